"""Answers among a subset of the training set: `Attributor.attribute(..., among=ids)` and `launch.py
attrib query --among 3,17,250 | --among-file F`. Which of these images (an artist's works, a licensed
collection, one source's share of the data) influenced the generated one, in what order and how much.

The answer is the full answer's order restricted to those ids, with the same scores (removed images
left out, as everywhere). ScaNN's Python API has no per-query filter (its restricts are C++ only),
and fetching ever deeper until k of a small subset turn up could take the whole index, so:
- a student searched by its own embedding scores every id of the subset exactly, a·cos + b (+ c(z))
  from its unit embeddings (student/embeddings.npy, memory-mapped): |S|·d work, whatever the index's
  size; a subset of an eighth of the images or more is found by the index instead, asked for about
  4·k·N/|S| neighbours (twice as many while a query has fewer than k of the subset among them);
- a reranking student (φ's top M ordered by the student, then φ's order) takes φ's top M as the full
  answer does, orders the subset's ids inside it by the student, and puts the rest of the subset after
  them in φ's order, read from a search of every row of the base index (N·d work per query, exact).
"""
from __future__ import annotations

import numpy as np

from attrib.removals import checked_ids, first_kept

# Queries whose whole φ order is held at once ([queries, N] ids and inner products).
RANKED_AT_ONCE = 16
# Subset ids whose embeddings are gathered at once: a subset of most of a 118K × 768 training set
# would otherwise copy 0.3 GB of rows per call.
EMBEDDED_AT_ONCE = 32768
# A plain student's subset this share of the answerable images or more is searched through the index:
# 100,000 of 118,287 embeddings gathered took 78 ms a query.
INDEX_SHARE = 1 / 8


def among_from_file(path, attributor) -> list[int]:
  """`--among-file F`: training ids (comma or newline separated), or, for a student loaded with its
  training list (full scale), training images by file, one per line: as the list names them (relative
  paths from F's folder, or absolute; a line copied from the list itself, image<TAB>caption, by its
  image). Blank lines and # comments skipped; an image or id given twice counts once."""
  from attrib.query_images import AttributionError
  from core.errors import ConfigError
  from core.paths import absolute, as_path, is_remote
  source = as_path(path)
  if not source.is_file():
    raise ConfigError(f'--among-file {path}: no such file (expected training ids, or training image files)')
  lines = [(number, line.split('#', 1)[0].strip())
           for number, line in enumerate(source.read_text().removeprefix('\ufeff').splitlines(), 1)]
  lines = [(number, line) for number, line in lines if line]
  if not lines:
    raise ConfigError(f'{source}: no training ids or images listed')
  not_ids = [(number, line) for number, line in lines
             if any(_integer(x) is None for x in line.split(',') if x.strip())]
  if not not_ids:
    return sorted({_integer(x) for _, line in lines for x in line.split(',') if x.strip()})
  files = attributor.train_images if isinstance(attributor.train_images, list) else None
  if files is None:
    number, line = not_ids[0]
    raise AttributionError(f'{source}:{number}: {line[:80]!r} is not a training id; training images are found by '
                           'file only for a student loaded with its training list (--train-list)')
  known = {}
  for i, file in enumerate(files):  # an added image named like a listed one answers as the first
    if file is not None:
      known.setdefault(absolute(file), i)
  ids = set()
  for number, line in lines:
    image = line.split('\t', 1)[0].strip()
    named = absolute(image if is_remote(image) or image.startswith('/') else source.parent / image)
    if named not in known:
      raise AttributionError(f'{source}:{number}: {named} is not one of this student\'s training images '
                             f'({len(known):,} files in its training list and additions)')
    ids.add(known[named])
  return sorted(ids)


def _integer(text: str) -> int | None:
  try:
    return int(text)
  except ValueError:
    return None


def among_ids(ids, total: int, removed: np.ndarray) -> np.ndarray:
  """The training ids a caller gave to answer among, sorted, the removed ones left out."""
  from attrib.query_images import AttributionError
  given = checked_ids(ids, total, 'to answer among')
  kept = np.setdiff1d(given, removed)
  if not len(kept):
    raise AttributionError(f'all {len(given)} training ids to answer among are removed from the answers')
  return kept


def order_by_student(cosine_qs: np.ndarray, scale: float, prior_s: np.ndarray | None) -> np.ndarray:
  """Column order per row, most influential first: the lowest logit a·cos (+ c(z)); ties keep the
  columns' order (ids ascending)."""
  logits = scale * cosine_qs + (0.0 if prior_s is None else prior_s[None, :])
  return np.argsort(logits, axis=1, kind='stable')


def search_among(attributor, query: np.ndarray, features: np.ndarray, k: int, among: np.ndarray):
  """(ids [q, k], cosine [q, k]) of each query's k most influential training images among `among`
  (sorted ids, none removed). Called under the attributor's read lock."""
  answerable = len(attributor.index) - len(attributor.removed)
  if attributor.rerank is None and len(among) >= INDEX_SHARE * answerable:
    return _searched_among(attributor, query, k, among)
  prior = None if attributor.prior is None else attributor.prior[among]
  cosine = np.concatenate([query @ attributor.student_embeddings(among[start:start + EMBEDDED_AT_ONCE]).T
                           for start in range(0, len(among), EMBEDDED_AT_ONCE)], axis=1)  # [q, s]
  order = order_by_student(cosine, attributor.scale, prior)
  if attributor.rerank is not None:
    order = _reranked_order(attributor, features, among, order, k)
  order = order[:, :k]
  return among[order], np.take_along_axis(cosine, order, axis=1)


def _reranked_order(attributor, features: np.ndarray, among: np.ndarray, student_order: np.ndarray,
                    k: int) -> np.ndarray:
  """As the full answer, cut to k columns: the subset's ids among φ's top M (of the images not removed)
  in the student's order, then the others in φ's order (read only when the top M holds fewer than k)."""
  from attrib.embedder import unit_rows
  base_index, _, m = attributor.rerank
  removed = attributor.removed
  m = min(m, len(base_index) - len(removed))
  unit = np.asarray(unit_rows(features))
  window, = first_kept(base_index.search(unit, m + len(removed))[0], removed, m)
  orders = []
  for start in range(0, len(unit), RANKED_AT_ONCE):
    ranking = None  # every row of the base index by φ, for these queries, when one of them needs it
    for q in range(start, min(start + RANKED_AT_ONCE, len(unit))):
      in_window = np.isin(among, window[q])
      head = student_order[q][in_window[student_order[q]]]
      if len(head) >= k:
        orders.append(head[:k])
        continue
      if ranking is None:
        ranking = base_index.ranking(unit[start:start + RANKED_AT_ONCE])[0]
        place = np.empty((len(ranking), int(ranking.max()) + 1), np.int64)  # [query, training id] -> φ rank
        np.put_along_axis(place, ranking, np.arange(ranking.shape[1])[None, :], axis=1)
      rest = np.flatnonzero(~in_window)
      rest = rest[np.argsort(place[q - start, among[rest]], kind='stable')]
      orders.append(np.concatenate([head, rest])[:k])
  return np.stack(orders)


def _searched_among(attributor, query: np.ndarray, k: int, among: np.ndarray):
  """A plain student's answer among a large subset: the index's answer, asked deeper until each query
  has k of the subset in it (removed images are not in `among`, so they drop out with the rest)."""
  from attrib.embedder import cosine_from_dots, index_queries
  rows = len(attributor.index)
  depth = min(rows, 4 * k * -(-rows // len(among)))
  searched = index_queries(query, attributor.scale, attributor.prior is not None)
  while True:
    ids, dots = attributor.index.search(searched, depth) if depth < rows else attributor.index.ranking(searched)
    inside = np.isin(ids, among)
    if depth == rows or inside.sum(axis=1).min() >= k:
      break
    depth = min(rows, 2 * depth)
  order = np.argsort(~inside, axis=1, kind='stable')[:, :k]  # the subset's first, in the index's order
  ids, dots = np.take_along_axis(ids, order, axis=1), np.take_along_axis(dots, order, axis=1)
  return ids, cosine_from_dots(dots, attributor.scale, None if attributor.prior is None else attributor.prior[ids])
