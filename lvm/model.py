"""LLaMA-style decoder in Flax NNX: RMSNorm, RoPE, SwiGLU, grouped-KV attention, untied embeddings.

Shapes use dimension letters: b batch, t/s query/key positions, d hidden, h query heads,
k key/value heads, g queries per kv head (h = k·g), e head dim, f SwiGLU width, v vocab, l layers.
Parameters are float32 by default and cast to `compute_dtype` where they are used. Layout follows
Hugging Face LlamaForCausalLM (RoPE in rotate-half form), so released weights load without permutation.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from core.sharding import constrain
from lvm.model_config import DecoderConfig

nnx.use_eager_sharding(False)  # shard by the preset's rules at init time, not by a global mesh

_REMAT_POLICIES = {
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots_saveable': jax.checkpoint_policies.dots_saveable,
    'dots_with_no_batch_dims_saveable': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _param(rngs: nnx.Rngs, config: DecoderConfig, shape, logical_axes) -> nnx.Param:
  init = nnx.initializers.normal(config.init_std)
  return nnx.Param(init(rngs.params(), shape, jnp.dtype(config.param_dtype)), out_sharding=logical_axes)


class RMSNorm(nnx.Module):

  def __init__(self, dim: int, config: DecoderConfig):
    self.scale = nnx.Param(jnp.ones((dim,), jnp.dtype(config.param_dtype)), out_sharding=('norm',))
    self.eps = config.rms_eps

  def __call__(self, x_btd: jax.Array) -> jax.Array:
    x32 = x_btd.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return normed.astype(x_btd.dtype) * self.scale[...].astype(x_btd.dtype)


def rope_tables(positions_bt: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
  """cos/sin tables [b, t, 1, e] for rotate-half RoPE (frequencies as in HF Llama)."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  angles = positions_bt[..., None].astype(jnp.float32) * inv_freq  # [b, t, e/2]
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x_bthe: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  half = x_bthe.shape[-1] // 2
  rotated = jnp.concatenate([-x_bthe[..., half:], x_bthe[..., :half]], axis=-1)
  return (x_bthe * cos.astype(x_bthe.dtype) + rotated * sin.astype(x_bthe.dtype))


def causal_attention(q_bthe: jax.Array, k_bske: jax.Array, v_bske: jax.Array, block: int) -> jax.Array:
  """Causal softmax attention, computed in query blocks that only see keys up to their own end.

  The textbook version builds all t×t scores and masks half of them away; here query block i
  attends to keys [0, (i+1)·block), so the work above the diagonal is never done and the largest
  score tensor is block × t. Softmax runs in float32. Grouped KV heads are broadcast, not copied.
  """
  b, t, h, e = q_bthe.shape
  kv_heads = k_bske.shape[2]
  q_btkge = q_bthe.reshape(b, t, kv_heads, h // kv_heads, e) * (e ** -0.5)
  block = t if block <= 0 or block >= t else block
  if t % block:
    raise ValueError(f'sequence length {t} is not a multiple of attention_block {block}')
  outputs = []
  for start in range(0, t, block):
    end = start + block
    q_blk = q_btkge[:, start:end]
    scores = jnp.einsum('btkge,bske->bkgts', q_blk, k_bske[:, :end],
                        preferred_element_type=jnp.float32)
    # Only the last key block straddles the diagonal and needs a mask.
    query_pos = jnp.arange(start, end)[:, None]
    key_pos = jnp.arange(end)[None, :]
    scores = jnp.where(key_pos <= query_pos, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_bske.dtype)
    outputs.append(jnp.einsum('bkgts,bske->btkge', probs, v_bske[:, :end]))
  out = outputs[0] if len(outputs) == 1 else jnp.concatenate(outputs, axis=1)
  return out.reshape(b, t, h, e)


class Attention(nnx.Module):

  def __init__(self, config: DecoderConfig, rngs: nnx.Rngs):
    d, h, k, e = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
    self.config = config
    self.q_proj = _param(rngs, config, (d, h, e), ('embed', 'heads', 'head_dim'))
    self.k_proj = _param(rngs, config, (d, k, e), ('embed', 'kv_heads', 'head_dim'))
    self.v_proj = _param(rngs, config, (d, k, e), ('embed', 'kv_heads', 'head_dim'))
    self.o_proj = _param(rngs, config, (h, e, d), ('heads', 'head_dim', 'embed'))

  def __call__(self, x_btd: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    dtype = x_btd.dtype
    q = jnp.einsum('btd,dhe->bthe', x_btd, self.q_proj[...].astype(dtype))
    k = jnp.einsum('btd,dke->btke', x_btd, self.k_proj[...].astype(dtype))
    v = jnp.einsum('btd,dke->btke', x_btd, self.v_proj[...].astype(dtype))
    q = constrain(apply_rope(q, cos, sin), ('batch', 'act_seq', 'act_heads', None))
    k = constrain(apply_rope(k, cos, sin), ('batch', 'act_seq', 'act_kv_heads', None))
    v = constrain(v, ('batch', 'act_seq', 'act_kv_heads', None))
    out_bthe = causal_attention(q, k, v, self.config.attention_block)
    return jnp.einsum('bthe,hed->btd', out_bthe, self.o_proj[...].astype(dtype))


class SwiGLU(nnx.Module):

  def __init__(self, config: DecoderConfig, rngs: nnx.Rngs):
    d, f = config.hidden_size, config.intermediate_size
    self.gate_proj = _param(rngs, config, (d, f), ('embed', 'mlp'))
    self.up_proj = _param(rngs, config, (d, f), ('embed', 'mlp'))
    self.down_proj = _param(rngs, config, (f, d), ('mlp', 'embed'))

  def __call__(self, x_btd: jax.Array) -> jax.Array:
    dtype = x_btd.dtype
    gate = x_btd @ self.gate_proj[...].astype(dtype)
    up = x_btd @ self.up_proj[...].astype(dtype)
    hidden_btf = constrain(jax.nn.silu(gate) * up, ('batch', 'act_seq', 'act_mlp'))
    return hidden_btf @ self.down_proj[...].astype(dtype)


class DecoderBlock(nnx.Module):

  def __init__(self, config: DecoderConfig, rngs: nnx.Rngs):
    self.attention_norm = RMSNorm(config.hidden_size, config)
    self.attention = Attention(config, rngs)
    self.mlp_norm = RMSNorm(config.hidden_size, config)
    self.mlp = SwiGLU(config, rngs)

  def __call__(self, x_btd: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    x_btd = x_btd + self.attention(self.attention_norm(x_btd), cos, sin)
    x_btd = x_btd + self.mlp(self.mlp_norm(x_btd))
    return constrain(x_btd, ('batch', 'act_seq', 'act_embed'))


class Decoder(nnx.Module):
  """tokens [b, t] int32 -> logits [b, t, v] float32. Blocks are stacked on a leading `layers` axis
  and run with `nnx.scan`, so compile time does not grow with depth."""

  def __init__(self, config: DecoderConfig, rngs: nnx.Rngs):
    self.config = config
    self.embed = _param(rngs, config, (config.vocab_size, config.hidden_size), ('vocab', 'embed'))

    @nnx.split_rngs(splits=config.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: 'layers'})
    def make_blocks(rngs):
      return DecoderBlock(config, rngs)

    self.blocks = make_blocks(rngs)
    self.final_norm = RMSNorm(config.hidden_size, config)
    self.lm_head = _param(rngs, config, (config.hidden_size, config.vocab_size), ('embed', 'vocab'))

  def __call__(self, tokens_bt: jax.Array, positions_bt: jax.Array | None = None) -> jax.Array:
    config = self.config
    dtype = jnp.dtype(config.compute_dtype)
    if positions_bt is None:
      positions_bt = jnp.broadcast_to(jnp.arange(tokens_bt.shape[1]), tokens_bt.shape)
    cos, sin = rope_tables(positions_bt, config.head_dim, config.rope_theta)
    x_btd = jnp.take(self.embed[...], tokens_bt, axis=0).astype(dtype)
    x_btd = constrain(x_btd, ('batch', 'act_seq', 'act_embed'))

    def run_block(block, x):
      return block(x, cos, sin)

    if config.remat_policy != 'none':
      run_block = nnx.remat(run_block, policy=_REMAT_POLICIES[config.remat_policy])

    @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry,
              transform_metadata={nnx.PARTITION_NAME: 'layers'})
    def scan_blocks(block, x):
      return run_block(block, x)

    x_btd = scan_blocks(self.blocks, x_btd)
    x_btd = self.final_norm(x_btd)
    logits_btv = jnp.einsum('btd,dv->btv', x_btd, self.lm_head[...].astype(dtype),
                            preferred_element_type=jnp.float32)
    return constrain(logits_btv, ('batch', 'act_seq', 'act_vocab'))
