"""The machine a benchmark ran on, and one switch to hold a run to a narrower vector ISA.

Every benchmark calls `prepare()` before jax, torch or numpy is imported: it sets the CPU flags that
launch.py sets for cpu presets (so the numbers are those a user gets) and, given `--isa AVX2` on the
command line, holds every library in the run to AVX2, so an AVX-512 machine shows what a laptop or
most cloud CPUs get:

  XLA    --xla_cpu_max_isa=AVX2
  torch  ATEN_CPU_CAPABILITY=avx2, MKL_ENABLE_INSTRUCTIONS=AVX2, ONEDNN_MAX_CPU_ISA=AVX2
  numpy  OPENBLAS_CORETYPE=Haswell (the OpenBLAS in numpy's wheels picks its kernels by this)

What the hold does not reach (measured on the AVX-512 dev VM, jaxlib 0.10.2): XLA's library kernels.
`--xla_cpu_max_isa` limits the code XLA emits itself (fusions, elementwise, reductions), but its
dots run in YNNPACK or Eigen, which pick AVX-512 from the CPU anyway: a 2048² f32 `jnp.dot` ran at
418–421 GFLOP/s held to AVX2, as fast as unheld (389–442) and twice what AVX2 FMAs can do on two
cores at that clock (~211). torch is the other way round on this AMD CPU: its
MKL GEMMs run AVX2 code with or without the hold (2048² f32: 208 GFLOP/s unheld, 202 held; MKL
does not use AVX-512 on AMD), while its oneDNN convolutions are held (a 3x3 conv, 64x32x16x16:
0.85 -> 1.47 ms). So the numbers of a machine without AVX-512 must
come from one; a held run shows what the emitted code loses, not what the GEMMs lose.

`describe()` goes into each result's JSON (`machine`) and onto the screen: CPU model, cores, widest
ISA the CPU has, the ISA the run was held to, and the XLA flags in effect.
"""
from __future__ import annotations

import os
import sys
import time

ISA_CHOICES = ('AVX2', 'AVX512')


def requested_isa(argv: list[str] | None = None) -> str | None:
  """The `--isa X` (or `--isa=X`) of the command line, read before argparse runs."""
  argv = sys.argv[1:] if argv is None else argv
  for n, arg in enumerate(argv):
    value = argv[n + 1] if arg == '--isa' and n + 1 < len(argv) else arg[6:] if arg.startswith('--isa=') else None
    if value is not None:
      value = value.upper().replace('-', '')
      if value not in ISA_CHOICES:
        raise SystemExit(f'--isa {value}: expected one of {ISA_CHOICES}')
      return value
  return None


def prepare(device_count: int | None = None) -> None:
  """Environment for a CPU benchmark; must run before jax, torch or numpy is imported."""
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from core.xla_flags import cpu_xla_flags
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')  # never probe for a TPU (libtpu may be installed)
  isa = requested_isa()
  flags = os.environ.get('XLA_FLAGS', '')
  if isa == 'AVX2':
    os.environ['ATEN_CPU_CAPABILITY'] = 'avx2'
    os.environ['OPENBLAS_CORETYPE'] = 'Haswell'
    os.environ['MKL_ENABLE_INSTRUCTIONS'] = 'AVX2'  # torch's GEMMs
    os.environ['ONEDNN_MAX_CPU_ISA'] = 'AVX2'       # torch's convolutions
    if 'xla_cpu_max_isa' not in flags:
      flags += ' --xla_cpu_max_isa=AVX2'
  os.environ['XLA_FLAGS'] = cpu_xla_flags(flags.strip(), device_count)


def add_isa_argument(parser) -> None:
  parser.add_argument('--isa', type=str.upper, choices=ISA_CHOICES,
                      help='hold XLA, torch and numpy to this ISA (AVX2: what a machine without AVX-512 gets)')


def describe() -> dict:
  from core.xla_flags import cpu_isa_summary
  out = dict(cpu_isa_summary(), held_to=requested_isa() or 'native')
  try:
    import torch
    out['torch_cpu_capability'] = torch.backends.cpu.get_cpu_capability()
  except ImportError:
    pass
  return out


def say(machine: dict) -> None:
  print(f"machine: {machine['cpu']}, {machine['cores']} cores, {machine['isa']} (run held to "
        f"{machine['held_to']}); XLA_FLAGS={machine['xla_flags']!r}", flush=True)
  if machine['held_to'] == 'AVX2' and machine['isa'] == 'AVX-512':
    print("note: XLA's dots (YNNPACK/Eigen) still use AVX-512 under --xla_cpu_max_isa=AVX2: a held run is "
          "not a machine without AVX-512 (benchmarks/machine.py)", flush=True)


def timed_runs(fn, repeats: int, warmup: int = 2) -> tuple[float, list[float]]:
  """(median seconds, every run's seconds) of `repeats` calls after `warmup` untimed ones."""
  import statistics
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times), times


def median_seconds(fn, repeats: int, warmup: int = 2) -> float:
  return timed_runs(fn, repeats, warmup)[0]


def matmul_peak(n: int = 2048) -> dict:
  """f32 GEMM GFLOP/s of XLA (jnp.dot, jitted) and numpy on n x n operands: the ceiling a model's
  FLOP rate is compared with, measured in the same run (and under the same ISA hold)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), np.float32))
  dot = jax.jit(jnp.dot)
  jax_time = median_seconds(lambda: dot(a, a).block_until_ready(), 15)
  host = np.asarray(a)
  numpy_time = median_seconds(lambda: host @ host, 15)
  return {'jax_f32_gflops': 2 * n ** 3 / jax_time / 1e9, 'numpy_f32_gflops': 2 * n ** 3 / numpy_time / 1e9}
