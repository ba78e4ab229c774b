"""ScaNN index over the embedded training set, with recall measured at build time.

Rows are unit vectors, searched by inner product (= cosine). The algorithm follows ScaNN's own
advice by size (scann/docs/algorithms.md): brute force below ~20k rows; asymmetric hashing (AH)
with exact re-scoring up to ~100k; a k-means tree over ~√N leaves + AH + exact re-scoring above.
Recall@k against exact search is measured when the index is built, on held-out probe vectors, and
stored with it, so a user sees what the index trades for its speed.

On disk (one directory): `index.json` (kind, sizes, recall, per-file sha256), `ids.npy` (row -> training id),
and `scann/` (ScaNN's serialised searcher). Loading checks every file against its checksum before
ScaNN's C++ reads it: a corrupt file is named in a clear error instead of crashing the process.

`ShardedIndex` splits rows over S independent indexes (built in parallel, searched in parallel,
top-k merged): the unit a host holds at LAION scale (see README, "Index at scale").
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from core.errors import ConfigError, UserError
from core.paths import as_path, is_remote
from core.workdir import atomic_path, read_json

INDEX_FILE = 'index.json'
FORMAT_VERSION = 1


class IndexFileError(UserError):
  """An index directory that is missing, incomplete, corrupt, or does not fit its model."""


class IndexInputError(UserError, ValueError):
  """Vectors, ids or k that an index cannot take: wrong shape, NaN or infinity, k < 1."""


def _check_finite(vectors: np.ndarray, what: str) -> None:
  # ScaNN refuses NaN queries with a bare RuntimeError, and builds an index over NaN rows without a word.
  bad = ~np.isfinite(vectors).all(axis=1)
  if bad.any():
    raise IndexInputError(f'{what} rows {np.flatnonzero(bad)[:5].tolist()} hold NaN or infinity')


@dataclasses.dataclass(frozen=True)
class IndexConfig:
  # 'auto' (by size, as ScaNN advises), 'brute_force', 'ah' (hashing + re-scoring) or 'tree_ah'.
  kind: str = 'auto'
  # Neighbours returned by default.
  k: int = 10
  # Rows below which 'auto' searches exhaustively, and above which it adds a partitioning tree.
  brute_force_below: int = 20_000
  tree_above: int = 100_000
  # Tree: leaves (0 = √N) and leaves searched per query.
  num_leaves: int = 0
  leaves_to_search: int = 32
  # Candidates re-scored exactly after AH scoring.
  reorder: int = 100
  # Probe queries used to measure recall at build time.
  recall_probes: int = 1000

  def __post_init__(self):
    if self.kind not in ('auto', 'brute_force', 'ah', 'tree_ah'):
      raise ConfigError(f"index.kind {self.kind!r}: expected 'auto', 'brute_force', 'ah' or 'tree_ah'")
    if self.k < 1 or self.reorder < 1 or self.leaves_to_search < 1 or self.recall_probes < 1:
      raise ConfigError('index.k, index.reorder, index.leaves_to_search and index.recall_probes must be >= 1')
    if self.num_leaves < 0:
      raise ConfigError(f'index.num_leaves must be >= 0 (0 = the square root of the rows), got {self.num_leaves}')
    if not 0 <= self.brute_force_below <= self.tree_above:
      raise ConfigError(f"index.brute_force_below ({self.brute_force_below}) and index.tree_above "
                        f"({self.tree_above}) bound 'auto''s middle size: 0 <= brute_force_below <= tree_above")


def choose_kind(config: IndexConfig, rows: int) -> str:
  if config.kind != 'auto':
    return config.kind
  if rows < config.brute_force_below:
    return 'brute_force'
  return 'ah' if rows <= config.tree_above else 'tree_ah'


def _builder(vectors: np.ndarray, kind: str, config: IndexConfig, k: int):
  import scann
  builder = scann.scann_ops_pybind.builder(vectors, k, 'dot_product')
  if kind == 'brute_force':
    return builder.score_brute_force()
  if kind == 'tree_ah':
    leaves = config.num_leaves or max(2, int(round(np.sqrt(len(vectors)))))
    builder = builder.tree(num_leaves=leaves, num_leaves_to_search=min(config.leaves_to_search, leaves),
                           training_sample_size=min(len(vectors), 250_000))
  return builder.score_ah(2, anisotropic_quantization_threshold=0.2).reorder(max(config.reorder, k))


def exact_top_k(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
  """Row numbers of the k largest inner products per query (numpy, chunked)."""
  out = []
  for start in range(0, len(queries), 256):
    scores = queries[start:start + 256] @ vectors.T
    top = np.argpartition(-scores, min(k, scores.shape[1] - 1), axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1, kind='stable')
    out.append(np.take_along_axis(top, order, axis=1))
  return np.concatenate(out)


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
  k = exact.shape[1]
  return float(np.mean([len(np.intersect1d(f[:k], e)) / k for f, e in zip(found, exact)]))


def probe_vectors(vectors: np.ndarray, count: int, seed: int = 0) -> np.ndarray:
  """Probes that look like queries: random rows, perturbed by noise of the data's own spread, renormalised."""
  rng = np.random.default_rng(seed)
  rows = vectors[rng.choice(len(vectors), min(count, len(vectors)), replace=False)]
  noisy = rows + rng.standard_normal(rows.shape).astype(np.float32) * float(np.std(vectors))
  return (noisy / np.linalg.norm(noisy, axis=1, keepdims=True)).astype(np.float32)


def _sha256(path: Path) -> str:
  digest = hashlib.sha256()
  with path.open('rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()


class Index:
  """One ScaNN searcher over unit vectors, with training ids per row."""

  def __init__(self, searcher, ids: np.ndarray, meta: dict):
    self.searcher, self.ids, self.meta = searcher, ids, meta

  @property
  def dim(self) -> int:
    return int(self.meta['dim'])

  def __len__(self) -> int:
    return len(self.ids)

  @classmethod
  def build(cls, vectors: np.ndarray, ids: np.ndarray | None = None, config: IndexConfig = IndexConfig(),
            probes: np.ndarray | None = None) -> 'Index':
    vectors = np.ascontiguousarray(vectors, np.float32)
    if vectors.ndim != 2 or len(vectors) == 0:
      raise IndexInputError(f'index rows must be a non-empty [N, d] array, got {vectors.shape}')
    _check_finite(vectors, 'index')
    ids = np.arange(len(vectors), dtype=np.int64) if ids is None else np.asarray(ids, np.int64)
    if len(ids) != len(vectors):
      raise IndexInputError(f'{len(ids)} ids for {len(vectors)} rows')
    kind = choose_kind(config, len(vectors))
    k = min(config.k, len(vectors))
    started = time.perf_counter()
    searcher = _builder(vectors, kind, config, k).build()
    build_s = time.perf_counter() - started
    probes = probe_vectors(vectors, config.recall_probes) if probes is None else probes
    found, _ = searcher.search_batched(probes, final_num_neighbors=k)
    recall = recall_at_k(np.asarray(found), exact_top_k(vectors, probes, k))
    meta = {'format': FORMAT_VERSION, 'kind': kind, 'rows': len(vectors), 'dim': int(vectors.shape[1]), 'k': k,
            'build_s': build_s, f'recall_at_{k}': recall, 'recall_probes': len(probes),
            'config': dataclasses.asdict(config)}
    return cls(searcher, ids, meta)

  def search(self, queries: np.ndarray, k: int | None = None, *, leaves: int | None = None,
             reorder: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(training ids [b, k], inner products [b, k]) of unit `queries` [b, d], best first; k defaults
    to the build's k and is at most the row count. `leaves` / `reorder` override the build settings
    (tree leaves searched, candidates re-scored)."""
    queries = np.ascontiguousarray(np.atleast_2d(queries), np.float32)
    if queries.ndim != 2 or queries.shape[1] != self.dim:
      raise IndexInputError(f'query dimension {queries.shape[-1]} does not match the index ({self.dim})')
    k = min(check_k(k, self.meta['k']), len(self.ids))
    if not len(queries):
      return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
    _check_finite(queries, 'query')
    settings = self.meta['config']
    pre = max(k, reorder or settings['reorder'])
    leaves = leaves or settings['leaves_to_search'] if self.meta['kind'] == 'tree_ah' else -1
    rows, dots = self._searched(queries, k, pre, leaves)
    if leaves > 0 and k > 1 and (np.diff(np.sort(rows, axis=1), axis=1) == 0).any():
      # A k past the rows of the searched leaves comes back padded with repeated rows: every leaf, then.
      rows, dots = self._searched(queries, k, pre, len(self.ids))
    return self.ids[rows], dots

  def _searched(self, queries: np.ndarray, k: int, pre: int, leaves: int) -> tuple[np.ndarray, np.ndarray]:
    if len(queries) == 1:
      rows, dots = self.searcher.search(queries[0], k, pre, leaves)
      rows, dots = np.asarray(rows)[None], np.asarray(dots)[None]
    else:  # ScaNN's own thread pool over the batch
      rows, dots = self.searcher.search_batched_parallel(queries, k, pre, leaves)
    return np.asarray(rows, np.int64), np.asarray(dots, np.float32)

  def ranking(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every row's (training id, inner product) per query, best first: every leaf searched and every
    row re-scored exactly."""
    rows = len(self.ids)
    return self.search(queries, rows, leaves=rows, reorder=rows)

  def upsert(self, vectors: np.ndarray, ids: np.ndarray) -> None:
    """Adds rows (new training images) without a rebuild; an id already present is replaced."""
    vectors, ids = _upsert_rows(vectors, ids, self.dim)
    position = {int(i): row for row, i in enumerate(self.ids)}
    rows = [position.get(int(i)) for i in ids]
    new_rows = self.searcher.searcher.upsert(rows, vectors, 1)
    grown = np.concatenate([self.ids, np.zeros(max(0, max(new_rows) + 1 - len(self.ids)), np.int64)])
    grown[np.asarray(new_rows)] = ids
    self.ids = grown
    self.meta['rows'] = len(self.ids)
    self.meta['upserted'] = int(self.meta.get('upserted', 0)) + sum(r is None for r in rows)

  def delete(self, ids: np.ndarray) -> None:
    """Removes rows by training id (a takedown, or the rows of an `attrib add` that did not finish).
    ScaNN moves the last row into each freed slot, one id after another; the row -> id map follows."""
    ids = np.asarray(ids, np.int64).reshape(-1)
    _check_unique(ids, 'delete')
    position = {int(i): row for row, i in enumerate(self.ids)}
    missing = [int(i) for i in ids if int(i) not in position]
    if missing:
      raise IndexInputError(f'delete: ids not in the index: {missing[:5]}')
    if len(ids) >= len(self.ids):
      raise IndexInputError(f'delete of all {len(self.ids)} rows: an index keeps at least one (build a new one)')
    kept, rows = [int(i) for i in self.ids], []
    for i in ids:
      row, last = position.pop(int(i)), len(kept) - 1
      if row != last:
        kept[row] = kept[last]
        position[kept[row]] = row
      kept.pop()
      rows.append(row)
    self.searcher.searcher.delete(rows)
    self.ids = np.asarray(kept, np.int64)
    self.meta['rows'] = len(self.ids)

  def save(self, directory) -> None:
    """Written beside the target and renamed into place (on gs://: uploaded when complete), so a
    crash never leaves half an index that loads: every file is checked against index.json on load."""
    directory = as_path(directory)
    if directory.exists():
      # os.replace cannot put a directory over a non-empty one; the old index goes first, so a
      # crash in between leaves no index (a clear "missing" error), never a mixed one.
      directory.rmtree()
    with atomic_path(directory) as temp:
      (temp / 'scann').mkdir(parents=True)
      self.searcher.serialize(str(temp / 'scann'), relative_path=True)
      np.save(temp / 'ids.npy', self.ids)
      files = sorted(p for p in temp.rglob('*') if p.is_file())
      meta = dict(self.meta, files={str(p.relative_to(temp)): _sha256(p) for p in files})
      (temp / INDEX_FILE).write_text(json.dumps(meta, indent=1))

  @classmethod
  def load(cls, directory) -> 'Index':
    directory = as_path(directory)
    meta = _read_meta(directory)
    if not is_remote(directory):
      return cls._load_files(Path(os.fspath(directory)), meta, directory)
    # ScaNN's loader opens local files only: the index is downloaded, checked, and read into memory;
    # the downloaded copy is not needed after that.
    with tempfile.TemporaryDirectory(prefix='lvm_attrib_index_') as folder:
      for name in meta['files']:
        remote, local = directory / name, Path(folder) / name
        if remote.is_file():
          local.parent.mkdir(parents=True, exist_ok=True)
          local.write_bytes(remote.read_bytes())
      return cls._load_files(Path(folder), meta, directory)

  @classmethod
  def _load_files(cls, local: Path, meta: dict, shown) -> 'Index':
    """Every file checked against its checksum before ScaNN's C++ reads it; errors name `shown`."""
    for name, digest in meta['files'].items():
      if not (local / name).is_file():
        raise IndexFileError(f'{shown / name} is missing: the index in {shown} is incomplete; rebuild it '
                             f'(launch.py attrib index)')
      if _sha256(local / name) != digest:
        raise IndexFileError(f'{shown / name} is corrupt (checksum differs from {shown / INDEX_FILE}); '
                             f'rebuild the index')
    import scann
    searcher = scann.scann_ops_pybind.load_searcher(str(local / 'scann'))
    return cls(searcher, np.load(local / 'ids.npy', allow_pickle=False), meta)


def _upsert_rows(vectors, ids, dim: int) -> tuple[np.ndarray, np.ndarray]:
  """An upsert's rows as an index takes them ([n, dim] float32, n int64 ids), checked."""
  vectors = np.ascontiguousarray(np.atleast_2d(vectors), np.float32)
  ids = np.asarray(ids, np.int64).reshape(-1)
  if vectors.shape != (len(ids), dim):
    raise IndexInputError(f'upsert needs [{len(ids)}, {dim}] vectors, got {vectors.shape}')
  _check_finite(vectors, 'upsert')
  _check_unique(ids)
  return vectors, ids


def _check_unique(ids: np.ndarray, what: str = 'upsert') -> None:
  # Two rows under one id would both be found; which one the caller meant is unknowable.
  values, counts = np.unique(ids, return_counts=True)
  if np.any(counts > 1):
    raise IndexInputError(f'{what} ids must be unique; repeated: {values[counts > 1][:5].tolist()}')


def check_k(k, default: int) -> int:
  """k of a search: None means `default`; 0 once meant the default too, silently."""
  if k is None:
    return default
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
    raise IndexInputError(f'k must be an integer >= 1, got {k!r}')
  return int(k)


def _read_meta(directory) -> dict:
  path = directory / INDEX_FILE
  if not path.is_file():
    raise IndexFileError(f'{path} not found: {directory} holds no index (build one with launch.py attrib index)')
  try:
    meta = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise IndexFileError(f'{path} is corrupt ({e})') from None
  if not isinstance(meta, dict) or meta.get('format') != FORMAT_VERSION or 'files' not in meta:
    raise IndexFileError(f'{path}: not an index of format {FORMAT_VERSION}')
  return meta


def built_config(directory) -> IndexConfig | None:
  """The settings the index in `directory` (plain or sharded) was built with; None where there is no
  readable index (a rebuild then takes the distill config's)."""
  directory = as_path(directory)
  if (directory / 'shards.json').is_file():
    directory = directory / 'shard_00000'
  try:
    settings = _read_meta(directory)['config']
    return IndexConfig(**{f.name: settings[f.name] for f in dataclasses.fields(IndexConfig) if f.name in settings})
  except (IndexFileError, ConfigError, KeyError, TypeError):
    return None


def _threads(num_shards: int) -> int:
  """Threads that build or search shards side by side: one per shard, at most one per core."""
  return max(1, min(num_shards, os.cpu_count() or 1))


class ShardedIndex:
  """S indexes over disjoint row ranges; built and searched in parallel, per-shard top-k merged.

  Exact merge: a row in the global top k is in its own shard's top k, so merging the shards' top k
  loses nothing that the shards found. At LAION scale each host holds its shards (rows by host), and
  the per-host top k are merged the same way over the network.
  """

  def __init__(self, shards: list[Index]):
    self.shards = shards
    self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=_threads(len(shards)))

  @property
  def dim(self) -> int:
    return self.shards[0].dim

  def __len__(self) -> int:
    return sum(len(s) for s in self.shards)

  @property
  def meta(self) -> dict:
    rows = [s.meta['rows'] for s in self.shards]
    k = self.shards[0].meta['k']
    recall = float(np.average([s.meta[f'recall_at_{s.meta["k"]}'] for s in self.shards], weights=rows))
    return {'kind': 'sharded', 'shards': len(self.shards), 'rows': sum(rows), 'dim': self.dim, 'k': k,
            'shard_recall_at_k_mean': recall, 'build_s': max(s.meta['build_s'] for s in self.shards)}

  @classmethod
  def build(cls, vectors: np.ndarray, ids: np.ndarray | None, num_shards: int,
            config: IndexConfig = IndexConfig(), probes: np.ndarray | None = None) -> 'ShardedIndex':
    if not 1 <= num_shards <= len(vectors):
      raise ConfigError(f'{num_shards} shards for {len(vectors)} rows: each shard needs at least one row')
    _check_finite(np.atleast_2d(vectors), 'index')  # here, so that the rows named are global, not a shard's
    ids = np.arange(len(vectors), dtype=np.int64) if ids is None else np.asarray(ids, np.int64)
    bounds = np.linspace(0, len(vectors), num_shards + 1).astype(int)
    with concurrent.futures.ThreadPoolExecutor(max_workers=_threads(num_shards)) as pool:  # ScaNN builds release the GIL
      shards = list(pool.map(lambda s: Index.build(vectors[bounds[s]:bounds[s + 1]], ids[bounds[s]:bounds[s + 1]],
                                                   config, probes), range(num_shards)))
    return cls(shards)

  def search(self, queries: np.ndarray, k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    parts = list(self._pool.map(lambda shard: shard.search(queries, k), self.shards))
    ids = np.concatenate([p[0] for p in parts], axis=1)
    dots = np.concatenate([p[1] for p in parts], axis=1)
    k = min(check_k(k, self.shards[0].meta['k']), ids.shape[1])
    order = np.argsort(-dots, axis=1, kind='stable')[:, :k]
    return np.take_along_axis(ids, order, axis=1), np.take_along_axis(dots, order, axis=1)

  def ranking(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every row of every shard per query, best first (`Index.ranking`), merged."""
    parts = list(self._pool.map(lambda shard: shard.ranking(queries), self.shards))
    ids = np.concatenate([p[0] for p in parts], axis=1)
    dots = np.concatenate([p[1] for p in parts], axis=1)
    order = np.argsort(-dots, axis=1, kind='stable')
    return np.take_along_axis(ids, order, axis=1), np.take_along_axis(dots, order, axis=1)

  def upsert(self, vectors: np.ndarray, ids: np.ndarray) -> None:
    """An id already present is replaced in its own shard; new ids go to the shard with the fewest
    rows, so shards stay balanced and a merged search never sees one id twice."""
    vectors, ids = _upsert_rows(vectors, ids, self.dim)
    owner = {int(i): s for s, shard in enumerate(self.shards) for i in shard.ids}
    sizes = [len(shard) for shard in self.shards]
    target = []
    for i in ids:
      s = owner.get(int(i))
      if s is None:
        s = int(np.argmin(sizes))
        sizes[s] += 1
      target.append(s)
    target = np.asarray(target)
    for s in np.unique(target):
      self.shards[s].upsert(vectors[target == s], ids[target == s])

  def delete(self, ids: np.ndarray) -> None:
    """Each id removed from the shard that holds it (`Index.delete`)."""
    ids = np.asarray(ids, np.int64).reshape(-1)
    _check_unique(ids, 'delete')
    owner = {int(i): s for s, shard in enumerate(self.shards) for i in shard.ids}
    missing = [int(i) for i in ids if int(i) not in owner]
    if missing:
      raise IndexInputError(f'delete: ids not in the index: {missing[:5]}')
    target = np.asarray([owner[int(i)] for i in ids])
    for s in np.unique(target):
      self.shards[s].delete(ids[target == s])

  def save(self, directory) -> None:
    """All shards or none, as `Index.save`: shards written over an index of another shard count
    one by one would, after a crash, load as new shards beside old ones over other row ranges."""
    directory = as_path(directory)
    if directory.exists():
      directory.rmtree()
    with atomic_path(directory) as temp:
      temp.mkdir(parents=True)
      for s, shard in enumerate(self.shards):
        shard.save(temp / f'shard_{s:05d}')
      (temp / 'shards.json').write_text(json.dumps({'shards': len(self.shards)}))

  @classmethod
  def load(cls, directory) -> 'ShardedIndex':
    directory = as_path(directory)
    try:
      count = read_json(directory / 'shards.json')['shards']
    except (OSError, ValueError, KeyError) as e:
      raise IndexFileError(f'{directory / "shards.json"}: not a sharded index ({e})') from None
    return cls([Index.load(directory / f'shard_{s:05d}') for s in range(count)])


def load_any(directory):
  """An `Index` or a `ShardedIndex`, whichever the directory holds (local or gs://)."""
  directory = as_path(directory)
  if (directory / 'shards.json').is_file():
    return ShardedIndex.load(directory)
  return Index.load(directory)
