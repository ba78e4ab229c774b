"""A shard's frames built as the encoder asks for them, one encoder batch at a time.

A shard of the tokenize job is `records_per_shard` sentences of `frames` images each: built whole
before encoding, 512 × 16 images of 256 px is 6 GiB of float pixels on every host (and every Beam
worker) for a few MB of tokens. `ShardFrames` looks like that [sentences · frames, s, s, 3] array to
`core.batching.map_batches`, which slices it batch by batch: a slice builds only the sentences it
covers, so a shard holds about two encoder batches of pixels. Sentence n is a pure function of
(seed, kind, n), so the tokens are the same as from the whole array, whatever the batch size.

While the encoder works on one batch (on an accelerator, or XLA's threads without the GIL), the next
batch's sentences are built in a background thread: the host's image work and the encoding overlap.
"""
from __future__ import annotations

import concurrent.futures
from typing import Callable

import numpy as np


class ShardFrames:
  """Frames [count · frames, s, s, 3] of sentences [start, start + count), where `build(n)` gives
  sentence n's [frames, s, s, 3]. Sliceable with unit-step slices, in any order; ascending slices
  of one size (as map_batches asks) find the next one built ahead. Use as a context manager so the
  threads end with the shard."""

  def __init__(self, build: Callable[[int], np.ndarray], start: int, count: int, frames: int, threads: int = 1):
    self.build, self.start, self.count, self.frames = build, start, count, frames
    self._sentences = concurrent.futures.ThreadPoolExecutor(threads) if threads > 1 else None
    self._ahead = concurrent.futures.ThreadPoolExecutor(1)
    self._next: tuple[tuple[int, int], concurrent.futures.Future] | None = None
    self._last: tuple[int, np.ndarray] | None = None  # a sentence that two batches share

  def __len__(self) -> int:
    return self.count * self.frames

  def __getitem__(self, index: slice) -> np.ndarray:
    if not isinstance(index, slice):
      raise TypeError(f'ShardFrames takes a slice of frames, not {type(index).__name__}')
    first, stop, step = index.indices(len(self))
    if step != 1:
      raise ValueError(f'ShardFrames takes unit-step slices, not step {step}')
    wanted = (first, stop)
    if self._next is not None and self._next[0] == wanted:
      frames = self._next[1].result()
    else:
      frames = self._frames(first, stop)
    following = (stop, min(len(self), 2 * stop - first))
    self._next = (following, self._ahead.submit(self._frames, *following)) if following[0] < following[1] else None
    return frames

  def _frames(self, first: int, stop: int) -> np.ndarray:
    """Frames [first, stop): the sentences they fall in, built (in threads when given), cut to the range."""
    if first >= stop:
      return self._sentence(0)[:0]
    low, high = first // self.frames, -(-stop // self.frames)
    numbers = range(low, high)
    mapper = self._sentences.map if self._sentences else map
    sentences = list(mapper(self._sentence, numbers))
    self._last = (numbers[-1], sentences[-1])
    offset = low * self.frames
    return np.concatenate(sentences)[first - offset:stop - offset]

  def _sentence(self, number: int) -> np.ndarray:
    last = self._last
    if last is not None and last[0] == number:
      return last[1]
    return np.asarray(self.build(self.start + number))

  def close(self) -> None:
    if self._next is not None:
      self._next[1].cancel()
    self._ahead.shutdown(wait=True)
    if self._sentences:
      self._sentences.shutdown(wait=True)

  def __enter__(self) -> ShardFrames:
    return self

  def __exit__(self, *exc) -> None:
    self.close()
