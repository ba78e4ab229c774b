"""Perplexity as LVM computes it (`eval_perplexity.py`): one forward pass over context + target
images, exp(mean NLL over the target tokens) per example, then the mean over examples."""
from __future__ import annotations

from core.errors import ConfigError

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from core.progress import bar
from core.sharding import activation_sharding, logical_to_spec
from lvm.task import next_token_nll


@functools.lru_cache(maxsize=8)
def _target_nll_fn(graphdef, mesh, rules, target_tokens: int):
  """One jitted scorer per model and mesh: `lvm eval` scores all records and then each task kind,
  which compiled the same forward once per call before."""
  # Replicated output: every process can read all of it (a batch-sharded result would span
  # devices that other hosts own, which device_get cannot fetch on a pod).
  @functools.partial(jax.jit, out_shardings=NamedSharding(mesh, P()))
  def target_nll(params, tokens_bt):
    with activation_sharding(mesh, rules):
      nll = next_token_nll(nnx.merge(graphdef, params)(tokens_bt), tokens_bt)
    return jnp.mean(nll[:, -target_tokens:], axis=-1)  # [b]: mean NLL of the target tokens
  return target_nll


def perplexity(graphdef, params, source, *, mesh, rules, target_tokens: int, batch_size: int,
               progress: bool = True) -> dict:
  """Scores every record of `source` in order; the last batch is padded and its padding ignored."""
  seq_len = len(source[0])
  if not 1 <= target_tokens < seq_len:
    raise ConfigError(f'target tokens must be in [1, {seq_len - 1}], got {target_tokens}')
  batch_sharding = NamedSharding(mesh, logical_to_spec(('batch', 'act_seq'), rules))
  batch_ways = mesh.shape['data'] * mesh.shape['fsdp']
  if batch_size % batch_ways:
    raise ConfigError(f'eval batch {batch_size} must be a multiple of data x fsdp = {batch_ways}')

  target_nll = _target_nll_fn(graphdef, mesh, tuple(rules), target_tokens)
  per_example = []
  indices = np.arange(len(source))
  batches = range(0, len(source), batch_size)
  batches = bar(batches, unit='batch', desc='eval', enabled=progress)
  for start in batches:
    rows = indices[start:start + batch_size]
    tokens = np.stack([source[i] for i in rows])
    pad = batch_size - len(rows)
    if pad:
      tokens = np.concatenate([tokens, np.repeat(tokens[-1:], pad, axis=0)])
    # Every host holds the same rows; each places only its own devices' share of them.
    tokens = jax.make_array_from_callback(tokens.shape, batch_sharding, lambda index: tokens[index])
    per_example.append(np.asarray(jax.device_get(target_nll(params, tokens)))[:len(rows)])
  nll = np.concatenate(per_example)
  return {'perplexity': float(np.mean(np.exp(nll))),  # LVM: mean over examples of exp(mean NLL)
          'corpus_perplexity': float(math.exp(np.mean(nll))),
          'mean_nll': float(np.mean(nll)), 'examples': int(len(nll)), 'target_tokens': target_tokens}
