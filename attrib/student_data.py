"""What the student learns from: base features φ and the teacher's rankings, as FastGDA lays them out.

A *student data set* is a features directory and rank arrays:

  features/  data_feats.npy [N, D]          φ of every training image (row = training id)
             train_query_feats.npy [Q, D]   φ of the queries the teacher ranked for training
             test_query_feats.npy [T, D]    φ of held-out queries (evaluation)
  train ranks [Q, M] int   per training query, its M candidates' ids, most influential first
  test ranks  [T, N'] int  per test query, the teacher's ranking (all N images, or its candidates)

That is FastGDA's release (`feats/<ftype>/*.npy`, `influence_train.pkl['random']['rank']`,
`influence_test.pkl`), and what `attrib teacher` + `attrib features` write for the built-in digits.
Rankings published as pickles are read with a restricted unpickler (dicts, lists, numpy arrays only).

Training pairs: every (query, position j) of the training queries once per epoch, in a fresh order
each epoch; the target is j/M. With probability p a pair's image is swapped for a random training
image outside the query's candidates, target (M−1)/M (FastGDA's outliers). Batches are built
vectorised from a per-epoch permutation (49M pairs per COCO epoch would not survive a per-record
Python loop), and element i of the grain source is global batch i, so grain's iterator state, which the
train loop checkpoints, resumes it exactly.
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path

import grain
import numpy as np

from core.errors import UserError
from core.paths import as_path
from core.workdir import load_npy

FEATURE_FILES = {'train': 'data_feats.npy', 'train_queries': 'train_query_feats.npy',
                 'test_queries': 'test_query_feats.npy'}


class StudentDataError(UserError):
  """A features or rank file is missing, unreadable, or does not fit the others."""


# ---------------------------------------------------------------- safe reading of released pickles

class _ArraysOnlyUnpickler(pickle.Unpickler):
  """Admits what numpy arrays and plain containers need, nothing that can run code."""
  _ALLOWED = {
      ('numpy', 'ndarray'), ('numpy', 'dtype'), ('numpy.core.multiarray', '_reconstruct'),
      ('numpy._core.multiarray', '_reconstruct'), ('numpy.core.multiarray', 'scalar'),
      ('numpy._core.multiarray', 'scalar'), ('builtins', 'dict'), ('builtins', 'list'),
      ('collections', 'OrderedDict'), ('numpy.core.numeric', '_frombuffer'), ('numpy._core.numeric', '_frombuffer'),
  }

  def find_class(self, module, name):
    if (module, name) in self._ALLOWED:
      return super().find_class(module, name)
    raise pickle.UnpicklingError(f'{module}.{name} is not allowed (only dicts, lists and numpy arrays)')


def load_rank_pickle(path: str | Path) -> np.ndarray:
  """FastGDA's `influence_*.pkl`: `['random']['rank']` or `['rank']`, an int array [queries, M]."""
  path = as_path(path)
  if not path.is_file():
    raise StudentDataError(f'{path} not found (FastGDA ranks: influence_train.pkl / influence_test.pkl)')
  try:
    data = _ArraysOnlyUnpickler(io.BytesIO(path.read_bytes())).load()
  except pickle.UnpicklingError as e:
    raise StudentDataError(f'{path}: refused to unpickle: {e}') from None
  except Exception as e:  # truncated or not a pickle at all
    raise StudentDataError(f'{path}: not a readable rank pickle ({type(e).__name__}: {e})') from None
  ranks = data.get('random', {}).get('rank') if isinstance(data.get('random'), dict) else data.get('rank')
  if not isinstance(ranks, np.ndarray) or ranks.ndim != 2 or not np.issubdtype(ranks.dtype, np.integer):
    raise StudentDataError(f"{path}: expected an int array [queries, M] under ['random']['rank'] or ['rank']")
  return ranks


def load_ranks(path: str | Path) -> np.ndarray:
  """Ranks from a FastGDA pickle, a .npy [queries, M], or our teacher's ranks.arrayrecord (local or gs://)."""
  path = as_path(path)
  if path.suffix == '.pkl':
    return load_rank_pickle(path)
  if not path.is_file():
    raise StudentDataError(f'{path} not found')
  if path.suffix == '.npy':
    ranks = load_npy(path, mmap=True)  # an unreadable file is named there
    if ranks.ndim != 2 or not np.issubdtype(ranks.dtype, np.integer):
      raise StudentDataError(f'{path}: expected an int array [queries, M], got {ranks.dtype} {ranks.shape}')
    return ranks
  if path.suffix == '.arrayrecord':
    from attrib.curation import read_rank_records
    records = read_rank_records(path)
    lengths = {len(r['ranked_ids']) for r in records}
    if len(lengths) != 1:
      raise StudentDataError(f'{path}: queries ranked different numbers of candidates {sorted(lengths)}')
    return np.stack([r['ranked_ids'] for r in sorted(records, key=lambda r: r['query'])])
  raise StudentDataError(f'{path}: unknown rank file type (expected .pkl, .npy or .arrayrecord)')


def load_features(directory: str | Path, which: str, mmap: bool = True) -> np.ndarray:
  path = as_path(directory) / FEATURE_FILES[which]
  if not path.is_file():
    raise StudentDataError(f'{path} not found: run `attrib features` or pass --features with FastGDA\'s '
                           f'feats/<ftype> directory')
  array = load_npy(path, mmap=mmap)  # memory-mapped when local, a gs:// object read whole; unreadable: named
  if array.ndim != 2 or array.dtype.kind != 'f':
    raise StudentDataError(f'{path}: expected float features [rows, dim], got {array.dtype} {array.shape}')
  # A NaN row would train a NaN embedder and index NaN rows without any other sign; checked in
  # chunks so a memory-mapped file is never read whole (~1 s per GB).
  for start in range(0, len(array), 1 << 16):
    finite = np.isfinite(array[start:start + (1 << 16)]).all(axis=1)
    if not finite.all():
      rows = start + np.flatnonzero(~finite)
      raise StudentDataError(f'{path}: rows {rows[:5].tolist()} hold NaN or infinity')
  return array


def check_ranks(ranks: np.ndarray, num_train: int, num_queries: int, name: str) -> None:
  """Before any work: ranks fit the features (ids in range, one row per query, no repeated id)."""
  if ranks.shape[0] > num_queries:
    raise StudentDataError(f'{name}: {ranks.shape[0]} ranked queries but only {num_queries} query feature rows')
  low, high = int(np.min(ranks)), int(np.max(ranks))
  if low < 0 or high >= num_train:
    raise StudentDataError(f'{name}: training ids {low}..{high} outside the {num_train} rows of data_feats.npy')
  sample = np.asarray(ranks[: min(len(ranks), 64)])
  if any(len(np.unique(row)) != len(row) for row in sample):
    raise StudentDataError(f'{name}: a query ranks the same training id twice')


# ---------------------------------------------------------------- training pairs

class PairBatches:
  """Element i = this host's rows of global batch i (epochs follow each other without end)."""

  def __init__(self, ranks: np.ndarray, query_feats: np.ndarray, train_feats: np.ndarray, *,
               global_batch: int, outlier_probability: float, seed: int, process_index: int = 0,
               process_count: int = 1):
    self.ranks = np.ascontiguousarray(ranks, dtype=np.int32)
    self.query_feats, self.train_feats = query_feats, train_feats
    self.num_queries, self.m = self.ranks.shape
    self.pairs = self.num_queries * self.m
    if global_batch > self.pairs:
      raise StudentDataError(f'distill.batch {global_batch} exceeds the {self.pairs} (query, candidate) pairs')
    self.global_batch, self.local = global_batch, global_batch // process_count
    self.offset = process_index * self.local
    self.batches_per_epoch = self.pairs // global_batch
    n = len(train_feats)
    # Outliers need images outside a query's candidates; when the candidates are everything, none exist.
    self.outlier_probability = outlier_probability if self.m < n else 0.0
    self.sorted_candidates = np.sort(self.ranks, axis=1)
    self.seed = seed
    self._epoch, self._order = -1, None

  def __len__(self) -> int:
    return np.iinfo(np.int32).max  # epochs repeat; the train loop stops at its step count

  def _permutation(self, epoch: int) -> np.ndarray:
    if epoch != self._epoch:
      self._order = np.random.default_rng([self.seed, epoch]).permutation(self.pairs).astype(np.int64)
      self._epoch = epoch
    return self._order

  def __getitem__(self, index: int) -> dict:
    epoch, batch = divmod(int(index), self.batches_per_epoch)
    start = batch * self.global_batch
    pair = self._permutation(epoch)[start:start + self.global_batch]
    query, position = np.divmod(pair, self.m)
    train_ids = self.ranks[query, position]
    target = position.astype(np.float32) / self.m
    # Outliers are drawn for the whole global batch, each host keeping its rows: the batch is then
    # the same on any number of hosts (drawn per host, two hosts trained another model than one).
    rng = np.random.default_rng([self.seed, epoch, batch, 0])
    swap = rng.random(len(pair)) < self.outlier_probability
    if swap.any():
      train_ids = train_ids.copy()
      train_ids[swap] = self._outside_candidates(query[swap], rng)
      target[swap] = (self.m - 1) / self.m
    mine = slice(self.offset, self.offset + self.local)
    query, train_ids, target = query[mine], train_ids[mine], target[mine]
    return {'query': np.asarray(self.query_feats[query], np.float32),
            'train': np.asarray(self.train_feats[train_ids], np.float32),
            'target': target, 'seed': np.full(self.local, np.int32(index % 2**31))}

  def _outside_candidates(self, queries: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A uniform random training id that is not among each query's candidates (rejection sampling)."""
    n = len(self.train_feats)
    out = rng.integers(0, n, len(queries))
    for _ in range(1000):
      rows = self.sorted_candidates[queries]
      at = np.minimum(np.array([np.searchsorted(r, x) for r, x in zip(rows, out)]), self.m - 1)
      clash = rows[np.arange(len(queries)), at] == out
      if not clash.any():
        return out
      out[clash] = rng.integers(0, n, int(clash.sum()))
    raise StudentDataError('could not draw training images outside the candidates (are they nearly all images?)')


def pair_iterator(source: PairBatches) -> grain.DatasetIterator:
  """A checkpointable iterator over the host's batches (grain state = the batch index)."""
  return iter(grain.MapDataset.source(source).to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=1)))
