"""`launch.py lvm ...` jobs: train, eval, import-hf, export-hf. Each writes WORKDIR/<job>_result.json (train, eval, import, export)."""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import jax
import numpy as np

from core import checkpoint
from core.config import ConfigError, apply_overrides, from_dict, load_config_file, to_dict
from core.mesh import make_mesh
from core.optim import OptimConfig
from core.sharding import activation_sharding
from core.train_loop import init_state, restore_latest_params, train
from core.workdir import versions, write_json_atomic
from data_pipelines.token_loader import token_batches
from data_pipelines.token_sources import open_token_source
from lvm import evaluate, hf_interop
from lvm.config import LvmConfig
from lvm.task import NextTokenTask

CONFIG_FILE = 'config.json'
DEFAULT_TPU = str(Path(__file__).resolve().parent.parent / 'tpu_configs' / 'cpu_1.py')


def load_run_config(workdir: Path) -> tuple[LvmConfig, str]:
  path = workdir / CONFIG_FILE
  if not path.is_file():
    raise ConfigError(f'{path} not found: is {workdir} an lvm workdir (made by train or import-hf)?')
  stored = json.loads(path.read_text())
  return from_dict(LvmConfig, stored['config']), stored.get('tpu', DEFAULT_TPU)


def _check_same_model(workdir: Path, config: LvmConfig) -> None:
  """Continuing a run with a different model or data layout would silently corrupt it: refuse."""
  if not (workdir / CONFIG_FILE).is_file():
    return
  previous, _ = load_run_config(workdir)
  for group in ('model', 'data'):
    old, new = to_dict(getattr(previous, group)), to_dict(getattr(config, group))
    changed = {k: (old.get(k), new[k]) for k in new if old.get(k) != new[k]
               and (group, k) not in {('data', 'read_threads'), ('model', 'remat_policy'),
                                      ('model', 'attention_block'), ('model', 'compute_dtype')}}
    if changed and not (group == 'data' and previous.data.train_path == ''):
      raise ConfigError(f'{workdir} holds a run with different {group} settings '
                        f'{ {k: f"{a} -> {b}" for k, (a, b) in changed.items()} }; use a new workdir')


def train_command(config_path: str, tpu_path: str, workdir: str, overrides: list[str]) -> dict:
  config: LvmConfig = apply_overrides(load_config_file(config_path), overrides)
  workdir = Path(workdir)
  _check_same_model(workdir, config)
  preset = load_config_file(tpu_path)
  # Validate the data before any compile or init work starts.
  source = open_token_source(config.data.train_path, seq_len=config.data.seq_len,
                             vocab_size=config.model.vocab_size)
  task = NextTokenTask(config.model, config.data.seq_len)
  workdir.mkdir(parents=True, exist_ok=True)
  write_json_atomic(workdir / CONFIG_FILE, {'config': to_dict(config), 'tpu': str(Path(tpu_path).resolve())})

  def make_iterator(process_index, process_count):
    return token_batches(source, global_batch=config.train.global_batch, seed=config.train.seed,
                         shuffle=config.data.shuffle, process_index=process_index,
                         process_count=process_count, prefetch_threads=config.data.read_threads)

  started = time.time()
  summary = train(task, train_config=config.train, optim=config.optim, preset=preset,
                  workdir=workdir, make_data_iterator=make_iterator,
                  meta={'model': to_dict(config.model)})
  summary.pop('trained_params')
  result = {'job': 'lvm train', **summary, 'model_params': config.model.num_params(),
            'data': repr(source), 'workdir': str(workdir), 'wall_s': time.time() - started,
            'versions': versions()}
  write_json_atomic(workdir / 'train_result.json', result)
  return result


def restore_params(workdir: Path, config: LvmConfig, tpu_path: str):
  """Latest parameters of a workdir, sharded for `tpu_path`'s mesh: (graphdef, params, mesh, preset, step)."""
  preset = load_config_file(tpu_path)
  graphdef, params, mesh, step = restore_latest_params(NextTokenTask(config.model, config.data.seq_len),
                                                       workdir, preset)
  return graphdef, params, mesh, preset, step


def eval_command(workdir: str, data_path: str, tpu_path: str | None, target_tokens: int | None,
                 batch_size: int) -> dict:
  workdir = Path(workdir)
  config, trained_tpu = load_run_config(workdir)
  source = open_token_source(data_path, seq_len=config.data.seq_len, vocab_size=config.model.vocab_size)
  graphdef, params, mesh, preset, step = restore_params(workdir, config, tpu_path or trained_tpu)
  target = target_tokens or min(256, config.data.seq_len // 4)
  scores = evaluate.perplexity(graphdef, params, source, mesh=mesh, rules=preset.logical_rules,
                               target_tokens=target, batch_size=batch_size)
  result = {'job': 'lvm eval', 'step': step, 'data': data_path, **scores, 'versions': versions()}
  write_json_atomic(workdir / 'eval_result.json', result)
  return result


def import_hf_command(hf_dir: str, workdir: str, tpu_path: str | None, seq_len: int) -> dict:
  workdir = Path(workdir)
  if (workdir / 'checkpoints').exists() and any((workdir / 'checkpoints').iterdir()):
    raise ConfigError(f'{workdir} already holds checkpoints; import into an empty workdir')
  model_config, tensors = hf_interop.read_hf_params(hf_dir)
  tiny = load_config_file(Path(__file__).parent / 'configs' / 'tiny.py')
  config = dataclasses.replace(tiny, model=model_config,
                               data=dataclasses.replace(tiny.data, train_path='', seq_len=seq_len))
  preset = load_config_file(tpu_path or DEFAULT_TPU)
  mesh = make_mesh(preset)
  task = NextTokenTask(config.model, config.data.seq_len)
  with activation_sharding(mesh, preset.logical_rules):
    _, _, _, abstract_params, _ = init_state(task, mesh, preset.logical_rules, OptimConfig(), 0)
  params = jax.tree.map(lambda a: None, abstract_params)
  for path, value in tensors:  # each tensor goes straight to its shards; the host frees it
    target = abstract_params
    for key in path[:-1]:
      target = target[key]
    leaf = target[path[-1]]
    if value.shape != leaf.shape:
      raise hf_interop.HFImportError(f'{hf_dir}: {"/".join(path)} has shape {value.shape}, expected {leaf.shape}')
    holder = params
    for key in path[:-1]:
      holder = holder[key]
    holder[path[-1]] = jax.make_array_from_callback(leaf.shape, leaf.sharding, lambda idx, v=value: v[idx])
  missing = [p for p, v in jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: x is None)[0] if v is None]
  if missing:
    raise hf_interop.HFImportError(f'{hf_dir}: parameters not filled: {missing}')
  workdir.mkdir(parents=True, exist_ok=True)
  write_json_atomic(workdir / CONFIG_FILE, {'config': to_dict(config), 'tpu': str(Path(tpu_path or DEFAULT_TPU).resolve())})
  manager = checkpoint.make_manager(workdir, async_save=False)
  checkpoint.save(manager, 0, params=params, meta={'imported_from': str(hf_dir)}, force=True)
  manager.wait_until_finished()
  manager.close()
  result = {'job': 'lvm import-hf', 'hf_dir': str(hf_dir), 'model_params': model_config.num_params(),
            'model': to_dict(model_config), 'versions': versions()}
  write_json_atomic(workdir / 'import_result.json', result)
  return result


def export_hf_command(workdir: str, out_dir: str, dtype: str) -> dict:
  workdir = Path(workdir)
  config, _ = load_run_config(workdir)
  _, params, _, _, step = restore_params(workdir, config, DEFAULT_TPU)
  host_params = jax.tree.map(np.asarray, jax.device_get(params))
  files = hf_interop.write_hf_dir(host_params, config.model, out_dir, dtype=dtype)
  result = {'job': 'lvm export-hf', 'step': step, 'out_dir': str(out_dir), 'files': [str(f) for f in files],
            'dtype': dtype, 'versions': versions()}
  write_json_atomic(workdir / 'export_result.json', result)
  return result
