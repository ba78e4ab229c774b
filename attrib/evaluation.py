"""`launch.py attrib eval`: how close are fast rankings to the teacher's, and how fast are they?

mAP(L) exactly as FastGDA's eval.py: for each test query, the positives are the teacher's top L;
AP is taken over the *full* predicted ranking (score 1/(rank+1), i.e. average precision of the
ranked list), and mAP is the mean over queries, reported with its standard error. It is computed for
each base feature (rank by cosine of φ) and for the distilled embedding (rank by the student's
score, most influential first), on test queries the student never trained on. The student is also
compared with the best base feature query by query (paired): the mean difference of AP, its
standard error, and on how many queries the student wins. With a few test queries the unpaired
standard errors overlap even when one ranking wins on nearly every query, and vice versa.
"""
from __future__ import annotations

import numpy as np

from core import progress
from core.errors import ConfigError
from core.paths import as_path
from core.workdir import load_npy, load_npz, versions, write_result_if_writable


def average_precision(predicted: np.ndarray, positives: np.ndarray) -> float:
  """AP of a ranked list (best first) against a set of positives; equals scikit-learn's
  average_precision_score(isin(predicted, positives), 1/(rank+1)) (ranks are distinct, no ties)."""
  relevant = np.isin(predicted, positives)
  hits = np.cumsum(relevant)
  if hits[-1] == 0:
    return 0.0
  precision_at_hit = hits[relevant] / (np.flatnonzero(relevant) + 1)
  return float(precision_at_hit.sum() / hits[-1])


def mean_average_precision(predicted: np.ndarray, teacher: np.ndarray, top_l: int) -> tuple[float, float]:
  """(mAP(L), standard error) of predicted rankings [Q, N] against the teacher's rankings [Q, >= L]."""
  aps = np.array([average_precision(p, t[:top_l]) for p, t in zip(predicted, teacher)])
  return float(aps.mean()), float(aps.std() / np.sqrt(len(aps)))


def rank_by_cosine(query_feats: np.ndarray, train_feats: np.ndarray) -> np.ndarray:
  """Training ids by descending cosine similarity to each query (a base feature's own ranking)."""
  q = query_feats / np.linalg.norm(query_feats, axis=1, keepdims=True)
  t = train_feats / np.linalg.norm(train_feats, axis=1, keepdims=True)
  return np.argsort(-(q @ t.T), axis=1, kind='stable')


def paired_comparison(predicted: np.ndarray, reference: np.ndarray, teacher: np.ndarray, map_at) -> dict:
  """Per L: AP(predicted) − AP(reference) over the same queries: mean, standard error of that mean
  (ddof 1), and the number of queries where predicted is ahead, level, or behind."""
  predicted, reference = restrict_to(predicted, teacher), restrict_to(reference, teacher)
  out = {}
  for l in (l for l in map_at if l <= teacher.shape[1]):
    diff = np.array([average_precision(p, t[:l]) - average_precision(r, t[:l])
                     for p, r, t in zip(predicted, reference, teacher)])
    stderr = float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else float('nan')
    out[f'mAP({l})'] = {'difference': float(diff.mean()), 'stderr': stderr, 'wins': int((diff > 0).sum()),
                        'ties': int((diff == 0).sum()), 'losses': int((diff < 0).sum()), 'queries': len(diff)}
  return out


def restrict_to(predicted: np.ndarray, candidates: np.ndarray) -> np.ndarray:
  """Each predicted ranking kept to the teacher's candidates of that query (when it ranked a subset)."""
  if predicted.shape[1] == candidates.shape[1]:
    return predicted
  return np.stack([p[np.isin(p, c)] for p, c in zip(predicted, candidates)])


def map_table(predicted: np.ndarray, teacher: np.ndarray, map_at) -> dict:
  predicted = restrict_to(predicted, teacher)
  return {f'mAP({l})': dict(zip(('mean', 'stderr'), mean_average_precision(predicted, teacher, l)))
          for l in map_at if l <= teacher.shape[1]}


def eval_command(workdir: str, features_dir: str | None = None, ranks_path: str | None = None,
                 latency_queries: int = 50) -> dict:
  from attrib.attributor import Attributor, rerank_by_student, student_key
  from attrib.distill import IMAGE_PRIOR, embed, load_student_run, restore_embedder
  from attrib.student_data import check_ranks, load_features, load_ranks
  workdir = as_path(workdir)
  run = load_student_run(workdir)
  config = run.config
  features_dir = as_path(features_dir or run.features)
  ranks_path = as_path(ranks_path) if ranks_path else workdir / 'teacher' / 'ranks.arrayrecord'
  train_feats = load_features(features_dir, 'train')
  test_feats = load_features(features_dir, 'test_queries')
  teacher = np.asarray(load_ranks(ranks_path))
  check_ranks(teacher, len(train_feats), len(test_feats), str(ranks_path))
  test_feats = test_feats[:len(teacher)]
  if max(config.map_at) > teacher.shape[1]:
    raise ConfigError(f'map_at {config.map_at}: the teacher ranked only {teacher.shape[1]} candidates per query')

  progress.say(f'eval: {len(teacher)} test queries, teacher rankings of {teacher.shape[1]} candidates')
  table, rankings = {}, {}
  compare = [config.feature] + [f for f in config.compare_features if f != config.feature]
  for name in compare:
    directory = features_dir if name == config.feature else features_dir.parent / name
    if not (directory / 'data_feats.npy').exists():
      progress.say(f'eval: no features {directory}, skipped')
      continue
    predicted = rank_by_cosine(np.asarray(load_features(directory, 'test_queries'))[:len(teacher)],
                               np.asarray(load_features(directory, 'train')))
    table[name] = map_table(predicted, teacher, config.map_at)
    rankings[name] = predicted

  graphdef, params, mesh, preset, _ = restore_embedder(workdir, run)
  query_emb = embed(graphdef, params, test_feats, mesh, preset.logical_rules)
  # The training set the teacher ranked: rows past it are images added since (attrib add).
  train_emb = load_npy(workdir / 'student' / 'embeddings.npy')[:len(train_feats)]
  prior = load_npy(workdir / 'student' / IMAGE_PRIOR)[None, :len(train_feats)] if config.embedder.image_prior else None
  key = student_key(float(params['scale']), query_emb @ train_emb.T, prior)  # most influential = lowest logit
  student = np.argsort(-key, axis=1, kind='stable')
  if config.rerank_candidates:  # what the Attributor answers: φ's top M, ordered by the student
    table[f'FastGDA({config.feature}) no rerank'] = map_table(student, teacher, config.map_at)
    base_rank = rank_by_cosine(np.asarray(test_feats), np.asarray(train_feats))
    order = rerank_by_student(base_rank, np.take_along_axis(key, base_rank, axis=1), config.rerank_candidates)
    student = np.take_along_axis(base_rank, order, axis=1)
  table[f'FastGDA({config.feature})'] = map_table(student, teacher, config.map_at)

  attributor = Attributor.load(workdir)
  images = prompts = None
  queries_file = workdir / 'teacher' / 'queries.npz'
  if attributor.featurizer is not None and queries_file.exists():  # time attribute() from image + prompt
    stored = load_npz(queries_file)
    images, prompts = list(stored['images']), [str(p) for p in stored['prompts']]
  latency = attributor.measure_latency(test_feats, latency_queries, images, prompts)
  # The teacher's own time per test query (each query file records it), when this workdir ran it.
  query_files = sorted((ranks_path.parent / 'queries').glob('query_*.npz')) if ranks_path.suffix == '.arrayrecord' else []
  times = [float(stored['seconds']) for stored in map(load_npz, query_files) if 'seconds' in stored]
  teacher_s = float(np.median(times)) if times else None
  first = f'mAP({config.map_at[0]})'
  best_base = max(rankings, key=lambda name: table[name][first]['mean'], default=None)
  result = {'job': 'attrib eval', 'test_queries': len(teacher), 'teacher_candidates': int(teacher.shape[1]),
            'map': table, 'latency_ms': latency, 'teacher_s_per_query': teacher_s,
            'speedup_vs_teacher': teacher_s / (latency['p50'] / 1e3) if teacher_s else None,
            'versions': versions()}
  if best_base is not None:
    result['student_minus_best_base'] = table[f'FastGDA({config.feature})'][first]['mean'] - table[best_base][first]['mean']
    result['student_vs_best_base'] = {'feature': best_base,
                                      **paired_comparison(student, rankings[best_base], teacher, config.map_at)}
  if config.feature in rankings and config.feature != best_base:  # what distillation added to its own input
    result['student_vs_own_base'] = {'feature': config.feature,
                                     **paired_comparison(student, rankings[config.feature], teacher, config.map_at)}
  write_result_if_writable(workdir / 'eval_result.json', result)
  _print_table(result, config.map_at)
  return result


def _print_table(result: dict, map_at) -> None:
  width = max([32] + [len(name) + 2 for name in result['map']])  # long feature names keep the columns
  lines = ['', f'{"ranking":<{width}}' + ''.join(f'{f"mAP({l})":>18}' for l in map_at)]
  for name, row in result['map'].items():
    cells = ''.join(f'{row[k]["mean"]:>10.3f} ± {row[k]["stderr"]:.3f}' if k in row else f'{"-":>18}'
                    for k in (f'mAP({l})' for l in map_at))
    lines.append(f'{name:<{width}}{cells}')
  for key in ('student_vs_best_base', 'student_vs_own_base'):
    paired = result.get(key)
    if paired:
      cells = '; '.join(f'{k} {v["difference"]:+.3f} ± {v["stderr"]:.3f}, ahead on {v["wins"]}/{v["queries"]}'
                        for k, v in paired.items() if k.startswith('mAP'))
      lines.append(f'student − {paired["feature"]}, per query: {cells}')
  lat = result['latency_ms']
  lines.append(f'attribute(): p50 {lat["p50"]:.2f} ms, p95 {lat["p95"]:.2f} ms'
               + (f'; teacher {result["teacher_s_per_query"]:.1f} s per query, '
                  f'{result["speedup_vs_teacher"]:,.0f}x faster' if result['speedup_vs_teacher'] else ''))
  progress.say('\n'.join(lines))
