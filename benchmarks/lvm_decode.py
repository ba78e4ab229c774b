"""Decode speed of the LVM against transformers' `generate` on torch CPU, in one process.

Config: the 33.8M decoder of benchmarks/lvm_train.py (vocab 8292, hidden 512, 8 layers, 8 heads),
random weights shared by both sides, a 1024-token context, `--new` greedy tokens, batch 1 and 8.
Rows: ours with the KV cache (f32 and bf16 weights + cache), ours without a cache (the full
forward over the growing sequence for every token, the cost the cache removes), and transformers'
`generate(do_sample=False)` (which uses its own KV cache). Tokens/s = batch · new / median time.
The memory-bandwidth fraction of each cached row = (weight bytes + KV-cache bytes read per step) ×
steps/s against a copy bandwidth measured here (numpy copy of a 1 GiB array: read + write).

  .venv/bin/python benchmarks/lvm_decode.py [--new 64] [--repeats 3] [--out F.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine  # noqa: E402

machine.prepare()  # launch.py's CPU flags; --isa AVX2 holds XLA, torch and numpy to AVX2
import numpy as np  # noqa: E402

VOCAB, HIDDEN, FFN, LAYERS, HEADS, CONTEXT = 8292, 512, 1376, 8, 8, 1024


def median_seconds(fn, repeats: int) -> tuple[float, list[float]]:
  return machine.timed_runs(fn, repeats, warmup=1)


def copy_bandwidth() -> float:
  """Bytes/s moved by a large numpy copy (each byte read once and written once)."""
  a = np.ones(1 << 27, np.float64)  # 1 GiB
  b = np.empty_like(a)
  seconds, _ = median_seconds(lambda: np.copyto(b, a), 5)
  return 2 * a.nbytes / seconds


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--new', type=int, default=64)
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--out')
  machine.add_isa_argument(parser)
  args = parser.parse_args()
  machine.say(machine.describe())

  import jax
  import jax.numpy as jnp
  import torch
  import transformers
  from flax import nnx
  from lvm.model import Decoder
  from lvm.model_config import DecoderConfig
  from lvm.sampling import generate

  config = DecoderConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_layers=LAYERS,
                         num_heads=HEADS, num_kv_heads=HEADS, max_seq_len=CONTEXT + args.new, attention_block=0)
  model = Decoder(config, nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  params = jax.device_get(nnx.to_pure_dict(state))
  weight_bytes = {dtype: sum(np.asarray(v).size for v in jax.tree.leaves(params)) * np.dtype(dtype).itemsize
                  for dtype in ('float32', 'float16')}

  # transformers with the same weights (our export path), f32, its own KV cache.
  from lvm.hf_interop import hf_config_from_decoder, hf_tensors as tensors_of
  hf_settings = {k: v for k, v in hf_config_from_decoder(config, 'float32').items()
                 if k not in ('architectures', 'model_type', 'torch_dtype')}
  hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_settings)).eval()
  hf.load_state_dict({name: torch.tensor(np.ascontiguousarray(value)) for name, value in tensors_of(params, config)},
                     strict=True)
  bandwidth = copy_bandwidth()
  rows = []
  for batch in (1, 8):
    prompt = np.random.default_rng(batch).integers(0, VOCAB, (batch, CONTEXT)).astype(np.int32)
    lengths = jnp.full(batch, CONTEXT, jnp.int32)
    outputs = {}
    for dtype in ('float32', 'bfloat16'):
      run = lambda: generate(params, config, jnp.asarray(prompt), lengths, new_tokens=args.new, dtype=dtype).block_until_ready()
      seconds, times = median_seconds(run, args.repeats)
      outputs[dtype] = np.asarray(generate(params, config, jnp.asarray(prompt), lengths, new_tokens=args.new, dtype=dtype))
      itemsize = 4 if dtype == 'float32' else 2
      cache_bytes = 2 * LAYERS * batch * HIDDEN * (CONTEXT + args.new) * itemsize  # k and v, whole cache
      read_per_step = weight_bytes['float32' if itemsize == 4 else 'float16'] + cache_bytes
      rows.append({'batch': batch, 'method': f'ours, KV cache, {dtype}', 'tokens_per_s': batch * args.new / seconds,
                   'runs_s': times, 'bandwidth_fraction': read_per_step * args.new / seconds / bandwidth})

    forward = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t)[:, -1])

    def no_cache():  # the full forward over the whole sequence for every new token (shapes grow)
      tokens = jnp.asarray(prompt)
      for _ in range(min(args.new, 8)):
        tokens = jnp.concatenate([tokens, jnp.argmax(forward(params, tokens), -1)[:, None].astype(jnp.int32)], 1)
      return tokens.block_until_ready()
    no_cache()  # compile every length once
    seconds, times = median_seconds(no_cache, args.repeats)
    rows.append({'batch': batch, 'method': 'ours, no cache (full forward per token)',
                 'tokens_per_s': batch * min(args.new, 8) / seconds, 'runs_s': times})

    def theirs():
      with torch.no_grad():
        return hf.generate(torch.tensor(prompt, dtype=torch.long), max_new_tokens=args.new, min_new_tokens=args.new,
                           do_sample=False, pad_token_id=0)
    seconds, times = median_seconds(theirs, args.repeats)
    rows.append({'batch': batch, 'method': 'transformers generate, f32', 'tokens_per_s': batch * args.new / seconds,
                 'runs_s': times})
    same = np.array_equal(theirs()[:, CONTEXT:].numpy(), outputs['float32'])
    rows[-1]['same_tokens_as_ours_f32'] = bool(same)

  result = {'machine': machine.describe(), 'config': dict(vocab=VOCAB, hidden=HIDDEN, ffn=FFN, layers=LAYERS, heads=HEADS,
                                                         context=CONTEXT, new_tokens=args.new),
            'copy_bandwidth_gb_s': bandwidth / 1e9, 'torch_threads': torch.get_num_threads(), 'rows': rows}
  for batch in (1, 8):
    theirs = next(r['tokens_per_s'] for r in rows if r['batch'] == batch and r['method'].startswith('transformers'))
    for r in rows:
      if r['batch'] == batch:
        r['ratio_to_transformers'] = r['tokens_per_s'] / theirs
        print(f"batch {batch}  {r['method']:<42} {r['tokens_per_s']:8.1f} tokens/s  x{r['ratio_to_transformers']:.2f}"
              + (f"  bandwidth {r['bandwidth_fraction']:.0%}" if 'bandwidth_fraction' in r else ''))
  if args.out:
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == '__main__':
  main()
