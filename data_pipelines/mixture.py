"""Sampling weights over the inputs of a merged sentence folder (`lvm merge-sentences --weights`).

LVM trains on videos, images and annotated pairs together; how much of each it sees is a choice
(upweight the annotated pairs, see a huge video set less than once), and tokenizing a source again
to change its count would cost hours. A weighted merge records a weight per input in its
manifest; training then draws each epoch's records (as many as the folder holds) so that input i
fills the share w_i / sum(w) of them: n_i slots of every epoch, rounded so that they sum to the
epoch. Slot o of input i in epoch e reads the input's record perm_i((e * n_i + o) mod count_i): a
down-weighted input goes on through its records from one epoch to the next (all of them seen
every count_i / n_i epochs), an up-weighted one repeats each record n_i / count_i times an epoch,
and perm_i (a fixed shuffle of the input's records, from the training seed) keeps an epoch's
share from being one run of its shards (its shards are sorted by kind). The loader's shuffle then
spreads the slots over the epoch as before, so the mapping is a pure function of the record's
position and the seed: resumed, multi-host and single-host runs read the same records.
"""
from __future__ import annotations

import bisect

import numpy as np

from core.errors import ConfigError


class Mixture:
  """Input i's `slots[i]` records of every epoch of `total`, drawn from its shards' records."""

  def __init__(self, names: list[str], inputs: list[list[tuple[int, int]]], weights: list[float]):
    # inputs[i]: (start in the concatenated source, records) of each of input i's shards, in order.
    self.names = names
    self.starts = [[start for start, _ in shards] for shards in inputs]
    self.offsets = [np.cumsum([0] + [count for _, count in shards]).tolist() for shards in inputs]
    self.counts = [offsets[-1] for offsets in self.offsets]
    self.total = sum(self.counts)
    self.weights = weights
    self.slots = _slots(self.total, weights)
    self.slot_starts = np.cumsum([0] + self.slots).tolist()

  def record(self, epoch: int, index: int, seed: int) -> int:
    """The record (of the concatenated source) that epoch `epoch`'s slot `index` reads."""
    import grain
    i = bisect.bisect_right(self.slot_starts, index) - 1
    count = self.counts[i]
    j = (epoch * self.slots[i] + index - self.slot_starts[i]) % count
    if count > 1:
      j = grain.experimental.index_shuffle(j, max_index=count - 1, seed=(seed + 7919 * (i + 1)) % 2**32, rounds=4)
    shard = bisect.bisect_right(self.offsets[i], j) - 1
    return self.starts[i][shard] + j - self.offsets[i][shard]

  def describe(self) -> str:
    return '; '.join(f'{name}: {slots:,} of each epoch\'s {self.total:,} records from its {count:,} '
                     f'({slots / count:.2f}x an epoch)'
                     for name, slots, count in zip(self.names, self.slots, self.counts))


def _slots(total: int, weights: list[float]) -> list[int]:
  """`total` split in proportion to `weights` (largest remainders), every input at least one."""
  shares = np.asarray(weights, np.float64) / sum(weights) * total
  slots = np.maximum(np.floor(shares).astype(np.int64), 1)
  remainders = shares - np.floor(shares)
  for i in np.argsort(-remainders, kind='stable'):
    if slots.sum() >= total:
      break
    slots[i] += 1
  while slots.sum() > total:  # inputs raised to one slot took it from the largest
    slots[np.argmax(slots)] -= 1
  return slots.tolist()


def check_weights(weights: list[float] | None, inputs: int) -> None:
  """`--weights` of a merge: one positive, finite number per input."""
  if weights is None:
    return
  if len(weights) != inputs:
    raise ConfigError(f'--weights: {len(weights)} given for {inputs} --inputs; give one per input, in their order')
  bad = [w for w in weights if not np.isfinite(w) or w <= 0]
  if bad:
    raise ConfigError(f'--weights {bad[0]}: each must be a number > 0 (an input is sampled in proportion to it)')


def training_mixture(folder, manifest: dict | None, source) -> Mixture | None:
  """The weighted inputs of a merged sentence folder, over `source` (its shards, as training reads
  them); None for any other data (every record once an epoch)."""
  inputs = (manifest or {}).get('inputs') or []
  if not inputs or not all('weight' in entry for entry in inputs):
    return None
  shard_paths = getattr(source, 'shard_paths', None)
  if shard_paths is None:
    raise ConfigError(f'{folder}: a weighted merge is read from its shards, not from {source}')
  where = {path.rsplit('/', 1)[-1]: (start, count) for path, start, count in source.shard_ranges()}
  owned = [name for entry in inputs for name in entry['shards']]
  unlisted = sorted(set(where) - set(owned))
  missing = sorted(set(owned) - set(where))
  if unlisted or missing:
    raise ConfigError(f'{folder}: its manifest.json weighs shards by input, but '
                      + (f'{missing[0]} (listed) is not there' if missing else f'{unlisted[0]} is in no input')
                      + ': not the folder `lvm merge-sentences` wrote; merge again')
  names = [f'input {i} ({entry["path"]}, weight {entry["weight"]:g})' for i, entry in enumerate(inputs, 1)]
  empty = [name for name, entry in zip(names, inputs) if not sum(where[shard][1] for shard in entry['shards'])]
  if empty:
    raise ConfigError(f'{folder}: {empty[0]} holds no records to draw its share from')
  return Mixture(names, [[where[name] for name in entry['shards']] for entry in inputs],
                 [float(entry['weight']) for entry in inputs])
