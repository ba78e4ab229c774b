"""Joining the hosts of a slice, and checking that the run got the hardware its preset describes.

Every host of a multi-host slice runs the same command; `jax.distributed.initialize()` finds the
others from the environment on Cloud TPU VMs, GKE and SLURM. Elsewhere (several processes on one
machine, a GPU cluster without a scheduler) the coordinator is given explicitly.
"""
from __future__ import annotations

import contextlib
import itertools

from core.errors import ConfigError, UserError

_HOW_TO_START = ('on Cloud TPU start every worker with `launch.py tpu run`; elsewhere give each process '
                 '--coordinator HOST:PORT --num-processes N --process-id I')


def add_process_flags(parser) -> None:
  """The flags that start one process of a multi-process run outside a TPU slice (`start` reads them)."""
  parser.add_argument('--coordinator', help='host:port of process 0 (multi-process runs without a TPU)')
  parser.add_argument('--num-processes', type=int, default=1)
  parser.add_argument('--process-id', type=int, default=0)


class AnotherProcessFailed(UserError):
  """Raised on every other process when a step of a multi-process job failed on one (`all_or_none`)."""


# How long the first process at a step's end waits for the last: the imbalance of the hosts' shares
# (one teacher query, one part of features) or process 0's solo work (an index build at LAION scale).
# A host that dies is noticed sooner, by the coordination service's heartbeats.
_STEP_WAIT_MS = 24 * 3600 * 1000
_steps = itertools.count()


@contextlib.contextmanager
def all_or_none(name: str):
  """A step that each process does on its own share (its parts, its shards, its queries), or that
  process 0 does alone, ending in a barrier: every process waits there for the others, and when the
  step failed on one, every process fails (the one with its own error, the others with
  AnotherProcessFailed quoting it) instead of the others waiting at the next barrier until JAX's
  coordination service gives up on them. A no-op on one process. Every process must enter the same
  steps in the same order, as with any barrier.

  The barrier is the coordination service's, not a device collective: hosts may reach it hours
  apart (a collective on CPU gives up after 30 s), and a host done early waits here, where a host
  that had returned would wait at JAX's shutdown barrier, which after 5 minutes ends every process,
  process 0 in the middle of its work."""
  import jax
  if jax.process_count() == 1:
    yield
    return
  try:
    yield
  except Exception as error:
    _exchange(name, error)
    raise
  _exchange(name, None)


def each_process(name: str, compute):
  """`compute()` on every process, and every process's result (a JSON value) on each, in process
  order: a step like `all_or_none` (a failure on one process fails every process), for choices that
  the hosts must make alike, e.g. to stream a source when any host lacks the memory to hold it. Not
  to be called inside an `all_or_none` step."""
  import json
  import jax
  if jax.process_count() == 1:
    return [compute()]
  try:
    value = compute()
  except Exception as error:
    _exchange(name, error)
    raise
  return [json.loads(result) for result in _exchange(name, None, json.dumps(value))]


def _exchange(name: str, error: BaseException | None, result: str = '') -> list[str]:
  """Every process's outcome of step `name` to every process, through the coordination service's
  key-value store (as orbax syncs hosts): raises on this one when another failed, else returns each
  process's `result`. An outcome is a kind (0 done, 1 bad input, 2 other) and a message (the result
  when done)."""
  import jax
  from jax._src import distributed
  client = distributed.global_state.client
  if client is None:
    raise RuntimeError(f'{name}: {jax.process_count()} processes but no JAX distributed client '
                       '(start the run with core.distributed.start)')
  step = f'lvm_attrib_step_{next(_steps)}'  # every process counts the same steps in the same order
  kind = '0' if error is None else '1' if isinstance(error, UserError) else '2'
  text = result if error is None else f'{error}' if isinstance(error, UserError) else f'{type(error).__name__}: {error}'
  client.key_value_set(f'{step}/{jax.process_index()}', kind + text)
  client.wait_at_barrier(step, timeout_in_ms=_STEP_WAIT_MS)
  outcomes = [client.blocking_key_value_get(f'{step}/{p}', 60_000) for p in range(jax.process_count())]
  failed = [p for p, outcome in enumerate(outcomes) if outcome[0] != '0']
  if error is not None or not failed:
    return [outcome[1:] for outcome in outcomes]  # this process raises its own error; or every process is done
  first = failed[0]
  others = f' (and {len(failed) - 1} more)' if len(failed) > 1 else ''
  text = f'{name}: process {first} of {jax.process_count()} failed{others}, so this one stops too: {outcomes[first][1:]}'
  raise AnotherProcessFailed(text) if outcomes[first][0] == '1' else RuntimeError(text)


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
