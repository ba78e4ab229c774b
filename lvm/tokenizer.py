"""VQGAN image tokenizer in Flax NNX, in the layout of diffusers' `VQModel` (LVM's released tokenizer).

images in [0, 1] -> encoder (convolutions and ResNet blocks, no attention) -> 1x1 quant_conv ->
nearest codebook row per position = one token -> codebook rows -> 1x1 post_quant_conv -> decoder.

Module names follow diffusers (`encoder.down_blocks.0.resnets.1.conv2`, `quantize.embedding`), so a
diffusers state dict loads by renaming and transposing (core/torch_layout.py). Images are NHWC here;
the network itself sees [-1, 1], as diffusers' VQModel does behind its image processor.
Training losses follow VQ-VAE: codebook term ||sg(z) - e||² plus `commitment` · ||z - sg(e)||²,
with straight-through gradients to the encoder.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from core.errors import ConfigError
from core.layers import conv, group_norm, logical_sharding_only


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
  # Output channels of each resolution level; every level but the last halves the image side.
  block_out_channels: tuple[int, ...] = (128, 256, 256, 512, 768)
  # ResNet blocks per level in the encoder (the decoder has one more, as diffusers).
  layers_per_block: int = 2
  # Channels of the encoder output / decoder input, and of each codebook row (diffusers'
  # latent_channels; its vq_embed_dim is the same).
  latent_channels: int = 64
  # Rows of the codebook K: token ids are 0 .. K-1.
  codebook_size: int = 8192
  norm_num_groups: int = 32
  # Side of the (square) images it is trained on; tokens per image = (image_size / 2^(levels-1))².
  image_size: int = 256
  in_channels: int = 3
  # Weight of the commitment term ||z - sg(e)||².
  commitment: float = 0.25

  def __post_init__(self):
    for name in ('latent_channels', 'codebook_size', 'image_size', 'layers_per_block', 'norm_num_groups'):
      if getattr(self, name) < 1:
        raise ConfigError(f'tokenizer.{name} must be >= 1, got {getattr(self, name)}')
    if not self.block_out_channels:
      raise ConfigError('tokenizer.block_out_channels needs one or more levels, got ()')
    if self.commitment < 0:
      raise ConfigError(f'tokenizer.commitment must be >= 0, got {self.commitment}')
    bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
    if bad:
      raise ConfigError(f'tokenizer.block_out_channels {self.block_out_channels} must all be multiples of '
                        f'norm_num_groups {self.norm_num_groups}')
    if self.image_size % self.downsample_factor:
      raise ConfigError(f'tokenizer.image_size {self.image_size} is not a multiple of the downsampling '
                        f'factor {self.downsample_factor}')

  def check_images(self, images, source: str) -> None:
    """Every image source is read as RGB [n, h, w, 3]: a tokenizer of other channels cannot take it."""
    if images.shape[-1] != self.in_channels:
      raise ConfigError(f'tokenizer.in_channels is {self.in_channels}, but the images of {source} have '
                        f'{images.shape[-1]} channels (every image source is read as RGB)')

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)

  @property
  def tokens_per_image(self) -> int:
    return (self.image_size // self.downsample_factor) ** 2


class ResnetBlock(nnx.Module):
  """diffusers ResnetBlock2D without a time embedding (temb_channels=None), eps 1e-6."""

  def __init__(self, cin: int, cout: int, groups: int, rngs: nnx.Rngs):
    self.norm1 = group_norm(rngs, cin, groups, 1e-6)
    self.conv1 = conv(rngs, cin, cout, 3)
    self.norm2 = group_norm(rngs, cout, groups, 1e-6)
    self.conv2 = conv(rngs, cout, cout, 3)
    self.conv_shortcut = conv(rngs, cin, cout, 1) if cin != cout else None

  def __call__(self, x_bhwc):
    h = self.conv1(jax.nn.silu(self.norm1(x_bhwc)))
    h = self.conv2(jax.nn.silu(self.norm2(h)))
    return (self.conv_shortcut(x_bhwc) if self.conv_shortcut is not None else x_bhwc) + h


class DownEncoderBlock(nnx.Module):

  def __init__(self, cin, cout, layers, downsample, groups, rngs):
    self.resnets = nnx.List([ResnetBlock(cin if i == 0 else cout, cout, groups, rngs) for i in range(layers)])
    # diffusers' Downsample2D(padding=0) pads right and bottom by one, then a stride-2 3x3 conv.
    self.downsamplers = nnx.List([conv(rngs, cout, cout, 3, stride=2, padding=((0, 1), (0, 1)))]) if downsample else None

  def __call__(self, x):
    for resnet in self.resnets:
      x = resnet(x)
    return self.downsamplers[0](x) if self.downsamplers is not None else x


class UpDecoderBlock(nnx.Module):

  def __init__(self, cin, cout, layers, upsample, groups, rngs):
    self.resnets = nnx.List([ResnetBlock(cin if i == 0 else cout, cout, groups, rngs) for i in range(layers)])
    self.upsamplers = nnx.List([conv(rngs, cout, cout, 3)]) if upsample else None

  def __call__(self, x):
    for resnet in self.resnets:
      x = resnet(x)
    if self.upsamplers is not None:
      b, h, w, c = x.shape
      x = self.upsamplers[0](jax.image.resize(x, (b, 2 * h, 2 * w, c), method='nearest'))
    return x


class MidBlock(nnx.Module):
  """UNetMidBlock2D with add_attention=False: two ResNet blocks."""

  def __init__(self, channels, groups, rngs):
    self.resnets = nnx.List([ResnetBlock(channels, channels, groups, rngs) for _ in range(2)])

  def __call__(self, x):
    for resnet in self.resnets:
      x = resnet(x)
    return x


class Encoder(nnx.Module):

  def __init__(self, c: TokenizerConfig, rngs: nnx.Rngs):
    chans, g = c.block_out_channels, c.norm_num_groups
    self.conv_in = conv(rngs, c.in_channels, chans[0], 3)
    self.down_blocks = nnx.List([
        DownEncoderBlock(chans[max(i - 1, 0)], chans[i], c.layers_per_block, i < len(chans) - 1, g, rngs)
        for i in range(len(chans))])
    self.mid_block = MidBlock(chans[-1], g, rngs)
    self.conv_norm_out = group_norm(rngs, chans[-1], g, 1e-6)
    self.conv_out = conv(rngs, chans[-1], c.latent_channels, 3)

  def __call__(self, x):
    x = self.conv_in(x)
    for block in self.down_blocks:
      x = block(x)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(self.mid_block(x))))


class Decoder(nnx.Module):

  def __init__(self, c: TokenizerConfig, rngs: nnx.Rngs):
    chans, g = tuple(reversed(c.block_out_channels)), c.norm_num_groups
    self.conv_in = conv(rngs, c.latent_channels, chans[0], 3)
    self.mid_block = MidBlock(chans[0], g, rngs)
    self.up_blocks = nnx.List([
        UpDecoderBlock(chans[max(i - 1, 0)], chans[i], c.layers_per_block + 1, i < len(chans) - 1, g, rngs)
        for i in range(len(chans))])
    self.conv_norm_out = group_norm(rngs, chans[-1], g, 1e-6)
    self.conv_out = conv(rngs, chans[-1], c.in_channels, 3)

  def __call__(self, x):
    x = self.mid_block(self.conv_in(x))
    for block in self.up_blocks:
      x = block(x)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Codebook(nnx.Module):
  """K x D rows; a token is the index of the row nearest (Euclidean) to an encoder vector."""

  def __init__(self, size: int, dim: int, rngs: nnx.Rngs):
    # diffusers initialises uniform(-1/K, 1/K); rows this small start nearly collapsed, which the
    # dead-code restarts in training undo.
    self.embedding = nnx.Embed(size, dim, rngs=rngs, embedding_init=nnx.initializers.uniform(2 / size),
                               embedding_metadata={'out_sharding': ('codebook', None)})

  @property
  def rows(self) -> jax.Array:
    return self.embedding.embedding[...]

  def nearest(self, z_nd: jax.Array) -> jax.Array:
    e = self.rows
    # ||z - e||² = ||z||² - 2 z·e + ||e||²; ||z||² is the same for every row and is left out.
    distances = jnp.sum(e * e, axis=1)[None, :] - 2 * jnp.dot(z_nd, e.T, precision='highest')
    return jnp.argmin(distances, axis=1).astype(jnp.int32)

  def lookup(self, ids):
    return jnp.take(self.rows, ids, axis=0)


class VQGAN(nnx.Module):

  @logical_sharding_only
  def __init__(self, config: TokenizerConfig, rngs: nnx.Rngs):
    self.config = config
    self.encoder = Encoder(config, rngs)
    self.quant_conv = conv(rngs, config.latent_channels, config.latent_channels, 1)
    self.quantize = Codebook(config.codebook_size, config.latent_channels, rngs)
    self.post_quant_conv = conv(rngs, config.latent_channels, config.latent_channels, 1)
    self.decoder = Decoder(config, rngs)

  def encode_latents(self, images_bhwc):
    """[b, h, w, c] in [0, 1] -> pre-quantisation vectors [b, h/f, w/f, D]."""
    return self.quant_conv(self.encoder(images_bhwc * 2 - 1))

  def encode(self, images_bhwc) -> jax.Array:
    """[b, h, w, c] in [0, 1] -> int32 tokens [b, (h/f)·(w/f)], row-major over the token grid."""
    z = self.encode_latents(images_bhwc)
    b, h, w, d = z.shape
    return self.quantize.nearest(z.reshape(-1, d)).reshape(b, h * w)

  def decode_vectors(self, quantised_bhwd):
    """Codebook vectors -> images in [-1, 1] (unclipped network output, as diffusers' decode)."""
    return self.decoder(self.post_quant_conv(quantised_bhwd))

  def decode(self, tokens_bn) -> jax.Array:
    """int tokens [b, n] (n a square) -> images [b, h, w, c] in [0, 1]."""
    b, n = tokens_bn.shape
    side = int(round(n ** 0.5))
    vectors = self.quantize.lookup(tokens_bn).reshape(b, side, side, -1)
    return jnp.clip((self.decode_vectors(vectors) + 1) / 2, 0, 1)

  def reconstruct(self, images_bhwc):
    """(images in [-1, 1], token ids, codebook loss, commitment loss) with straight-through gradients."""
    z = self.encode_latents(images_bhwc)
    b, h, w, d = z.shape
    ids = self.quantize.nearest(jax.lax.stop_gradient(z).reshape(-1, d))
    e = self.quantize.lookup(ids).reshape(z.shape)
    codebook_loss = jnp.mean(jnp.square(jax.lax.stop_gradient(z) - e))
    commitment_loss = jnp.mean(jnp.square(z - jax.lax.stop_gradient(e)))
    straight_through = z + jax.lax.stop_gradient(e - z)
    return self.decode_vectors(straight_through), ids.reshape(b, h * w), codebook_loss, commitment_loss
