"""Released tokenizer weights -> our VQGAN: diffusers `VQModel` (aMUSEd-256, LVM's tokenizer) and the
open-muse / taming `VQGANModel` key layout that LVM's own demo loads (`Emma02/vqvae_ckpts`).

Both layouts hold the same network; the open-muse names are mapped onto diffusers' names first
(`muse_to_diffusers_names`), then one loader fills our tree (core/torch_layout.py).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from core.torch_layout import WeightImportError, params_from_diffusers
from lvm.tokenizer import TokenizerConfig


def config_from_diffusers(config: dict, where: str) -> TokenizerConfig:
  """A diffusers VQModel config.json -> TokenizerConfig; anything we do not build is refused by name."""
  def need(key, allowed):
    value = config.get(key, allowed[0])
    if value not in allowed:
      raise WeightImportError(f'{where}: {key}={value!r} is not supported (expected {allowed[0]!r})')
  need('act_fn', ['silu'])
  need('norm_type', ['group'])
  need('mid_block_add_attention', [False])
  down, up = config.get('down_block_types', []), config.get('up_block_types', [])
  channels = tuple(config.get('block_out_channels', ()))
  if set(down) != {'DownEncoderBlock2D'} or set(up) != {'UpDecoderBlock2D'} or not len(down) == len(up) == len(channels):
    raise WeightImportError(f'{where}: expected one DownEncoderBlock2D and one UpDecoderBlock2D per entry of '
                            f'block_out_channels {channels}, got {down} / {up}')
  latent = int(config.get('latent_channels', 3))
  if config.get('vq_embed_dim') not in (None, latent):
    raise WeightImportError(f'{where}: vq_embed_dim {config["vq_embed_dim"]} != latent_channels {latent} '
                            'is not supported')
  factor = 2 ** (len(channels) - 1)
  return TokenizerConfig(block_out_channels=channels, layers_per_block=int(config.get('layers_per_block', 1)),
                         latent_channels=latent, codebook_size=int(config.get('num_vq_embeddings', 256)),
                         norm_num_groups=int(config.get('norm_num_groups', 32)),
                         image_size=int(config.get('sample_size', 32)) * factor,
                         in_channels=int(config.get('in_channels', 3)))


# open-muse VQGANModel (taming layout) -> diffusers VQModel names. Decoder levels are numbered
# from the lowest resolution up in taming (`up.0` is the last to run) and in run order in diffusers.
_MUSE_PATTERNS = [
    (r'^(encoder|decoder)\.mid\.block_(\d)\.', lambda m: f'{m[1]}.mid_block.resnets.{int(m[2]) - 1}.'),
    (r'^encoder\.down\.(\d+)\.block\.(\d+)\.', lambda m: f'encoder.down_blocks.{m[1]}.resnets.{m[2]}.'),
    (r'^encoder\.down\.(\d+)\.downsample\.conv\.', lambda m: f'encoder.down_blocks.{m[1]}.downsamplers.0.conv.'),
    (r'^(encoder|decoder)\.norm_out\.', lambda m: f'{m[1]}.conv_norm_out.'),
    (r'\.nin_shortcut\.', lambda m: '.conv_shortcut.'),
]


def muse_to_diffusers_names(state: dict[str, np.ndarray], levels: int) -> dict[str, np.ndarray]:
  out = {}
  for name, value in state.items():
    new = name
    m = re.match(r'^decoder\.up\.(\d+)\.(block\.(\d+)|upsample\.conv)\.', new)
    if m:
      level = levels - 1 - int(m[1])
      inner = f'resnets.{m[3]}.' if m[3] is not None else 'upsamplers.0.conv.'
      new = f'decoder.up_blocks.{level}.{inner}' + new[m.end():]
    for pattern, replace in _MUSE_PATTERNS:
      new = re.sub(pattern, replace, new)
    out[new] = value
  return out


def tokenizer_params(state: dict[str, np.ndarray], abstract_params: dict, config: TokenizerConfig,
                     source: str) -> dict:
  """Either layout -> our parameter tree (every tensor matched, every shape checked)."""
  muse_layout = any(k.startswith(('encoder.down.', 'decoder.up.')) for k in state)
  if muse_layout:
    state = muse_to_diffusers_names(state, len(config.block_out_channels))
  try:
    return params_from_diffusers(state, abstract_params, model='VQGAN')
  except WeightImportError as e:
    # Tensors are named as diffusers' VQModel names them; say so when the file uses open-muse's names.
    names = " (diffusers' VQModel names; the file is in open-muse's VQGANModel layout)" if muse_layout else ''
    raise WeightImportError(f'{source}: {e}{names}') from None


def read_tokenizer_dir(path: str | Path) -> tuple[TokenizerConfig, dict[str, np.ndarray], str]:
  """A diffusers VQModel directory (config.json + diffusion_pytorch_model.safetensors/.bin), or
  one weights file with a config.json beside it. Returns (config, state dict, weights path)."""
  from attrib.released import read_state_dict, weights_in
  from core.paths import as_path, is_remote, local_data
  if is_remote(path):  # gs://: the folder (a weights file's, for its config.json) copied into this host's cache
    remote = as_path(path)
    is_file = remote.is_file()
    local = Path(local_data(str(remote.parent if is_file else remote)))
    path = local / remote.name if is_file else local
  path = Path(path)
  if not path.exists():
    from core.hub_folders import where_the_files_are
    raise WeightImportError(f'{path} not found: give a diffusers VQModel directory or its weights file'
                            f'{where_the_files_are(path, "vqvae")}')
  directory = path if path.is_dir() else path.parent
  config_file = directory / 'config.json'
  if not config_file.is_file():
    from core.hub_folders import where_the_files_are
    raise WeightImportError(f'{config_file} not found: a tokenizer needs its diffusers VQModel config.json'
                            f'{where_the_files_are(directory, "vqvae")}')
  try:
    config = config_from_diffusers(json.loads(config_file.read_text()), str(config_file))
  except ValueError as e:
    if isinstance(e, WeightImportError):
      raise
    raise WeightImportError(f'{config_file}: not a JSON config ({e})') from None
  if path.is_dir():
    path = weights_in(directory, 'vqvae')
  return config, read_state_dict(path), str(path)
