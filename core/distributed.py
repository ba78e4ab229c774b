"""Joining the hosts of a slice, and checking that the run got the hardware its preset describes.

Every host of a multi-host slice runs the same command; `jax.distributed.initialize()` finds the
others from the environment on Cloud TPU VMs, GKE and SLURM. Elsewhere (several processes on one
machine, a GPU cluster without a scheduler) the coordinator is given explicitly.
"""
from __future__ import annotations

from core.errors import ConfigError

_HOW_TO_START = ('on Cloud TPU start every worker with `launch.py tpu run`; elsewhere give each process '
                 '--coordinator HOST:PORT --num-processes N --process-id I')


def add_process_flags(parser) -> None:
  """The flags that start one process of a multi-process run outside a TPU slice (`start` reads them)."""
  parser.add_argument('--coordinator', help='host:port of process 0 (multi-process runs without a TPU)')
  parser.add_argument('--num-processes', type=int, default=1)
  parser.add_argument('--process-id', type=int, default=0)


def wait_for_every_process(name: str) -> None:
  """Returns once every process of the run has reached the same call (a no-op on one process): what
  one host wrote before it is there for the others after it."""
  import jax
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def start(preset, coordinator: str | None = None, num_processes: int = 1, process_id: int = 0) -> None:
  """Starts the multi-process runtime if this run needs one, then checks processes and devices."""
  import jax
  if not coordinator and (num_processes, process_id) != (1, 0):
    # Ran as one process, silently: each of N processes started so would train alone.
    raise ConfigError(f'--num-processes {num_processes} --process-id {process_id} need --coordinator HOST:PORT '
                      '(the address of process 0, the same for every process); on Cloud TPU `launch.py tpu run` '
                      'starts every worker without them')
  if coordinator:
    host, _, port = coordinator.rpartition(':')
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
      raise ConfigError(f'--coordinator {coordinator!r}: expected HOST:PORT of process 0, e.g. 10.0.0.2:1234')
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise ConfigError(f'--process-id {process_id} must be in [0, --num-processes {num_processes})')
    if preset is None or preset.platform == 'cpu':
      jax.config.update('jax_cpu_collectives_implementation', 'gloo')  # CPU collectives across processes
    jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)
  elif preset is not None and preset.num_hosts > 1:
    try:
      jax.distributed.initialize()
    except Exception as e:  # noqa: BLE001 (jax raises ValueError or RuntimeError, by platform)
      raise ConfigError(f'{preset.name} spans {preset.num_hosts} hosts, but this process found no '
                        f'cluster to join ({type(e).__name__}: {e}); {_HOW_TO_START}') from None
  if preset is not None:
    check_hardware(preset, jax.process_count(), jax.local_device_count(), jax.device_count(),
                   jax.devices()[0].platform)


def check_hardware(preset, processes: int, local_devices: int, devices: int, platform: str) -> None:
  """A clear error when the run and the preset disagree, before any compile or data work."""
  if processes != preset.num_hosts:
    raise ConfigError(f'{preset.name} is a {preset.num_hosts}-host preset, but this run has {processes} '
                      f'process(es); {_HOW_TO_START}, or pick the preset of the machine you are on '
                      f'(--tpu tpu_configs/...)')
  if platform != preset.platform:
    raise ConfigError(f'{preset.name} is a {preset.platform.upper()} preset, but JAX runs on {platform.upper()} '
                      f'here; choose a preset for this machine (tpu_configs/cpu_1.py on a laptop)')
  if processes > 1 and local_devices != preset.devices_per_host:
    raise ConfigError(f'{preset.name} expects {preset.devices_per_host} devices per host, this host has '
                      f'{local_devices}')
  if devices < preset.num_devices:
    raise ConfigError(f'{preset.name} needs {preset.num_devices} devices, this run has {devices}')
