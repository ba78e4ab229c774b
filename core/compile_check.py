"""Compile a task's training step for a preset's mesh without running it (no data, no parameters).

Used to check what XLA's SPMD partitioner makes of the sharding annotations: it reports shardings it
cannot convert efficiently ("Involuntary full rematerialization": the whole tensor is replicated on
every device and sliced again) as warnings on stderr, from C++, where Python cannot catch them. So
the check compiles in a child process and reads its stderr:

  python -m core.compile_check --task lvm --config lvm/configs/tiny.py --tpu tpu_configs/cpu_8.py
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REMAT_WARNING = 'Involuntary full rematerialization'


def check_batch_splits(rows: int, mesh, batch_axes, preset_name: str) -> None:
  """Each micro-step's rows are split over the mesh axes of the `batch` rule; say so if they cannot be."""
  import math
  from core.errors import ConfigError
  axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes or ())
  ways = math.prod(mesh.shape[a] for a in axes)
  if rows % ways:
    raise ConfigError(f'{preset_name}: a micro-step of {rows} rows (train.global_batch / optim.grad_accum) '
                      f'cannot be split {ways} ways over mesh axes {axes}; make train.global_batch a '
                      f'multiple of {ways} x optim.grad_accum')


def lower_train_step(task, preset, optim, global_batch: int, example_shapes: dict, devices=None, frozen=None):
  """The train step lowered for `preset`'s mesh from abstract parameters and an abstract batch.

  `devices` defaults to this machine's; the fit check passes the devices of a TPU topology that is
  not here. `frozen`: abstract (ShapeDtypeStruct) frozen inputs of the task (e.g. a perceptual loss
  network), replicated on every device as the train loop places them. Returns (lowered, abstract
  inputs) where the inputs are (params, opt_state, batch, frozen)."""
  import jax
  from jax.sharding import NamedSharding
  from core.mesh import make_mesh
  from core.sharding import activation_sharding, logical_to_spec
  from core.train_loop import init_state, jit_train_step
  mesh, rules = make_mesh(preset, devices), preset.logical_rules
  check_batch_splits(global_batch // optim.grad_accum, mesh, logical_to_spec(('batch',), rules)[0], preset.name)
  with activation_sharding(mesh, rules):
    graphdef, tx, _, abstract_params, abstract_opt = init_state(task, mesh, rules, optim, 0)
    shardings = {name: NamedSharding(mesh, logical_to_spec(axes, rules))
                 for name, axes in task.batch_logical_axes().items()}
    step = jit_train_step(task, graphdef, tx, optim, shardings, abstract_params, abstract_opt)
    batch = {name: jax.ShapeDtypeStruct((global_batch,) + shape, dtype, sharding=shardings[name])
             for name, (shape, dtype) in example_shapes.items()}
    if frozen is not None:
      replicated = NamedSharding(mesh, jax.sharding.PartitionSpec())
      frozen = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), frozen)
    lowered = step.lower(jax.numpy.int32(0), abstract_params, abstract_opt, batch, frozen)
  return lowered, (abstract_params, abstract_opt, batch, frozen)


def compile_train_step(task, preset, optim, global_batch: int, example_shapes: dict):
  """The compiled train step for `preset`'s mesh on this machine's devices."""
  return lower_train_step(task, preset, optim, global_batch, example_shapes)[0].compile()


def _task(kind: str, config_path: str, overrides=()):
  from core.config import apply_overrides, load_config_file
  config = apply_overrides(load_config_file(config_path), list(overrides))
  if kind == 'lvm':
    from lvm.task import NextTokenTask
    return config, NextTokenTask(config.model, config.data.seq_len)
  from attrib.task import DenoisingTask
  return config, DenoisingTask(config.unet, config.schedule, config.data.text_len)


def remat_warnings(kind: str, config_path: str, tpu_path: str, timeout: int = 600) -> list[str]:
  """Compiles in a child process; returns the partitioner's full-rematerialisation warnings."""
  from core.mesh import load_preset
  from core.xla_flags import cpu_xla_flags
  preset = load_preset(tpu_path)
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS=cpu_xla_flags(' '.join(f for f in os.environ.get('XLA_FLAGS', '').split()
                                              if 'device_count' not in f), preset.num_devices))
  # The warnings come from compiling: an executable served from a persistent cache would print none.
  env.pop('JAX_COMPILATION_CACHE_DIR', None)
  done = subprocess.run([sys.executable, '-m', 'core.compile_check', '--task', kind, '--config', config_path,
                         '--tpu', tpu_path], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
  if done.returncode != 0:
    raise RuntimeError(f'compiling the {kind} train step failed:\n{done.stderr[-4000:]}')
  return [line for line in done.stderr.splitlines() if REMAT_WARNING in line]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--task', choices=['lvm', 'diffusion'], required=True)
  parser.add_argument('--config', required=True)
  parser.add_argument('--tpu', required=True)
  args = parser.parse_args()
  from core.mesh import load_preset
  config, task = _task(args.task, args.config)
  compile_train_step(task, load_preset(args.tpu), config.optim, config.train.global_batch, task.batch_shapes())
  print('compiled')


if __name__ == '__main__':
  main()
