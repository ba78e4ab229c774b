"""grain loader of records (token sentences, captioned images), sharded per host, with a checkpointable iterator.

Batches are defined globally: the records are shuffled once per epoch with one seed on every host,
global batch k is positions [k*B, (k+1)*B) of that order, and host h reads only its rows
[h*B/H, (h+1)*B/H) of it. So the global batch does not depend on the number of hosts: a run on 2
hosts sees exactly the data of a run on 1, and a job can resume on a different slice size.

The order is exactly grain's `MapDataset.source(records).shuffle(seed).repeat()` (a test holds it
to that), but computed for a whole batch in one grain dataset whose elements are record indices,
and each batch is then read in one call: grain's stack of per-record datasets (source wrapper,
shuffle, repeat, each with its own metrics) cost more than reading a 4096-token record, and made
the loader barely faster than parsing JSONL. The iterator state is still one batch position, so
checkpoints from before resume at the same data.
"""
from __future__ import annotations

import functools
import sys

import grain
import numpy as np

from core.errors import ConfigError


class _HostBatchIndices(grain.MapDataset):
  """Element k: (positions, record indices) of this host's rows of global batch k."""

  def __init__(self, num_records: int, *, global_batch: int, seed: int, shuffle: bool,
               num_epochs: int | None, process_index: int, process_count: int, mixture=None):
    super().__init__()
    if shuffle and not 0 <= seed < 2**32:
      raise ValueError(f'the shuffle seed must be in [0, 2**32), got {seed}')
    if mixture is not None and mixture.total != num_records:
      raise ValueError(f'a mixture of {mixture.total} records over a source of {num_records}')
    self._num_records, self._global_batch, self._seed, self._shuffle = num_records, global_batch, seed, shuffle
    self._mixture = mixture
    self._local_batch = global_batch // process_count
    self._offset = process_index * self._local_batch
    self._length = sys.maxsize if num_epochs is None else num_records * num_epochs // global_batch

  def __len__(self) -> int:
    return self._length

  def _record_index(self, position: int) -> int:
    epoch, index = divmod(position, self._num_records)
    if self._shuffle:
      # grain's ShuffleMapDataset: epoch e is index_shuffle with seed (seed + e) mod 2**32, 4 rounds.
      index = grain.experimental.index_shuffle(index, max_index=self._num_records - 1,
                                               seed=(self._seed + epoch) % 2**32, rounds=4)
    # A weighted merge: the epoch's slot `index` names a record of one input (data_pipelines/mixture.py).
    return index if self._mixture is None else self._mixture.record(epoch, index, self._seed)

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    start = index * self._global_batch + self._offset
    positions = range(start, start + self._local_batch)
    return positions, [self._record_index(p) for p in positions]

  def __str__(self) -> str:
    return f'HostBatchIndices(offset={self._offset}, local_batch={self._local_batch})'


def _stack_tokens(rows):
  return {'tokens': rows if isinstance(rows, np.ndarray) else np.stack(rows)}


def _stack_fields(rows):
  return {key: np.stack([row[key] for row in rows]) for key in rows[0]}


def _read_batch(source, batch_fn, map_with_index, positions_and_indices):
  positions, indices = positions_and_indices
  read_batch = getattr(source, 'read_batch', None)  # one call per batch where the source has it
  records = read_batch(indices) if read_batch is not None else [source[index] for index in indices]
  if map_with_index is not None:
    records = [map_with_index(position, record) for position, record in zip(positions, records)]
  return batch_fn(records)


def token_batches(source, **kwargs) -> grain.DatasetIterator:
  """Iterator of {'tokens': int32 [global_batch / process_count, T]} for this host."""
  return record_batches(source, batch_fn=_stack_tokens, **kwargs)


def record_batches(source, *, global_batch: int, seed: int, shuffle: bool = True,
                   process_index: int = 0, process_count: int = 1, num_epochs: int | None = None,
                   prefetch_threads: int = 0, batch_fn=_stack_fields, map_with_index=None,
                   mixture=None) -> grain.DatasetIterator:
  """This host's rows of each global batch, stacked by `batch_fn` (dict records: field by field).

  `map_with_index(i, record)` sees the record's position `i` in the global stream (all epochs):
  a seed for per-example randomness that is the same whatever the device or host layout.
  `iterator.get_state()` / `set_state()` capture the position exactly; the train loop stores it in
  every checkpoint. `num_epochs=None` repeats forever (training); 1 gives one pass (evaluation).
  `mixture`: the sampling weights of a merged folder's inputs (data_pipelines/mixture.py).
  """
  if global_batch % process_count:
    raise ConfigError(f'global batch {global_batch} does not split over {process_count} hosts')
  if len(source) < global_batch:
    raise ConfigError(f'{source}: {len(source)} records are fewer than one global batch of {global_batch}')
  dataset = _HostBatchIndices(len(source), global_batch=global_batch, seed=seed, shuffle=shuffle,
                              num_epochs=num_epochs, process_index=process_index, process_count=process_count,
                              mixture=mixture)
  dataset = dataset.map(functools.partial(_read_batch, source, batch_fn, map_with_index))
  iter_dataset = dataset.to_iter_dataset(
      grain.ReadOptions(num_threads=prefetch_threads, prefetch_buffer_size=max(1, prefetch_threads)))
  return iter(iter_dataset)
