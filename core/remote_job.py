"""A job that outlives the terminal: what `launch.py tpu run` starts on every worker of a slice.

  python -m core.remote_job start --name JOB -- lvm train --workdir gs://b/run ...   (detaches)
  python -m core.remote_job status --name JOB
  python -m core.remote_job stop --name JOB      (SIGTERM: the job saves a checkpoint and exits)

`start` forks a detached supervisor (new session, no terminal) and returns at once. The supervisor
runs `launch.py ARGS`, writes its output to `~/lvm_attrib_jobs/JOB/worker-HOST.log` on this worker,
keeps `worker-HOST.json` (pid, state, exit code) up to date, forwards SIGTERM to the job, and copies
the log into `WORKDIR/logs/` (local or gs://) every minute and at the end, so the logs of every
worker are in one place after the slice is gone.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
JOBS_DIR = Path(os.environ.get('LVM_ATTRIB_JOBS_DIR', Path.home() / 'lvm_attrib_jobs'))
COPY_EVERY_S = 60


def _files(name: str) -> tuple[Path, Path]:
  host = socket.gethostname()
  folder = JOBS_DIR / name
  return folder / f'worker-{host}.log', folder / f'worker-{host}.json'


def _write_state(path: Path, **state) -> None:
  temp = path.with_suffix('.tmp')
  temp.write_text(json.dumps({'host': socket.gethostname(), **state}))
  os.replace(temp, path)


def _workdir_of(job_args: list[str]) -> str | None:
  """The job's --workdir, in either of argparse's spellings (`--workdir X`, `--workdir=X`)."""
  for i, arg in enumerate(job_args):
    if arg == '--workdir' and i + 1 < len(job_args):
      return job_args[i + 1]
    if arg.startswith('--workdir='):
      return arg.partition('=')[2]
  return None


def _copy_log(log: Path, workdir: str | None) -> None:
  """The worker's log into WORKDIR/logs/ (epath: local or gs://); a failed copy never stops the job."""
  if not workdir:
    return
  try:
    from core.paths import as_path
    target = as_path(workdir) / 'logs' / log.name
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(log.read_bytes())
  except Exception as e:  # noqa: BLE001 (storage errors vary by backend; the local log stays)
    print(f'remote_job: could not copy {log} to {workdir}/logs: {e}', file=sys.stderr)


def supervise(name: str, job_args: list[str]) -> int:
  log, state = _files(name)
  log.parent.mkdir(parents=True, exist_ok=True)
  workdir = _workdir_of(job_args)
  with open(log, 'ab', buffering=0) as out:
    child = subprocess.Popen([sys.executable, str(ROOT / 'launch.py')] + job_args, cwd=ROOT,
                             stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    started = time.time()
    _write_state(state, state='running', pid=child.pid, supervisor_pid=os.getpid(), started=started,
                 args=job_args)
    # Preemption and `tpu stop` send SIGTERM to the supervisor: pass it on, the job saves and exits.
    signal.signal(signal.SIGTERM, lambda *_: child.send_signal(signal.SIGTERM))
    last_copy = time.time()
    while child.poll() is None:
      time.sleep(1)
      if time.time() - last_copy > COPY_EVERY_S:
        _copy_log(log, workdir)
        last_copy = time.time()
  _copy_log(log, workdir)  # before the state says "exited", so whoever waits on it finds the copy
  _write_state(state, state='exited', exit_code=child.returncode, pid=child.pid, started=started,
               finished=time.time(), args=job_args)
  return child.returncode


def start(name: str, job_args: list[str]) -> None:
  """Detaches a supervisor (own session, no terminal, no inherited stdin/stdout) and returns."""
  log, state = _files(name)
  if state.exists() and json.loads(state.read_text()).get('state') == 'running':
    pid = json.loads(state.read_text())['supervisor_pid']
    try:
      os.kill(pid, 0)
      raise SystemExit(f'job {name!r} is already running here (pid {pid}); stop it or choose another --job')
    except ProcessLookupError:
      pass  # a stale state file from a machine that went down
  log.parent.mkdir(parents=True, exist_ok=True)
  with open(log.with_suffix('.supervisor.log'), 'ab') as supervisor_log:
    subprocess.Popen([sys.executable, '-m', 'core.remote_job', 'supervise', '--name', name, '--'] + job_args,
                     cwd=ROOT, start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=supervisor_log)
  print(f'{socket.gethostname()}: started {name!r}; log {log}')


def status(name: str) -> int:
  log, state = _files(name)
  if not state.exists():
    print(f'{socket.gethostname()}: no job {name!r}')
    return 1
  info = json.loads(state.read_text())
  if info['state'] == 'running':
    try:
      os.kill(info['supervisor_pid'], 0)
    except ProcessLookupError:
      info['state'] = 'lost (the machine restarted or the supervisor was killed)'
  since = time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(info['started']))
  exit_text = f", exit code {info['exit_code']}" if 'exit_code' in info else ''
  print(f"{info['host']}: {name} {info['state']}{exit_text} (started {since}); log {log}")
  return 0


def stop(name: str) -> int:
  _, state = _files(name)
  if not state.exists():
    print(f'{socket.gethostname()}: no job {name!r}')
    return 1
  info = json.loads(state.read_text())
  if info['state'] != 'running':
    print(f"{socket.gethostname()}: {name} already {info['state']}")
    return 0
  try:
    os.kill(info['supervisor_pid'], signal.SIGTERM)
  except ProcessLookupError:  # the worker restarted, or the supervisor was killed: nothing to stop
    print(f'{socket.gethostname()}: {name} was lost (its supervisor is gone); nothing to stop')
    return 1
  print(f'{socket.gethostname()}: sent SIGTERM to {name} (it saves a checkpoint, then exits)')
  return 0


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  job_args = argv[argv.index('--') + 1:] if '--' in argv else []
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('action', choices=['start', 'supervise', 'status', 'stop'])
  parser.add_argument('--name', required=True)
  args = parser.parse_args(argv[:argv.index('--')] if '--' in argv else argv)
  if '/' in args.name or args.name.startswith('.'):
    raise SystemExit(f'job name {args.name!r} must be a plain name')
  if args.action in ('start', 'supervise') and not job_args:
    raise SystemExit('give the launch.py arguments after --')
  if args.action == 'start':
    start(args.name, job_args)
    return 0
  if args.action == 'supervise':
    return supervise(args.name, job_args)
  return status(args.name) if args.action == 'status' else stop(args.name)


if __name__ == '__main__':
  sys.exit(main())
