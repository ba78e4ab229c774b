"""`launch.py attrib distill`: train the FastGDA embedder on the teacher's rankings, embed the
training set, and build its ScaNN index.

Everything lives in WORKDIR/student/: config.json (what was trained on what), the train loop's
checkpoints, metrics.jsonl and TensorBoard logs, embeddings.npy (unit rows, training id = row) and
index/. Rerunning the same command resumes training where it stopped; the result goes to
WORKDIR/distill_result.json.
"""
from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import jax
import numpy as np
import optax
from flax import nnx

from attrib.additions import distilled_rows, read_additions
from attrib.embedder import DistillTask, index_queries, index_rows, unit_rows
from attrib.fastgda_config import FastGDAConfig
from attrib.index import Index, probe_vectors
from attrib.student_data import (PairBatches, check_ranks, load_features, load_ranks, pair_iterator,
                                 StudentDataError)
from core import progress
from core.batching import map_batches
from core.config import apply_overrides, from_dict, load_config_file, to_dict
from core.distributed import all_or_none
from core.mesh import load_preset, preset_to_record, recorded_preset
from core.errors import ConfigError
from core.optim import OptimConfig
from core.train_loop import TrainConfig, check_batch_layout, restore_latest_params, train
from core.paths import absolute, as_path, is_remote, resolve_within, within
from core.workdir import load_npy, read_json, save_npy_atomic, versions, write_json_atomic

STUDENT_DIR = 'student'
BASE_INDEX = 'base_index'  # index over unit φ, for FastGDAConfig.rerank_candidates
IMAGE_PRIOR = 'image_prior.npy'  # c(z) per training image, for EmbedderConfig.image_prior
DEFAULT_TPU = str(Path(__file__).resolve().parent.parent / 'tpu_configs' / 'cpu_1.py')
DEFAULT_CONFIG = str(Path(__file__).resolve().parent / 'configs' / 'fastgda_digits.py')


@dataclasses.dataclass(frozen=True)
class StudentRun:
  """What `student/config.json` records: enough for eval and the Attributor to rebuild everything."""
  config: FastGDAConfig
  features: str   # directory of data_feats.npy / *_query_feats.npy
  ranks: str      # training-query ranks the student learned from
  tpu: str


def student_dir(workdir):
  return as_path(workdir) / STUDENT_DIR


def load_student_run(workdir: str | Path) -> StudentRun:
  path = student_dir(workdir) / 'config.json'
  if not path.is_file():
    from core.workdir import quickstart_runs
    if wrong_folder := _not_an_attribution_workdir(as_path(workdir)):
      raise ConfigError(wrong_folder)
    hint = quickstart_runs(workdir)
    raise ConfigError(f'{path} not found: ' + (hint.strip(' ()') if hint else
                                               f'run `launch.py attrib distill --workdir {workdir}` first'))
  stored = read_json(path)
  return StudentRun(from_dict(FastGDAConfig, stored['config']), resolve_within(stored['features'], workdir),
                    resolve_within(stored['ranks'], workdir), recorded_preset(stored['tpu']))


def _not_an_attribution_workdir(folder: Path) -> str | None:
  """What to pass instead, for a folder given as an attribution workdir that is not one: the student
  folder itself (it holds the index, so it is an easy thing to pass), a folder inside a workdir
  (checkpoints/, the student's index/), or an LVM's or a tokenizer's workdir. None for a folder that
  may yet become one (a diffusion workdir not distilled yet, an empty folder)."""
  from core.workdir import RUN_CONFIG_FILE, enclosing_workdir, what_it_holds

  def groups(workdir: Path) -> dict:  # the top-level groups of a workdir's config, {} for none
    return read_json(workdir / RUN_CONFIG_FILE).get('config', {}) if (workdir / RUN_CONFIG_FILE).is_file() else {}

  own = groups(folder)
  if 'embedder' in own:
    return f'{folder} is the student folder of the attribution workdir {folder.parent}: pass that (--workdir {folder.parent})'
  if own:
    return None if 'unet' in own else (f'{folder} is not an attribution workdir{what_it_holds(folder / RUN_CONFIG_FILE)}; '
                                       'pass the workdir `attrib distill` ran in')
  enclosing = enclosing_workdir(folder)
  if enclosing is None:
    return None
  outer = enclosing.parent if 'embedder' in groups(enclosing) else enclosing
  if 'unet' in groups(outer) or (student_dir(outer) / RUN_CONFIG_FILE).is_file():
    return f'{folder} is a folder inside the attribution workdir {outer}: pass that (--workdir {outer})'
  return (f'{folder} is a folder inside the workdir {enclosing}{what_it_holds(enclosing / RUN_CONFIG_FILE)}; pass the '
          'workdir `attrib distill` ran in')


def optim_config(config: FastGDAConfig) -> OptimConfig:
  # torch.optim.AdamW as FastGDA uses it: constant rate, betas (.9, .999), no clipping.
  d = config.distill
  return OptimConfig(lr=d.lr, end_lr=d.lr, warmup_steps=0, decay_steps=1, b1=0.9, b2=0.999, eps=1e-8,
                     weight_decay=d.weight_decay, clip_norm=0.0)


def restore_embedder(workdir: str | Path, run: StudentRun | None = None, tpu_path: str | None = None):
  """(graphdef, params, mesh, preset, step) of the student's latest checkpoint, sharded for `tpu_path`'s
  mesh (default: the preset it was distilled with)."""
  run = run or load_student_run(workdir)
  preset = load_preset(tpu_path or run.tpu)
  graphdef, params, mesh, step = restore_latest_params(DistillTask(run.config.embedder), student_dir(workdir), preset)
  return graphdef, params, mesh, preset, step


def embed(graphdef, params, features: np.ndarray, mesh, rules, batch: int = 1024) -> np.ndarray:
  """Unit embeddings g(φ)/‖g(φ)‖ of feature rows, in batches sharded over the mesh (no dropout)."""
  apply = jax.jit(lambda x: unit_rows(nnx.merge(graphdef, params)(x)))
  return map_batches(apply, features, mesh, rules, batch).astype(np.float32)


def image_priors(graphdef, params, features: np.ndarray, mesh, rules, batch: int = 1024) -> np.ndarray:
  """c(z) of training-image feature rows (EmbedderConfig.image_prior; zeros without it)."""
  apply = jax.jit(lambda x: nnx.merge(graphdef, params).embed_and_prior(x)[1][:, None])
  return map_batches(apply, features, mesh, rules, batch)[:, 0].astype(np.float32)


def student_probes(unit_embeddings: np.ndarray, scale: float, prior: np.ndarray | None, config) -> np.ndarray | None:
  """Recall probes in the form the Attributor queries the index (None: the index's own default)."""
  if prior is None:
    return None
  return index_queries(probe_vectors(unit_embeddings, config.recall_probes), scale, with_prior=True)


def pair_losses(graphdef, params, query_feats, train_feats, ranks: np.ndarray) -> float:
  """Mean BCE of the student on every (query, candidate) pair of `ranks` (validation: no outliers)."""
  model = nnx.merge(graphdef, params)
  scale, offset = float(model.scale[...]), float(model.offset[...])
  apply = jax.jit(lambda x: unit_rows(model(x)))

  def train_side(x):
    embedding, prior = model.embed_and_prior(x)
    return unit_rows(embedding), prior
  with_prior = jax.jit(train_side)
  q = np.asarray(apply(np.asarray(query_feats, np.float32)))
  total = 0.0
  for row, ids in enumerate(ranks):
    t, prior = map(np.asarray, with_prior(np.asarray(train_feats[np.asarray(ids)], np.float32)))
    logits = scale * (t @ q[row]) + offset + prior
    targets = np.arange(len(ids), dtype=np.float32) / len(ids)
    total += float(np.mean(optax.sigmoid_binary_cross_entropy(logits, targets)))
  return total / max(1, len(ranks))


def distill_command(workdir: str, config_path: str | None, tpu_path: str | None, overrides: list[str],
                    features_dir: str | None = None, ranks_path: str | None = None) -> dict:
  workdir = as_path(workdir)
  # A rerun (more distill.epochs, or after an interruption) continues with what the student recorded
  # for what is not given: its config, features, rankings and preset (a COCO student's --config,
  # --features and --ranks had to be given again, and its preset fell back to cpu_1).
  stored = load_student_run(workdir) if (student_dir(workdir) / 'config.json').is_file() else None
  if config_path or stored is None:
    config: FastGDAConfig = load_config_file(config_path or DEFAULT_CONFIG, expect=FastGDAConfig)
  else:
    config = stored.config
  config = apply_overrides(config, overrides)
  features_dir = as_path(features_dir) if features_dir else (
      as_path(stored.features) if stored else workdir / 'features' / config.feature)
  ranks_path = as_path(ranks_path) if ranks_path else (
      as_path(stored.ranks) if stored else workdir / 'teacher_train' / 'ranks.arrayrecord')
  tpu = preset_to_record(tpu_path or (stored.tpu if stored else DEFAULT_TPU))
  preset = load_preset(tpu)

  # Every input is opened and checked before anything is written or compiled, on every host: one that
  # fails stops every host here, before the others wait for it in the training's first collective.
  with all_or_none('distill: the features, rankings and workdir checked'):
    train_feats = load_features(features_dir, 'train')
    query_feats = load_features(features_dir, 'train_queries')
    if train_feats.shape[1] != query_feats.shape[1]:
      raise StudentDataError(f'{features_dir}: training features are {train_feats.shape[1]}-d, queries '
                             f'{query_feats.shape[1]}-d')
    ranks = load_ranks(ranks_path)
    check_ranks(ranks, len(train_feats), len(query_feats), str(ranks_path))
    d = config.distill
    if d.val_queries >= len(ranks):
      raise ConfigError(f'distill.val_queries {d.val_queries} leaves no training queries of the {len(ranks)} '
                        f'in {ranks_path}')
    embedder = dataclasses.replace(config.embedder, input_dim=int(train_feats.shape[1]))
    config = dataclasses.replace(config, embedder=embedder)
    train_ranks, val_ranks = ranks[:len(ranks) - d.val_queries], ranks[len(ranks) - d.val_queries:]
    pairs = train_ranks.shape[0] * train_ranks.shape[1]
    if d.batch > pairs:
      raise ConfigError(f'distill.batch {d.batch} exceeds the {pairs} training pairs in {ranks_path}')
    steps = d.epochs * (pairs // d.batch)
    train_config = TrainConfig(steps=steps, global_batch=d.batch, log_every=min(d.log_every, steps),
                               checkpoint_every=max(1, steps // 4), seed=d.seed, tensorboard=True)
    check_batch_layout(train_config, optim_config(config), preset)

    out = student_dir(workdir)
    stored_path = out / 'config.json'
    trained_on = training_inputs(ranks, query_feats, train_feats, config)
    run_ranks = absolute(ranks_path)
    if stored is not None:
      if stored.config.embedder != config.embedder:
        raise ConfigError(f'{out} holds a student of another embedder ({stored.config.embedder}, now '
                          f'{config.embedder}); use a new --workdir to train a new one')
      if stored.features != absolute(features_dir):
        raise ConfigError(f'{out} holds a student of the features in {stored.features}, not {features_dir}; '
                          'use a new --workdir to train one on these')
      # A rerun resumes from the student's checkpoint (and more distill.epochs continue it): only with
      # the same rankings and settings, or the resumed student would mix two trainings silently.
      recorded = read_json(stored_path).get('trained_on')
      # A student from before the inputs were recorded: its settings and its rankings' path.
      before = recorded or {**training_inputs(None, None, None, stored.config), 'ranks': stored.ranks}
      now = {**trained_on, 'ranks': run_ranks}
      changed = sorted(k for k in before if before[k] != now.get(k))
      if changed:
        raise ConfigError(f'{out} holds a student trained on other inputs ({", ".join(changed)} changed: '
                          f'{ {k: before[k] for k in changed} } then, { {k: now.get(k) for k in changed} } now); '
                          f'move {out} away or use a new --workdir to train a new one')
    out.mkdir(parents=True, exist_ok=True)
    run = StudentRun(config, absolute(features_dir), absolute(ranks_path), tpu)
    # Inputs inside the workdir are recorded relative to it: a copied or moved workdir still finds them.
    write_json_atomic(stored_path, {'config': to_dict(config), 'features': within(run.features, workdir),
                                    'ranks': within(run.ranks, workdir), 'tpu': tpu, 'trained_on': trained_on})
  progress.say(f'distill: {len(train_ranks)} queries x {train_ranks.shape[1]} candidates = {pairs} pairs, '
               f'{d.epochs} epochs of batch {d.batch} ({steps} updates); {d.val_queries} queries held out')

  def make_iterator(process_index, process_count):
    return pair_iterator(PairBatches(train_ranks, query_feats, train_feats, global_batch=d.batch,
                                     outlier_probability=d.outlier_probability, seed=d.seed,
                                     process_index=process_index, process_count=process_count))

  clock = progress.Stopwatch()
  summary = train(DistillTask(config.embedder), train_config=train_config, optim=optim_config(config),
                  preset=preset, workdir=out, make_data_iterator=make_iterator)
  summary.pop('trained_params')
  clock.lap('train')
  result = {'job': 'attrib distill', **summary, 'features': run.features, 'ranks': run.ranks,
            'training_queries': len(train_ranks), 'candidates': int(train_ranks.shape[1]), 'pairs': pairs}
  if not summary['preempted']:
    kept = finished_before(workdir, run, summary['step'])
    if kept is not None:
      progress.say(f'distill: the student of step {summary["step"]} is embedded and indexed already: kept as it '
                   'is (`attrib index` rebuilds its index, with --set index.* for other settings; without '
                   'student/embeddings.npy it is embedded again)')
      result.update(kept)
    else:
      result.update(finish_student(workdir, run, val_ranks, query_feats[len(train_ranks):]))
  result.update(stage_seconds=clock.stages, wall_s=clock.elapsed(), versions=versions())
  with all_or_none('distill: the result written'):  # by process 0; the others wait for it
    write_json_atomic(workdir / 'distill_result.json', result)
  return result


def training_inputs(ranks: np.ndarray, query_feats, train_feats, config: FastGDAConfig) -> dict:
  """What a student's training depends on, apart from the epoch count: the rankings' content, the
  feature rows, and the distillation settings (a checkpoint may only be resumed under the same)."""
  settings = {f'distill.{k}': v for k, v in dataclasses.asdict(config.distill).items()
              if k not in ('epochs', 'log_every')}
  if ranks is None:  # the settings alone (a student from before the inputs were recorded)
    return settings
  digest = hashlib.sha256(np.ascontiguousarray(ranks).tobytes()).hexdigest()[:16]
  return {'ranks_sha256': digest, 'ranks_shape': list(ranks.shape), 'query_rows': len(query_feats),
          'train_rows': len(train_feats), **settings}


# What finish_student adds to a distill result.
FINISHED_KEYS = ('student_step', 'scale_a', 'offset_b', 'most_influential_is', 'val_loss', 'image_prior', 'index',
                 'base_index')


def finished_before(workdir, run: StudentRun, step: int) -> dict | None:
  """The last run's finishing results when it embedded and indexed the student of `step` (a rerun of a
  finished distillation), else None. Doing it again would take hours at scale and replace an index
  that `attrib index` may have sharded or tuned since (and one that `attrib add` grew)."""
  path = as_path(workdir) / 'distill_result.json'
  if not path.is_file():
    return None
  last = read_json(path)
  out = student_dir(workdir)
  needed = [out / 'embeddings.npy', out / 'index'] + [out / BASE_INDEX] * bool(run.config.rerank_candidates) + \
      [out / IMAGE_PRIOR] * bool(run.config.embedder.image_prior)
  if last.get('student_step') != step or last.get('preempted') or not all(p.exists() for p in needed):
    return None
  return {key: last[key] for key in FINISHED_KEYS if key in last}


def finish_student(workdir, run: StudentRun, val_ranks: np.ndarray, val_query_feats: np.ndarray) -> dict:
  """Validation loss, the learned scale, the embedded training set and its index."""
  graphdef, params, mesh, preset, step = restore_embedder(workdir, run)
  scale = float(params['scale'])
  train_feats = load_features(run.features, 'train')
  val_loss = pair_losses(graphdef, params, val_query_feats, train_feats, val_ranks) if len(val_ranks) else None
  additions = read_additions(student_dir(workdir))
  if additions is not None and len(additions):  # training images added since (attrib add) keep their ids
    progress.say(f'distill: with the {len(additions)} training images added to this student')
    train_feats = np.concatenate([np.asarray(train_feats, np.float32), additions.features])
  progress.say(f'distill: embedding {len(train_feats)} training images')
  # Every process embeds its share of each batch (the parameters are sharded over all of them) ...
  embeddings = embed(graphdef, params, train_feats, mesh, preset.logical_rules)
  prior = image_priors(graphdef, params, train_feats, mesh, preset.logical_rules) if run.config.embedder.image_prior else None
  learned = {'student_step': step, 'scale_a': scale, 'offset_b': float(params['offset']),
             'most_influential_is': 'highest cosine' if scale < 0 else 'lowest cosine', 'val_loss': val_loss}
  # ... and process 0 alone writes them and builds the index (one workdir), the others waiting for it.
  built = {}
  with all_or_none('distill: the training set embedded and indexed'):
    if jax.process_index() == 0:
      built = write_and_index(workdir, run, embeddings, prior, scale, train_feats)
  return {**learned, **built}


def write_and_index(workdir, run: StudentRun, embeddings, prior, scale: float, train_feats) -> dict:
  """The student's embeddings (and per-image terms) in its folder, and its ScaNN index (with
  `rerank_candidates`, the base feature's too): each index's kind, size and measured recall."""
  out = student_dir(workdir)
  save_npy_atomic(out / 'embeddings.npy', embeddings)
  prior_summary = {}
  if prior is not None:
    save_npy_atomic(out / IMAGE_PRIOR, prior)
    prior_summary = {'image_prior': {'mean': float(prior.mean()), 'std': float(prior.std())}}
  progress.say(f'distill: building the ScaNN index over {len(embeddings)} rows')
  index = Index.build(index_rows(embeddings, prior), None, run.config.index,
                      student_probes(embeddings, scale, prior, run.config.index))
  index.save(out / 'index')
  indexes = {'index': index}
  if run.config.rerank_candidates:
    progress.say(f'distill: building the ScaNN index over the base feature (top {run.config.rerank_candidates} '
                 'reranked by the student)')
    indexes['base_index'] = Index.build(np.asarray(unit_rows(np.asarray(train_feats, np.float32))), None,
                                        run.config.index)
    indexes['base_index'].save(out / BASE_INDEX)

  def summary(built):
    k = built.meta['k']
    return ({key: built.meta[key] for key in ('kind', 'rows', 'dim', 'k', 'build_s')}
            | {f'recall_at_{k}': built.meta[f'recall_at_{k}']})
  return {**prior_summary, **{name: summary(built) for name, built in indexes.items()}}


def rebuild_index_command(workdir: str, shards: int = 1, overrides: list[str] = ()) -> dict:
  """Rebuilds student/index from student/embeddings.npy (one ScaNN index, or `shards` merged ones),
  with the settings the index has (else the distill config's), changed by `overrides` (index.KEY=VALUE:
  its kind, tree leaves and leaves searched, re-scored candidates: recall against latency, tuned
  without distilling again). The build measures the new index's recall, as distill's does."""
  from attrib.index import ShardedIndex, built_config
  workdir = as_path(workdir)
  run = load_student_run(workdir)
  other = [o for o in overrides if not o.split('=', 1)[0].strip().startswith('index.')]
  if other:
    raise ConfigError(f'--set {other[0]}: attrib index changes the index settings only (index.kind, '
                      'index.num_leaves, index.leaves_to_search, index.reorder, index.k, ...); others are attrib distill\'s')
  settings = built_config(student_dir(workdir) / 'index') or run.config.index
  run = dataclasses.replace(run, config=apply_overrides(dataclasses.replace(run.config, index=settings), overrides))
  path = student_dir(workdir) / 'embeddings.npy'
  if not path.is_file():
    raise ConfigError(f'{path} not found: the distill run in {workdir} has not finished')
  if shards < 1:
    raise ConfigError(f'--shards must be >= 1, got {shards}')
  additions = read_additions(student_dir(workdir))
  # Rows past the distilled and added images are from an addition whose save did not finish.
  added = len(additions or ())
  rows_that_count = distilled_rows(student_dir(workdir), len(load_npy(path, mmap=True)) - added) + added
  embeddings = load_npy(path)[:rows_that_count]
  if shards > len(embeddings):
    raise ConfigError(f'--shards {shards}: more shards than the {len(embeddings)} training rows in {path}')
  prior, probes = None, None
  if run.config.embedder.image_prior:
    prior_path = student_dir(workdir) / IMAGE_PRIOR
    if not prior_path.is_file():
      raise ConfigError(f'{prior_path} not found: the distill run in {workdir} has not finished')
    prior = load_npy(prior_path)[:rows_that_count]
    _, params, _, _, _ = restore_embedder(workdir, run)  # the learned a shapes the queries
    probes = student_probes(embeddings, float(params['scale']), prior, run.config.index)
  build = lambda rows, probes=None: (Index.build(rows, None, run.config.index, probes) if shards == 1
                                     else ShardedIndex.build(rows, None, shards, run.config.index, probes))
  index = build(index_rows(embeddings, prior), probes)
  result = {'job': 'attrib index', 'index': {k: v for k, v in index.meta.items() if k != 'config'},
            'settings': to_dict(run.config.index)}
  base_index = None
  if run.config.rerank_candidates:  # a reranking student answers from φ's index: rebuilt alike
    train_feats = np.asarray(load_features(run.features, 'train'), np.float32)
    if additions is not None and len(additions):
      train_feats = np.concatenate([train_feats, additions.features])
    if len(train_feats) != len(embeddings):
      raise ConfigError(f'{run.features}: {len(train_feats)} training feature rows (with those added) for '
                        f'{len(embeddings)} student embeddings: not the features this student was distilled on')
    base_index = build(np.asarray(unit_rows(train_feats)))
    result['base_index'] = {k: v for k, v in base_index.meta.items() if k != 'config'}
  replace_index(index, student_dir(workdir) / 'index')
  if base_index is not None:
    replace_index(base_index, student_dir(workdir) / BASE_INDEX)
  write_json_atomic(workdir / 'index_result.json', result)
  return result


def replace_index(index, target) -> None:
  """`index` saved over the one at `target`. Locally it is written beside it and renamed into place
  (a crash leaves the old index or the new one); gs:// has no rename, so the old index is removed
  first and a crash leaves none: a clear "missing" error on load, never a mix of the two."""
  target = as_path(target)
  if is_remote(target):
    if target.exists():
      target.rmtree()
    index.save(target)
    return
  import os
  import shutil
  staged = target.parent / f'{target.name}.new'
  if staged.exists():
    shutil.rmtree(staged)
  index.save(staged)
  shutil.rmtree(target, ignore_errors=True)
  os.replace(staged, target)
