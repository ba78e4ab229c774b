"""The patch discriminator of VQGAN training (taming-transformers' NLayerDiscriminator, PatchGAN):
strided 4x4 convs with LeakyReLU 0.2, one logit per image patch. GroupNorm replaces BatchNorm
(no running statistics to carry or shard; the choice of StyleGAN-style VQGAN ports)."""
from __future__ import annotations

import jax
from flax import nnx

from core.layers import conv, group_norm, logical_sharding_only


class PatchDiscriminator(nnx.Module):

  @logical_sharding_only
  def __init__(self, in_channels: int, channels: int, layers: int, rngs: nnx.Rngs):
    widths = [channels * min(2 ** i, 8) for i in range(layers + 1)]
    self.first = conv(rngs, in_channels, widths[0], 4, stride=2, padding=1)
    # Downsampling blocks, then one stride-1 block (taming's n_layers structure).
    self.blocks = nnx.List([
        nnx.List([conv(rngs, widths[i], widths[i + 1], 4, stride=2 if i < layers - 1 else 1, padding=1),
                  group_norm(rngs, widths[i + 1], min(32, widths[i + 1]), 1e-6)])
        for i in range(layers)])
    self.last = conv(rngs, widths[layers], 1, 4, stride=1, padding=1)

  def __call__(self, images_bhwc):
    """Images in [-1, 1] -> patch logits [b, h', w', 1] (high = looks real)."""
    x = jax.nn.leaky_relu(self.first(images_bhwc), 0.2)
    for conv_layer, norm in self.blocks:
      x = jax.nn.leaky_relu(norm(conv_layer(x)), 0.2)
    return self.last(x)
