"""diffusers UNet2DConditionModel state dict (torch names, NCHW / [out, in]) -> our parameter tree."""
from __future__ import annotations

from core.errors import UserError

from typing import Mapping

import jax
import numpy as np

_RENAMES = (('.to_out.0.', '.to_out.'), ('.downsamplers.0.conv.', '.downsamplers.0.'),
            ('.upsamplers.0.conv.', '.upsamplers.0.'), ('.ff.net.0.proj.', '.ff_in.'), ('.ff.net.2.', '.ff_out.'))


class WeightImportError(UserError):
  pass


def _our_path(name: str, value: np.ndarray) -> tuple[tuple, np.ndarray]:
  for old, new in _RENAMES:
    name = name.replace(old, new)
  *modules, leaf = name.split('.')
  if leaf == 'weight':
    if value.ndim == 4:  # conv [out, in, kh, kw] -> [kh, kw, in, out]
      leaf, value = 'kernel', value.transpose(2, 3, 1, 0)
    elif value.ndim == 2:  # linear [out, in] -> [in, out]
      leaf, value = 'kernel', value.T
    else:  # GroupNorm / LayerNorm
      leaf = 'scale'
  path = tuple(int(m) if m.isdigit() else m for m in modules) + (leaf,)
  return path, value


def params_from_diffusers(state_dict: Mapping[str, np.ndarray], abstract_params: dict) -> dict:
  """Fills a copy of `abstract_params` (shapes) from `state_dict`; every parameter must be matched."""
  flat_abstract = {path: leaf for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_params)[0]}
  by_path = {tuple(getattr(k, 'key', getattr(k, 'idx', None)) for k in path): leaf
             for path, leaf in flat_abstract.items()}
  filled = {}
  for name, value in state_dict.items():
    path, value = _our_path(name, np.asarray(value, np.float32))
    if path not in by_path:
      raise WeightImportError(f'diffusers weight {name!r} has no place in this U-Net config')
    if tuple(value.shape) != tuple(by_path[path].shape):
      raise WeightImportError(f'diffusers weight {name!r}: shape {value.shape} != expected {by_path[path].shape}')
    filled[path] = value
  missing = sorted('.'.join(map(str, p)) for p in by_path if p not in filled)
  if missing:
    raise WeightImportError(f'U-Net parameters missing from the diffusers weights: {missing[:5]} ...')
  leaves = [filled[p] for p in by_path]
  return jax.tree.unflatten(jax.tree.structure(abstract_params), leaves)


def params_to_diffusers(params: dict) -> dict[str, np.ndarray]:
  """Our tree -> diffusers state dict names and layouts (inverse of `params_from_diffusers`)."""
  out = {}
  for keys, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    path = [str(getattr(k, 'key', getattr(k, 'idx', None))) for k in keys]
    value = np.asarray(leaf)
    leaf_name = path[-1]
    if leaf_name == 'kernel':
      value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
    name = '.'.join(path[:-1] + ['weight' if leaf_name in ('kernel', 'scale') else leaf_name])
    name = f'.{name}.'
    for old, new in _RENAMES:
      name = name.replace(new, old)
    out[name.strip('.')] = np.ascontiguousarray(value)
  return out
