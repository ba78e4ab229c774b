"""One writing job per workdir at a time, on this machine.

Two jobs writing into one workdir (the same command started twice, from two terminals or a rerun
while the first still runs) both ran to the end: they wrote checkpoints of the same steps over each
other and interleaved their metrics, leaving a run that neither of them made. A job that writes
into a workdir (training, import, tokenize --out, the attribution jobs) first takes an exclusive
`flock` on a lock file named after the workdir's resolved path; a second job finds it taken and is
refused, naming the job that holds it, before it reads or writes anything. Jobs that only read a
workdir (eval, generate, query, export) take no lock, so a run can be watched while it trains.

The kernel drops the lock when its process ends however it ends (a crash, kill -9, a lost session),
so a stale lock never blocks the rerun that resumes the run. The lock files live in the temporary
directory, not in the workdir: taking the lock creates nothing there, so a job refused for bad
input leaves no empty workdir behind. A gs:// workdir is locked by its URL on the machine of the
job's process 0: a TPU slice's jobs all start their process 0 on worker 0, so two `tpu run` jobs
into one bucket folder are refused; jobs on two different machines are not (object stores have no
lock). Processes other than 0 of a multi-process run take no lock: they share process 0's workdir.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

from core.errors import UserError
from core.paths import is_remote


class WorkdirBusy(UserError):
  """Another job on this machine is writing into the same workdir."""


def lock_directory() -> Path:
  """Per user: another user's lock file in a shared /tmp would not be writable."""
  return Path(tempfile.gettempdir()) / f'lvm_attrib-{os.getuid()}' / 'workdir-locks'


def lock_file(workdir: str | Path) -> Path:
  resolved = _where(workdir)
  return lock_directory() / f'{hashlib.sha256(resolved.encode()).hexdigest()[:24]}.lock'


def _where(workdir) -> str:
  """The workdir as one string per place: resolved locally (symlinks, '..'), the URL for gs://
  (with the storage endpoint, so that tests' emulators on different ports are different places)."""
  if is_remote(workdir):
    return os.environ.get('STORAGE_EMULATOR_HOST', '') + str(workdir).rstrip('/')
  return str(Path(workdir).expanduser().resolve())


def _holder(handle) -> str:
  """The job that holds the lock, as it wrote itself into the lock file."""
  handle.seek(0)
  try:
    holder = json.loads(handle.read() or '{}')
  except ValueError:
    holder = {}
  if not holder:  # it has the lock but has not written its name yet
    return 'another job'
  started = time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(holder.get('started', 0)))
  return f"`{holder.get('command', '?')}` (pid {holder.get('pid', '?')}, started {started})"


# Workdirs this process holds: lock file -> [open handle, blocks holding it]. A job that holds its
# workdir may call code that takes it again (`attrib add` -> Attributor.save); a second flock of the
# same file from this process would be refused as another holder, so the process counts instead.
_held: dict[Path, list] = {}
_held_guard = threading.Lock()  # checking and taking a lock is one step for this process's threads


@contextlib.contextmanager
def writing_into(workdir: str | Path | None, command: str):
  """Holds `workdir` for this job until the block ends; WorkdirBusy if another process holds it."""
  if workdir is None:
    yield
    return
  path = lock_file(workdir)
  with _held_guard:
    if path not in _held:
      _held[path] = [_take(path, workdir, command), 0]
    _held[path][1] += 1
  try:
    yield
  finally:
    with _held_guard:
      _held[path][1] -= 1
      if not _held[path][1]:
        _release(_held.pop(path)[0])


def _take(path: Path, workdir, command: str):
  """The lock file's handle, flocked and naming this job; WorkdirBusy if another process has it."""
  path.parent.mkdir(parents=True, exist_ok=True)
  # 'a+': opening must not empty the holder's record before we know whether we hold the lock.
  handle = open(path, 'a+')
  try:
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    holder = _holder(handle)
    handle.close()
    raise WorkdirBusy(f'{workdir} is in use: {holder} is writing into it on this machine; '
                      f'wait for it to end (or stop it with kill, it keeps its saved state), then rerun. '
                      f'Lock file {path}') from None
  handle.seek(0)
  handle.truncate()
  handle.write(json.dumps({'pid': os.getpid(), 'command': command, 'started': time.time(),
                           'workdir': _where(workdir)}))
  handle.flush()
  return handle


def _release(handle) -> None:
  handle.seek(0)
  handle.truncate()  # released: the next holder writes its own record
  fcntl.flock(handle, fcntl.LOCK_UN)
  handle.close()


def command_line(argv: list[str]) -> str:
  """How the holder is shown to the job it refuses."""
  return ' '.join(['launch.py', *argv]) if argv else ' '.join(sys.argv)
