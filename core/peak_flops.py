"""The peak FLOP/s behind MFU on CPU presets: measured on this machine once, then cached.

A constant in a preset is only right on the machine it was measured on (the 2-core dev VM's 300
GFLOP/s was 30% off on another one). CPU presets therefore say `peak_flops_per_device=0` and the
figure is measured: every local device runs an f32 matmul at the same time (the way a sharded
training step loads the machine), best of several rounds. The result is cached per CPU model, core
count, XLA flags and jaxlib version, so the measurement costs about a second once per machine.
TPU and GPU presets keep their data-sheet peaks.

On CPU every device of a process shares the same cores (XLA's one thread pool), so a mesh that
uses 1 of 8 forced devices still has the whole host: the peak of a CPU mesh is the host's peak per
process in it, whatever its size (`mesh_peak_flops`). Counting per used device reported MFU 1.57
for the quickstart's diffusion model (one device of eight).
"""
from __future__ import annotations

import json
import os
import time
from importlib import metadata
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

MATMUL_SIZE = 2048  # 1024 ran one device at half the speed of 2048 (235 vs 440 GFLOP/s on 2 cores)
ROUNDS = 7


def _cache_file() -> Path:
  root = os.environ.get('XDG_CACHE_HOME') or Path.home() / '.cache'
  return Path(root) / 'lvm_attrib' / 'peak_flops.json'


def _machine_key() -> str:
  from core.xla_flags import cpu_isa_summary
  summary = cpu_isa_summary()
  return json.dumps([summary.get('cpu'), os.cpu_count(), os.environ.get('XLA_FLAGS', ''),
                     metadata.version('jaxlib'), jax.local_device_count(), MATMUL_SIZE])  # size: older caches were 1024


def measure_host_flops() -> float:
  """FLOP/s of all local devices together on a dense f32 matmul (each device its own product)."""
  devices = jax.local_devices()
  mesh = jax.sharding.Mesh(np.array(devices), ('d',))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('d'))
  n = MATMUL_SIZE
  a = jax.device_put(jnp.ones((len(devices), n, n), jnp.float32) / n, sharding)
  product = jax.jit(lambda x: jnp.einsum('dij,djk->dik', x, x), out_shardings=sharding)
  product(a).block_until_ready()  # compile and warm up
  best = float('inf')
  for _ in range(ROUNDS):
    start = time.perf_counter()
    product(a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return len(devices) * 2 * n ** 3 / best


def host_peak_flops() -> float:
  """Measured once per machine (and per XLA flags / jaxlib), then read from the cache."""
  path, key = _cache_file(), _machine_key()
  try:
    cached = json.loads(path.read_text())
  except (OSError, ValueError):
    cached = {}
  if key not in cached:
    cached[key] = measure_host_flops()
    try:
      from core.workdir import write_bytes_atomic
      path.parent.mkdir(parents=True, exist_ok=True)
      write_bytes_atomic(path, json.dumps(cached, indent=1).encode())
    except OSError:
      pass  # a read-only home still gets a correct figure, measured each run
  return float(cached[key])


def mesh_peak_flops(preset, mesh) -> float:
  """Peak FLOP/s of a job on `mesh`: data-sheet peak x devices, or on CPU the measured host peak
  x the processes in the mesh."""
  if preset.peak_flops_per_device > 0:
    return float(preset.peak_flops_per_device) * mesh.devices.size
  return host_peak_flops() * len({device.process_index for device in mesh.devices.flat})


def peak_flops_per_device(preset) -> float:
  """The preset's data-sheet peak, or for CPU presets (peak 0) the measured one per device."""
  if preset.peak_flops_per_device > 0:
    return float(preset.peak_flops_per_device)
  return host_peak_flops() / jax.local_device_count()


def program_flops(fn, *abstract_args) -> float:
  """XLA's FLOP count of `jax.jit(fn)` on these shapes, from the lowered (unoptimised) program.

  The count behind a task's MFU (`Task.flops_per_example`). Compiling the program only to read the
  count cost ~2.3-4.6 s on a 2-core CPU for the digits U-Net's forward, paid at the start of every
  diffusion training process; the lowered program's count differs from the compiled one's by 0.2%
  there (169.9 against 170.3 MFLOP: the dots and convolutions are the same, fusion only reorders the
  element-wise work), and the count needs no backend compile."""
  cost = jax.jit(fn).lower(*abstract_args).cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float((cost or {}).get('flops', 0.0))
