"""Multi-host start-up and the fit check: the run must match its preset, hosts must agree on a
SIGTERM, and a job is compiled for its TPU topology before anyone pays for the slice."""
import json
import signal
import time

import pytest

from core.compile_check import check_batch_splits
from core.distributed import check_hardware
from core.errors import ConfigError
from core.mesh import load_preset
from core.metrics import read_metrics
from tests.helpers import CPU2X4, ROOT, SMALL_MODEL, TINY, free_port, launch, outputs_of

V4_32 = load_preset(ROOT / 'tpu_configs/v4_32.py')


@pytest.mark.parametrize('processes, local, total, platform, message', [
    (1, 4, 4, 'tpu', '4-host preset, but this run has 1 process'),
    (4, 4, 16, 'cpu', 'TPU preset, but JAX runs on CPU'),
    (4, 8, 32, 'tpu', 'expects 4 devices per host, this host has 8'),
])
def test_a_run_that_does_not_match_its_preset_is_named(processes, local, total, platform, message):
  with pytest.raises(ConfigError, match=message):
    check_hardware(V4_32, processes, local, total, platform)
  check_hardware(V4_32, 4, 4, 16, 'tpu')  # the matching run passes


def test_a_micro_batch_that_does_not_split_over_the_mesh_is_named():
  import jax
  from jax.sharding import Mesh
  import numpy as np
  mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ('data', 'fsdp', 'tensor'))
  check_batch_splits(32, mesh, ('data', 'fsdp'), 'p')
  fake = type('FakeMesh', (), {'shape': {'data': 2, 'fsdp': 64, 'tensor': 4}})()
  with pytest.raises(ConfigError, match=r'32 rows .* cannot be split 128 ways'):
    check_batch_splits(32, fake, ('data', 'fsdp'), 'p')


def test_a_multi_host_preset_without_a_cluster_says_how_to_start(tmp_path):
  proc = launch(['lvm', 'train', '--config', TINY, '--tpu', CPU2X4, '--workdir', str(tmp_path / 'w')], devices=4)
  out = proc.communicate(timeout=300)[0]
  assert proc.returncode == 2, out[-2000:]
  assert 'cpu-2x4 spans 2 hosts' in out and '--coordinator' in out and 'Traceback' not in out
  assert not (tmp_path / 'w').exists()


def test_sigterm_on_one_host_stops_every_host_at_the_same_checked_step(tmp_path):
  """Hosts exchange their SIGTERM flags only every `preemption_check_every` updates, and all of
  them stop and save at the first such step after the signal (a lone host stopping would hang the
  others in the next collective)."""
  workdir, every = tmp_path / 'run', 4
  overrides = [a for o in SMALL_MODEL + ['train.steps=100000', 'train.log_every=1', 'train.checkpoint_every=100000',
                                         f'train.preemption_check_every={every}'] for a in ('--set', o)]
  port = free_port()
  procs = [launch(['lvm', 'train', '--config', TINY, '--tpu', CPU2X4, '--workdir', str(workdir),
                   '--coordinator', f'127.0.0.1:{port}', '--num-processes', '2', '--process-id', str(i)]
                  + overrides, devices=4) for i in range(2)]
  deadline = time.time() + 300
  while time.time() < deadline and not ((workdir / 'metrics.jsonl').exists() and len(read_metrics(workdir)) >= 5):
    time.sleep(0.2)
  procs[1].send_signal(signal.SIGTERM)  # only the second host is told
  outputs = [p.communicate(timeout=300)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  result = json.loads((workdir / 'train_result.json').read_text())
  assert result['preempted'] is True and result['step'] % every == 0 and result['step'] >= 8
  assert (workdir / 'checkpoints' / str(result['step'])).is_dir()
  assert f"SIGTERM: saved step {result['step']}" in outputs[0]


def _check(config: str, tpu: str):
  proc = launch(['lvm', 'train', '--config', config, '--tpu', str(ROOT / 'tpu_configs' / tpu), '--check'], devices=1)
  out = proc.communicate(timeout=900)[0]
  return proc.returncode, out


@pytest.mark.libtpu
def test_fit_check_compiles_the_7b_step_for_v5p_128_and_reports_memory():
  pytest.importorskip('libtpu')
  code, out = _check('lvm/configs/vqlm_7b.py', 'v5p_128.py')
  assert code == 0, out[-3000:]
  report = json.loads(out[out.index('{'):])
  assert report['fits'] and report['devices'] == 64 and report['topology'] == 'v5:4x4x4'
  # f32 parameters: 6.74e9 x 4 bytes over 64 devices; Adam keeps two moments of each.
  assert report['params_gib'] == pytest.approx(report['model_params'] * 4 / 64 / 2**30, rel=0.01)
  assert report['optimizer_gib'] == pytest.approx(2 * report['params_gib'], rel=0.01)
  assert report['params_gib'] + report['optimizer_gib'] < report['peak_gib'] < report['hbm_gib']


@pytest.mark.libtpu
def test_fit_check_fails_clearly_when_the_job_does_not_fit():
  pytest.importorskip('libtpu')
  code, out = _check('lvm/configs/vqlm_7b.py', 'v4_8.py')
  assert code == 3, out[-3000:]
  assert 'v4-8 (v4:2x2x1, 4 devices, 32 GiB HBM each): does NOT fit' in out
  assert 'Ran out of memory' in out and 'Traceback' not in out


@pytest.mark.libtpu
def test_fit_check_of_the_tokenizer_counts_its_frozen_perceptual_network_without_reading_it(tmp_path):
  pytest.importorskip('libtpu')
  from flax import nnx
  import jax
  from lvm.perceptual import LPIPS
  proc = launch(['lvm', 'train-tokenizer', '--config', str(ROOT / 'lvm/configs/tokenizer_tiny.py'), '--tpu',
                 str(ROOT / 'tpu_configs/v4_8.py'), '--check', '--set', 'loss.perceptual_weight=1',
                 '--set', f'loss.perceptual_weights={tmp_path / "not_there.pth"}'], devices=1)
  out = proc.communicate(timeout=900)[0]
  assert proc.returncode == 0, out[-3000:]
  report = json.loads(out[out.index('{'):])
  assert report['job'] == 'lvm train-tokenizer --check' and report['fits'] and report['devices'] == 4
  # LPIPS-on-VGG16 in f32, whole on every device (replicated, as the train loop places it).
  lpips = nnx.state(nnx.eval_shape(lambda: LPIPS(nnx.Rngs(0))))
  assert report['frozen_gib'] == pytest.approx(sum(a.size * 4 for a in jax.tree.leaves(lpips)) / 2**30)
  assert report['optimizer_gib'] == pytest.approx(2 * report['params_gib'], rel=0.01)  # Adam's two moments
  assert report['batch_gib'] == pytest.approx(32 * 32 * 32 * 3 * 4 / 4 / 2**30)  # 32 images of 32x32x3, 4 ways
  assert report['peak_gib'] > report['params_gib'] + report['optimizer_gib'] + report['frozen_gib']
  assert f'+ frozen inputs {report["frozen_gib"]:.2f}' in out


@pytest.mark.libtpu
def test_fit_check_of_the_diffusion_model():
  # (A batch too large for the slice is refused as the 7B above is; for this U-Net the TPU compiler
  # searches rematerialisations for minutes before it gives up, so that case is left to the LVM.)
  pytest.importorskip('libtpu')
  proc = launch(['attrib', 'train-model', '--config', str(ROOT / 'attrib/configs/digits.py'), '--tpu',
                 str(ROOT / 'tpu_configs/v4_8.py'), '--check', '--set', 'train.global_batch=64'], devices=1)
  out = proc.communicate(timeout=900)[0]
  assert proc.returncode == 0, out[-3000:]
  report = json.loads(out[out.index('{'):])
  assert report['job'] == 'attrib train-model --check' and report['fits'] and report['devices'] == 4
  assert report['images_per_step'] == 64 and report['optimizer_gib'] == pytest.approx(2 * report['params_gib'], rel=0.01)
  assert report['model_params'] * 4 / 4 / 2**30 <= report['params_gib'] * 1.01  # sharded at most 4 ways


def test_every_preset_describes_a_mesh_that_uses_all_its_devices():
  import math
  from core.mesh import resolve_sizes
  presets = [load_preset(p) for p in sorted((ROOT / 'tpu_configs').glob('*.py'))
             if p.stem not in ('__init__', 'rules', 'gcloud')]
  assert {p.platform for p in presets} == {'cpu', 'gpu', 'tpu'}
  for p in presets:
    slices = math.prod(p.dcn_mesh)
    assert math.prod(resolve_sizes(p.ici_mesh, p.num_devices // slices, p.name)) * slices == p.num_devices
    if p.platform == 'tpu':
      # One JAX device per chip (v4/v5p megacore included): the topology's chips are the devices.
      chips = math.prod(int(n) for n in p.topology.split(':')[1].split('x'))
      assert chips * slices == p.num_devices, p.name
      assert p.zones and p.peak_flops_per_device > 0 and p.hbm_gib_per_device > 0


ALL_OR_NONE = '''
import sys
import time
import jax
from core.distributed import all_or_none, each_process, start
from core.errors import ConfigError
port, me, failure = sys.argv[1], int(sys.argv[2]), sys.argv[3]
start(None, f'127.0.0.1:{port}', 2, me)
print('every value', each_process('step zero', lambda: {'process': me, 'free': 10 * me}))
with all_or_none('step one'):
  if me == 0 and failure == 'process 0 late':
    time.sleep(40)  # process 0's solo work (an index build), past a CPU collective's 30-s wait
with all_or_none('step two'):
  if me == 1 and failure == 'bad input':
    raise ConfigError('record 7 of shard 3 is out of range')
  if me == 1 and failure == 'bug':
    raise KeyError('missing')
print('both done')
'''


@pytest.mark.parametrize('failure', ['none', 'bad input', 'bug', pytest.param('process 0 late', marks=pytest.mark.slow)])
def test_a_step_that_fails_on_one_process_fails_on_every_process(tmp_path, failure):
  """core.distributed.all_or_none (after each_process, whose values every process gets): when a step fails on process 1, process 0 (which finished its
  share) stops at the step's end with process 1's message, a UserError when process 1's was one.
  A process may reach the step's end long after the others (`slow`: 40 s; the device allgather it
  replaced failed past 30 s on CPU, and a process that returned early would end process 0 at JAX's
  5-minute shutdown barrier)."""
  import os
  import subprocess
  import sys
  port = free_port()
  procs = [subprocess.Popen([sys.executable, '-c', ALL_OR_NONE, str(port), str(i), failure], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=dict(os.environ, JAX_PLATFORMS='cpu'))
           for i in range(2)]
  outputs = outputs_of(procs, 120)
  # each_process: every process's value on each, in process order
  assert all("every value [{'process': 0, 'free': 0}, {'process': 1, 'free': 10}]" in out for out in outputs), outputs
  if failure in ('none', 'process 0 late'):
    assert [p.returncode for p in procs] == [0, 0] and all('both done' in out for out in outputs), outputs
    return
  assert [p.returncode for p in procs] == [1, 1] and not any('both done' in out for out in outputs), outputs
  if failure == 'bad input':
    assert 'ConfigError: record 7 of shard 3 is out of range' in outputs[1]
    assert ('core.distributed.AnotherProcessFailed: step two: process 1 of 2 failed, so this one stops too: '
            'record 7 of shard 3 is out of range') in outputs[0]
  else:
    assert "KeyError: 'missing'" in outputs[1]
    assert "RuntimeError: step two: process 1 of 2 failed, so this one stops too: KeyError: 'missing'" in outputs[0]


def _job_args(job: str, tmp_path) -> list[str]:
  from tests.test_fastgda import CONFIG, write_release
  if job == 'lvm train':
    return ['lvm', 'train', '--config', TINY, *[a for o in SMALL_MODEL for a in ('--set', o)]]
  if job == 'attrib train-model':
    return ['attrib', 'train-model', '--config', str(ROOT / 'attrib/configs/digits.py')]
  if job == 'lvm train-tokenizer':
    return ['lvm', 'train-tokenizer', '--config', str(ROOT / 'lvm/configs/tokenizer_tiny.py')]
  release = write_release(tmp_path / 'release')
  (release / 'config.py').write_text(CONFIG)
  return ['attrib', 'distill', '--config', str(release / 'config.py'), '--features', str(release / 'feats' / 'toy'),
          '--ranks', str(release / 'influence_train.pkl')]


@pytest.mark.parametrize('job, step, writer, failing', [
    ('lvm train', 'lvm train: the config, data and workdir checked', 'lvm.commands.open_token_source', 1),
    ('lvm train', 'lvm train: the config, data and workdir checked', 'lvm.commands.write_json_atomic', 0),
    ('attrib train-model', 'train-model: the config, data and workdir checked', 'attrib.commands.CaptionedImages', 1),
    ('lvm train-tokenizer', 'train-tokenizer: the config, images and workdir checked',
     'lvm.tokenizer_images.open_images', 1),
    ('attrib distill', 'distill: the features, rankings and workdir checked', 'attrib.distill.load_ranks', 1),
], ids=['lvm-train-data', 'lvm-train-config-write', 'train-model-data', 'train-tokenizer-images', 'distill-ranks'])
def test_a_host_that_fails_before_training_stops_every_host_at_once(tmp_path, job, step, writer, failing):
  """Each host checks a training job and reads its data (a gs:// path is staged to each host's disk)
  before the first collective; a host that fails there (here its disk is full: reading its data, or
  process 0 writing the run's config) stops every host with its message. Before, the other host went
  on into the training's first collective and failed there on a timeout (a traceback after 30 s on
  CPU; on a TPU slice it waits until JAX's heartbeats notice the lost host)."""
  from tests.helpers import launch_with_full_disk
  port, workdir = free_port(), tmp_path / 'run'
  args = _job_args(job, tmp_path) + ['--tpu', CPU2X4, '--workdir', str(workdir), '--coordinator', f'127.0.0.1:{port}',
                                     '--num-processes', '2']
  procs = [launch_with_full_disk(writer, failing, args + ['--process-id', str(i)], devices=4) for i in range(2)]
  outputs = outputs_of(procs, 240)
  assert [proc.returncode for proc in procs] == [2, 2], outputs
  disk_full = 'OSError: [Errno 28] No space left on device'
  assert 'error: the disk is full ([Errno 28] No space left on device)' in outputs[failing]
  assert (f'error: the disk is full ({step}: process {failing} of 2 failed, so this one stops too: {disk_full})'
          in outputs[1 - failing]), outputs[1 - failing][-3000:]
  assert not any('Traceback' in out for out in outputs)
  assert not (workdir / 'checkpoints').exists() and not (workdir / 'student' / 'checkpoints').exists()
