"""U-Net dimensions, named as in diffusers' UNet2DConditionModel so configs move across unchanged."""
from __future__ import annotations

from core.errors import ConfigError

import dataclasses


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  # Spatial size of the model input (latents, or pixels for a pixel-space model).
  sample_size: int = 16
  # Channels of the model input and output (4 for SD-VAE latents, 1 or 3 for pixels).
  in_channels: int = 4
  out_channels: int = 4
  # Channels of each resolution level, top to bottom.
  block_out_channels: tuple[int, ...] = (128, 256, 256, 256)
  # Which levels have cross-attention transformers (diffusers CrossAttnDownBlock2D vs DownBlock2D);
  # the up path mirrors it.
  cross_attention_levels: tuple[bool, ...] = (True, True, True, False)
  # ResNet blocks per level on the way down (the way up has one more, for the skip).
  layers_per_block: int = 2
  # Attention heads (diffusers' legacy name for this is `attention_head_dim`).
  num_attention_heads: int = 8
  # Width of the text embeddings the cross-attention attends to.
  cross_attention_dim: int = 1024
  # GroupNorm groups.
  norm_num_groups: int = 32
  # GroupNorm epsilon of ResNet blocks and the output norm.
  norm_eps: float = 1e-5

  def __post_init__(self):
    for name in ('sample_size', 'in_channels', 'out_channels', 'layers_per_block', 'num_attention_heads',
                 'cross_attention_dim', 'norm_num_groups'):
      if getattr(self, name) < 1:
        raise ConfigError(f'unet.{name} must be >= 1, got {getattr(self, name)}')
    if not self.block_out_channels or min(self.block_out_channels) < 1:
      raise ConfigError(f'unet.block_out_channels needs one or more positive widths, got {self.block_out_channels}')
    if self.norm_eps <= 0:
      raise ConfigError(f'unet.norm_eps must be > 0, got {self.norm_eps}')
    # Every level but the last halves the image, and the up path must meet each skip at its size.
    halvings = 2 ** (len(self.block_out_channels) - 1)
    if self.sample_size % halvings:
      raise ConfigError(f'unet.sample_size {self.sample_size} must divide by {halvings} '
                        f'({len(self.block_out_channels)} levels halve it {len(self.block_out_channels) - 1} times)')
    if len(self.cross_attention_levels) != len(self.block_out_channels):
      raise ConfigError('unet.cross_attention_levels needs one flag per block_out_channels level')
    for channels in self.block_out_channels:
      if channels % self.norm_num_groups or channels % self.num_attention_heads:
        raise ConfigError(f'unet channels {channels} must divide by norm_num_groups and heads')

  @property
  def time_embed_dim(self) -> int:
    return self.block_out_channels[0] * 4

  def diffusers_kwargs(self) -> dict:
    """The same model as keyword arguments of diffusers.UNet2DConditionModel (for parity tests)."""
    down = tuple('CrossAttnDownBlock2D' if a else 'DownBlock2D' for a in self.cross_attention_levels)
    up = tuple('CrossAttnUpBlock2D' if a else 'UpBlock2D' for a in reversed(self.cross_attention_levels))
    return dict(sample_size=self.sample_size, in_channels=self.in_channels, out_channels=self.out_channels,
                block_out_channels=self.block_out_channels, layers_per_block=self.layers_per_block,
                down_block_types=down, up_block_types=up, attention_head_dim=self.num_attention_heads,
                cross_attention_dim=self.cross_attention_dim, norm_num_groups=self.norm_num_groups,
                norm_eps=self.norm_eps)


# FastGDA's MSCOCO latent diffusion U-Net (fastgda.md §1): 128 px images as 4x16x16 SD-VAE latents.
MSCOCO = UNetConfig()
