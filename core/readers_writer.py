"""A readers-writer lock: many readers at once, or one writer alone. Writers go first once they wait,
so that a steady stream of readers (queries from many threads) cannot hold an update off forever."""
from __future__ import annotations

import contextlib
import threading


class ReadersWriterLock:

  def __init__(self):
    self._changed = threading.Condition()
    self._readers = 0
    self._writing = False
    self._writers_waiting = 0

  @contextlib.contextmanager
  def reading(self):
    with self._changed:
      self._changed.wait_for(lambda: not self._writing and not self._writers_waiting)
      self._readers += 1
    try:
      yield
    finally:
      with self._changed:
        self._readers -= 1
        if not self._readers:
          self._changed.notify_all()

  @contextlib.contextmanager
  def writing(self):
    with self._changed:
      self._writers_waiting += 1
      self._changed.wait_for(lambda: not self._writing and not self._readers)
      self._writers_waiting -= 1
      self._writing = True
    try:
      yield
    finally:
      with self._changed:
        self._writing = False
        self._changed.notify_all()
