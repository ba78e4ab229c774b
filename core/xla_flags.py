"""XLA flags for CPU runs, set in XLA_FLAGS before jax is first imported.

- `--xla_force_host_platform_device_count=N`: N host devices, so a CPU preset gets a real mesh.
- `--xla_cpu_experimental_ynn_fusion_type=INDIVIDUAL_DOT,REDUCE`: keep matmuls and reductions on
  YNNPACK but give convolutions back to XLA's Eigen kernels, and stop XLA from fusing elementwise
  chains into the dot calls. Measured on the digits U-Net forward (batch 256, 2-core EPYC): 3x3
  convolutions 5.5 -> 3.5 ms, whole forward 0.32 -> 0.22 s; the LVM train step is unchanged
  (1007 -> 1025 tokens/s). The flag is experimental, and an XLA that does not know a flag aborts at
  start-up, so it is only added for the jaxlib series it was measured on.

One setting is per program, not per process (`program_options`): on a CPU without AVX-512 the LVM
decoder's training step (dots and elementwise work, no convolutions) compiles with YNNPACK's `DOT`
fusion, elementwise producers and consumers fused into the dot calls. Measured on a 2-core AMD EPYC
without AVX-512 (XLA's GEMM 137-171 GFLOP/s), `benchmarks/lvm_train.py`, alternating runs: 478, 494,
494 tokens/s against 439, 434, 441 with `INDIVIDUAL_DOT` (+12%). The same fusion for the whole
process slowed the AbU teacher's U-Net there from 1.25x diffusers to 0.96x (61.6 -> 103.8 s per
query), so the convolutional programs keep the process flags.

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


def cpu_flags() -> set[str]:
  """The CPU feature flags of /proc/cpuinfo (empty where there is none)."""
  try:
    with open('/proc/cpuinfo') as info:
      for line in info:
        if line.startswith('flags'):
          return set(line.split(':', 1)[1].split())
  except OSError:
    pass
  return set()


# Program kinds: 'matmul' (no convolutions: the LVM decoder) or 'convolutional' (U-Net, VQGAN).
_DOT_FUSION = 'LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE'


def program_options(kind: str, has_avx512: bool | None = None, xla_flags: str | None = None,
                    backend: str | None = None) -> dict:
  """XLA compiler options for one jitted program of `kind`, on top of the process's XLA_FLAGS.

  Empty unless this is our CPU default on a CPU without AVX-512 and `kind` is 'matmul': a ynn flag
  the user set in XLA_FLAGS, an accelerator, or another jaxlib series keep their own settings.
  """
  if kind != 'matmul':
    return {}
  if backend is None:
    import jax
    backend = jax.default_backend()
  if backend != 'cpu':
    return {}
  flags = (os.environ.get('XLA_FLAGS', '') if xla_flags is None else xla_flags).split()
  if f'{_YNN_FLAG}=INDIVIDUAL_DOT,REDUCE' not in flags:  # not our default: the user's choice, or no YNN flag
    return {}
  if has_avx512 is None:
    has_avx512 = 'avx512f' in cpu_flags()
  return {} if has_avx512 else {_YNN_FLAG.lstrip('-'): _DOT_FUSION}


def init_program_options(backend: str) -> dict:
  """XLA compiler options for the parameter-init program (core/train_loop.init_state).

  On CPU it compiles at LLVM O1: an init is one small loop per parameter (random bits, scaling), so
  compiling it costs far more than running it, and LLVM's O2 passes buy nothing measurable. Digits
  U-Net (324 parameters, 1,593 fusions; 2-core EPYC without AVX-512): the init and the training step,
  compiled side by side as the loop does, took 28.2 s (both runs) at the default, 22.4 and 23.5 s
  with this, with bit-identical parameters (tests/test_train.py checks the tokenizer's, the LVM's and,
  with the slow tests, the U-Net's).
  O0 would compile faster still but changes the initial values. Accelerators keep their defaults.
  """
  return {'xla_backend_optimization_level': 1} if backend == 'cpu' else {}


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
  model, flags = 'unknown', cpu_flags()
  try:
    with open('/proc/cpuinfo') as info:
      model = next((line.split(':', 1)[1].strip() for line in info if line.startswith('model name')), model)
  except OSError:
    pass
  isa = 'AVX-512' if 'avx512f' in flags else 'AVX2' if 'avx2' in flags else 'older than AVX2'
  limit = [f for f in os.environ.get('XLA_FLAGS', '').split() if 'max_isa' in f]
  return {'cpu': model, 'cores': os.cpu_count(), 'isa': isa, 'xla_flags': os.environ.get('XLA_FLAGS', ''),
          'xla_isa_limit': limit[0].split('=', 1)[1] if limit else None}
