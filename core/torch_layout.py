"""Torch state dicts (diffusers names, NCHW convs, [out, in] linears) <-> our NNX parameter trees.

Our modules keep diffusers' module names, so a state dict maps onto a tree by renaming a few
wrappers (`RENAMES`) and transposing: convs [out, in, kh, kw] -> [kh, kw, in, out], linears
[out, in] -> [in, out]; a module named `embedding` (a codebook) keeps its [rows, dim] layout.
Used by the diffusion U-Net and the VQGAN tokenizer.
"""
from __future__ import annotations

from core.errors import UserError

from typing import Mapping

import jax
import numpy as np

RENAMES = (('.to_out.0.', '.to_out.'), ('.downsamplers.0.conv.', '.downsamplers.0.'),
           ('.upsamplers.0.conv.', '.upsamplers.0.'), ('.ff.net.0.proj.', '.ff_in.'), ('.ff.net.2.', '.ff_out.'))


class WeightImportError(UserError):
  pass


def _our_path(name: str, value: np.ndarray) -> tuple[tuple, np.ndarray]:
  name = f'.{name}.'
  for old, new in RENAMES:
    name = name.replace(old, new)
  *modules, leaf = name.strip('.').split('.')
  if leaf == 'weight' and modules[-1:] == ['embedding']:  # a codebook: [rows, dim] in both
    leaf = 'embedding'
  elif leaf == 'weight':
    if value.ndim == 4:  # conv [out, in, kh, kw] -> [kh, kw, in, out]
      leaf, value = 'kernel', value.transpose(2, 3, 1, 0)
    elif value.ndim == 2:  # linear [out, in] -> [in, out]
      leaf, value = 'kernel', value.T
    else:  # GroupNorm / LayerNorm
      leaf = 'scale'
  path = tuple(int(m) if m.isdigit() else m for m in modules) + (leaf,)
  return path, value


def params_from_diffusers(state_dict: Mapping[str, np.ndarray], abstract_params: dict, model: str = 'U-Net') -> dict:
  """Fills a copy of `abstract_params` (shapes) from `state_dict`; every parameter must be matched."""
  flat_abstract = {path: leaf for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_params)[0]}
  by_path = {tuple(getattr(k, 'key', getattr(k, 'idx', None)) for k in path): leaf
             for path, leaf in flat_abstract.items()}
  filled = {}
  for name, value in state_dict.items():
    path, value = _our_path(name, np.asarray(value, np.float32))
    if path not in by_path:
      raise WeightImportError(f'diffusers weight {name!r} has no place in this {model} config')
    if tuple(value.shape) != tuple(by_path[path].shape):
      raise WeightImportError(f'diffusers weight {name!r}: shape {value.shape} != expected {by_path[path].shape}')
    filled[path] = value
  missing = sorted(_diffusers_name(p) for p in by_path if p not in filled)
  if missing:  # named as in the file the user holds, not as in our tree
    more = f' and {len(missing) - 5} more' if len(missing) > 5 else ''
    raise WeightImportError(f'{model} weights missing from the file ({len(missing)} of {len(by_path)}): '
                            f'{", ".join(missing[:5])}{more}')
  leaves = [filled[p] for p in by_path]
  return jax.tree.unflatten(jax.tree.structure(abstract_params), leaves)


def _diffusers_name(path: tuple) -> str:
  """Our parameter path -> its diffusers state dict name (inverse of `_our_path`'s renaming)."""
  *modules, leaf = map(str, path)
  name = '.'.join(modules + ['weight' if leaf in ('kernel', 'scale', 'embedding') else leaf])
  name = f'.{name}.'
  for old, new in RENAMES:
    name = name.replace(new, old)
  return name.strip('.')


def params_to_diffusers(params: dict) -> dict[str, np.ndarray]:
  """Our tree -> diffusers state dict names and layouts (inverse of `params_from_diffusers`)."""
  out = {}
  for keys, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    path = tuple(getattr(k, 'key', getattr(k, 'idx', None)) for k in keys)
    value = np.asarray(leaf)
    if path[-1] == 'kernel':
      value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
    out[_diffusers_name(path)] = np.ascontiguousarray(value)
  return out
