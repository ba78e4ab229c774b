"""grain loader of records (token sentences, captioned images), sharded per host, with a checkpointable iterator.

Batches are defined globally: the records are shuffled once per epoch with one seed on every host,
global batch k is positions [k*B, (k+1)*B) of that order, and host h reads only its rows
[h*B/H, (h+1)*B/H) of it. So the global batch does not depend on the number of hosts: a run on 2
hosts sees exactly the data of a run on 1, and a job can resume on a different slice size.
"""
from __future__ import annotations

import grain
import numpy as np


class _HostRows(grain.MapDataset):
  """Element n of this host's stream = global element (n // b) * B + h * b + n % b."""

  def __init__(self, parent: grain.MapDataset, global_batch: int, process_index: int,
               process_count: int):
    super().__init__(parent)
    self._global_batch = global_batch
    self._local_batch = global_batch // process_count
    self._offset = process_index * self._local_batch

  def __len__(self) -> int:
    return len(self._parent) // self._global_batch * self._local_batch

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    step, row = divmod(index, self._local_batch)
    return self._parent[step * self._global_batch + self._offset + row]

  def __str__(self) -> str:
    return f'HostRows(offset={self._offset}, local_batch={self._local_batch})'


def _stack_tokens(rows):
  return {'tokens': np.stack(rows)}


def _stack_fields(rows):
  return {key: np.stack([row[key] for row in rows]) for key in rows[0]}


def token_batches(source, **kwargs) -> grain.DatasetIterator:
  """Iterator of {'tokens': int32 [global_batch / process_count, T]} for this host."""
  return record_batches(source, batch_fn=_stack_tokens, **kwargs)


def record_batches(source, *, global_batch: int, seed: int, shuffle: bool = True,
                   process_index: int = 0, process_count: int = 1, num_epochs: int | None = None,
                   prefetch_threads: int = 0, batch_fn=_stack_fields, map_with_index=None) -> grain.DatasetIterator:
  """This host's rows of each global batch, stacked by `batch_fn` (dict records: field by field).

  `map_with_index(i, record)` sees the record's position `i` in the global stream (all epochs):
  a seed for per-example randomness that is the same whatever the device or host layout.
  `iterator.get_state()` / `set_state()` capture the position exactly; the train loop stores it in
  every checkpoint. `num_epochs=None` repeats forever (training); 1 gives one pass (evaluation).
  """
  if global_batch % process_count:
    raise ValueError(f'global batch {global_batch} does not split over {process_count} hosts')
  if len(source) < global_batch:
    raise ValueError(f'{source}: {len(source)} records are fewer than one global batch of {global_batch}')
  dataset = grain.MapDataset.source(source)
  if shuffle:
    dataset = dataset.shuffle(seed=seed)
  dataset = dataset.repeat(num_epochs)
  if map_with_index is not None:
    dataset = dataset.map_with_index(map_with_index)
  dataset = _HostRows(dataset, global_batch, process_index, process_count)
  dataset = dataset.batch(global_batch // process_count, drop_remainder=True, batch_fn=batch_fn)
  iter_dataset = dataset.to_iter_dataset(
      grain.ReadOptions(num_threads=prefetch_threads, prefetch_buffer_size=max(1, prefetch_threads)))
  return iter(iter_dataset)
