"""`launch.py attrib teacher`: the attribution data set the student distills, written resumably.

Queries are generated from held-out prompts (built-in digits) or read from precomputed latents
(`--query-dir`, FastGDA's released MSCOCO queries); each query's candidates (all training images, the
top M by base features, or the first M of a `--neighbours` file) are scored by the AbU teacher. Every query's ranking is written to its own
file by an atomic rename, so a crash loses at most the query in flight; hosts take queries
round-robin, each scoring on its own devices (candidates sharded over them); at the end process 0
gathers them into one ArrayRecord shard (one record per query).
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from attrib.commands import generate, load_run, restore_unet
from attrib.config import DiffusionConfig
from attrib.data import CaptionedImages
from attrib.diffusion import NoiseSchedule
from attrib.precomputed import LazyRows, PrecomputedLatents
from attrib.released import training_set_dir
from attrib.teacher import Teacher, TeacherConfig
from attrib.text_encoder import mean_pool_normalise, shared_text_encoder
from core import progress
from core.distributed import all_or_none
from core.paths import as_path
from core.config import ConfigError, apply_overrides, check_at_least
from core.mesh import MESH_AXES
from core.workdir import (atomic_path, load_npy, load_npz, local_copy, read_json, save_npy_atomic,
                         save_npz_atomic, versions, write_json_atomic)


def base_features(images, text_embeddings) -> np.ndarray:
  """Cheap stand-in for FastGDA's DINO + CLIP-text φ on digits: unit pixels ⊕ unit MiniLM text."""
  pixels = images.reshape(len(images), -1)
  pixels = pixels / np.linalg.norm(pixels, axis=1, keepdims=True)
  return np.concatenate([pixels, np.asarray(text_embeddings)], axis=1) / np.sqrt(2)


# Output directory and result file of each query split.
SPLIT_DIRS = {'test': 'teacher', 'train': 'teacher_train'}
# Seeds of the training split start here, so no training query repeats a test query's noise.
TRAIN_SEED_OFFSET = 100_000


def query_plan(held_out_captions, split: str, count: int) -> tuple[list[str], list[int]]:
  """(prompt, seed) of each query. `test` queries (evaluation, the counterfactual) take the captions
  of the first half of the held-out images, in order. `train` queries (the student's) take every
  caption the digits' template can write (10 classes x thickness x slant) that no test query uses,
  so the student never trains on a prompt it is evaluated on. Query q takes prompt q mod P with
  seed q (test) or TRAIN_SEED_OFFSET + q (train): prompts x seeds give as many queries as wanted."""
  from data_pipelines.digit_captions import caption
  test_pool = list(held_out_captions[:len(held_out_captions) // 2])
  if split == 'test':
    pool, offset = test_pool, 0
  else:
    styles = [', '.join(w for w in (ink, slant) if w) for ink in ('', 'thick', 'thin')
              for slant in ('', 'right-slanted', 'left-slanted')]
    used = set(test_pool)
    pool = [p for p in (caption(label, style) for label in range(10) for style in styles) if p not in used]
    offset = TRAIN_SEED_OFFSET
  return [pool[q % len(pool)] for q in range(count)], [offset + q for q in range(count)]


def make_queries(config: DiffusionConfig, graphdef, params, data: CaptionedImages, count: int, out: Path,
                 split: str = 'test'):
  """Query images of a split (see `query_plan`), generated once and read back on reruns. Asking for
  more queries than `out` holds generates only the new ones: the stored images, which earlier teacher
  rankings were computed on, are kept bit for bit (a batch of another size may round differently)."""
  prompts, seeds = query_plan(data.held_out_captions, split, count)
  kept = None
  if out.exists():
    stored = load_npz(out)
    stored_prompts = [str(c) for c in stored['prompts']]
    differ = [q for q, (a, b) in enumerate(zip(stored_prompts, prompts)) if a != b]
    if differ:
      q = differ[0]
      raise ConfigError(f'{out}: query {q} was made from the prompt {stored_prompts[q]!r}, this model\'s {split} '
                        f'split asks for {prompts[q]!r}; move the file away to start over')
    if len(stored['images']) >= count:
      return stored['images'][:count], prompts
    kept = stored['images']
  first = 0 if kept is None else len(kept)
  context = np.asarray(data.text_encoder(prompts[first:])[0])
  # In batches (0.11 s per query at 8 against 0.18 alone on 2 cores); each query keeps its own seed.
  batch = 16
  new = [generate(graphdef, params, config, context[q:q + batch], data.uncond, seed=seeds[first + q:first + q + batch],
                  desc=f'queries {first + q + 1}-{min(first + q + batch, count)}/{count}')
         for q in range(0, count - first, batch)]
  images = np.concatenate(([kept] if first else []) + new)
  if jax.process_index() == 0:
    save_npz_atomic(out, images=images, prompts=np.array(prompts))
  return images, prompts


@dataclasses.dataclass
class TrainingViews:
  """What the teacher reads of a training set: N images, F flipped copies (rows f·N + i), K captions."""
  num_images: int
  num_flips: int
  num_captions: int
  latent_rows: Any   # rows [0, F·N) -> model inputs [rows, h, w, c] (an array or a LazyRows)
  text_rows: Callable[[int], Any]  # caption k -> image ids [0, N) -> text states [ids, tokens, dim]
  index: np.ndarray  # position -> training-set id (ids stay stable when images are excluded)


@dataclasses.dataclass
class Queries:
  images: np.ndarray    # [Q, h, w, c] model inputs
  context: np.ndarray   # [Q, tokens, dim] text states of their prompts
  features: np.ndarray  # [Q, d] base features, comparable with the training set's


def _gather(view, rows: np.ndarray) -> LazyRows:
  return LazyRows(lambda idx: view[rows[idx]], len(rows))


def candidate_losses(teacher: Teacher, kv, train: TrainingViews, cand: np.ndarray, desc: str | None = None,
                     shaped_like: int = 0) -> np.ndarray:
  """[F, m]: each candidate's loss per flip, averaged over its captions (AbU's scoring loss).

  The noise of (row, caption) is seeded by `row·K + caption`, so it is the same before and after
  unlearning and for any candidate subset. `shaped_like`: see `Teacher.losses`.
  """
  out = np.zeros((train.num_flips, len(cand)), np.float64)
  for flip in range(train.num_flips):
    rows = cand + flip * train.num_images
    for caption in range(train.num_captions):
      ids = (rows * train.num_captions + caption).astype(np.int32)
      part = f'{desc} (flip {flip + 1}/{train.num_flips}, caption {caption + 1}/{train.num_captions})' \
          if desc and train.num_flips * train.num_captions > 1 else desc
      out[flip] += teacher.losses(kv, _gather(train.latent_rows, rows), _gather(train.text_rows(caption), cand),
                                  ids, desc=part, shaped_like=shaped_like) / train.num_captions
  return out


def _check_candidates(candidates: str, num_images: int) -> None:
  """Before the queries are made: a count above the training set would quietly rank every image
  while the stored settings record the larger count."""
  if candidates != 'all' and int(candidates) > num_images:
    raise ConfigError(f"--candidates {candidates} exceeds the {num_images} training images; "
                      f"use --candidates all to rank every one")


def _digits_setup(workdir: Path, config, graphdef, params, num_queries: int, out: Path, split: str,
                  candidates: str):
  text_encoder = shared_text_encoder(config.data.text_len)
  data = CaptionedImages(config.data, text_encoder, cache_dir=workdir / 'cache')
  _check_candidates(candidates, len(data))
  progress.say(f'teacher: generating {num_queries} queries from held-out prompts (or reading them back)')
  query_images, prompts = make_queries(config, graphdef, params, data, num_queries, out / 'queries.npz', split)
  query_context = np.asarray(text_encoder(prompts)[0])
  train_text = np.asarray(mean_pool_normalise(data.context, np.ones(data.context.shape[:2])))
  train = TrainingViews(len(data), 1, 1, data.images, lambda caption: data.context, data.index)
  queries = Queries(query_images, query_context,
                    base_features(query_images, np.asarray(text_encoder.sentence_embedding(prompts))))
  return train, queries, lambda: base_features(data.images, train_text)


def _precomputed_setup(config, data_dir: Path, query_dir: str | None, num_queries: int, candidates: str):
  if not query_dir:
    raise ConfigError('this model trained on precomputed latents: pass --query-dir with the queries\' '
                      'latents.npy and text_embeddings.npy')
  data = PrecomputedLatents(data_dir, config.unet, flipped_copies=True)
  _check_candidates(candidates, data.num_images)
  query_set = PrecomputedLatents(query_dir, config.unet, flipped_copies=False)
  if num_queries > query_set.num_images:
    raise ConfigError(f'--queries {num_queries}: {query_dir} holds {query_set.num_images} queries')
  for name, d in (('training set', data), ('queries', query_set)):
    if d.text_len != config.data.text_len:
      raise ConfigError(f'{name} in {d.directory}: {d.text_len} text tokens, the model uses {config.data.text_len}')
  rows = np.arange(num_queries)
  train = TrainingViews(data.num_images, data.num_flips, data.num_captions, data.latent_rows(),
                        data.text_rows, np.arange(data.num_images))
  queries = Queries(query_set.latent_rows()[rows], query_set.text_rows(0)[rows], query_set.features()[rows])
  return train, queries, data.features


def _local_teacher_mesh(mesh, params):
  """Hosts score different queries, so each needs the whole model on its own devices."""
  if jax.process_count() == 1:
    return mesh, params
  full = multihost_utils.process_allgather(params, tiled=True)
  return Mesh(np.array(jax.local_devices()).reshape(-1, 1, 1), MESH_AXES), full


SETTINGS_FILE = 'settings.json'


def check_same_ranking_settings(workdir: Path, split: str, now: dict) -> None:
  """A rerun only adds queries ranked the way the stored ones were: same teacher settings, candidates,
  model step, neighbours and query source. Otherwise one split would hold rankings of two kinds, which
  the student and the evaluation would mix without a word. Refused before anything is computed.

  Splits ranked before this file existed are held to the settings in their last `*_result.json`."""
  out = workdir / SPLIT_DIRS[split]
  stored_queries = (out / 'queries').exists() and any((out / 'queries').glob('query_*.npz'))
  if not stored_queries:
    return
  settings_path = out / SETTINGS_FILE
  if settings_path.exists():
    before, source = read_json(settings_path), settings_path
  else:
    result_path = workdir / f'{SPLIT_DIRS[split]}_result.json'
    if not result_path.exists():
      return  # nothing records how the stored queries were ranked
    result = read_json(result_path)
    before = {'teacher': result.get('teacher'), 'candidates': result.get('candidates'),
              'model_step': result.get('model_step')}
    source = result_path
  changed = []
  for key, then in before.items():
    if key == 'teacher':
      changed += [f'{name}: {then.get(name)!r} then, {value!r} now' for name, value in now['teacher'].items()
                  if name in then and then[name] != value]
    elif then != now.get(key):
      changed.append(f'{key}: {then!r} then, {now.get(key)!r} now')
  if changed:
    raise ConfigError(f'{out}: its stored queries were ranked with other settings ({"; ".join(changed)}; '
                      f'recorded in {source}). Rerun with the same settings to add queries, or rank into '
                      f'another workdir (or move {out} away) to start over.')


def _fisher(teacher: Teacher, train: TrainingViews, workdir: Path, step: int) -> tuple[dict, Path]:
  """The diagonal Fisher (computed, or read back) and the path of the θ₀ losses' cache. Both depend
  on the model (its step) and the teacher settings, not on the queries: both splits and every rerun
  share them, named by what they depend on."""
  cache = workdir / 'teacher_cache'
  cache.mkdir(exist_ok=True)
  c = teacher.config
  fisher_path = cache / f'fisher_step{step}_s{c.fisher_samples_per_image}_n{c.fisher_images}.npz'
  base_path = cache / f'base_losses_step{step}_stride{c.score_timestep_stride}.npy'
  if fisher_path.exists():
    progress.say(f'teacher: Fisher read back from {fisher_path}')
    return load_npz(fisher_path), base_path
  rows = np.arange(train.num_images)
  if 0 < c.fisher_images < train.num_images:
    rows = np.sort(np.random.default_rng(0).choice(train.num_images, c.fisher_images, replace=False))
  progress.say(f'teacher: diagonal Fisher over {len(rows)} training images x {c.fisher_samples_per_image} samples')
  fisher = teacher.fisher(_gather(train.latent_rows, rows), _gather(train.text_rows(0), rows))
  fisher = {k: np.asarray(v) for k, v in fisher.items()}
  if jax.process_index() == 0:
    save_npz_atomic(fisher_path, **fisher)
  return fisher, base_path


def teacher_command(workdir: str, num_queries: int, candidates: str, tpu_path: str | None,
                    overrides: list[str], query_dir: str | None = None, neighbours: str | None = None,
                    split: str = 'test') -> dict:
  check_at_least(1, queries=num_queries)
  workdir = as_path(workdir)
  config, trained_tpu = load_run(workdir)
  teacher_config: TeacherConfig = apply_overrides(TeacherConfig(), overrides)
  if candidates != 'all' and not (candidates.isdigit() and int(candidates) >= 1):
    raise ConfigError(f"--candidates must be 'all' or a count >= 1, got {candidates!r}")
  neighbour_ids = load_npy(neighbours, mmap=True) if neighbours else None
  if neighbour_ids is not None and (candidates == 'all' or neighbour_ids.ndim != 2
                                    or neighbour_ids.shape[0] < num_queries or neighbour_ids.shape[1] < int(candidates)):
    raise ConfigError(f'--neighbours {neighbours}: expected [queries >= {num_queries}, >= --candidates] training '
                      f'ids, got shape {neighbour_ids.shape} with --candidates {candidates}')
  if split not in SPLIT_DIRS:
    raise ConfigError(f"--split {split!r}: expected 'test' or 'train'")
  out = workdir / SPLIT_DIRS[split]
  (out / 'queries').mkdir(parents=True, exist_ok=True)
  started = time.time()
  graphdef, params, mesh, preset, step = restore_unet(workdir, config, tpu_path or trained_tpu)
  # candidate_batch only sizes the scoring calls (padding changes no loss), so it may change between runs.
  ranked_under = {'teacher': {k: v for k, v in vars(teacher_config).items() if k != 'candidate_batch'},
                  'candidates': candidates, 'model_step': step,
                  'neighbours': neighbours, 'query_dir': query_dir}
  # Every host reads the data and its queries; one that fails stops every host (here, not hours later
  # at the end of the others' queries).
  with all_or_none('teacher: the training set and the queries read'):
    check_same_ranking_settings(workdir, split, ranked_under)
    data_dir = training_set_dir(config)
    if data_dir is None:
      train, queries, train_features = _digits_setup(workdir, config, graphdef, params, num_queries, out, split,
                                                     candidates)
    else:
      train, queries, train_features = _precomputed_setup(config, data_dir, query_dir, num_queries, candidates)
    if neighbour_ids is not None and (neighbour_ids.min() < 0 or neighbour_ids.max() >= train.num_images):
      raise ConfigError(f'--neighbours {neighbours}: ids must be in [0, {train.num_images})')
  teacher_mesh, teacher_params = _local_teacher_mesh(mesh, params)
  teacher = Teacher(graphdef, teacher_params, NoiseSchedule(config.schedule), teacher_config, mesh=teacher_mesh,
                    rules=preset.logical_rules, num_training_images=train.num_images)
  # Process 0 saves the Fisher and the settings; a save that fails there stops every host now.
  with all_or_none('teacher: the Fisher and the settings saved'):
    fisher, base_path = _fisher(teacher, train, workdir, step)
    # θ₀ losses [F, N], filled in as candidates need them (NaN = not computed yet).
    base_losses = (load_npy(base_path).reshape(train.num_flips, train.num_images) if base_path.exists()
                   else np.full((train.num_flips, train.num_images), np.nan))
    features = train_features() if candidates != 'all' and neighbour_ids is None else None
    if jax.process_index() == 0:
      write_json_atomic(out / SETTINGS_FILE, ranked_under)
  done = 0
  mine = list(range(jax.process_index(), num_queries, jax.process_count()))
  todo = [q for q in mine if not (out / 'queries' / f'query_{q:05d}.npz').exists()]
  if len(todo) < len(mine):
    progress.say(f'teacher: resuming {workdir}: {len(mine) - len(todo)} of {len(mine)} queries already ranked')
  per_query = train.num_images if candidates == 'all' else int(candidates)
  if len(todo) * per_query >= train.num_images and jax.process_count() == 1:
    # The queries' candidates will cover most of the training set: its θ₀ losses in full-size
    # batches now, instead of per query in sets of every size (each new size a compile). On the
    # digits' 128 training queries the teacher's total stayed within noise (433 vs 437 s); the
    # per-query times become even (1.2 s instead of 1.7-4.8 s for the first few dozen).
    missing = np.flatnonzero(np.isnan(base_losses).any(axis=0)).astype(np.int32)
    if len(missing):
      base_losses[:, missing] = candidate_losses(teacher, teacher.kv0, train, missing,
                                                 desc=f'θ₀ losses of {len(missing)} training images')
      save_npy_atomic(base_path, base_losses)
  clock = progress.Stopwatch()
  # Each host ranks its own queries; one that fails there (a full disk) stops every host at the end.
  with all_or_none('teacher: every query ranked'):
    for q in todo:
      query_started = time.time()
      path = out / 'queries' / f'query_{q:05d}.npz'
      if candidates == 'all':
        cand = np.arange(train.num_images, dtype=np.int32)
      elif neighbour_ids is not None:
        cand = np.asarray(neighbour_ids[q, :int(candidates)], np.int32)
      else:
        cand = np.argsort(-(features @ queries.features[q]), kind='stable')[:int(candidates)].astype(np.int32)
      missing = cand[np.isnan(base_losses[:, cand]).any(axis=0)]
      if len(missing):
        # In the scoring call's batch shape (below), so that any count of missing ones compiles nothing.
        base_losses[:, missing] = candidate_losses(teacher, teacher.kv0, train, missing,
                                                   desc=f'query {q + 1}/{num_queries}: θ₀ losses',
                                                   shaped_like=len(cand))
        if jax.process_count() == 1:  # hosts fill different entries; only a lone process may cache them
          save_npy_atomic(base_path, base_losses)
      kv = teacher.unlearn(fisher, queries.images[q], queries.context[q], q)
      # Score = loss increase; with flipped copies the larger of the two (AbU App. B.4).
      after = candidate_losses(teacher, kv, train, cand, desc=f'query {q + 1}/{num_queries}: scoring {len(cand)}')
      scores = (after - base_losses[:, cand]).max(axis=0).astype(np.float32)
      query_rows = (queries.images[q:q + 1], queries.context[q:q + 1], np.array([10**6 + q]))
      query_loss = teacher.losses(kv, *query_rows)
      query_base = teacher.losses(teacher.kv0, *query_rows)
      order = np.argsort(-scores, kind='stable')  # most influential first
      save_npz_atomic(path, query=q, candidates=cand, scores=scores, ranked_ids=train.index[cand[order]],
                       query_loss_before=query_base[0], query_loss_after=query_loss[0],
                       seconds=time.time() - query_started)
      done += 1
      progress.say(f'teacher: query {q + 1}/{num_queries} ranked {len(cand)} candidates '
                   f'({progress.format_seconds(clock.elapsed() / done)} per query, {clock.eta(done, len(todo))} left)')

  result = {'job': 'attrib teacher', 'split': split, 'model_step': step, 'queries': num_queries, 'candidates': candidates,
            'scored_this_run': done, 'processes': jax.process_count(), 'teacher': dict(vars(teacher_config)),
            'wall_s': time.time() - started}
  # Process 0 gathers the rankings (thousands of files on gs:// at COCO scale); the others wait for it.
  with all_or_none('teacher: the rankings gathered'):
    if jax.process_index() == 0:
      records = [load_npz(out / 'queries' / f'query_{q:05d}.npz') for q in range(num_queries)]
      write_rank_records(records, out / 'ranks.arrayrecord')
      before = np.array([r['query_loss_before'] for r in records])
      after = np.array([r['query_loss_after'] for r in records])
      result.update(ranks=str(out / 'ranks.arrayrecord'), mean_query_loss_before=float(before.mean()),
                    mean_query_loss_after=float(after.mean()),
                    queries_whose_loss_rose=int((after > before).sum()), versions=versions())
      write_json_atomic(workdir / f'{SPLIT_DIRS[split]}_result.json', result)
  return result


def write_rank_records(records: list[dict], path: Path) -> None:
  """One ArrayRecord record per query: JSON header line, then int32 ranked ids and float32 scores."""
  from array_record.python.array_record_module import ArrayRecordWriter
  with atomic_path(path) as temp:
    writer = ArrayRecordWriter(str(temp), 'group_size:1')
    for r in records:
      order = np.argsort(-r['scores'], kind='stable')
      header = json.dumps({'query': int(r['query']), 'm': int(len(order))}).encode() + b'\n'
      writer.write(header + r['ranked_ids'].astype('<i4').tobytes() + r['scores'][order].astype('<f4').tobytes())
    writer.close()


def read_rank_records(path: Path) -> list[dict]:
  import grain
  with local_copy(path) as local:
    source = grain.sources.ArrayRecordDataSource([str(local)])
    raws = [source[i] for i in range(len(source))]
  out = []
  for raw in raws:
    header, body = raw.split(b'\n', 1)
    meta = json.loads(header)
    m = meta['m']
    out.append({'query': meta['query'], 'ranked_ids': np.frombuffer(body[:4 * m], '<i4'),
                'scores': np.frombuffer(body[4 * m:], '<f4')})
  return out
