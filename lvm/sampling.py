"""Autoregressive decoding with a preallocated KV cache, as one compiled program per call.

`generate(params, config, prompts_bt, prompt_lengths_b, new_tokens, ...)`: a prefill writes the keys
and values of every prompt into the cache (per layer [b, kv_heads, S, e]); a `lax.fori_loop` then appends one
token per step, attending over the cache with a mask. Prompts of different lengths share a batch by
left padding: row b's tokens occupy cache slots [pad_b, ...), its RoPE positions start at 0 at its
first real token, and slots before pad_b are masked out of every softmax.

The functions work on the Decoder's parameter dict (the layer-stacked tree the engine checkpoints),
so no module state is mutated; the cache carries the logical axes ('batch', 'act_kv_heads', ...) and
is sharded over the mesh like the activations of training. `dtype='bfloat16'` casts the
weights once before the loop and keeps the cache in bf16 (decoding is memory-bound: half the bytes
read per token).

Sampling: temperature 0 is greedy; otherwise logits / temperature, then top-k and top-p (nucleus)
filtering, then a categorical draw from `jax.random.fold_in(key, step)`: a fixed seed reproduces the
output. `allowed_ids` (e.g. the image codes 0..K-1) masks every other id, so special tokens are never
emitted inside an image.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from core.sharding import constrain
from lvm.model import apply_rope, rope_tables
from lvm.model_config import DecoderConfig


def _rms(x, scale, eps):
  x32 = x.astype(jnp.float32)
  return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype) * scale.astype(x.dtype)


def split_layers(params: dict) -> dict:
  """The layer-stacked parameter tree with `blocks` as a list of per-layer trees, sliced once.

  Decoding reads every weight once per token; slicing layer i out of the stacked arrays inside the
  token loop would copy each layer's weights on every token (three passes over them instead of one).
  """
  num_layers = jax.tree.leaves(params['blocks'])[0].shape[0]
  return {**params, 'blocks': [jax.tree.map(lambda p: p[i], params['blocks']) for i in range(num_layers)]}


def init_cache(config: DecoderConfig, batch: int, length: int, dtype) -> dict:
  """Per-layer key and value caches [b, kv_heads, S, e]: separate buffers, each updated in place."""
  shape = (batch, config.num_kv_heads, length, config.head_dim)
  axes = ('batch', 'act_kv_heads', None, None)
  return {name: [constrain(jnp.zeros(shape, dtype), axes) for _ in range(config.num_layers)]
          for name in ('k', 'v')}


def forward_with_cache(params: dict, config: DecoderConfig, cache: dict, tokens_bt, slot_start, pad_b):
  """Runs `tokens_bt` (cache slots slot_start .. slot_start+t-1) through the decoder, writing their
  keys/values into the cache. `params` from `split_layers`. Returns (logits [b, t, v] float32, cache).

  The layers are unrolled (a Python loop): each has its own weight and cache buffers, so a decode
  step reads each weight once and writes only the new cache slots."""
  dtype = cache['k'][0].dtype
  b, t = tokens_bt.shape
  slots_t = slot_start + jnp.arange(t)
  positions_bt = jnp.maximum(slots_t[None, :] - pad_b[:, None], 0)
  cos, sin = rope_tables(positions_bt, config.head_dim, config.rope_theta)
  length = cache['k'][0].shape[2]
  key_slots = jnp.arange(length)
  # [b, 1, 1, t, S]: a query at slot i sees key slots pad_b <= j <= i. Padding queries see only
  # themselves, so their (unused) keys and values stay finite: a 0 weight times NaN would not be 0.
  causal = key_slots[None, None, :] <= slots_t[None, :, None]
  real = key_slots[None, None, :] >= pad_b[:, None, None]
  itself = key_slots[None, None, :] == slots_t[None, :, None]
  visible = (causal & (real | itself))[:, None, None]
  x = jnp.take(params['embed'].astype(dtype), tokens_bt, axis=0)  # [b, t, d]
  heads_per_kv = config.num_heads // config.num_kv_heads
  axes = ('batch', 'act_kv_heads', None, None)
  new_k, new_v = [], []
  for block, cache_k, cache_v in zip(params['blocks'], cache['k'], cache['v']):
    attn, mlp = block['attention'], block['mlp']
    h = _rms(x, block['attention_norm']['scale'], config.rms_eps)
    q = jnp.einsum('btd,dhe->bhte', h, attn['q_proj'].astype(dtype))
    k = jnp.einsum('btd,dke->bkte', h, attn['k_proj'].astype(dtype))
    v = jnp.einsum('btd,dke->bkte', h, attn['v_proj'].astype(dtype))
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    cache_k = constrain(jax.lax.dynamic_update_slice(cache_k, k.astype(dtype), (0, 0, slot_start, 0)), axes)
    cache_v = constrain(jax.lax.dynamic_update_slice(cache_v, v.astype(dtype), (0, 0, slot_start, 0)), axes)
    new_k.append(cache_k)
    new_v.append(cache_v)
    q = q.reshape(b, config.num_kv_heads, heads_per_kv, t, config.head_dim) * jnp.asarray(
        config.head_dim ** -0.5, dtype)
    scores = jnp.einsum('bkgte,bkse->bkgts', q, cache_k, preferred_element_type=jnp.float32)
    scores = jnp.where(visible, scores, -jnp.inf)
    weights = jax.nn.softmax(scores, axis=-1).astype(dtype)
    out = jnp.einsum('bkgts,bkse->bkgte', weights, cache_v, preferred_element_type=jnp.float32).astype(dtype)
    out = out.reshape(b, config.num_heads, t, config.head_dim)
    x = x + jnp.einsum('bhte,hed->btd', out, attn['o_proj'].astype(dtype))
    h = _rms(x, block['mlp_norm']['scale'], config.rms_eps)
    hidden = jax.nn.silu(h @ mlp['gate_proj'].astype(dtype)) * (h @ mlp['up_proj'].astype(dtype))
    x = x + hidden @ mlp['down_proj'].astype(dtype)
  x = _rms(x, params['final_norm']['scale'], config.rms_eps)
  logits = jnp.dot(x, params['lm_head'].astype(dtype), preferred_element_type=jnp.float32)
  return logits, {'k': new_k, 'v': new_v}


def check_sampling(temperature: float, top_k: int, top_p: float, vocab_size: int) -> None:
  """Sampling settings checked by name before anything compiles: a negative temperature would flip
  the distribution (and turn a frame into NaN pixels), a top-p above 1 or top-k above the vocabulary
  would silently mean "no filter"."""
  from core.errors import ConfigError
  if not 0 <= temperature < float('inf'):  # also refuses NaN; inf turns the masked ids' -inf into NaN
    raise ConfigError(f'temperature must be a finite number >= 0 (0 is greedy), got {temperature}')
  if not 0 <= top_k <= vocab_size:
    raise ConfigError(f'top_k must be in [0, {vocab_size}] (0 keeps every id), got {top_k}')
  if not 0 < top_p <= 1:
    raise ConfigError(f'top_p must be in (0, 1] (1 keeps every id), got {top_p}')


def sample_logits(logits_bv, keys_b, temperature: float, top_k: int, top_p: float, allowed_mask_v):
  """One id per row: greedy at temperature 0, else temperature / top-k / top-p sampling, row b drawn
  with keys_b[b] alone (so a row's ids do not depend on the rows batched beside it)."""
  logits_bv = jnp.where(allowed_mask_v[None, :], logits_bv, -jnp.inf)
  if temperature == 0:
    return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
  logits_bv = logits_bv / temperature
  if top_k:
    kth = jax.lax.top_k(logits_bv, top_k)[0][:, -1:]
    logits_bv = jnp.where(logits_bv < kth, -jnp.inf, logits_bv)
  if top_p < 1.0:
    sorted_desc = jnp.sort(logits_bv, axis=-1)[:, ::-1]
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_desc, axis=-1), axis=-1)
    # Keep the smallest set whose probability reaches top_p (the top id is always kept).
    cutoff_index = jnp.sum(cumulative < top_p, axis=-1, keepdims=True)
    cutoff = jnp.take_along_axis(sorted_desc, cutoff_index, axis=-1)
    logits_bv = jnp.where(logits_bv < cutoff, -jnp.inf, logits_bv)
  return jax.vmap(jax.random.categorical)(keys_b, logits_bv).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=('config', 'new_tokens', 'temperature', 'top_k', 'top_p', 'dtype',
                                             'cache_length'))
def generate(params: dict, config: DecoderConfig, prompts_bt, prompt_lengths_b, *, new_tokens: int,
             key=None, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, allowed_ids=None,
             dtype: str = 'float32', cache_length: int | None = None):
  """Continues left-padded prompts [b, T] (real lengths `prompt_lengths_b`) by `new_tokens` ids.
  `key`: one random key for every row, or one per row ([b]: row b samples as it would alone).

  Returns int32 [b, new_tokens]. One jitted program: prefill, then a fori_loop of decode steps.
  """
  check_sampling(temperature, top_k, top_p, config.vocab_size)  # static: runs once, at trace time
  b, prompt_len = prompts_bt.shape
  length = cache_length or prompt_len + new_tokens
  dtype = jnp.dtype(dtype)
  params = split_layers(jax.tree.map(lambda p: p.astype(dtype), params))
  pad_b = (prompt_len - prompt_lengths_b).astype(jnp.int32)
  key = jax.random.key(0) if key is None else key
  keys_b = jnp.broadcast_to(key, (b,)) if key.ndim == 0 else key
  fold_b = jax.vmap(jax.random.fold_in, in_axes=(0, None))  # token i's keys, one per row
  allowed = (jnp.ones((config.vocab_size,), bool) if allowed_ids is None
             else jnp.zeros((config.vocab_size,), bool).at[allowed_ids].set(True))
  cache = init_cache(config, b, length, dtype)
  logits, cache = forward_with_cache(params, config, cache, prompts_bt, jnp.int32(0), pad_b)
  first = sample_logits(logits[:, -1], fold_b(keys_b, 0), temperature, top_k, top_p, allowed)
  out = jnp.zeros((b, new_tokens), jnp.int32).at[:, 0].set(first)

  def step(i, carry):
    out, cache = carry
    previous = jax.lax.dynamic_slice_in_dim(out, i - 1, 1, axis=1)
    logits, cache = forward_with_cache(params, config, cache, previous, prompt_len + i - 1, pad_b)
    token = sample_logits(logits[:, -1], fold_b(keys_b, i), temperature, top_k, top_p, allowed)
    return out.at[:, i].set(token), cache

  out, _ = jax.lax.fori_loop(1, new_tokens, step, (out, cache))
  return out


def left_pad(prompts: list, pad_id: int = 0):
  """Token lists of different lengths -> (int32 [b, max_len] left-padded, int32 lengths [b])."""
  import numpy as np
  longest = max(len(p) for p in prompts)
  out = np.full((len(prompts), longest), pad_id, np.int32)
  for row, prompt in enumerate(prompts):
    out[row, longest - len(prompt):] = prompt
  return out, np.asarray([len(p) for p in prompts], np.int32)
