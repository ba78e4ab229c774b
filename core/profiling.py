"""A profiler trace of a few training updates (`train.profile_from`, `train.profile_steps`).

Where a step's time goes on a TPU slice (which ops, how much is collectives, whether the host keeps
the devices fed) is read from a trace, not from tokens/s. The loop traces updates
[profile_from, profile_from + profile_steps) on every host (each host's devices and threads) and
writes each host's trace into WORKDIR/tensorboard/plugins/profile/updates_F-L/ as
`<hostname>-process<i>.xplane.pb` (and `.trace.json.gz`): TensorBoard's profile tab opens that
folder (`tensorboard --logdir WORKDIR/tensorboard`, with the tensorboard-plugin-profile package),
and Perfetto the JSON. jax writes the trace to local disk; it is then copied into the workdir, so
a gs:// workdir gets it as a local one does. Updates before the window run untraced (the first
ones compile), and the window's last update is waited for before the trace stops, so its device
work is in it. A run resumed past the window traces nothing.
"""
from __future__ import annotations

import shutil
import socket
import tempfile
from pathlib import Path

import jax

from core import progress
from core.paths import as_path


class StepProfiler:
  """Starts and stops the trace around the loop's updates; `close` ends one left open by an error."""

  def __init__(self, workdir, first: int, steps: int, start_step: int):
    self.workdir, self.first, self.last = workdir, first, first + steps - 1
    self.enabled = first > 0 and start_step < first
    self._local = None
    if first > 0 and not self.enabled and jax.process_index() == 0:
      progress.say(f'note: train.profile_from {first}: this run starts after update {start_step}; nothing traced')

  def before_update(self, update: int) -> None:
    """Called with the number (1-based) of the update about to run."""
    if self.enabled and update == self.first:
      self._local = Path(tempfile.mkdtemp(prefix='lvm_attrib_profile_'))
      jax.profiler.start_trace(str(self._local))

  def after_update(self, update: int, outputs) -> None:
    if self._local is not None and update == self.last:
      jax.block_until_ready(outputs)
      self._finish()

  def close(self) -> None:
    if self._local is not None:  # the run stopped inside the window: what was traced is kept
      self._finish()

  def _finish(self) -> None:
    local, self._local = self._local, None
    try:
      jax.profiler.stop_trace()
      target = as_path(self.workdir) / 'tensorboard' / 'plugins' / 'profile' / f'updates_{self.first}-{self.last}'
      target.mkdir(parents=True, exist_ok=True)
      host = f'{socket.gethostname()}-process{jax.process_index()}'
      for path in sorted(local.rglob('*')):
        if path.is_file():  # jax names them <hostname>.xplane.pb, ...: one name per process here
          (target / f'{host}.{path.name.split(".", 1)[1]}').write_bytes(path.read_bytes())
      if jax.process_index() == 0:
        progress.say(f'profile of updates {self.first}-{self.last}: {target} (TensorBoard\'s profile tab, or Perfetto)')
    finally:
      shutil.rmtree(local, ignore_errors=True)
