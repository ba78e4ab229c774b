"""`launch.py attrib import-diffusers`: a released diffusers U-Net (FastGDA's MSCOCO `model.bin`) as a workdir.

  python launch.py attrib import-diffusers --weights data/coco/model.bin \
      --config attrib/configs/mscoco.py --set data.train_path=latents:data/coco/trainset --workdir runs/coco
  python launch.py attrib teacher --workdir runs/coco --query-dir data/coco/query_test --queries 110 --candidates all

The workdir then holds the imported parameters as a step-0 checkpoint and the run config, so every
`attrib` command that reads a trained workdir (teacher, counterfactual scoring) reads it too.
Everything is checked (weights against the config, the precomputed data against the U-Net) before
anything is written.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import jax
import numpy as np

from attrib.config import DiffusionConfig
from attrib.precomputed import PrecomputedLatents
from attrib.task import DenoisingTask
from core.torch_layout import WeightImportError, params_from_diffusers
from core.config import ConfigError, apply_overrides, load_config_file
from core.mesh import load_preset, make_mesh
from core.sharding import activation_sharding
from core.train_loop import init_state
from core.optim import OptimConfig
from core.paths import as_path, local_data
from core.workdir import versions, write_imported_run, write_json_atomic

LATENTS_PREFIX = 'latents:'


# A diffusers model folder's weights, in the order they are taken: full precision first; the fp16
# variant is what `from_pretrained(..., variant='fp16')` downloads (read into float32 like the rest).
WEIGHT_FILES = ('diffusion_pytorch_model.safetensors', 'model.safetensors', 'diffusion_pytorch_model.bin',
                'pytorch_model.bin', 'diffusion_pytorch_model.fp16.safetensors', 'diffusion_pytorch_model.fp16.bin')


def weights_in(folder: str | Path, part: str) -> Path:
  """The weights file of a diffusers model folder (its `part` of a pipeline: 'unet', 'vqvae'), or an
  error naming what to give instead (the pipeline's part, a Hub cache folder's snapshot)."""
  from core.hub_folders import where_the_files_are
  folder = Path(folder)
  found = [folder / name for name in WEIGHT_FILES if (folder / name).is_file()]
  if not found:
    raise WeightImportError(f'{folder}: no diffusion_pytorch_model.safetensors (or .bin, or their .fp16 variant) '
                            f'weights{where_the_files_are(folder, part)}')
  return found[0]


def read_state_dict(path: str | Path, part: str = 'unet') -> dict[str, np.ndarray]:
  """A diffusers state dict from .safetensors (numpy only) or a torch pickle (.bin/.pt, needs torch);
  a model folder's weights file (`weights_in`). A gs:// file or folder is copied once into this
  host's data cache."""
  from core.paths import local_data
  path = Path(local_data(os.fspath(path)))
  if path.is_dir():
    path = weights_in(path, part)
  if not path.is_file():
    from core.hub_folders import where_the_files_are
    raise WeightImportError(f'{path} not found{where_the_files_are(path, part)}')
  if path.suffix == '.safetensors':
    from safetensors.numpy import load_file
    try:
      return load_file(str(path))
    except Exception as e:  # safetensors raises its own error type for a corrupt header
      raise WeightImportError(f'{path}: not a readable safetensors file ({e})') from None
  try:
    import torch
  except ImportError:
    raise WeightImportError(f'{path}: reading a torch pickle needs torch (pip install torch==2.13.0 for the CPU '
                            'build), or convert it to .safetensors') from None
  try:
    state = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # torch raises several types for a corrupt or non-tensor pickle
    raise WeightImportError(f'{path}: not a readable torch state dict ({type(e).__name__}: {e})') from None
  if not isinstance(state, dict) or not all(hasattr(v, 'numpy') for v in state.values()):
    raise WeightImportError(f'{path}: expected a state dict of tensors')
  return {k: v.float().numpy() for k, v in state.items()}


def training_set_dir(config: DiffusionConfig) -> Path | None:
  path = config.data.train_path
  # A gs:// training set is staged once into this host's data cache: its arrays are memory-mapped.
  return Path(local_data(path[len(LATENTS_PREFIX):])) if path.startswith(LATENTS_PREFIX) else None


def import_diffusers_command(weights: str, config_path: str, tpu_path: str, workdir: str,
                             overrides: list[str]) -> dict:
  started = time.time()
  config: DiffusionConfig = apply_overrides(load_config_file(config_path, expect=DiffusionConfig), overrides)
  workdir = as_path(workdir)
  if (workdir / 'checkpoints').exists() and any((workdir / 'checkpoints').iterdir()):
    raise ConfigError(f'{workdir} already holds checkpoints; import into an empty workdir')
  preset = load_preset(tpu_path)
  mesh = make_mesh(preset)
  task = DenoisingTask(config.unet, config.schedule, config.data.text_len)
  with activation_sharding(mesh, preset.logical_rules):  # shapes and shardings only, nothing allocated
    _, _, _, abstract_params, _ = init_state(task, mesh, preset.logical_rules, OptimConfig(), 0)
  # The weights the user named are checked first (every key and shape), then the training set.
  try:
    host_params = params_from_diffusers(read_state_dict(weights), abstract_params)
  except WeightImportError as e:
    if str(weights) in str(e):
      raise
    raise WeightImportError(f'{weights}: {e}') from None
  data_dir = training_set_dir(config)
  data = PrecomputedLatents(data_dir, config.unet, flipped_copies=True) if data_dir else None
  if data is not None and data.text_len != config.data.text_len:
    raise ConfigError(f'data.text_len {config.data.text_len} != {data.text_len} tokens in {data_dir}')
  params = jax.tree.map(lambda value, leaf: jax.make_array_from_callback(leaf.shape, leaf.sharding,
                                                                         lambda idx, v=value: v[idx]),
                        host_params, abstract_params)
  write_imported_run(workdir, config, tpu_path, params, source=weights)
  result = {'job': 'attrib import-diffusers', 'weights': str(weights),
            'parameters': int(sum(np.size(v) for v in jax.tree.leaves(host_params))),
            'training_images': data.num_images if data else None,
            'captions_per_image': data.num_captions if data else None,
            'flipped_copies': bool(data and data.num_flips == 2), 'wall_s': time.time() - started,
            'versions': versions()}
  write_json_atomic(workdir / 'import_result.json', result)
  return result
