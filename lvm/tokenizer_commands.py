"""`launch.py lvm train-tokenizer | import-tokenizer`, and loading a tokenizer workdir for other jobs."""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from core.paths import as_path
from core.batching import map_batches
from core.config import ConfigError, apply_overrides, to_dict
from core.distributed import all_or_none
from core.mesh import load_preset, make_mesh, preset_to_record
from core.optim import OptimConfig
from core.sharding import activation_sharding
from core.train_loop import check_batch_layout, init_state, restore_latest_params, train
from core.workdir import (RUN_CONFIG_FILE, config_of_run, make_workdir, note_changed_training, read_run_config, versions, write_imported_run,
                          write_json_atomic)
from data_pipelines.token_loader import record_batches
from lvm.tokenizer_images import InMemoryImages, report_images, slice_stream_plan, training_images
from lvm.tokenizer_task import TokenizerRunConfig, TokenizerTask
from lvm.tokenizer_weights import read_tokenizer_dir, tokenizer_params

MADE_BY = '`lvm train-tokenizer` or `lvm import-tokenizer`'
DEFAULT_TPU = str(Path(__file__).resolve().parent.parent / 'tpu_configs' / 'cpu_1.py')


@dataclasses.dataclass
class LoadedTokenizer:
  config: TokenizerRunConfig
  graphdef: object
  params: dict
  mesh: object
  rules: tuple
  step: int
  checksum: str

  def __post_init__(self):
    # One jitted encoder and decoder per tokenizer, the parameters an argument: compiled once per
    # batch shape, not on every call (the tokenize job encodes shard by shard, which compiled the
    # encoder again for each shard), and the weights are not embedded in the program as constants.
    self._encode = jax.jit(lambda params, x: nnx.merge(self.graphdef, params).encode(x))
    self._decode = jax.jit(lambda params, t: nnx.merge(self.graphdef, params).decode(t))

  def encode(self, images, batch: int = 256) -> np.ndarray:
    """float [n, s, s, 3] in [0, 1] -> int32 tokens [n, tokens_per_image], sharded over the mesh.
    `images`: an array, or anything that slices into arrays batch by batch (lvm/shard_frames.py)."""
    with activation_sharding(self.mesh, self.rules):
      return map_batches(functools.partial(self._encode, self.params), images, self.mesh, self.rules, batch)

  def decode(self, tokens: np.ndarray, batch: int = 256) -> np.ndarray:
    with activation_sharding(self.mesh, self.rules):
      return map_batches(functools.partial(self._decode, self.params), tokens, self.mesh, self.rules, batch)

  def on_this_host(self) -> LoadedTokenizer:
    """The same tokenizer on this host's devices alone (core.mesh.host_mesh): on several hosts, each
    encodes shards of its own. Every process must call it (the parameters are gathered from all)."""
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding, PartitionSpec
    from core.mesh import host_mesh
    mesh = host_mesh()
    whole = jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)), self.params)
    return dataclasses.replace(self, params=jax.device_put(whole, NamedSharding(mesh, PartitionSpec())), mesh=mesh)


def params_checksum(params) -> str:
  """sha256 over every parameter's bytes, in tree order: names the exact tokenizer a shard used."""
  digest = hashlib.sha256()
  for leaf in jax.tree.leaves(params):
    digest.update(np.asarray(jax.device_get(leaf)).tobytes())
  return digest.hexdigest()[:16]


def load_tokenizer(workdir: str | Path, tpu_path: str | None = None) -> LoadedTokenizer:
  config, trained_tpu = read_run_config(workdir, TokenizerRunConfig, MADE_BY)
  from core.mesh import serving_preset
  preset = load_preset(tpu_path or serving_preset(trained_tpu))  # loads anywhere, as lvm.Prompter
  # The run's own loss config: a run trained with a discriminator checkpointed its parameters too.
  graphdef, params, mesh, step = restore_latest_params(TokenizerTask(config.tokenizer, config.loss), workdir, preset)
  tokenizer_params = {k: v for k, v in params.items() if k != 'discriminator'}
  return LoadedTokenizer(config, graphdef, params, mesh, preset.logical_rules, step, params_checksum(tokenizer_params))


def reconstruction_report(tokenizer: LoadedTokenizer, images: np.ndarray) -> dict:
  """PSNR (dB, mean over images) of encode -> decode, and how the codebook is used on `images`."""
  tokens = tokenizer.encode(images)
  decoded = tokenizer.decode(tokens)
  mse = np.mean(np.square(decoded - images), axis=(1, 2, 3))
  counts = np.bincount(tokens.reshape(-1), minlength=tokenizer.config.tokenizer.codebook_size)
  p = counts[counts > 0] / counts.sum()
  return {'psnr_db': float(np.mean(10 * np.log10(1 / np.maximum(mse, 1e-10)))), 'images': int(len(images)),
          'codes_used': int((counts > 0).sum()), 'codebook_size': int(len(counts)),
          'codebook_perplexity': float(np.exp(-(p * np.log(p)).sum()))}


def tokenizer_fit_check_command(config_path: str | None, tpu_path: str, overrides: list[str], workdir=None) -> dict:
  """`lvm train-tokenizer --check`: the tokenizer's training step (its discriminator and perceptual
  loss too, when the config has them) compiled for the preset's TPU topology on this machine, and
  its per-device memory against the HBM (core/fit_check.py). No image or weights file is read,
  nothing is trained or written. Without --config, the run in --workdir is checked."""
  from core.fit_check import fit_check_result, fit_report, trained_params
  config: TokenizerRunConfig = apply_overrides(
      config_of_run(config_path, workdir, TokenizerRunConfig, MADE_BY, 'lvm/configs/tokenizer_tiny.py'), overrides)
  task = TokenizerTask(config.tokenizer, config.loss, config.train.seed)
  report = fit_report(task, load_preset(tpu_path), config.optim, config.train.global_batch, task.batch_shapes(),
                      frozen=task.abstract_frozen_inputs())
  return fit_check_result('lvm train-tokenizer', report, model_params=trained_params(task),
                          images_per_step=config.train.global_batch,
                          model_flops_per_step=task.flops_per_example() * config.train.global_batch)


def train_tokenizer_command(config_path: str | None, tpu_path: str, workdir: str, overrides: list[str]) -> dict:
  # Without --config, a rerun continues with the config its workdir recorded.
  config: TokenizerRunConfig = apply_overrides(
      config_of_run(config_path, workdir, TokenizerRunConfig, MADE_BY, 'lvm/configs/tokenizer_tiny.py'), overrides)
  workdir = as_path(workdir)
  size = config.tokenizer.image_size
  plan = {'stream': config.data.stream}
  if jax.process_count() > 1:  # the hosts stream alike, a streamed folder's headers read a share on each
    plan = slice_stream_plan(config.data.source, size, config.data.stream)
  # Each host checks the job and reads its images; one that fails stops every host here, before the
  # others wait for it in the training's first collective.
  with all_or_none('train-tokenizer: the config, images and workdir checked'):
    if (workdir / RUN_CONFIG_FILE).is_file():
      previous, _ = read_run_config(workdir, TokenizerRunConfig, MADE_BY)
      if previous.tokenizer != config.tokenizer:
        raise ConfigError(f'{workdir} holds a tokenizer with other settings; use a new workdir')
      note_changed_training(workdir, previous, config, groups=('train', 'optim', 'loss', 'data'))
    preset = load_preset(tpu_path)
    # Decoded (and checked) before any model work; or, streamed, every file's header read.
    source = training_images(config.data.source, size, **plan)
    config.tokenizer.check_images(source.images_at([0]), config.data.source)
    task = TokenizerTask(config.tokenizer, config.loss, config.train.seed)
    if hasattr(task, 'frozen_inputs'):
      task.frozen_inputs()  # read and checked (files, keys, shapes) before the workdir is touched
    check_batch_layout(config.train, config.optim, preset, records=len(source), data=repr(source))
    make_workdir(workdir)
    write_json_atomic(workdir / RUN_CONFIG_FILE, {'config': to_dict(config), 'tpu': preset_to_record(tpu_path)})

  def make_iterator(process_index, process_count):
    streamed = not isinstance(source, InMemoryImages)  # held in memory: the main thread reads fastest
    return record_batches(source, global_batch=config.train.global_batch, seed=config.train.seed,
                          process_index=process_index, process_count=process_count,
                          prefetch_threads=config.data.read_threads if streamed else 0)

  started = time.time()
  summary = train(task, train_config=config.train, optim=config.optim, preset=preset, workdir=workdir,
                  make_data_iterator=make_iterator, meta={'tokenizer': to_dict(config.tokenizer)})
  summary.pop('trained_params')
  train_seconds = time.time() - started
  # A run stopped by SIGTERM exits now; its rerun reports on the finished tokenizer.
  report = None if summary['preempted'] else reconstruction_report(load_tokenizer(workdir, tpu_path), report_images(source))
  result = {'job': 'lvm train-tokenizer', **summary, 'train_seconds': train_seconds,
            'tokens_per_image': config.tokenizer.tokens_per_image, 'data': repr(source),
            'reconstruction': report, 'versions': versions()}
  if hasattr(task, 'lpips_checksum'):
    result['perceptual_weights'] = {'files': config.loss.perceptual_weights, 'checksum': task.lpips_checksum}
  with all_or_none('train-tokenizer: the result written'):  # by process 0; the others wait for it
    write_json_atomic(workdir / 'train_result.json', result)
  return result


def import_tokenizer_command(weights: str, workdir: str, tpu_path: str | None) -> dict:
  """A released tokenizer (diffusers VQModel dir, or open-muse VQGANModel weights with the
  config.json beside them) -> a tokenizer workdir that `lvm tokenize` and `generate` use."""
  workdir = as_path(workdir)
  if (workdir / 'checkpoints').exists() and any((workdir / 'checkpoints').iterdir()):
    raise ConfigError(f'{workdir} already holds checkpoints; import into an empty workdir')
  tokenizer_config, state, source = read_tokenizer_dir(weights)
  tpu_path = tpu_path or DEFAULT_TPU
  preset = load_preset(tpu_path)
  mesh = make_mesh(preset)
  task = TokenizerTask(tokenizer_config)
  with activation_sharding(mesh, preset.logical_rules):
    _, _, _, abstract_params, _ = init_state(task, mesh, preset.logical_rules, OptimConfig(), 0)
  host_params = tokenizer_params(state, abstract_params, tokenizer_config, source)
  params = jax.tree.map(lambda value, leaf: jax.make_array_from_callback(leaf.shape, leaf.sharding,
                                                                         lambda idx, v=value: v[idx]),
                        host_params, abstract_params)
  write_imported_run(workdir, TokenizerRunConfig(tokenizer=tokenizer_config), tpu_path, params, source)
  result = {'job': 'lvm import-tokenizer', 'weights': source, 'tokenizer': to_dict(tokenizer_config),
            'checksum': params_checksum(params), 'versions': versions()}
  write_json_atomic(workdir / 'import_result.json', result)
  return result
