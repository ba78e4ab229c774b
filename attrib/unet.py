"""Text-conditioned U-Net in Flax NNX with the layout of diffusers' UNet2DConditionModel.

Module and attribute names follow diffusers, so a diffusers state dict maps onto this tree by
renaming `weight` (and transposing it): the released MSCOCO model of FastGDA loads directly.
Images are NHWC here (diffusers is NCHW). Parameters carry logical axis names: `channels` for the
output channels of convs and linears, `embed` for their inputs, replicated by default rules.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from attrib.unet_config import UNetConfig
from core.layers import conv as _conv, group_norm as _group_norm, linear as _linear, logical_sharding_only



def timestep_embedding(timesteps_b: jax.Array, dim: int) -> jax.Array:
  """Sinusoidal embedding as diffusers' Timesteps(dim, flip_sin_to_cos=True, freq_shift=0)."""
  half = dim // 2
  exponent = -math.log(10000) * jnp.arange(half, dtype=jnp.float32) / half
  angles = timesteps_b.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
  return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


class TimestepEmbedding(nnx.Module):

  def __init__(self, din, dim, rngs):
    self.linear_1 = _linear(rngs, din, dim)
    self.linear_2 = _linear(rngs, dim, dim)

  def __call__(self, x):
    return self.linear_2(jax.nn.silu(self.linear_1(x)))


def pointwise(conv: nnx.Conv, x_bhwc: jax.Array) -> jax.Array:
  """A 1x1 convolution as one [pixels, cin] x [cin, cout] matmul (same kernel, same result to
  float32 rounding). XLA:CPU's backward of a dense layer is slower when its input keeps [b, h, w] or
  [b, n] as separate axes than on the 2-D matrix; with this and the 2-D token stream below, the
  digits U-Net's train-step gradient took 381 instead of 404 ms at batch 64 (754 vs 835 at 128)."""
  b, h, w, c = x_bhwc.shape
  y = x_bhwc.reshape(b * h * w, c) @ conv.kernel[0, 0]
  return (y + conv.bias[...]).reshape(b, h, w, -1)


class ResnetBlock2D(nnx.Module):

  def __init__(self, cin, cout, config: UNetConfig, rngs):
    self.norm1 = _group_norm(rngs, cin, config.norm_num_groups, config.norm_eps)
    self.conv1 = _conv(rngs, cin, cout, 3)
    self.time_emb_proj = _linear(rngs, config.time_embed_dim, cout)
    self.norm2 = _group_norm(rngs, cout, config.norm_num_groups, config.norm_eps)
    self.conv2 = _conv(rngs, cout, cout, 3)
    self.conv_shortcut = _conv(rngs, cin, cout, 1) if cin != cout else None

  def __call__(self, x_bhwc, temb_bd):
    h = self.conv1(jax.nn.silu(self.norm1(x_bhwc)))
    h = h + self.time_emb_proj(jax.nn.silu(temb_bd))[:, None, None, :]
    h = self.conv2(jax.nn.silu(self.norm2(h)))
    shortcut = pointwise(self.conv_shortcut, x_bhwc) if self.conv_shortcut is not None else x_bhwc
    return shortcut + h


class Attention(nnx.Module):
  """Multi-head attention; `to_k`/`to_v` of the cross-attention (attn2) are what AbU unlearns.

  Tokens come and go as one [b·n, d] matrix (the projections are 2-D matmuls, see `pointwise`);
  only the score and value products see the [b, heads, n, e] layout."""

  def __init__(self, dim, context_dim, heads, rngs):
    self.heads = heads
    self.to_q = _linear(rngs, dim, dim, bias=False)
    self.to_k = _linear(rngs, context_dim, dim, bias=False)
    self.to_v = _linear(rngs, context_dim, dim, bias=False)
    self.to_out = _linear(rngs, dim, dim)

  def __call__(self, x_td, batch: int, context_bmc=None):
    """x_td: [b·n, d] tokens of `batch` images; context_bmc: [b, m, context_dim] (None: self-attention)."""
    d = x_td.shape[-1]
    context_td = x_td if context_bmc is None else context_bmc.reshape(-1, context_bmc.shape[-1])
    # Head-major [b, h, tokens, e] operands, q pre-scaled, softmax normalised after the PV product:
    # XLA:CPU otherwise fuses the scale and the normalisation into the batched dots as full
    # [b, h, n, m] tensors (7x slower at 64 tokens).
    split = lambda y: y.reshape(batch, -1, self.heads, d // self.heads).transpose(0, 2, 1, 3)
    q = split(self.to_q(x_td) * (1 / math.sqrt(d // self.heads)))
    k, v = split(self.to_k(context_td)), split(self.to_v(context_td))
    scores = jnp.einsum('bhne,bhme->bhnm', q, k)
    weights = jnp.exp(scores - jax.lax.stop_gradient(scores.max(axis=-1, keepdims=True)))
    out = jnp.einsum('bhnm,bhme->bhne', weights, v) / weights.sum(axis=-1)[..., None]
    return self.to_out(out.transpose(0, 2, 1, 3).reshape(-1, d))


class BasicTransformerBlock(nnx.Module):

  def __init__(self, dim, config: UNetConfig, rngs):
    self.norm1 = nnx.LayerNorm(dim, epsilon=1e-5, rngs=rngs)
    self.attn1 = Attention(dim, dim, config.num_attention_heads, rngs)
    self.norm2 = nnx.LayerNorm(dim, epsilon=1e-5, rngs=rngs)
    self.attn2 = Attention(dim, config.cross_attention_dim, config.num_attention_heads, rngs)
    self.norm3 = nnx.LayerNorm(dim, epsilon=1e-5, rngs=rngs)
    self.ff_in = _linear(rngs, dim, dim * 4 * 2)  # GEGLU: value and gate in one matmul
    self.ff_out = _linear(rngs, dim * 4, dim)

  def __call__(self, x_td, batch: int, context_bmc):
    """x_td: the residual stream as [b·n, d], so every dense layer's backward is a 2-D matmul
    (see `pointwise`)."""
    x_td = x_td + self.attn1(self.norm1(x_td), batch)
    x_td = x_td + self.attn2(self.norm2(x_td), batch, context_bmc)
    value, gate = jnp.split(self.ff_in(self.norm3(x_td)), 2, axis=-1)
    return x_td + self.ff_out(value * jax.nn.gelu(gate, approximate=False))


class Transformer2DModel(nnx.Module):

  def __init__(self, channels, config: UNetConfig, rngs):
    self.norm = _group_norm(rngs, channels, config.norm_num_groups, 1e-6)
    self.proj_in = _conv(rngs, channels, channels, 1)
    self.transformer_blocks = nnx.List([BasicTransformerBlock(channels, config, rngs)])
    self.proj_out = _conv(rngs, channels, channels, 1)

  def __call__(self, x_bhwc, context_bmc):
    b, h, w, c = x_bhwc.shape
    y = pointwise(self.proj_in, self.norm(x_bhwc)).reshape(b * h * w, c)
    for block in self.transformer_blocks:
      y = block(y, b, context_bmc)
    return x_bhwc + pointwise(self.proj_out, y.reshape(b, h, w, c))


class DownBlock(nnx.Module):
  """CrossAttnDownBlock2D (with attentions) or DownBlock2D (without)."""

  def __init__(self, cin, cout, cross_attention, add_downsample, config, rngs):
    n = config.layers_per_block
    self.resnets = nnx.List([ResnetBlock2D(cin if i == 0 else cout, cout, config, rngs) for i in range(n)])
    self.attentions = nnx.List([Transformer2DModel(cout, config, rngs) for _ in range(n)]) if cross_attention else None
    self.downsamplers = nnx.List([_conv(rngs, cout, cout, 3, stride=2)]) if add_downsample else None

  def __call__(self, x, temb, context):
    skips = []
    for i, resnet in enumerate(self.resnets):
      x = resnet(x, temb)
      if self.attentions is not None:
        x = self.attentions[i](x, context)
      skips.append(x)
    if self.downsamplers is not None:
      x = self.downsamplers[0](x)
      skips.append(x)
    return x, skips


class UpBlock(nnx.Module):
  """CrossAttnUpBlock2D or UpBlock2D: layers_per_block + 1 ResNets, each fed one skip."""

  def __init__(self, cin, cout, prev_cout, cross_attention, add_upsample, config, rngs):
    n = config.layers_per_block + 1
    resnets = []
    for i in range(n):
      skip = cin if i == n - 1 else cout
      resnets.append(ResnetBlock2D((prev_cout if i == 0 else cout) + skip, cout, config, rngs))
    self.resnets = nnx.List(resnets)
    self.attentions = nnx.List([Transformer2DModel(cout, config, rngs) for _ in range(n)]) if cross_attention else None
    self.upsamplers = nnx.List([_conv(rngs, cout, cout, 3)]) if add_upsample else None

  def __call__(self, x, skips, temb, context):
    for i, resnet in enumerate(self.resnets):
      x = resnet(jnp.concatenate([x, skips.pop()], axis=-1), temb)
      if self.attentions is not None:
        x = self.attentions[i](x, context)
    if self.upsamplers is not None:
      b, h, w, c = x.shape
      x = jax.image.resize(x, (b, 2 * h, 2 * w, c), method='nearest')
      x = self.upsamplers[0](x)
    return x


class MidBlock(nnx.Module):

  def __init__(self, channels, config, rngs):
    self.resnets = nnx.List([ResnetBlock2D(channels, channels, config, rngs) for _ in range(2)])
    self.attentions = nnx.List([Transformer2DModel(channels, config, rngs)])

  def __call__(self, x, temb, context):
    x = self.resnets[0](x, temb)
    return self.resnets[1](self.attentions[0](x, context), temb)


class UNet2DConditionModel(nnx.Module):
  """ε-prediction U-Net: (noisy x [b, h, w, c], timesteps [b], text [b, m, cross_dim]) -> ε [b, h, w, c]."""

  @logical_sharding_only
  def __init__(self, config: UNetConfig, rngs: nnx.Rngs):
    self.config = config
    channels = config.block_out_channels
    self.conv_in = _conv(rngs, config.in_channels, channels[0], 3)
    self.time_embedding = TimestepEmbedding(channels[0], config.time_embed_dim, rngs)
    levels = len(channels)
    self.down_blocks = nnx.List([
        DownBlock(channels[max(i - 1, 0)], channels[i], config.cross_attention_levels[i], i < levels - 1, config, rngs)
        for i in range(levels)])
    self.mid_block = MidBlock(channels[-1], config, rngs)
    reversed_channels = list(reversed(channels))
    reversed_attention = list(reversed(config.cross_attention_levels))
    up = []
    for i in range(levels):
      cin = reversed_channels[min(i + 1, levels - 1)]
      up.append(UpBlock(cin, reversed_channels[i], reversed_channels[max(i - 1, 0)], reversed_attention[i],
                        i < levels - 1, config, rngs))
    self.up_blocks = nnx.List(up)
    self.conv_norm_out = _group_norm(rngs, channels[0], config.norm_num_groups, config.norm_eps)
    self.conv_out = _conv(rngs, channels[0], config.out_channels, 3)

  def _down_and_mid(self, x_bhwc, timesteps_b, context_bmc):
    timesteps_b = jnp.broadcast_to(jnp.asarray(timesteps_b), (x_bhwc.shape[0],))
    temb = self.time_embedding(timestep_embedding(timesteps_b, self.config.block_out_channels[0]))
    x = self.conv_in(x_bhwc)
    skips = [x]
    for block in self.down_blocks:
      x, block_skips = block(x, temb, context_bmc)
      skips += block_skips
    return self.mid_block(x, temb, context_bmc), skips, temb

  def mid_block_features(self, x_bhwc, timesteps_b, context_bmc):
    """The bottleneck's activations averaged over space, [b, channels[-1]]: the model's own view
    of an image (a candidate base feature for attribution)."""
    return self._down_and_mid(x_bhwc, timesteps_b, context_bmc)[0].mean(axis=(1, 2))

  def __call__(self, x_bhwc, timesteps_b, context_bmc):
    x, skips, temb = self._down_and_mid(x_bhwc, timesteps_b, context_bmc)
    for block in self.up_blocks:
      x = block(x, skips, temb, context_bmc)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))
