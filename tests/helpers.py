"""Shared test helpers: small configs and subprocess runs of launch.py."""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / 'lvm/configs/tiny.py')
CPU8 = str(ROOT / 'tpu_configs/cpu_8.py')
CPU2X4 = str(ROOT / 'tpu_configs/cpu_2x4.py')  # two processes x four devices
CPU1 = str(ROOT / 'tpu_configs/cpu_1.py')

# A smaller-than-tiny model so each train test compiles and runs in seconds; f32 throughout.
SMALL_MODEL = ['model.hidden_size=64', 'model.intermediate_size=96', 'model.num_heads=4',
               'model.num_kv_heads=2', 'model.attention_block=64', 'data.seq_len=128',
               'train.global_batch=8', 'train.progress_bar=false', 'train.tensorboard=false',
               'optim.warmup_steps=2', 'optim.decay_steps=40']


@contextlib.contextmanager
def read_only(folder: Path):
  """`folder` and everything under it unwritable for the block, as a shared model folder is to its
  readers: by mode bits for a user, by the immutable attribute for root (which mode bits do not stop);
  skipped where the file system has no such attribute."""
  import pytest
  if os.geteuid() != 0:
    subprocess.run(['chmod', '-R', 'a-w', str(folder)], check=True)
    undo = ['chmod', '-R', 'u+w', str(folder)]
  else:
    if subprocess.run(['chattr', '-R', '+i', str(folder)], capture_output=True).returncode != 0:
      subprocess.run(['chattr', '-R', '-i', str(folder)], capture_output=True)
      pytest.skip('chattr +i is not supported here: cannot make a folder read-only for root')
    undo = ['chattr', '-R', '-i', str(folder)]
  try:
    yield folder
  finally:
    subprocess.run(undo, check=True)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def launch(args: list[str], *, devices: int = 8, timeout: int = 600, **popen_kwargs):
  return subprocess.Popen([sys.executable, str(ROOT / 'launch.py')] + args, env=_child_env(devices), cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen_kwargs)


def _child_env(devices: int) -> dict:
  # Keep the caller's other XLA flags (e.g. --xla_cpu_max_isa=AVX2 for the older-CPU run).
  flags = [f for f in os.environ.get('XLA_FLAGS', '').split() if 'xla_force_host_platform_device_count' not in f]
  return dict(os.environ, XLA_FLAGS=' '.join(flags + [f'--xla_force_host_platform_device_count={devices}']),
              JAX_PLATFORMS='cpu')



def outputs_of(procs, timeout: int) -> list[str]:
  """Each process's output (stdout and stderr), waiting up to `timeout` s for each; every process is
  killed after, so one that hangs (a host waiting for another) ends with the test."""
  try:
    return [proc.communicate(timeout=timeout)[0] for proc in procs]
  finally:
    for proc in procs:
      proc.kill()


_FULL_DISK = '''
import importlib
import sys
import jax
from launch import main
module_name, name, failing_process = sys.argv[1], sys.argv[2], int(sys.argv[3])
module = importlib.import_module(module_name)
write = getattr(module, name)


def write_or_fail(*args, **kwargs):
  if jax.process_index() == failing_process:
    raise OSError(28, 'No space left on device')
  return write(*args, **kwargs)


setattr(module, name, write_or_fail)
sys.exit(main(sys.argv[4:]))
'''


def launch_with_full_disk(writer: str, process_id: int, args: list[str], *, devices: int):
  """`launch` whose `writer` ('module.function', as the job looks it up) raises the full-disk OSError
  on process `process_id` of a multi-process run: one host failing while the others go on."""
  module, name = writer.rsplit('.', 1)
  return subprocess.Popen([sys.executable, '-c', _FULL_DISK, module, name, str(process_id)] + args,
                          env=_child_env(devices), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def compiles_during(run, backend: bool = False) -> list[tuple[str, str]]:
  """(thread, 'Compiling jit(name)') of every program JAX lowers for compilation while `run()` runs
  (JAX logs that line when it lowers, before XLA compiles); with `backend`, (thread, 'Finished XLA
  compilation of jit(name)') of every XLA backend compile instead."""
  import logging

  import jax
  messages = []

  class Collect(logging.Handler):
    def emit(self, record):
      messages.append((record.threadName, record.getMessage()))

  handler = Collect()
  logging.getLogger('jax').addHandler(handler)
  jax.config.update('jax_log_compiles', True)  # process-wide: `jax.log_compiles()` is per thread
  try:
    run()
  finally:
    jax.config.update('jax_log_compiles', False)
    logging.getLogger('jax').removeHandler(handler)
  if backend:
    return [(thread, m.split(' in ')[0]) for thread, m in messages if m.startswith('Finished XLA compilation of')]
  return [(thread, m.split(' with ')[0]) for thread, m in messages if m.startswith('Compiling jit(')]
