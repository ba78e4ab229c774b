"""What a long job tells the person running it, on stderr, from process 0 only.

`say(...)` prints one line per stage; `bar(...)` wraps a loop in a tqdm bar (rate and time left),
`progress_bar(...)` is that bar for manual updates (the train loop's); `Stopwatch` times the stages of
a job and estimates the time left of a sequence of equal units. stdout stays reserved for the job's
result (JSON), so scripts can parse it.
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


# On a terminal tqdm redraws its bar in place ('\r' and the bar again, up to ten times a second). In a
# log file or a pipe (a TPU VM's job log, nohup, CI) those redraws pile up into one line of kilobytes
# (67 KB for the quickstart's 2,400 distillation steps; megabytes for a day of training), which `tail
# -n` and `launch.py tpu logs` show whole or not at all. There a bar is a line of its own every
# LOG_EVERY_S seconds instead, and a loop shorter than that prints none.
LOG_EVERY_S = 30.0


class _OneLinePerRedraw:
  """A log stream as tqdm's output: each redraw (a '\r', the bar, padding) written as one line."""

  def __init__(self, stream):
    self.stream = stream

  def write(self, text: str) -> None:
    line = text.replace('\r', '').rstrip()
    if line:  # the padding that erases a closed bar (leave=False) is no line
      self.stream.write(line + '\n')

  def flush(self) -> None:
    self.stream.flush()


def _is_terminal(stream) -> bool:
  try:
    return stream.isatty()
  except (AttributeError, ValueError):  # no isatty, or closed
    return False


def progress_bar(iterable: Iterable[T] | None = None, **tqdm_args):
  """A tqdm bar on stderr, redrawn in place on a terminal and a line every LOG_EVERY_S s in a log."""
  from tqdm import tqdm
  stream = sys.stderr
  if _is_terminal(stream):
    return tqdm(iterable, file=stream, dynamic_ncols=True, **tqdm_args)
  # miniters=1: with tqdm's adaptive default its monitor thread redraws a loop that went 10 s without
  # one, and the next update, not counting that redraw, draws again: two lines a second apart.
  return tqdm(iterable, file=_OneLinePerRedraw(stream), ascii=True, miniters=1, mininterval=LOG_EVERY_S,
              delay=LOG_EVERY_S, **tqdm_args)


def bar(iterable: Iterable[T], *, total: int | None = None, desc: str = '', unit: str = 'it',
        enabled: bool = True) -> Iterable[T]:
  if not enabled or not _is_main_process():
    return iterable
  return progress_bar(iterable, total=total, desc=desc, unit=unit, leave=False)


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
