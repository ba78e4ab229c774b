"""What orbax and TensorStore print around a failed read or write, kept from burying the one-line
error that `launch.py` gives for it (a damaged checkpoint, a full disk).

When a save or restore fails, orbax's other reads and writes finish on its closed event loop or
are dropped unawaited, and each prints a traceback ('Event loop is closed', a coroutine never
awaited, asyncio's 'exception was never retrieved'): 26 of them, 600 lines, for one full disk in a
tiny LVM's save. orbax also logs the failure itself at ERROR from each of its threads. None of it
says more than the error line, and none of it comes from this package's own code (which has no
event loop), so the CLI drops exactly those; `--debug` keeps everything. Light: imports no orbax.
"""
from __future__ import annotations

import importlib
import logging
import sys
import warnings

_DISK_FULL_TEXTS = ('No space left on device', 'Disk quota exceeded')


class DropMessage(logging.Filter):
  """Drops log records whose message starts with `prefix`."""

  def __init__(self, prefix: str):
    super().__init__()
    self.prefix = prefix

  def filter(self, record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(self.prefix)


class _DropOrbaxErrorsOnceTheDiskIsFull(logging.Filter):
  """orbax's ERROR records from the first one about a full disk on: each of its threads logs the
  same failure, then the failed commit and finalize, before the error reaches the CLI."""

  def __init__(self):
    super().__init__()
    self.disk_full = False

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno < logging.ERROR or 'orbax' not in record.pathname:
      return True
    text = record.getMessage() + (str(record.exc_info[1]) if record.exc_info and record.exc_info[1] else '')
    self.disk_full = self.disk_full or any(t in text for t in _DISK_FULL_TEXTS)
    return not self.disk_full


def drop_abandoned_io_noise() -> None:
  """Drops the tracebacks of orbax's abandoned reads and writes (see the module's docstring), and
  asyncio's 'exception was never retrieved' for them; anything else is reported as before."""
  global _filters_added
  if not _filters_added:  # once per process (the CLI at start, then a failed restore)
    _add_log_and_warning_filters()
    _filters_added = True
  if getattr(sys.unraisablehook, 'drops_abandoned_io', False):
    return  # installed already (a test runner may have put its own back since: then again)
  previous = sys.unraisablehook

  def hook(unraisable):
    code = getattr(unraisable.object, 'cr_code', None)  # an orbax coroutine that was never finished
    if ((isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == 'Event loop is closed')
        or (code is not None and 'orbax' in code.co_filename)):
      return
    previous(unraisable)
  hook.drops_abandoned_io = True
  sys.unraisablehook = hook


_filters_added = False


def _add_log_and_warning_filters() -> None:
  for what in ('Future', 'Task'):
    logging.getLogger('asyncio').addFilter(DropMessage(f'{what} exception was never retrieved'))
  # absl makes its 'absl' logger on import; asked for first, it would be a plain Logger, whose records
  # name absl's own file as their origin instead of orbax's.
  importlib.import_module('absl.logging')
  logging.getLogger('absl').addFilter(_DropOrbaxErrorsOnceTheDiskIsFull())
  # An unfinished write's coroutine, collected unawaited after its loop closed (orbax's and jax's
  # array serialization: e.g. 'async_serialize_from_host.<locals>.write_fragment').
  warnings.filterwarnings('ignore', message=r"coroutine '.*serializ.*' was never awaited", category=RuntimeWarning)
