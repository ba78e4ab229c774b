"""Layers shared by the convolutional models (the diffusion U-Net, the VQGAN tokenizer).

Parameters carry logical axis names: `channels` for the output channels of convs and linears,
`embed` for their inputs (replicated by the default rules; sharded where a preset says so).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from core import tracing_fix  # noqa: F401  (linear-time tracing of model construction)


def linear(rngs, din, dout, bias=True):
  return nnx.Linear(din, dout, use_bias=bias, rngs=rngs,
                    kernel_metadata={'out_sharding': ('embed', 'channels')},
                    bias_metadata={'out_sharding': ('channels',)})


def conv(rngs, cin, cout, kernel, stride=1, padding=None):
  """A square conv; `padding` defaults to 'same' for odd kernels (diffusers' padding=k//2)."""
  padding = kernel // 2 if padding is None else padding
  return nnx.Conv(cin, cout, (kernel, kernel), strides=(stride, stride), padding=padding, rngs=rngs,
                  kernel_metadata={'out_sharding': (None, None, 'embed', 'channels')},
                  bias_metadata={'out_sharding': ('channels',)})


class GroupNorm(nnx.Module):
  """GroupNorm over NHWC with `scale`/`bias` like nnx.GroupNorm, computed in two reduction stages.

  Statistics are reduced over H, W first (per channel, contiguous in NHWC) and then over the channels
  of a group. nnx.GroupNorm reduces over (H, W, channels-of-group) in one strided reduction, which
  XLA:CPU runs 2-3x slower; the result is the same to float32 rounding.
  """

  def __init__(self, channels, groups, eps, rngs):
    del rngs  # no random init: ones and zeros
    self.groups, self.eps = groups, eps
    self.scale = nnx.Param(jnp.ones((channels,)), out_sharding=('channels',))
    self.bias = nnx.Param(jnp.zeros((channels,)), out_sharding=('channels',))

  def __call__(self, x_bhwc):
    b, _, _, c = x_bhwc.shape
    per_group = c // self.groups
    def group_mean(values_bc):  # [b, c] -> [b, 1, 1, c], each channel holding its group's mean
      means_bg = values_bc.reshape(b, self.groups, per_group).mean(axis=-1)
      return jnp.repeat(means_bg, per_group, axis=1)[:, None, None, :]
    centred = x_bhwc - group_mean(x_bhwc.mean(axis=(1, 2)))
    inv_std = jax.lax.rsqrt(group_mean(jnp.square(centred).mean(axis=(1, 2))) + self.eps)
    return centred * (inv_std * self.scale[...]) + self.bias[...]


def group_norm(rngs, channels, groups, eps):
  return GroupNorm(channels, groups, eps, rngs)


def logical_sharding_only(init):
  """For a top-level model's __init__: its parameters carry logical axis names only, and the engine
  places them by the preset's rules table at init (core/train_loop.init_state), not Flax's eager
  sharding against a global mesh. Scoped to the constructor, so importing a model changes nothing."""
  @functools.wraps(init)
  def wrapped(*args, **kwargs):
    with nnx.use_eager_sharding(False):
      return init(*args, **kwargs)
  return wrapped
