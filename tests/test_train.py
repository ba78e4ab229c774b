"""The train loop: sharded == single device, resumed == uninterrupted, 2 processes == 1, SIGTERM."""
import json
import signal
import time

import jax
import numpy as np
import pytest

from core.metrics import read_metrics
from lvm import commands
from tests.helpers import CPU1, CPU8, SMALL_MODEL, TINY, free_port, launch


def _train(workdir, tpu, steps, extra=()):
  return commands.train_command(TINY, tpu, str(workdir),
                                SMALL_MODEL + [f'train.steps={steps}', 'train.log_every=1', *extra])


def _losses(workdir):
  return np.array([m['loss'] for m in read_metrics(workdir)])


def _params(workdir):
  config, _ = commands.load_run_config(workdir)
  _, params, _, _, _ = commands.restore_params(workdir, config, CPU1)
  return jax.tree.map(np.asarray, jax.device_get(params))


def test_sharded_mesh_matches_single_device(tmp_path):
  _train(tmp_path / 'one', CPU1, 3)
  result = _train(tmp_path / 'eight', CPU8, 3)
  assert result['mesh'] == {'data': 2, 'fsdp': 2, 'tensor': 2}
  single, sharded = _losses(tmp_path / 'one'), _losses(tmp_path / 'eight')
  assert len(single) == 3 and single[2] < single[0]  # it trains
  np.testing.assert_allclose(sharded, single, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               _params(tmp_path / 'eight'), _params(tmp_path / 'one'))


def test_resume_equals_uninterrupted(tmp_path):
  _train(tmp_path / 'straight', CPU8, 20)
  _train(tmp_path / 'resumed', CPU8, 10)
  assert len(read_metrics(tmp_path / 'resumed')) == 10
  result = _train(tmp_path / 'resumed', CPU8, 20)  # the same command with more steps continues
  assert result['step'] == 20
  np.testing.assert_array_equal(_losses(tmp_path / 'resumed'), _losses(tmp_path / 'straight'))
  jax.tree.map(np.testing.assert_array_equal, _params(tmp_path / 'resumed'), _params(tmp_path / 'straight'))
  # Finished: a rerun does nothing and changes nothing.
  assert _train(tmp_path / 'resumed', CPU8, 20)['step'] == 20
  assert len(read_metrics(tmp_path / 'resumed')) == 20


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
  _train(tmp_path / 'big', CPU8, 3)
  _train(tmp_path / 'accum', CPU8, 3, ['optim.grad_accum=2'])
  np.testing.assert_allclose(_losses(tmp_path / 'accum'), _losses(tmp_path / 'big'), rtol=1e-5)
  # The schedule counts optimizer updates: 3 updates at warmup 2 reach the same learning rate.
  assert [m['learning_rate'] for m in read_metrics(tmp_path / 'accum')] == \
         [m['learning_rate'] for m in read_metrics(tmp_path / 'big')]


def test_two_processes_with_per_host_data_match_one(tmp_path):
  _train(tmp_path / 'single', CPU8, 4)
  port = free_port()
  args = ['lvm', 'train', '--config', TINY, '--tpu', CPU8, '--workdir', str(tmp_path / 'multi'),
          '--coordinator', f'127.0.0.1:{port}', '--num-processes', '2']
  overrides = [a for o in SMALL_MODEL + ['train.steps=4', 'train.log_every=1'] for a in ('--set', o)]
  procs = [launch(args + ['--process-id', str(i)] + overrides, devices=4) for i in range(2)]
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  result = json.loads((tmp_path / 'multi' / 'result.json').read_text())
  assert result['num_devices'] == 8 and result['step'] == 4
  np.testing.assert_allclose(_losses(tmp_path / 'multi'), _losses(tmp_path / 'single'), rtol=1e-5)
  # Each host checkpointed its own data iterator position.
  data_dir = tmp_path / 'multi' / 'checkpoints' / '4' / 'data'
  assert sorted(p.name for p in data_dir.iterdir() if p.suffix == '.json') == \
         ['process_0-of-2.json', 'process_1-of-2.json']


def test_sigterm_saves_and_exits_cleanly(tmp_path):
  workdir = tmp_path / 'run'
  overrides = [a for o in SMALL_MODEL + ['train.steps=100000', 'train.log_every=1', 'train.checkpoint_every=100000']
               for a in ('--set', o)]
  proc = launch(['lvm', 'train', '--config', TINY, '--tpu', CPU8, '--workdir', str(workdir)] + overrides)
  deadline = time.time() + 300
  while time.time() < deadline and not ((workdir / 'metrics.jsonl').exists()
                                         and len(read_metrics(workdir)) >= 3):
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  out = proc.communicate(timeout=300)[0]
  assert proc.returncode == 0, out[-3000:]
  result = json.loads((workdir / 'result.json').read_text())
  assert result['preempted'] is True and 3 <= result['step'] < 100000
  assert (workdir / 'checkpoints' / str(result['step'])).is_dir()
  # The next run picks up exactly there.
  resumed = _train(workdir, CPU8, result['step'] + 2)
  assert resumed['step'] == result['step'] + 2
  assert [m['step'] for m in read_metrics(workdir)][-3:] == [result['step'], result['step'] + 1, result['step'] + 2]


def test_changed_model_in_existing_workdir_is_refused(tmp_path):
  _train(tmp_path / 'w', CPU8, 1)
  with pytest.raises(ValueError, match='hidden_size'):
    _train(tmp_path / 'w', CPU8, 2, ['model.hidden_size=128'])
