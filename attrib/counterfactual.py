"""`launch.py attrib counterfactual`: does removing the teacher's top-K training images and
retraining hurt the query more than removing K random ones? (AbU §3, FastGDA §4.1)

For each seed: one model trained on everything (θ₀), and per query one model without the teacher's
top K and one without K random images, all with the same recipe. ΔL = L(ẑ, θ₋K) − L(ẑ, θ₀) with the
teacher's fixed-noise scoring loss. Every retraining is its own resumable workdir.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

from attrib.commands import load_run, restore_unet, train_model_command
from attrib.curation import read_rank_records
from attrib.diffusion import NoiseSchedule
from attrib.teacher import Teacher, TeacherConfig
from attrib.text_encoder import shared_text_encoder
from core import progress
from core.compile_cache import reuse_compilations
from core.config import ConfigError, check_at_least
from core.errors import stop_if_preempted
from core.paths import as_path
from core.workdir import load_npz, versions, write_bytes_atomic, write_json_atomic


def query_losses(workdir: Path, images, contexts, queries, repeats: int = 4) -> list[float]:
  """The teacher's fixed-noise loss of each query under the model in `workdir` (restored once)."""
  config, tpu = load_run(workdir)
  graphdef, params, mesh, preset, _ = restore_unet(workdir, config, tpu)
  teacher = Teacher(graphdef, params, NoiseSchedule(config.schedule), TeacherConfig(), mesh=mesh,
                    rules=preset.logical_rules, num_training_images=1)
  losses = []
  for image, context, query in zip(images, contexts, queries):
    # Several fixed noise draws (ids) of the same image: less variance, same noise for every model.
    ids = np.array([10**6 + query * 100 + r for r in range(repeats)], np.int32)
    losses.append(float(np.mean(teacher.losses(teacher.kv0, np.repeat(image[None], repeats, 0),
                                               np.repeat(context[None], repeats, 0), ids))))
  return losses


def _finished(run: Path, steps: int) -> bool:
  """A retraining is done when its checkpoints reached `steps` (state lives in checkpoints)."""
  from core.checkpoint import make_manager
  if not (run / 'checkpoints').is_dir():
    return False
  manager = make_manager(run, async_save=False)
  try:
    return (manager.latest_step() or 0) >= steps
  finally:
    manager.close()


def ranking_top_k(workdir: Path, ranking: str, queries, records, k: int) -> list[np.ndarray]:
  """Each query's top K training ids by `ranking`: 'teacher' (AbU), 'student' (the distilled
  embedding, through the Attributor) or a base feature name (cosine of φ, features/<name>/)."""
  if ranking == 'teacher':
    return [r['ranked_ids'][:k] for r in records]
  if ranking == 'student':
    from attrib.attributor import Attributor
    attributor = Attributor.load(workdir)
    return [attributor.attribute(image=queries['images'][q], prompt=str(queries['prompts'][q]), k=k).ids
            for q in range(len(records))]
  from attrib.evaluation import rank_by_cosine
  from attrib.student_data import load_features
  directory = workdir / 'features' / ranking
  query_feats = np.asarray(load_features(directory, 'test_queries'))[:len(records)]
  return list(rank_by_cosine(query_feats, np.asarray(load_features(directory, 'train')))[:, :k])


def counterfactual_command(workdir: str, k: int, num_queries: int, seeds: int, steps: int,
                           tpu_path: str | None, rankings: tuple[str, ...] = ('teacher',)) -> dict:
  check_at_least(1, k=k, queries=num_queries, seeds=seeds, steps=steps)
  workdir = as_path(workdir)
  # Every retraining runs the same init, step and loss programs: compile them once per job.
  with reuse_compilations(workdir / 'cache' / 'xla'):
    return _counterfactual(workdir, k, num_queries, seeds, steps, tpu_path, rankings)


def _counterfactual(workdir: Path, k: int, num_queries: int, seeds: int, steps: int, tpu_path: str | None,
                    rankings: tuple[str, ...]) -> dict:
  config, trained_tpu = load_run(workdir)
  for name in rankings:
    if name not in ('teacher', 'student') and not (workdir / 'features' / name).is_dir():
      raise ConfigError(f"--ranking {name!r}: expected 'teacher', 'student' or a base feature with "
                        f"features in {workdir / 'features' / name} (run `attrib features` first)")
  ranks_path = workdir / 'teacher' / 'ranks.arrayrecord'
  if not ranks_path.exists():
    raise ConfigError(f'{ranks_path} not found: run `attrib teacher` on {workdir} first')
  records = read_rank_records(ranks_path)[:num_queries]
  if len(records) < num_queries:
    raise ConfigError(f'{ranks_path} holds {len(records)} queries, fewer than --queries {num_queries}')
  fewest = min(len(r['ranked_ids']) for r in records)
  if fewest < k:
    raise ConfigError(f'--k {k} exceeds the {fewest} candidates the teacher ranked for a query in {ranks_path}')
  queries = load_npz(workdir / 'teacher' / 'queries.npz')
  text_encoder = shared_text_encoder(config.data.text_len)
  query_context = np.asarray(text_encoder([str(p) for p in queries['prompts'][:num_queries]])[0])
  # The training set's size from the data it was trained on (result files are reports, not state).
  training_size = None
  if config.data.train_path == 'builtin:digits':
    from data_pipelines.digit_captions import digit_captions
    training_size = len(digit_captions()[0]) - config.data.held_out
  out = workdir / 'counterfactual'
  out.mkdir(parents=True, exist_ok=True)
  recipe = dataclasses.replace(config, train=dataclasses.replace(config.train, steps=steps, progress_bar=False,
                                                                 checkpoint_every=steps),
                               optim=dataclasses.replace(config.optim, decay_steps=max(1, steps - config.optim.warmup_steps)))
  tpu = tpu_path or trained_tpu
  started = time.time()

  def trained(name: str, seed: int, excluded: np.ndarray | None) -> Path:
    run = out / name
    overrides = [f'train.seed={seed}']
    if excluded is not None:
      run.mkdir(parents=True, exist_ok=True)
      write_bytes_atomic(run / 'excluded.txt', ','.join(map(str, excluded)).encode())
      overrides.append(f'data.exclude_path={run / "excluded.txt"}')
    if not _finished(run, steps):
      progress.say(f'counterfactual: training {name} ({steps} steps)')
      # The captions' text states are the parent model's (same captions): encode them once.
      trained_run = train_model_command('', tpu, str(run), overrides, evaluate=False, config=recipe,
                                        cache_dir=workdir / 'cache')
      stop_if_preempted(trained_run, f'counterfactual: the retraining {name}')
    announce(name)
    return run

  tops = {name: ranking_top_k(workdir, name, queries, records, k) for name in rankings}  # checked before training
  rows = []
  clock, total_runs = progress.Stopwatch(), seeds * (1 + (1 + len(rankings)) * num_queries)
  runs_done = 0

  def announce(name: str) -> None:
    nonlocal runs_done
    runs_done += 1
    progress.say(f'counterfactual: model {runs_done}/{total_runs} ({name}) ready, '
                 f'{progress.format_seconds(clock.elapsed())} so far, about {clock.eta(runs_done, total_runs)} left')

  def query_loss(run: Path, q: int) -> float:
    return query_losses(run, [queries['images'][q]], [query_context[q]], [q])[0]

  for seed in range(seeds):
    base_model = trained(f'full_seed{seed}', seed, None)
    base_losses = query_losses(base_model, queries['images'][:num_queries], query_context, range(num_queries))
    for q, record in enumerate(records):
      base = base_losses[q]
      rng = np.random.default_rng(1000 * seed + q)
      random = rng.choice(training_size or int(record['ranked_ids'].max()) + 1, size=k, replace=False)
      row = {'query': q, 'seed': seed, 'loss_full': base}
      for name in rankings:
        run_name = f'q{q}_top{k}_seed{seed}' if name == 'teacher' else f'q{q}_{name}{k}_seed{seed}'
        row[f'delta_{name}_top_k'] = query_loss(trained(run_name, seed, tops[name][q]), q) - base
      row['delta_random_k'] = query_loss(trained(f'q{q}_random{k}_seed{seed}', seed, random), q) - base
      rows.append(row)
  delta_random = np.array([r['delta_random_k'] for r in rows])
  result = {'job': 'attrib counterfactual', 'k': k, 'queries': num_queries, 'seeds': seeds, 'steps': steps,
            'rankings': list(rankings), 'mean_delta_loss_random_k': float(delta_random.mean()),
            'stderr_delta_loss_random_k': float(delta_random.std() / np.sqrt(len(rows))), 'rows': rows,
            'wall_s': time.time() - started, 'versions': versions()}
  for name in rankings:
    delta = np.array([r[f'delta_{name}_top_k'] for r in rows])
    result[f'mean_delta_loss_{name}_top_k'] = float(delta.mean())
    result[f'stderr_delta_loss_{name}_top_k'] = float(delta.std() / np.sqrt(len(rows)))
    result[f'{name}_top_k_beats_random_fraction'] = float(np.mean(delta > delta_random))
  write_json_atomic(workdir / 'counterfactual_result.json', result)
  return result
