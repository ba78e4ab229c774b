"""grain loader of token records, sharded per host, with a checkpointable iterator.

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


def token_batches(source, *, global_batch: int, seed: int, shuffle: bool = True,
                  process_index: int = 0, process_count: int = 1, num_epochs: int | None = None,
                  prefetch_threads: int = 0) -> grain.DatasetIterator:
  """Iterator of {'tokens': int32 [global_batch / process_count, T]} for this host.

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
  dataset = _HostRows(dataset, global_batch, process_index, process_count)
  dataset = dataset.batch(global_batch // process_count, drop_remainder=True,
                          batch_fn=lambda rows: {'tokens': np.stack(rows)})
  iter_dataset = dataset.to_iter_dataset(
      grain.ReadOptions(num_threads=prefetch_threads, prefetch_buffer_size=max(1, prefetch_threads)))
  return iter(iter_dataset)
