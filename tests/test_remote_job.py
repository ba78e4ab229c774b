"""`launch.py tpu run`'s worker side (core/remote_job.py), run for real on this machine: the job
detaches from the terminal, its state and log are kept, the log is copied into WORKDIR/logs/, and
`stop` reaches the training loop as SIGTERM (a checkpoint is saved, exit code 0)."""
import json
import os
import socket
import subprocess
import sys
import time

from tests.helpers import CPU1, ROOT, SMALL_MODEL, TINY


def _remote_job(jobs_dir, *args):
  env = dict(os.environ, LVM_ATTRIB_JOBS_DIR=str(jobs_dir), JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, '-m', 'core.remote_job', *args], cwd=ROOT, env=env, text=True,
                        capture_output=True, timeout=120)


def _state(jobs_dir, name):
  path = jobs_dir / name / f'worker-{socket.gethostname()}.json'
  return json.loads(path.read_text()) if path.exists() else None


def _wait(condition, timeout=300):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if condition():
      return
    time.sleep(0.5)
  raise AssertionError('timed out')


def _train(workdir, steps):
  sets = [x for item in SMALL_MODEL + [f'train.steps={steps}', 'train.checkpoint_every=1000', 'train.log_every=1']
          for x in ('--set', item)]
  return ['lvm', 'train', '--config', TINY, '--tpu', CPU1, f'--workdir={workdir}', *sets]


def test_a_detached_job_is_stopped_by_sigterm_and_leaves_its_log_in_the_workdir(tmp_path):
  """One real training job (one compile): started detached, seen running, refused a second start,
  stopped; the loop saves a checkpoint and exits 0, and the worker's log is in WORKDIR/logs/."""
  jobs, workdir = tmp_path / 'jobs', tmp_path / 'run'
  started = _remote_job(jobs, 'start', '--name', 'long', '--', *_train(workdir, 100_000))
  assert started.returncode == 0 and "started 'long'" in started.stdout  # returned at once: detached
  # Running the first updates: metrics are being written.
  _wait(lambda: (workdir / 'metrics.jsonl').exists() and len((workdir / 'metrics.jsonl').read_text().splitlines()) >= 2)
  assert 'long running' in _remote_job(jobs, 'status', '--name', 'long').stdout
  again = _remote_job(jobs, 'start', '--name', 'long', '--', *_train(workdir, 100_000))
  assert again.returncode != 0 and 'already running' in again.stderr
  assert 'sent SIGTERM' in _remote_job(jobs, 'stop', '--name', 'long').stdout
  _wait(lambda: (_state(jobs, 'long') or {}).get('state') == 'exited')
  state = _state(jobs, 'long')
  assert state['exit_code'] == 0 and state['args'][0:2] == ['lvm', 'train']
  log_name = f'worker-{socket.gethostname()}.log'
  # The copy in the workdir is the worker's whole log, made before the state said "exited".
  log = (workdir / 'logs' / log_name).read_text()
  assert log == (jobs / 'long' / log_name).read_text() and 'SIGTERM: saved step' in log
  saved = int(log.split('SIGTERM: saved step ')[1].split()[0])
  assert 2 <= saved < 100_000 and (workdir / 'checkpoints' / str(saved)).is_dir()
  assert json.loads((workdir / 'train_result.json').read_text())['step'] == saved
  assert 'exited, exit code 0' in _remote_job(jobs, 'status', '--name', 'long').stdout
  assert 'already exited' in _remote_job(jobs, 'stop', '--name', 'long').stdout
  assert _remote_job(jobs, 'status', '--name', 'other').returncode == 1


def test_stop_of_a_lost_job_says_so(tmp_path):
  jobs = tmp_path / 'jobs'
  (jobs / 'gone').mkdir(parents=True)
  dead = subprocess.Popen([sys.executable, '-c', 'pass'])
  dead.wait()  # a pid that no longer runs: the worker restarted under the job
  (jobs / 'gone' / f'worker-{socket.gethostname()}.json').write_text(json.dumps(
      {'host': socket.gethostname(), 'state': 'running', 'pid': dead.pid, 'supervisor_pid': dead.pid,
       'started': time.time(), 'args': []}))
  stopped = _remote_job(jobs, 'stop', '--name', 'gone')
  assert stopped.returncode == 1 and 'lost' in stopped.stdout and 'Traceback' not in stopped.stderr
  assert 'lost' in _remote_job(jobs, 'status', '--name', 'gone').stdout
