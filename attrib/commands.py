"""`launch.py attrib ...` jobs. Each writes WORKDIR/<job>_result.json."""
from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attrib import diffusion
from attrib.config import DiffusionConfig
from attrib.data import CaptionDropout, CaptionedImages
from attrib.task import DenoisingTask
from attrib.text_encoder import shared_text_encoder
from core import progress
from core.paths import absolute, as_path
from core.config import ConfigError, apply_overrides, to_dict
from core.distributed import all_or_none
from core.mesh import load_preset, preset_to_record
from core.train_loop import check_batch_layout, restore_latest_params, train
from core.workdir import (RUN_CONFIG_FILE, config_of_run, make_workdir, note_changed_training, read_json, read_run_config,
                         refuse_changed_run, save_image_atomic, versions, write_json_atomic)
from data_pipelines.token_loader import record_batches

DEFAULT_TPU = str(Path(__file__).resolve().parent.parent / 'tpu_configs' / 'cpu_1.py')


MADE_BY = '`attrib train-model` or `attrib import-diffusers`'


def load_run(workdir: Path) -> tuple[DiffusionConfig, str]:
  return read_run_config(workdir, DiffusionConfig, MADE_BY)


def restore_unet(workdir: Path, config: DiffusionConfig, tpu_path: str):
  """(graphdef, params, mesh, preset, step) of the latest checkpoint."""
  preset = load_preset(tpu_path)
  task = DenoisingTask(config.unet, config.schedule, config.data.text_len)
  graphdef, params, mesh, step = restore_latest_params(task, workdir, preset)
  return graphdef, params, mesh, preset, step


@functools.lru_cache(maxsize=4)
def _unet_apply(graphdef):
  """One jitted U-Net call per model structure, reused by every sampling run (params are an argument)."""
  return jax.jit(lambda params, x, t, context: nnx.merge(graphdef, params)(x, t, context))


def generate(graphdef, params, config: DiffusionConfig, context, uncond, seed: int | list[int],
             desc: str | None = None) -> np.ndarray:
  """Images [b, h, w, c] for text states `context` [b, m, k] (CFG against `uncond` [m, k]).
  `seed`: one for the batch, or one per image (each image then equals its batch-of-one result)."""
  c = config.unet
  predict = functools.partial(_unet_apply(graphdef), params)
  uncond_b = jnp.broadcast_to(uncond, context.shape)
  images = diffusion.sample(predict, diffusion.NoiseSchedule(config.schedule),
                            shape=(context.shape[0], c.sample_size, c.sample_size, c.out_channels),
                            context=jnp.asarray(context), uncond_context=uncond_b,
                            guidance=config.sample.guidance, num_steps=config.sample.num_steps,
                            method=config.sample.method, key=_keys(seed), desc=desc)
  return np.clip(np.asarray(images), -1, 1)


def _keys(seed: int | list[int]) -> jax.Array:
  return jax.random.key(seed) if isinstance(seed, int) else jnp.stack([jax.random.key(s) for s in seed])


def save_grid(images_bhwc: np.ndarray, rows: int, path: Path) -> None:
  from PIL import Image
  # A 1-pixel dark-grey frame per cell, so digits that touch their edges stay apart.
  framed = np.pad(images_bhwc[..., 0], ((0, 0), (1, 1), (1, 1)), constant_values=-0.6)[..., None]
  b, h, w, _ = framed.shape
  cols = b // rows
  grid = ((framed[:rows * cols, ..., 0] + 1) * 127.5).round().astype(np.uint8)
  grid = grid.reshape(rows, cols, h, w).transpose(0, 2, 1, 3).reshape(rows * h, cols * w)
  save_image_atomic(path, np.asarray(Image.fromarray(grid).resize((cols * w * 4, rows * h * 4), Image.NEAREST)))


def nearest_neighbour_labels(generated: np.ndarray, train_images: np.ndarray, train_labels: np.ndarray) -> np.ndarray:
  flat = train_images.reshape(len(train_images), -1)
  queries = generated.reshape(len(generated), -1)
  distances = (queries ** 2).sum(1)[:, None] - 2 * queries @ flat.T + (flat ** 2).sum(1)[None, :]
  return train_labels[np.argmin(distances, axis=1)]


def check_same_run(workdir: Path, config: DiffusionConfig) -> None:
  """A rerun continues the run in `workdir`: only the same model on the same images (a workdir of
  another kind is named by load_run, before its config.json would be overwritten)."""
  if not (workdir / RUN_CONFIG_FILE).is_file():
    return
  previous = load_run(workdir)[0]
  # The same exclude file named another way ('x.txt', then '/abs/x.txt' or '../w/x.txt' from
  # elsewhere) is the same file: compared by the absolute path recorded when training ran.
  recorded = read_json(workdir / RUN_CONFIG_FILE).get('exclude_file')
  if config.data.exclude_path and recorded == absolute(config.data.exclude_path):
    previous = dataclasses.replace(previous, data=dataclasses.replace(previous.data,
                                                                      exclude_path=config.data.exclude_path))
  refuse_changed_run(workdir, previous, config, ('unet', 'schedule', 'data'))
  note_changed_training(workdir, previous, config)


def _run_config(config_path: str | None, workdir) -> DiffusionConfig:
  """--config's; without it, the config a rerun's workdir recorded, its exclude file by the absolute
  path recorded (data.exclude_path counts from the folder the run started in)."""
  config = config_of_run(config_path, workdir, DiffusionConfig, MADE_BY, 'attrib/configs/digits.py')
  recorded = None if config_path else read_json(as_path(workdir) / RUN_CONFIG_FILE).get('exclude_file')
  if recorded:
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, exclude_path=recorded))
  return config


def model_fit_check_command(config_path: str | None, tpu_path: str, overrides: list[str], workdir=None) -> dict:
  """`attrib train-model --check`: the diffusion model's training step compiled for the preset's TPU
  topology on this machine, and its per-device memory against the HBM (core/fit_check.py). No data is
  read, nothing is trained or written. Without --config, the run in --workdir is checked."""
  from core.fit_check import fit_check_result, fit_report, trained_params
  config = apply_overrides(_run_config(config_path, workdir), overrides)
  task = DenoisingTask(config.unet, config.schedule, config.data.text_len)
  report = fit_report(task, load_preset(tpu_path), config.optim, config.train.global_batch, task.batch_shapes())
  return fit_check_result('attrib train-model', report, model_params=trained_params(task),
                          images_per_step=config.train.global_batch,
                          model_flops_per_step=task.flops_per_example() * config.train.global_batch)


def train_model_command(config_path: str | None, tpu_path: str, workdir: str, overrides: list[str],
                        evaluate: bool = True, config: DiffusionConfig | None = None,
                        cache_dir: Path | None = None) -> dict:
  if config is None:
    config = _run_config(config_path, workdir)
  config = apply_overrides(config, overrides)
  workdir = as_path(workdir)
  # Each host checks the job and reads its data; one that fails stops every host here, before the
  # others wait for it in the training's first collective.
  with all_or_none('train-model: the config, data and workdir checked'):
    preset = load_preset(tpu_path)
    check_batch_layout(config.train, config.optim, preset)  # before the captions' cache is written
    text_encoder = shared_text_encoder(config.data.text_len)
    if text_encoder.dim != config.unet.cross_attention_dim:
      raise ConfigError(f'unet.cross_attention_dim {config.unet.cross_attention_dim} != text encoder width '
                        f'{text_encoder.dim}')
    check_same_run(workdir, config)
    data = CaptionedImages(config.data, text_encoder, cache_dir=cache_dir or workdir / 'cache')
    task = DenoisingTask(config.unet, config.schedule, config.data.text_len)
    check_batch_layout(config.train, config.optim, preset, records=len(data), data=config.data.train_path)
    make_workdir(workdir)
    write_json_atomic(workdir / RUN_CONFIG_FILE, {'config': to_dict(config), 'tpu': preset_to_record(tpu_path),
                                                  'exclude_file': absolute(config.data.exclude_path)
                                                  if config.data.exclude_path else ''})

  def make_iterator(process_index, process_count):
    return record_batches(data, global_batch=config.train.global_batch, seed=config.train.seed,
                          process_index=process_index, process_count=process_count,
                          map_with_index=CaptionDropout(data.uncond, config.data.caption_dropout))

  started = time.time()
  summary = train(task, train_config=config.train, optim=config.optim, preset=preset, workdir=workdir,
                  make_data_iterator=make_iterator)
  summary.pop('trained_params')
  result = {'job': 'attrib train-model', **summary, 'training_images': len(data),
            'wall_s': time.time() - started}
  if evaluate and not summary['preempted']:
    result['samples'] = evaluate_samples(workdir, config, tpu_path, data)
  result['versions'] = versions()
  with all_or_none('train-model: the result written'):  # by process 0; the others wait for it
    write_json_atomic(workdir / 'train_result.json', result)
  return result


def evaluate_samples(workdir: Path, config: DiffusionConfig, tpu_path: str, data: CaptionedImages,
                     per_class: int = 8) -> dict:
  """A PNG grid (row = digit) and how often a sample's nearest training image has its prompt's class."""
  from data_pipelines.digit_captions import WORDS
  graphdef, params, _, _, step = restore_unet(workdir, config, tpu_path)
  prompts = [f'a handwritten {WORDS[c]}' for c in range(10) for _ in range(per_class)]
  context = data.text_encoder(prompts)[0]
  progress.say(f'sampling {len(prompts)} images ({config.sample.method.upper()}, {config.sample.num_steps} steps, '
               f'guidance {config.sample.guidance})')
  images = generate(graphdef, params, config, context, data.uncond, seed=0, desc='sampling')
  save_grid(images, 10, workdir / 'samples.png')
  predicted = nearest_neighbour_labels(images, data.images, data.labels)
  wanted = np.repeat(np.arange(10), per_class)
  return {'step': step, 'grid': str(workdir / 'samples.png'),
          'nearest_neighbour_class_agreement': float(np.mean(predicted == wanted)), 'chance': 0.1}
