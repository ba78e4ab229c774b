"""What a person watching a run sees: metrics.jsonl, TensorBoard scalars and a progress bar.

Only process 0 writes. On resume, lines of metrics.jsonl past the restored step are dropped, so the
file always describes one consistent history. On gs:// (objects cannot be appended to) the file is
rewritten whole at each log; it is small (one line per logged step).
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import jax

from core.paths import as_path, is_remote
from core.workdir import write_bytes_atomic


def _summary_writer_class():
  """tensorboardX's SummaryWriter, imported without torch.

  tensorboardX's writer module imports torch whenever it is installed, only to name torch tensors in
  its type hints; with torch present (the test extra, or any researcher's environment) that import is
  ~2 s of every job's start-up (a tiny `cpu_8` LVM job: 23.1-23.6 s against 25.5-26.7). We log
  Python and numpy numbers, so torch is hidden while tensorboardX loads (`sys.modules[name] = None`
  makes `import name` raise ImportError, which it handles) and is importable as usual afterwards.
  Only for the moment of that import, and only if nothing has loaded torch yet: the job's other
  thread (the step's background compile) never imports it.
  """
  if 'tensorboardX.writer' in sys.modules or 'torch' in sys.modules:
    from tensorboardX import SummaryWriter
    return SummaryWriter
  sys.modules['torch'] = None
  try:
    from tensorboardX import SummaryWriter
  finally:
    del sys.modules['torch']
  return SummaryWriter


class MetricsLogger:

  def __init__(self, workdir: str | Path, *, total_steps: int, start_step: int,
               tensorboard: bool = True, progress_bar: bool = True):
    self.enabled = jax.process_index() == 0
    self.path = as_path(workdir) / 'metrics.jsonl'
    self._remote = is_remote(self.path)
    self._lines: list[str] = []
    self._tb = None
    self._bar = None
    if not self.enabled:
      return
    self._truncate_after(start_step)
    self._file = None if self._remote else open(self.path, 'a')
    if tensorboard:
      # Imported here, lazily: only process 0 writes (gs:// too).
      self._tb = _summary_writer_class()(str(as_path(workdir) / 'tensorboard'), purge_step=start_step + 1)
    if progress_bar:
      from core.progress import progress_bar
      self._bar = progress_bar(total=total_steps, initial=start_step, unit='step')

  def _truncate_after(self, step: int) -> None:
    if not self.path.exists():
      return
    kept = [line for line in self.path.read_text().splitlines()
            if line.strip() and json.loads(line)['step'] <= step]
    write_bytes_atomic(self.path, ''.join(line + '\n' for line in kept).encode())
    self._lines = kept

  def log(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    record = {'step': int(step), **{k: float(v) for k, v in metrics.items()}}
    line = json.dumps(record)
    if self._remote:
      self._lines.append(line)
      write_bytes_atomic(self.path, ''.join(x + '\n' for x in self._lines).encode())
    else:
      self._file.write(line + '\n')
      self._file.flush()
    if self._tb is not None:
      for key, value in metrics.items():
        if math.isfinite(float(value)):
          self._tb.add_scalar(key, float(value), step)
      self._tb.flush()
    if self._bar is not None:
      shown = {name: f'{record[name]:.4f}' for name in ('loss', 'eval_loss') if name in record}
      self._bar.set_postfix(shown, refresh=False)

  def advance(self, steps: int = 1) -> None:
    if self._bar is not None:
      self._bar.update(steps)

  def close(self) -> None:
    if not self.enabled:
      return
    if self._file is not None:
      self._file.close()
    if self._tb is not None:
      self._tb.close()
    if self._bar is not None:
      self._bar.close()


def read_metrics(workdir: str | Path) -> list[dict]:
  path = as_path(workdir) / 'metrics.jsonl'
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
