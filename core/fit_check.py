"""Will this job fit on that slice? Compile its real training step for the slice's TPU topology,
here, before paying for the slice.

JAX can compile for a TPU that is not attached: `jax.experimental.topologies.get_topology_desc`
describes the chips of a topology (through the `libtpu` wheel that `jax[tpu]` pins: the `tpu`
extra), the mesh is laid out over those devices exactly as on the pod, and the TPU compiler's own
memory analysis says what each device holds. This is what MaxText's `train_compile.py` does.

  python launch.py lvm train --config lvm/configs/vqlm_7b.py --tpu tpu_configs/v5p_128.py --check
  python launch.py lvm train-tokenizer --config lvm/configs/tokenizer_f16.py --tpu tpu_configs/v4_8.py --check
  python launch.py attrib train-model --config attrib/configs/mscoco.py --tpu tpu_configs/v4_8.py --check
"""
from __future__ import annotations

import dataclasses
import math
import re

from core.errors import ConfigError

GIB = 1024 ** 3
CHECK_HELP = "compile the step for the preset's TPU topology here and report per-device memory; no training"
# TPU v4 and v5p chips hold two TensorCores that JAX drives as one device ("megacore").
_MEGACORE = ('v4', 'v5')


@dataclasses.dataclass
class FitReport:
  preset: str
  topology: str
  devices: int
  hbm_gib: float
  params_gib: float       # this device's shard of the parameters
  optimizer_gib: float    # ... of the optimizer state (Adam moments, counters)
  batch_gib: float        # ... of one global batch
  temporaries_gib: float  # activations, gradients and workspace, from XLA's memory analysis
  peak_gib: float         # everything live at once: arguments + outputs - reused (donated) + temporaries
  compile_s: float
  error: str = ''         # the compiler's words when it refused (e.g. out of HBM)
  frozen_gib: float = 0.0  # the task's frozen inputs (e.g. a perceptual loss network), on every device

  @property
  def fits(self) -> bool:
    return not self.error and self.peak_gib <= self.hbm_gib

  def summary(self) -> str:
    head = (f'{self.preset} ({self.topology}, {self.devices} devices, {self.hbm_gib:g} GiB HBM each): ')
    if self.error:
      return head + (f'does NOT fit: about {self.peak_gib:.1f} GiB per device needed (parameters '
                     f'{self.params_gib:.2f} + optimizer {self.optimizer_gib:.2f} + temporaries '
                     f'{self.temporaries_gib:.1f}); the TPU compiler says: {self.error}')
    verdict = 'fits' if self.fits else 'does NOT fit'
    frozen = f' + frozen inputs {self.frozen_gib:.2f}' if self.frozen_gib else ''
    return head + (f'{verdict}: {self.peak_gib:.2f} GiB per device at peak = parameters {self.params_gib:.2f}'
                   f' + optimizer {self.optimizer_gib:.2f} + batch {self.batch_gib:.3f}{frozen}'
                   f' + activations/gradients/workspace {self.temporaries_gib:.2f}'
                   f' ({100 * self.peak_gib / self.hbm_gib:.0f}% of HBM; compiled in {self.compile_s:.0f} s)')


def topology_devices(preset) -> list:
  """The devices of `preset`'s TPU topology, described by libtpu without any TPU attached."""
  if not preset.topology:
    raise ConfigError(f'{preset.name}: the fit check needs a TPU preset with a `topology` field '
                      f'(e.g. tpu_configs/v5p_128.py)')
  import importlib.util
  if importlib.util.find_spec('libtpu') is None:
    raise ConfigError('the fit check compiles for TPU with libtpu, which is not installed: '
                      'pip install -e ".[tpu]"')
  from jax.experimental import topologies
  import os
  # libtpu reads these at load time to find the TPU it runs on; here there is none to find, and
  # without them it logs a page of metadata-server errors before describing the topology.
  os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')
  os.environ.setdefault('TPU_ACCELERATOR_TYPE', preset.accelerator_type)
  os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')
  # libtpu takes a machine-wide lock for the TPU it drives; compiling drives none, so several
  # checks may run at once.
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  chip = preset.topology.split(':')[0]
  num_slices = math.prod(s for s in preset.dcn_mesh if s != -1)
  # Hosts of every current generation drive 2x2 chips (4 per VM).
  desc = topologies.get_topology_desc(
      platform='tpu', topology_name=preset.topology,
      chip_config_name='megacore' if chip in _MEGACORE else 'default',
      chips_per_host_bounds=(2, 2, 1), num_slices=num_slices)
  devices = list(desc.devices)
  if len(devices) != preset.num_devices:
    raise ConfigError(f'{preset.name}: topology {preset.topology} x {num_slices} slice(s) has {len(devices)} '
                      f'devices, the preset says {preset.num_hosts} hosts x {preset.devices_per_host}')
  return devices


def _shard_gib(tree) -> float:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard: uneven splits)."""
  import jax
  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    total += math.prod(shape) * leaf.dtype.itemsize
  return total / GIB


def fit_report(task, preset, optim, global_batch: int, example_shapes: dict, frozen=None) -> FitReport:
  """Compiles the training step for the preset's topology and reads the per-device memory.
  `frozen`: the task's frozen inputs as ShapeDtypeStructs (nothing is read to check a fit)."""
  import time
  from core.compile_check import lower_train_step
  devices = topology_devices(preset)
  start = time.perf_counter()
  lowered, (params, opt_state, batch, frozen) = lower_train_step(task, preset, optim, global_batch, example_shapes,
                                                                 devices=devices, frozen=frozen)
  sizes = dict(preset=preset.name, topology=preset.topology, devices=len(devices),
               hbm_gib=preset.hbm_gib_per_device, params_gib=_shard_gib(params),
               optimizer_gib=_shard_gib(opt_state), batch_gib=_shard_gib(batch), frozen_gib=_shard_gib(frozen))
  try:
    compiled = lowered.compile()
  except Exception as e:  # the TPU compiler refuses programs that exceed HBM (RESOURCE_EXHAUSTED)
    message = str(e).strip().splitlines()
    if not any('RESOURCE_EXHAUSTED' in line or 'memory' in line.lower() for line in message):
      raise
    error = ' '.join(message[:3])[:400]
    # "... required for HLO temporaries (58.35G) exceeds available HBM (30.75G)": keep the number
    # (XLA prints bytes in units of 1024, so G is GiB).
    needed = re.search(r'temporaries \(([\d.]+)G\)', error)
    temporaries = float(needed.group(1)) if needed else float('nan')
    return FitReport(**sizes, temporaries_gib=temporaries,
                     peak_gib=(sizes['params_gib'] + sizes['optimizer_gib'] + sizes['batch_gib'] + sizes['frozen_gib']
                               + temporaries),
                     compile_s=time.perf_counter() - start, error=error)
  memory = compiled.memory_analysis()
  peak = (memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
          + memory.temp_size_in_bytes + memory.generated_code_size_in_bytes) / GIB
  return FitReport(**sizes, temporaries_gib=memory.temp_size_in_bytes / GIB, peak_gib=peak,
                   compile_s=time.perf_counter() - start)


def trained_params(task) -> int:
  """How many parameters the task trains, counted from shapes (nothing is allocated)."""
  import jax
  from flax import nnx
  model = nnx.eval_shape(lambda: task.make_model(nnx.Rngs(0)))
  return int(sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param))))


def fit_check_result(job: str, report: FitReport, **facts) -> dict:
  """Says the verdict on one line and returns the command's JSON result (`facts`: the model's size,
  what one step processes)."""
  from core import progress
  progress.say(report.summary())
  return {'job': f'{job} --check', 'fits': report.fits, **dataclasses.asdict(report), **facts}


def lvm_fit_report(config, preset) -> FitReport:
  from lvm.task import NextTokenTask
  task = NextTokenTask(config.model, config.data.seq_len)
  return fit_report(task, preset, config.optim, config.train.global_batch, task.batch_shapes())
