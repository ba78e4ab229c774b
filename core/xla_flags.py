"""XLA flags for CPU runs, set in XLA_FLAGS before jax is first imported.

- `--xla_force_host_platform_device_count=N`: N host devices, so a CPU preset gets a real mesh.
- `--xla_cpu_experimental_ynn_fusion_type=INDIVIDUAL_DOT,REDUCE`: keep matmuls and reductions on
  YNNPACK but give convolutions back to XLA's Eigen kernels, and stop XLA from fusing elementwise
  chains into the dot calls. Measured on the digits U-Net forward (batch 256, 2-core EPYC): 3x3
  convolutions 5.5 -> 3.5 ms, whole forward 0.32 -> 0.22 s; the LVM train step is unchanged
  (1007 -> 1025 tokens/s). The flag is experimental, and an XLA that does not know a flag aborts at
  start-up, so it is only added for the jaxlib series it was measured on.

`launch.py`, the tests and the benchmarks set these before jax starts. A script that imports the
package instead (`from attrib import Attributor`, or the jobs themselves) gets the same flags from
`apply_library_defaults()`, which `core/__init__.py` runs: XLA reads XLA_FLAGS when its first backend
starts, not when jax is imported, so this works whatever the import order, as long as nothing has
run on a device yet.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import sys

_TESTED_JAXLIB_SERIES = '0.10.'
_YNN_FLAG = '--xla_cpu_experimental_ynn_fusion_type'


def cpu_xla_flags(existing: str, device_count: int | None = None) -> str:
  """`existing` XLA_FLAGS plus the CPU flags above; a flag the user already set is left as it is."""
  flags = existing.split()
  if device_count is not None and not any('xla_force_host_platform_device_count' in f for f in flags):
    flags.append(f'--xla_force_host_platform_device_count={device_count}')
  try:
    jaxlib_version = importlib.metadata.version('jaxlib')
  except importlib.metadata.PackageNotFoundError:
    jaxlib_version = ''
  if jaxlib_version.startswith(_TESTED_JAXLIB_SERIES) and not any(_YNN_FLAG in f for f in flags):
    flags.append(f'{_YNN_FLAG}=INDIVIDUAL_DOT,REDUCE')
  return ' '.join(flags)


def _accelerator_runtime_installed() -> bool:
  """libtpu or a CUDA/ROCm plugin: their XLA parses XLA_FLAGS too and may not know the CPU flag."""
  if importlib.util.find_spec('libtpu') is not None:
    return True
  try:
    plugins = importlib.util.find_spec('jax_plugins')
  except (ImportError, ValueError):
    plugins = None
  return plugins is not None


def _backends_started() -> bool:
  if 'jax' not in sys.modules:
    return False
  try:
    from jax._src import xla_bridge
    return bool(xla_bridge.backends_are_initialized())
  except (ImportError, AttributeError):
    return True  # cannot tell: leave XLA_FLAGS alone rather than report flags that are not in effect


def apply_library_defaults() -> bool:
  """Add the CPU flags for a process that did not come through launch.py; True if XLA_FLAGS changed.

  No forced device count (that is the preset's choice). Nothing happens once a backend has started,
  or where an accelerator runtime is installed unless JAX_PLATFORMS=cpu. A flag the user set wins.
  """
  if _accelerator_runtime_installed() and os.environ.get('JAX_PLATFORMS', '').strip() != 'cpu':
    return False
  if _backends_started():
    return False
  existing = os.environ.get('XLA_FLAGS', '')
  updated = cpu_xla_flags(existing)
  if updated == existing:
    return False
  os.environ['XLA_FLAGS'] = updated
  return True


def cpu_isa_summary() -> dict:
  """The machine a number was measured on: CPU model, cores, widest vector ISA, XLA flags in effect."""
  model, flags = 'unknown', set()
  try:
    for line in open('/proc/cpuinfo'):
      if line.startswith('model name') and model == 'unknown':
        model = line.split(':', 1)[1].strip()
      elif line.startswith('flags') and not flags:
        flags = set(line.split(':', 1)[1].split())
  except OSError:
    pass
  isa = 'AVX-512' if 'avx512f' in flags else 'AVX2' if 'avx2' in flags else 'older than AVX2'
  limit = [f for f in os.environ.get('XLA_FLAGS', '').split() if 'max_isa' in f]
  return {'cpu': model, 'cores': os.cpu_count(), 'isa': isa, 'xla_flags': os.environ.get('XLA_FLAGS', ''),
          'xla_isa_limit': limit[0].split('=', 1)[1] if limit else None}
