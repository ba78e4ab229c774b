"""Tokenizer and loader throughput against their peers, in one process on the same data.

1. Encode images/s: our VQGAN (jit, f32, NHWC) against diffusers' VQModel (torch CPU, f32, NCHW,
   `torch.inference_mode`) with the same config and the same random weights, batch `--batch`:
   the full aMUSEd-256 tokenizer (256 px -> 16x16 tokens, K=8192) unless `--config tiny`.
2. Loader tokens/s: our ArrayRecord shards read through grain (shuffled, batched, as training
   reads them) against LVM's JSONL read the way EasyLM does (json.loads + base64 decode per line,
   batched in numpy), the same 4096-token sentences.

  .venv/bin/python benchmarks/tokenizer.py [--config amused|tiny] [--batch 4] [--repeats 5]
      [--records 16384] [--only encode|loader] [--out F.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine  # noqa: E402

machine.prepare()  # launch.py's CPU flags; --isa AVX2 holds XLA, torch and numpy to AVX2
import numpy as np  # noqa: E402

CONFIGS = {
    'amused': dict(block_out_channels=[128, 256, 256, 512, 768], layers_per_block=2, latent_channels=64,
                   num_vq_embeddings=8192, norm_num_groups=32, sample_size=16),
    'tiny': dict(block_out_channels=[32, 64, 64], layers_per_block=1, latent_channels=16,
                 num_vq_embeddings=512, norm_num_groups=8, sample_size=8),
}


def median_rate(fn, items: int, repeats: int) -> tuple[float, list[float]]:
  fn()  # warm-up / compile
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return items / float(np.median(times)), [items / t for t in times]


def encode_benchmark(name: str, batch: int, repeats: int) -> dict:
  import jax
  import torch
  from diffusers import VQModel
  from flax import nnx
  from lvm.tokenizer import VQGAN
  from lvm.tokenizer_weights import config_from_diffusers, tokenizer_params
  kwargs = dict(CONFIGS[name], in_channels=3, out_channels=3, mid_block_add_attention=False,
                down_block_types=['DownEncoderBlock2D'] * len(CONFIGS[name]['block_out_channels']),
                up_block_types=['UpDecoderBlock2D'] * len(CONFIGS[name]['block_out_channels']))
  torch.manual_seed(0)
  reference = VQModel(**kwargs).eval()
  config = config_from_diffusers(kwargs, name)
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: VQGAN(config, nnx.Rngs(0))))
  params = tokenizer_params({k: v.numpy() for k, v in reference.state_dict().items()}, nnx.to_pure_dict(abstract),
                            config, name)
  images = np.random.default_rng(0).uniform(0, 1, (batch, config.image_size, config.image_size, 3)).astype(np.float32)
  # On the device once, as the tokenize job holds them: numpy parameters (146 M for aMUSEd, most of them
  # the decoder's) would be converted on every call, which cost 8-10% of ours in this benchmark.
  params = jax.device_put(params)
  ours_fn = jax.jit(lambda p, x: nnx.merge(graphdef, p).encode(x))
  ours = median_rate(lambda: ours_fn(params, images).block_until_ready(), batch, repeats)
  torch_images = torch.tensor(images.transpose(0, 3, 1, 2) * 2 - 1)

  def theirs_fn():
    with torch.inference_mode():
      latents = reference.encode(torch_images).latents
      return reference.quantize(latents)[2][2]
  theirs = median_rate(theirs_fn, batch, repeats)
  same = np.array_equal(np.asarray(ours_fn(params, images)).reshape(-1), theirs_fn().numpy().reshape(-1))
  return {'config': name, 'batch': batch, 'image_size': config.image_size, 'ours_images_per_s': ours[0],
          'diffusers_images_per_s': theirs[0], 'ratio': ours[0] / theirs[0], 'runs_ours': ours[1],
          'runs_diffusers': theirs[1], 'identical_tokens': bool(same), 'torch_threads': torch.get_num_threads()}


def loader_benchmark(records: int, seq_len: int, batch: int, repeats: int) -> dict:
  import base64
  from data_pipelines.token_formats import encode_lvm_jsonl_line
  from data_pipelines.token_loader import token_batches
  from data_pipelines.token_records import TokenRecordSource, find_shards, write_token_shards
  tokens = np.random.default_rng(0).integers(0, 8192, (records, seq_len)).astype(np.int32)
  with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    shards = write_token_shards(tokens, tmp / 'shards', seq_len=seq_len, vocab_size=8292, records_per_shard=1024)
    bytes_per_record = sum(p.stat().st_size for p in shards) / records
    (tmp / 'sentences.jsonl').write_text(''.join(encode_lvm_jsonl_line(t) + '\n' for t in tokens))
    steps = records // batch

    def ours():
      source = TokenRecordSource(find_shards(tmp / 'shards'), seq_len=seq_len, vocab_size=8292)
      iterator = token_batches(source, global_batch=batch, seed=0)
      for _ in range(steps):
        next(iterator)

    def easylm():  # EasyLM's JsonDataset: one json.loads per line, then decode and batch
      rows = []
      with open(tmp / 'sentences.jsonl') as f:
        for line in f:
          rows.append(np.frombuffer(base64.b64decode(json.loads(line)['tokens']), dtype=np.int32))
          if len(rows) == batch:
            np.stack(rows)
            rows = []
    n = steps * batch * seq_len
    a, b = median_rate(ours, n, repeats), median_rate(easylm, n, repeats)
  return {'records': records, 'seq_len': seq_len, 'batch': batch, 'bytes_per_record': bytes_per_record,
          'ours_tokens_per_s': a[0],
          'jsonl_tokens_per_s': b[0], 'ratio': a[0] / b[0], 'runs_ours': a[1], 'runs_jsonl': b[1]}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--config', default='amused', choices=sorted(CONFIGS))
  parser.add_argument('--batch', type=int, default=4)
  parser.add_argument('--repeats', type=int, default=5)
  # Enough records for a realistic shuffle: grain's index_shuffle costs ~30 us per record over
  # 1,024 records but ~4 us over 16K or more (its permutation is built for large data sets).
  parser.add_argument('--records', type=int, default=16384)
  parser.add_argument('--only', choices=['encode', 'loader'], help='run one of the two benchmarks')
  parser.add_argument('--out')
  machine.add_isa_argument(parser)
  args = parser.parse_args()
  machine.say(machine.describe())
  result = {'machine': machine.describe()}
  if args.only in (None, 'encode'):
    e = result['encode'] = encode_benchmark(args.config, args.batch, args.repeats)
    print(f"encode {e['config']} batch {e['batch']}: ours {e['ours_images_per_s']:.2f} img/s, diffusers "
          f"{e['diffusers_images_per_s']:.2f} img/s, ratio {e['ratio']:.2f} (identical tokens: {e['identical_tokens']})")
  if args.only in (None, 'loader'):
    l = result['loader'] = loader_benchmark(args.records, 4096, 8, args.repeats)
    print(f"loader ({l['records']} records, {l['bytes_per_record'] / 1024:.1f} KB each on disk): ours "
          f"{l['ours_tokens_per_s'] / 1e6:.1f} M tokens/s, EasyLM-style JSONL {l['jsonl_tokens_per_s'] / 1e6:.1f} "
          f"M tokens/s, ratio {l['ratio']:.2f}")
  if args.out:
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == '__main__':
  main()
