"""KV-cache decoding: logits with and without the cache agree; greedy decoding of imported Hugging
Face weights equals transformers' generate(do_sample=False) token for token (MHA and grouped KV);
sampling is reproducible from its seed and never leaves the allowed ids."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from lvm import commands
from lvm.sampling import forward_with_cache, generate, init_cache, left_pad, split_layers
from tests.helpers import CPU8
from tests.test_hf_interop import CONFIGS, _hf_model


def _imported(kind, tmp_path):
  hf = _hf_model(kind, tmp_path)
  commands.import_hf_command(str(tmp_path / 'hf'), str(tmp_path / 'work'), CPU8, seq_len=128)
  config, _ = commands.load_run_config(tmp_path / 'work')
  graphdef, params, mesh, preset, _ = commands.restore_params(tmp_path / 'work', config, CPU8)
  return hf, config.model, graphdef, jax.device_get(params)


@pytest.mark.parametrize('kind', sorted(CONFIGS))
def test_cached_logits_equal_full_forward_and_greedy_equals_transformers(kind, tmp_path):
  hf, config, graphdef, params = _imported(kind, tmp_path)
  tokens = np.random.default_rng(3).integers(0, 300, (2, 24)).astype(np.int32)
  full = np.asarray(nnx.merge(graphdef, params)(jnp.asarray(tokens)))

  # Prefill 16 tokens, then feed the remaining 8 one at a time through the cache.
  cache = init_cache(config, 2, 24, jnp.float32)
  pad = jnp.zeros(2, jnp.int32)
  step = jax.jit(lambda c, t, s: forward_with_cache(split_layers(params), config, c, t, s, pad))
  logits, cache = step(cache, tokens[:, :16], 0)
  pieces = [np.asarray(logits)]
  for i in range(16, 24):
    logits, cache = step(cache, tokens[:, i:i + 1], i)
    pieces.append(np.asarray(logits))
  np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, atol=1e-5, rtol=0)

  prompt = tokens[:, :10]
  with torch.no_grad():
    expected = hf.generate(torch.tensor(prompt, dtype=torch.long), max_new_tokens=20, do_sample=False,
                           min_new_tokens=20, pad_token_id=0)[:, 10:].numpy()
  ours = np.asarray(generate(params, config, jnp.asarray(prompt), jnp.full(2, 10, jnp.int32), new_tokens=20))
  np.testing.assert_array_equal(ours, expected)


def test_prompts_of_different_lengths_decode_as_if_alone(tmp_path):
  _, config, _, params = _imported('grouped_kv', tmp_path)
  rng = np.random.default_rng(4)
  prompts = [rng.integers(0, 300, n).astype(np.int32) for n in (5, 12, 9)]
  batch, lengths = left_pad(prompts)
  together = np.asarray(generate(params, config, jnp.asarray(batch), jnp.asarray(lengths), new_tokens=12))
  for row, prompt in enumerate(prompts):
    alone = np.asarray(generate(params, config, jnp.asarray(prompt[None]), jnp.asarray([len(prompt)]), new_tokens=12))
    np.testing.assert_array_equal(together[row], alone[0])


def test_sampling_is_seeded_and_stays_in_the_allowed_ids(tmp_path):
  _, config, _, params = _imported('mha', tmp_path)
  prompt = jnp.asarray(np.random.default_rng(5).integers(0, 300, (4, 8)), jnp.int32)
  lengths = jnp.full(4, 8, jnp.int32)
  draw = lambda seed, **kw: np.asarray(generate(params, config, prompt, lengths, new_tokens=32,
                                                key=jax.random.key(seed), temperature=1.0, **kw))
  a, b, c = draw(0), draw(0), draw(1)
  np.testing.assert_array_equal(a, b)
  assert (a != c).any()
  allowed = jnp.arange(100)
  limited = draw(0, allowed_ids=allowed, top_k=20, top_p=0.9)
  assert limited.max() < 100 and len(np.unique(limited)) > 5
  # One key per row: each row samples as it would alone with its key (a batch of prompts answers each
  # as one prompt would), and rows sharing a prompt and not a key draw differently.
  keys = jax.vmap(jax.random.key)(jnp.asarray([5, 6, 5, 7]))
  rows = np.asarray(generate(params, config, prompt, lengths, new_tokens=32, key=keys, temperature=1.0, top_p=0.9))
  for row, seed in enumerate((5, 6, 5, 7)):
    alone = generate(params, config, prompt[row:row + 1], lengths[:1], new_tokens=32, key=jax.random.key(seed),
                     temperature=1.0, top_p=0.9)
    np.testing.assert_array_equal(rows[row], np.asarray(alone)[0])
  same_prompt = jnp.repeat(prompt[:1], 2, axis=0)
  two = np.asarray(generate(params, config, same_prompt, lengths[:2], new_tokens=32, key=keys[:2], temperature=1.0))
  assert (two[0] != two[1]).any()
  # top-k 1 is greedy whatever the temperature.
  greedy = np.asarray(generate(params, config, prompt, lengths, new_tokens=32))
  np.testing.assert_array_equal(draw(7, top_k=1), greedy)


@pytest.mark.parametrize('setting, named', [(dict(temperature=-1.0), 'temperature'),
                                            (dict(temperature=float('nan')), 'temperature'),
                                            (dict(temperature=float('inf')), 'temperature'),
                                            (dict(temperature=1.0, top_p=0.0), 'top_p'),
                                            (dict(temperature=1.0, top_p=1.5), 'top_p'),
                                            (dict(temperature=1.0, top_k=-1), 'top_k'),
                                            (dict(temperature=1.0, top_k=301), 'top_k')])
def test_bad_sampling_settings_are_refused_by_name_before_compiling(setting, named):
  from core.errors import ConfigError
  from lvm.model_config import DecoderConfig
  config = DecoderConfig(vocab_size=300, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                         num_kv_heads=2, max_seq_len=32)
  prompt = jnp.zeros((1, 4), jnp.int32)
  with pytest.raises(ConfigError, match=named):
    generate({}, config, prompt, jnp.full(1, 4, jnp.int32), new_tokens=2, **setting)
