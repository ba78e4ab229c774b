"""`launch.py attrib teacher`: the attribution data set the student distills, written resumably.

Queries are generated from held-out prompts; each query's candidates (all training images, or the
top M by base features) are scored by the AbU teacher. Every query's ranking is written to its own
file by an atomic rename, so a crash loses at most the query in flight; hosts take queries
round-robin; at the end process 0 gathers them into one ArrayRecord shard (one record per query).
"""
from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils

from attrib.commands import generate, load_run, restore_unet
from attrib.config import DiffusionConfig
from attrib.data import CaptionedImages
from attrib.diffusion import NoiseSchedule
from attrib.teacher import Teacher, TeacherConfig
from attrib.text_encoder import MiniLMTextEncoder, mean_pool_normalise
from core.config import ConfigError, apply_overrides
from core.workdir import versions, write_json_atomic


def _save_npz_atomic(path: Path, **arrays) -> None:
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  temp = path.with_name(f'.{path.name}.tmp{os.getpid()}')
  temp.write_bytes(buffer.getvalue())
  os.replace(temp, path)


def base_features(images, text_embeddings) -> np.ndarray:
  """Cheap stand-in for FastGDA's DINO + CLIP-text φ on digits: unit pixels ⊕ unit MiniLM text."""
  pixels = images.reshape(len(images), -1)
  pixels = pixels / np.linalg.norm(pixels, axis=1, keepdims=True)
  return np.concatenate([pixels, np.asarray(text_embeddings)], axis=1) / np.sqrt(2)


def make_queries(config: DiffusionConfig, graphdef, params, data: CaptionedImages, count: int, out: Path):
  """Query images from the first `count` held-out prompts (query q is generated with seed q)."""
  if count > len(data.held_out_captions):
    raise ConfigError(f'--queries {count}: only {len(data.held_out_captions)} held-out prompts exist')
  if out.exists():
    stored = np.load(out)
    if len(stored['images']) >= count:
      return stored['images'][:count], [str(c) for c in stored['prompts'][:count]]
  prompts = list(data.held_out_captions[:count])
  context = np.asarray(data.text_encoder(prompts)[0])
  images = np.concatenate([generate(graphdef, params, config, context[q:q + 1], data.uncond, seed=q)
                           for q in range(count)])
  if jax.process_index() == 0:
    _save_npz_atomic(out, images=images, prompts=np.array(prompts))
  return images, prompts


def teacher_command(workdir: str, num_queries: int, candidates: str, tpu_path: str | None,
                    overrides: list[str]) -> dict:
  workdir = Path(workdir)
  config, trained_tpu = load_run(workdir)
  teacher_config: TeacherConfig = apply_overrides(TeacherConfig(), overrides)
  if candidates != 'all' and not candidates.isdigit():
    raise ConfigError(f"--candidates must be a number or 'all', got {candidates!r}")
  out = workdir / 'teacher'
  (out / 'queries').mkdir(parents=True, exist_ok=True)
  started = time.time()
  graphdef, params, mesh, preset, step = restore_unet(workdir, config, tpu_path or trained_tpu)
  text_encoder = MiniLMTextEncoder(max_len=config.data.text_len)
  data = CaptionedImages(config.data, text_encoder, cache_dir=workdir / 'cache')
  teacher = Teacher(graphdef, params, NoiseSchedule(config.schedule), teacher_config, mesh=mesh,
                    rules=preset.logical_rules, num_training_images=len(data))
  query_images, prompts = make_queries(config, graphdef, params, data, num_queries, out / 'queries.npz')
  query_context = np.asarray(text_encoder(prompts)[0])

  # Per-model quantities, computed once and reused by every query (and every rerun).
  fisher_path, base_path = out / 'fisher.npz', out / 'base_losses.npy'
  if fisher_path.exists():
    fisher = dict(np.load(fisher_path))
  else:
    fisher = {k: np.asarray(v) for k, v in teacher.fisher(data.images, data.context).items()}
    if jax.process_index() == 0:
      _save_npz_atomic(fisher_path, **fisher)
  ids = np.arange(len(data), dtype=np.int32)
  if base_path.exists():
    base_losses = np.load(base_path)
  else:
    base_losses = teacher.losses(teacher.kv0, data.images, data.context, ids)
    if jax.process_index() == 0:
      np.save(base_path, base_losses)

  train_text = np.asarray(mean_pool_normalise(data.context, np.ones(data.context.shape[:2])))
  train_features = base_features(data.images, train_text)
  query_text = np.asarray(text_encoder.sentence_embedding(prompts))
  query_features = base_features(query_images, query_text)

  done = 0
  for q in range(jax.process_index(), num_queries, jax.process_count()):
    path = out / 'queries' / f'query_{q:05d}.npz'
    if path.exists():
      continue
    if candidates == 'all':
      cand = ids
    else:
      cand = np.argsort(-(train_features @ query_features[q]), kind='stable')[:int(candidates)].astype(np.int32)
    kv = teacher.unlearn(fisher, query_images[q], query_context[q], q)
    scores = teacher.scores(kv, base_losses[cand], data.images[cand], data.context[cand], cand)
    query_loss = teacher.losses(kv, query_images[q:q + 1], query_context[q:q + 1], np.array([10**6 + q]))
    query_base = teacher.losses(teacher.kv0, query_images[q:q + 1], query_context[q:q + 1], np.array([10**6 + q]))
    order = np.argsort(-scores, kind='stable')  # most influential first
    _save_npz_atomic(path, query=q, candidates=cand, scores=scores, ranked_ids=data.index[cand[order]],
                     query_loss_before=query_base[0], query_loss_after=query_loss[0])
    done += 1
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('teacher queries done')

  result = {'job': 'attrib teacher', 'model_step': step, 'queries': num_queries, 'candidates': candidates,
            'scored_this_run': done, 'teacher': dict(vars(teacher_config)), 'wall_s': time.time() - started}
  if jax.process_index() == 0:
    records = [dict(np.load(out / 'queries' / f'query_{q:05d}.npz')) for q in range(num_queries)]
    write_rank_records(records, out / 'ranks.arrayrecord')
    before = np.array([r['query_loss_before'] for r in records])
    after = np.array([r['query_loss_after'] for r in records])
    result.update(ranks=str(out / 'ranks.arrayrecord'), mean_query_loss_before=float(before.mean()),
                  mean_query_loss_after=float(after.mean()),
                  queries_whose_loss_rose=int((after > before).sum()), versions=versions())
  write_json_atomic(workdir / 'teacher_result.json', result)
  return result


def write_rank_records(records: list[dict], path: Path) -> None:
  """One ArrayRecord record per query: JSON header line, then int32 ranked ids and float32 scores."""
  from array_record.python.array_record_module import ArrayRecordWriter
  temp = path.with_name(f'.{path.name}.tmp')
  writer = ArrayRecordWriter(str(temp), 'group_size:1')
  for r in records:
    order = np.argsort(-r['scores'], kind='stable')
    header = json.dumps({'query': int(r['query']), 'm': int(len(order))}).encode() + b'\n'
    writer.write(header + r['ranked_ids'].astype('<i4').tobytes() + r['scores'][order].astype('<f4').tobytes())
  writer.close()
  os.replace(temp, path)


def read_rank_records(path: Path) -> list[dict]:
  import grain
  source = grain.sources.ArrayRecordDataSource([str(path)])
  out = []
  for i in range(len(source)):
    raw = source[i]
    header, body = raw.split(b'\n', 1)
    meta = json.loads(header)
    m = meta['m']
    out.append({'query': meta['query'], 'ranked_ids': np.frombuffer(body[:4 * m], '<i4'),
                'scores': np.frombuffer(body[4 * m:], '<f4')})
  return out
