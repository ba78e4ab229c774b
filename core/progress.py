"""What a long job tells the person running it, on stderr, from process 0 only.

`say(...)` prints one line per stage; `bar(...)` wraps a loop in a tqdm bar (rate and time left);
`Stopwatch` times the stages of a job and estimates the time left of a sequence of equal units.
stdout stays reserved for the job's result (JSON), so scripts can parse it.
"""
from __future__ import annotations

import contextlib
import sys
import threading
import time
from typing import Iterable, TypeVar

T = TypeVar('T')


_QUIET = threading.local()


def _is_main_process() -> bool:
  import jax
  return jax.process_index() == 0 and not getattr(_QUIET, 'on', False)


@contextlib.contextmanager
def quiet():
  """No notes or bars from this thread inside the block: work that repeats what was already said (a
  Beam worker planning the job its driver planned and reported)."""
  _QUIET.on = True
  try:
    yield
  finally:
    _QUIET.on = False


def say(message: str) -> None:
  if _is_main_process():
    print(message, file=sys.stderr, flush=True)


def bar(iterable: Iterable[T], *, total: int | None = None, desc: str = '', unit: str = 'it',
        enabled: bool = True) -> Iterable[T]:
  if not enabled or not _is_main_process():
    return iterable
  from tqdm import tqdm
  return tqdm(iterable, total=total, desc=desc, unit=unit, dynamic_ncols=True, file=sys.stderr, leave=False)


def format_seconds(seconds: float) -> str:
  seconds = int(round(seconds))
  if seconds < 60:
    return f'{seconds}s'
  if seconds < 3600:
    return f'{seconds // 60}m{seconds % 60:02d}s'
  return f'{seconds // 3600}h{seconds % 3600 // 60:02d}m'


class Stopwatch:
  """Times named stages; `eta(done, total)` extrapolates the mean time of the units done so far."""

  def __init__(self):
    self.started = time.perf_counter()
    self.stages: dict[str, float] = {}
    self._stage_start = self.started

  def lap(self, name: str) -> float:
    now = time.perf_counter()
    self.stages[name] = now - self._stage_start
    self._stage_start = now
    return self.stages[name]

  def elapsed(self) -> float:
    return time.perf_counter() - self.started

  def eta(self, done: int, total: int) -> str:
    if done == 0:
      return 'unknown'
    return format_seconds(self.elapsed() / done * (total - done))
