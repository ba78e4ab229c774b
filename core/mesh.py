"""Slice presets and the device mesh built from them.

A preset (one file in `tpu_configs/`) says what hardware a run gets: accelerator type, hosts, the
mesh axis sizes inside a slice (ici) and across slices (dcn), peak FLOPs for MFU, and the logical
sharding rules. Axis sizes of -1 mean "whatever devices are left".
"""
from __future__ import annotations

from core.errors import ConfigError

import dataclasses
import math
from pathlib import Path

import numpy as np

MESH_AXES = ('data', 'fsdp', 'tensor')

# A rule maps one logical axis name to a mesh axis, a tuple of mesh axes, or None (replicated).
LogicalRule = tuple[str, str | tuple[str, ...] | None]


@dataclasses.dataclass(frozen=True)
class SliceConfig:
  # Short name of the preset, e.g. 'v4-32' or 'cpu-8'.
  name: str
  # gcloud accelerator type ('v4-32', 'v5litepod-16', ...) or 'cpu' for local runs.
  accelerator_type: str
  # TPU VM runtime image passed to `gcloud compute tpus tpu-vm create --version`.
  runtime_version: str
  # Number of host VMs in the slice (processes that jax.distributed joins).
  num_hosts: int
  # Devices each host drives (chips for TPU; forced host devices for CPU).
  devices_per_host: int
  # Mesh sizes (data, fsdp, tensor) inside one slice over the fast interconnect; -1 = the rest.
  ici_mesh: tuple[int, ...]
  # Mesh sizes (data, fsdp, tensor) across slices over the data-centre network; -1 = the rest.
  dcn_mesh: tuple[int, ...]
  # Peak dense FLOP/s of one device at the compute dtype, for MFU; 0 = measure it on this machine
  # (CPU presets: core/peak_flops.py).
  peak_flops_per_device: float
  # High-bandwidth memory per device in GiB (used to warn about configs that cannot fit).
  hbm_gib_per_device: float
  # Logical axis name -> mesh axes; the one sharding rules table of this preset.
  logical_rules: tuple[LogicalRule, ...]
  # The slice's TPU topology as libtpu names it ('v5:4x4x4', 'v5e:4x4', ...), for the fit check
  # (core/fit_check.py compiles the training step for it on any machine); '' = none (CPU, GPU).
  topology: str = ''
  # Zones that offer this accelerator, first = default for `launch.py tpu` (--zone overrides).
  zones: tuple[str, ...] = ()

  def __post_init__(self):
    if self.peak_flops_per_device < 0:
      raise ConfigError(f'{self.name}: peak_flops_per_device must be >= 0 (0 = measure here)')
    for field in ('ici_mesh', 'dcn_mesh'):
      sizes = getattr(self, field)
      if len(sizes) != len(MESH_AXES):
        raise ConfigError(f'{self.name}: {field} needs one size per axis {MESH_AXES}, got {sizes}')
      if sum(1 for s in sizes if s == -1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ConfigError(f'{self.name}: {field} {sizes} may hold at most one -1 and no zeros')
    for logical, target in self.logical_rules:
      axes = (target,) if isinstance(target, str) else (target or ())
      unknown = [a for a in axes if a not in MESH_AXES]
      if unknown:
        raise ConfigError(f'{self.name}: rule for {logical!r} names unknown mesh axes {unknown}')

  @property
  def platform(self) -> str:
    """The JAX platform this preset runs on: 'cpu', 'gpu' (accelerator_type 'gpu-...') or 'tpu'."""
    if self.accelerator_type == 'cpu':
      return 'cpu'
    return 'gpu' if self.accelerator_type.startswith('gpu') else 'tpu'

  @property
  def num_devices(self) -> int:
    return self.num_hosts * self.devices_per_host


def resolve_sizes(sizes: tuple[int, ...], total: int, what: str) -> tuple[int, ...]:
  """Replaces a -1 by the size that makes the product equal `total`."""
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if total % known:
      raise ConfigError(f'{what}: {total} devices do not divide into {sizes}')
    sizes = tuple(total // known if s == -1 else s for s in sizes)
  if math.prod(sizes) != total:
    raise ConfigError(f'{what}: mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, '
                     f'{total} are available')
  return sizes


def make_mesh(preset: SliceConfig, devices: list | None = None):
  """Builds the (data, fsdp, tensor) mesh; ici axes are laid out inside a slice, dcn across slices.

  Uses `jax.sharding.Mesh` with automatic axes (see deps.md: `jax.make_mesh` now defaults to
  explicit axes, which reject the implicit resharding that FSDP relies on).
  """
  import jax
  from jax.experimental import mesh_utils
  from jax.sharding import Mesh
  if devices is None:
    devices = jax.devices()
    # A smaller preset on a bigger single host (cpu-1 under 8 forced devices) takes the first ones.
    if jax.process_count() == 1 and len(devices) > preset.num_devices:
      devices = devices[:preset.num_devices]
  devices = list(devices)
  num_slices = math.prod(s for s in preset.dcn_mesh if s != -1)
  if -1 in preset.dcn_mesh:
    num_slices = max(1, len({getattr(d, 'slice_index', 0) for d in devices}))
  dcn = resolve_sizes(preset.dcn_mesh, num_slices, f'{preset.name} dcn_mesh')
  if len(devices) % num_slices:
    raise ConfigError(f'{preset.name}: {len(devices)} devices do not split into {num_slices} slices')
  ici = resolve_sizes(preset.ici_mesh, len(devices) // num_slices, f'{preset.name} ici_mesh')
  if num_slices > 1:
    # TPU multislice devices carry slice_index; on CPU or GPU each process stands in for a slice.
    by_process = not hasattr(devices[0], 'slice_index')
    grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=by_process,
                                                allow_split_physical_axes=True)
  elif devices[0].platform == 'tpu':
    # Splitting a physical torus axis (tensor=4 on v6e's 16x16) is allowed: it keeps each group of
    # the split on neighbouring chips, which is all a mesh axis needs.
    grid = mesh_utils.create_device_mesh(ici, devices, allow_split_physical_axes=True)
  else:
    # CPU/GPU: no physical topology to respect; keep process-major order so per-host data lines up.
    grid = np.array(devices).reshape(ici)
  return Mesh(grid, MESH_AXES)


def host_mesh():
  """This host's devices alone, data parallel: for jobs whose hosts each work through items of their
  own (features, tokenize shards) rather than one batch spread over every host."""
  import jax
  from jax.sharding import Mesh
  return Mesh(np.array(jax.local_devices()).reshape(-1, 1, 1), MESH_AXES)


PRESET_DIR = Path(__file__).resolve().parent.parent / 'tpu_configs'


def load_preset(path) -> SliceConfig:
  """A slice preset file (tpu_configs/*.py), rejected clearly if the file holds something else."""
  from core.config import bundled_or_given, load_config_file
  path = bundled_or_given(path) if path else path
  if path and not Path(path).exists():
    raise ConfigError(f'slice preset {path} not found: pass --tpu with a preset file on this machine '
                      '(tpu_configs/*.py; a workdir records where its preset was on the machine that trained it)')
  return load_config_file(path, expect=SliceConfig)


def preset_to_record(path) -> str:
  """The absolute path a workdir records for the preset `path` names (a bundled preset given
  relative from another folder is recorded where it is, not under that folder)."""
  from core.config import bundled_or_given
  return str(bundled_or_given(path).resolve())


def serving_preset(trained: str | None) -> str:
  """The preset to load a trained model with when none is given (the Python APIs, the tokenizer):
  the one it trained with where this process has that preset's devices (its TPU slice, or the CPU
  devices `launch.py` forced for it); otherwise one CPU device, as a plain Python process on a laptop
  has, so a run trained over 8 forced CPU devices or on a TPU can be loaded from anywhere."""
  import jax
  one_cpu = str(PRESET_DIR / 'cpu_1.py')
  if trained:
    preset = load_preset(trained)
    if preset.platform == jax.default_backend() and preset.num_hosts * preset.devices_per_host == jax.device_count():
      return trained
  return one_cpu if jax.default_backend() == 'cpu' or not trained else trained


def trained_preset(workdir) -> str | None:
  """The slice preset a workdir's run was started with (commands that default to it); None where
  the workdir holds no run or its preset is not on this machine."""
  from core.paths import as_path
  from core.workdir import read_json
  stored = as_path(workdir) / 'config.json' if workdir else None
  if stored is None or not stored.exists():
    return None
  preset = recorded_preset(read_json(stored).get('tpu'))
  return preset if preset and Path(preset).exists() else None


def recorded_preset(path: str) -> str:
  """The preset a workdir recorded, as a path on this machine.

  Workdirs record the absolute path of their preset; a workdir copied from the machine that trained
  it (a TPU VM, a gs:// bucket read from a laptop) or a checkout moved elsewhere records a path that
  is not here. The preset of the same name in this checkout's tpu_configs/ is the same preset. A path
  found nowhere is returned as is, so that loading it names it."""
  if not path or Path(path).exists():
    return path
  here = PRESET_DIR / Path(path).name
  return str(here) if Path(path).parent.name == PRESET_DIR.name and here.is_file() else path
