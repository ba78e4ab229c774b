"""The train loop: sharded == single device, resumed == uninterrupted, 2 processes == 1, SIGTERM."""
import json
import signal
import time

import jax
import numpy as np
import pytest

from core.config import load_config_file
from core.metrics import read_metrics
from core import train_loop
from core.train_loop import forget_programs
from launch import main as launch_main
from lvm import commands
from tests.helpers import CPU1, CPU2X4, CPU8, SMALL_MODEL, TINY, compiles_during, free_port, launch
from tests.tolerance import assert_network_close, total_fan_in


def _train(workdir, tpu, steps, extra=()):
  return commands.train_command(TINY, tpu, str(workdir),
                                SMALL_MODEL + [f'train.steps={steps}', 'train.log_every=1', *extra])


def _losses(workdir):
  return np.array([m['loss'] for m in read_metrics(workdir)])


def _params(workdir):
  config, _ = commands.load_run_config(workdir)
  _, params, _, _, _ = commands.restore_params(workdir, config, CPU1)
  return jax.tree.map(np.asarray, jax.device_get(params))


def _initial_params(workdir):
  from core.mesh import make_mesh
  from core.train_loop import init_state
  from lvm.task import NextTokenTask
  config, _ = commands.load_run_config(workdir)
  preset = load_config_file(CPU1)
  init_fn = init_state(NextTokenTask(config.model, config.data.seq_len), make_mesh(preset), preset.logical_rules,
                       config.optim, config.train.seed)[2]
  return jax.tree.map(np.asarray, jax.device_get(init_fn()[0]))


def _reduction_length(workdir, steps):
  """Sums along the decoder (every weight's fan-in, attention over the sequence, softmax over the
  vocabulary, the batch mean), once per step: step s's loss depends on all earlier updates."""
  config, _ = commands.load_run_config(workdir)
  m, t = config.model, config.data.seq_len
  per_step = (total_fan_in(_params(workdir), layout='jax') + 2 * m.num_layers * t + m.vocab_size
              + config.train.global_batch * t)
  return per_step * steps


def test_sharded_mesh_matches_single_device(tmp_path):
  _train(tmp_path / 'one', CPU1, 3)
  result = _train(tmp_path / 'eight', CPU8, 3)
  assert result['mesh'] == {'data': 2, 'fsdp': 2, 'tensor': 2}
  single, sharded = _losses(tmp_path / 'one'), _losses(tmp_path / 'eight')
  assert len(single) == 3 and single[2] < single[0]  # it trains
  length = _reduction_length(tmp_path / 'one', 3)
  assert_network_close(sharded, single, reduction_length=length, what='losses')
  # Adam's update m/√v is scale-free, so the parameters carry the gradients' relative error.
  initial = _initial_params(tmp_path / 'one')
  updates = lambda workdir: np.concatenate([np.ravel(p - p0) for p, p0 in
                                            zip(jax.tree.leaves(_params(workdir)), jax.tree.leaves(initial))])
  assert_network_close(updates(tmp_path / 'eight'), updates(tmp_path / 'one'), reduction_length=length,
                       what='parameter updates')


def _ctrl_c_after(step, logger_class):
  """A MetricsLogger that presses Ctrl-C (SIGINT to this process) once update `step` is done."""
  class CtrlC(logger_class):
    def __init__(self, *args, start_step, **kwargs):
      super().__init__(*args, start_step=start_step, **kwargs)
      self.updates = start_step

    def advance(self):
      super().advance()
      self.updates += 1
      if self.updates == step:
        signal.raise_signal(signal.SIGINT)
  return CtrlC


def test_resume_equals_uninterrupted(tmp_path, capfd, monkeypatch):
  _train(tmp_path / 'straight', CPU8, 20)
  # Updates 3-4 traced by the profiler on the way: a trace in the workdir, training unchanged to the bit.
  _train(tmp_path / 'resumed', CPU8, 10, ['train.profile_from=3', 'train.profile_steps=2'])
  assert len(read_metrics(tmp_path / 'resumed')) == 10
  traced = tmp_path / 'resumed' / 'tensorboard' / 'plugins' / 'profile' / 'updates_3-4'
  trace = next(traced.glob('*-process0.xplane.pb'))
  assert trace.stat().st_size > 10_000 and b'jit_train_step' in trace.read_bytes()
  # The same command with more steps continues; Ctrl-C after update 15 saves it (the next
  # checkpoint would be at 20) and stops; rerun, it goes on from 15.
  capfd.readouterr()
  # As on a terminal: a suite started in the background (nohup, &) inherits Ctrl-C ignored.
  inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    with monkeypatch.context() as patch:
      patch.setattr(train_loop, 'MetricsLogger', _ctrl_c_after(15, train_loop.MetricsLogger))
      with pytest.raises(KeyboardInterrupt):
        _train(tmp_path / 'resumed', CPU8, 20)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the loop's handler is gone
  finally:
    signal.signal(signal.SIGINT, inherited)
  err = capfd.readouterr().err
  assert f"resuming {tmp_path / 'resumed'} from step 10 of 20" in err and 'note:' not in err
  assert f"Ctrl-C: saved step 15 in {tmp_path / 'resumed'}, rerun the same command to continue" in err
  assert sorted(int(p.name) for p in (tmp_path / 'resumed' / 'checkpoints').iterdir())[-1] == 15
  result = _train(tmp_path / 'resumed', CPU8, 20)
  assert f"resuming {tmp_path / 'resumed'} from step 15 of 20" in capfd.readouterr().err
  assert result['step'] == 20
  np.testing.assert_array_equal(_losses(tmp_path / 'resumed'), _losses(tmp_path / 'straight'))
  jax.tree.map(np.testing.assert_array_equal, _params(tmp_path / 'resumed'), _params(tmp_path / 'straight'))
  # Finished: a rerun does nothing and changes nothing; without --config and --tpu it is the same
  # run on the same preset (the recorded ones).
  assert _train(tmp_path / 'resumed', CPU8, 20)['step'] == 20
  assert launch_main(['lvm', 'train', '--workdir', str(tmp_path / 'resumed')]) == 0
  assert f"resuming {tmp_path / 'resumed'} from step 20 of 20" in capfd.readouterr().err
  assert len(read_metrics(tmp_path / 'resumed')) == 20


def test_a_rerun_with_other_training_settings_notes_each(tmp_path, capsys):
  """A rerun continues the saved run with what it is given now; a forgotten `--set` (a batch size,
  a learning rate) would change it silently. Each change is noted; train.steps (what a rerun raises)
  and bookkeeping (logging, checkpoint cadence) are not; nothing is noted before a first save."""
  from core.config import apply_overrides
  from core.workdir import note_changed_training
  before = apply_overrides(load_config_file(TINY), ['train.global_batch=16', 'optim.lr=1e-3'])
  after = apply_overrides(before, ['train.global_batch=32', 'optim.lr=1e-2', 'train.steps=99', 'train.log_every=3',
                                   'train.progress_bar=false', 'train.profile_from=5', 'train.eval_every=9',
                                   'data.eval_path=builtin:digits-eval'])
  note_changed_training(tmp_path, before, after)
  assert capsys.readouterr().err == ''  # no checkpoint yet: the run starts over with the new settings
  (tmp_path / 'checkpoints' / '10').mkdir(parents=True)
  note_changed_training(tmp_path, before, after)
  assert capsys.readouterr().err.strip() == (f'note: {tmp_path} continues its saved run with settings other than it '
                                             'trained with so far: train.global_batch 16 -> 32, optim.lr 0.001 -> 0.01')
  note_changed_training(tmp_path, before, apply_overrides(before, ['train.steps=99']))
  assert capsys.readouterr().err == ''


def test_fresh_run_compiles_its_step_once_beside_the_init(tmp_path):
  """The loop compiles a fresh run's step on a second thread while the init runs; the loop's own
  calls must then find that executable, not trace and compile the step a second time (they would if
  the thread traced it without the loop's activation shardings)."""
  forget_programs()  # an earlier test's run of this recipe would lend its programs
  compiles = compiles_during(lambda: _train(tmp_path / 'w', CPU8, 2))
  assert [thread for thread, m in compiles if m == 'Compiling jit(train_step)'] == ['compile-ahead'], compiles
  assert [thread for thread, m in compiles if m == 'Compiling jit(init_fn)'] == ['MainThread'], compiles
  # The checkpoint at the end writes each replicated array whole: no per-replica slice programs.
  assert not [m for _, m in compiles if m.startswith('Compiling jit(slice')], compiles
  assert len(_losses(tmp_path / 'w')) == 2


def test_runs_of_one_recipe_share_compiled_programs(tmp_path):
  """A second run of an equal task, optimizer, seed and mesh in one process (the counterfactual's
  retrainings) traces and compiles neither its init nor its step, and trains exactly as a run that
  compiled them afresh; another seed is another init program."""
  forget_programs()
  _train(tmp_path / 'first', CPU8, 2)
  compiles = compiles_during(lambda: _train(tmp_path / 'reused', CPU8, 3))
  assert not [m for _, m in compiles if m in ('Compiling jit(init_fn)', 'Compiling jit(train_step)')], compiles
  forget_programs()
  _train(tmp_path / 'fresh', CPU8, 3)
  np.testing.assert_array_equal(_losses(tmp_path / 'reused'), _losses(tmp_path / 'fresh'))
  jax.tree.map(np.testing.assert_array_equal, _params(tmp_path / 'reused'), _params(tmp_path / 'fresh'))
  compiles = compiles_during(lambda: _train(tmp_path / 'seed1', CPU8, 1, extra=['train.seed=1']))
  assert [m for _, m in compiles if m == 'Compiling jit(init_fn)'] == ['Compiling jit(init_fn)'], compiles


def test_cpu_checkpoints_save_replicas_whole_and_read_orbax_default_saves(tmp_path):
  """On CPU a replicated array is saved from one replica (orbax's replica-parallel save would slice it
  per replica); a checkpoint written with orbax's default handler reads back the same, and ours
  reads back exactly what was saved, replicated and sharded arrays alike."""
  import orbax.checkpoint as ocp
  from jax.sharding import NamedSharding, PartitionSpec as P
  from core import checkpoint
  mesh = jax.make_mesh((4, 2), ('data', 'model'), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
  rng = np.random.default_rng(0)
  params = {'replicated': jax.device_put(rng.standard_normal((64, 48), np.float32), NamedSharding(mesh, P())),
            'half': jax.device_put(rng.standard_normal((64, 48), np.float32), NamedSharding(mesh, P('model'))),
            'full': jax.device_put(rng.standard_normal((64, 48), np.float32), NamedSharding(mesh, P('data', 'model')))}
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), params)
  expected = jax.tree.map(np.asarray, params)

  def round_trip(workdir):
    manager = checkpoint.make_manager(workdir, async_save=False)
    checkpoint.save(manager, 1, params=params, force=True)
    manager.wait_until_finished()
    restored = checkpoint.restore(checkpoint.make_manager(workdir), 1, abstract_params=abstract)
    return jax.tree.map(np.asarray, restored['params'])

  ours = round_trip(tmp_path / 'ours')
  assert not ocp.type_handlers.get_type_handler(jax.Array)._use_replica_parallel
  jax.tree.map(np.testing.assert_array_equal, ours, expected)

  # The same arrays saved by orbax's default (replica-parallel) handler, then read by ours.
  from orbax.checkpoint._src.metadata import array_metadata_store
  ours_handler = ocp.type_handlers.get_type_handler(jax.Array)
  ocp.type_handlers.register_type_handler(jax.Array, ocp.type_handlers.ArrayHandler(
      array_metadata_store=array_metadata_store.Store()), override=True)
  try:
    assert ocp.type_handlers.get_type_handler(jax.Array)._use_replica_parallel
    manager = ocp.CheckpointManager((tmp_path / 'default').absolute() / 'checkpoints',
                                    options=ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False))
    manager.save(1, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                            meta=ocp.args.JsonSave({'step': 1})))
    manager.wait_until_finished()
  finally:
    ocp.type_handlers.register_type_handler(jax.Array, ours_handler, override=True)
  restored = checkpoint.restore(checkpoint.make_manager(tmp_path / 'default'), 1, abstract_params=abstract)
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, restored['params']), expected)


def test_compile_in_background_traces_as_the_calling_thread_would():
  """The background compile sees the caller's activation shardings (a ContextVar, which a new thread
  would not inherit by itself), and the next call reuses its trace and executable."""
  from core import sharding
  from core.mesh import make_mesh
  from core.train_loop import BackgroundCompile
  preset = load_config_file(CPU8)
  traced_with_rules = []

  @jax.jit
  def step(x):
    traced_with_rules.append(sharding._ACTIVE.get() is not None)
    return x * 2

  x = np.arange(8, dtype=np.float32)
  with sharding.activation_sharding(make_mesh(preset), preset.logical_rules):
    BackgroundCompile(step, x).result()
    np.testing.assert_array_equal(step(x), 2 * x)
  assert traced_with_rules == [True]

  @jax.jit
  def broken(x):
    raise ValueError('bad shapes')
  with pytest.raises(ValueError, match='bad shapes'):  # the thread's error reaches the caller
    BackgroundCompile(broken, x).result()


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
  _train(tmp_path / 'big', CPU8, 3)
  _train(tmp_path / 'accum', CPU8, 3, ['optim.grad_accum=2'])
  assert_network_close(_losses(tmp_path / 'accum'), _losses(tmp_path / 'big'),
                       reduction_length=_reduction_length(tmp_path / 'big', 3), what='losses')
  # The schedule counts optimizer updates: 3 updates at warmup 2 reach the same learning rate.
  assert [m['learning_rate'] for m in read_metrics(tmp_path / 'accum')] == \
         [m['learning_rate'] for m in read_metrics(tmp_path / 'big')]


def test_two_processes_with_per_host_data_match_one(tmp_path):
  # Validated every 2 steps on held-out tokens, each host reading its rows of each held-out batch.
  validation = ['data.eval_path=builtin:digits-eval', 'data.eval_examples=32', 'train.eval_every=2']
  _train(tmp_path / 'single', CPU8, 4, validation)
  port = free_port()
  args = ['lvm', 'train', '--config', TINY, '--tpu', CPU2X4, '--workdir', str(tmp_path / 'multi'),
          '--coordinator', f'127.0.0.1:{port}', '--num-processes', '2']
  overrides = [a for o in SMALL_MODEL + ['train.steps=4', 'train.log_every=1', 'train.profile_from=2',
                                         'train.profile_steps=1', *validation] for a in ('--set', o)]
  procs = [launch(args + ['--process-id', str(i)] + overrides, devices=4) for i in range(2)]
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  result = json.loads((tmp_path / 'multi' / 'train_result.json').read_text())
  assert result['num_devices'] == 8 and result['step'] == 4
  # Each host traced update 2 into the one workdir, under a name of its own.
  traced = tmp_path / 'multi' / 'tensorboard' / 'plugins' / 'profile' / 'updates_2-2'
  assert sorted(p.name.rsplit('-', 1)[1] for p in traced.glob('*.xplane.pb')) == ['process0.xplane.pb',
                                                                                  'process1.xplane.pb']
  assert_network_close(_losses(tmp_path / 'multi'), _losses(tmp_path / 'single'),
                       reduction_length=_reduction_length(tmp_path / 'single', 4), what='losses')
  held_out = lambda workdir: np.array([m['eval_loss'] for m in read_metrics(workdir) if 'eval_loss' in m])
  assert len(held_out(tmp_path / 'single')) == 2
  assert_network_close(held_out(tmp_path / 'multi'), held_out(tmp_path / 'single'),
                       reduction_length=_reduction_length(tmp_path / 'single', 5) + 32 * 128, what='held-out losses')
  # Each host checkpointed its own data iterator position.
  data_dir = tmp_path / 'multi' / 'checkpoints' / '4' / 'data'
  assert sorted(p.name for p in data_dir.iterdir() if p.suffix == '.json') == \
         ['process_0-of-2.json', 'process_1-of-2.json']
  # Eval across the two hosts (a batch-sharded output that no single host holds) equals one process.
  eval_args = ['lvm', 'eval', '--workdir', str(tmp_path / 'multi'), '--data', 'builtin:digits-eval',
               '--target-tokens', '64']
  one = launch(eval_args + ['--tpu', CPU8])
  assert one.wait(timeout=600) == 0, one.communicate()[0][-3000:]
  single_eval = json.loads((tmp_path / 'multi' / 'eval_result.json').read_text())
  port = free_port()
  procs = [launch(eval_args + ['--tpu', CPU2X4, '--coordinator', f'127.0.0.1:{port}', '--num-processes', '2',
                               '--process-id', str(i)], devices=4) for i in range(2)]
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  assert 'perplexity' not in outputs[1]  # only process 0 prints the result
  multi_eval = json.loads((tmp_path / 'multi' / 'eval_result.json').read_text())
  assert multi_eval['examples'] == single_eval['examples'] > 0
  assert multi_eval['mean_nll'] == pytest.approx(single_eval['mean_nll'], rel=1e-5)


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
  result = json.loads((workdir / 'train_result.json').read_text())
  assert result['preempted'] is True and 3 <= result['step'] < 100000
  assert f"SIGTERM: saved step {result['step']} in {workdir}, rerun the same command to continue" in out
  assert (workdir / 'checkpoints' / str(result['step'])).is_dir()
  # The next run picks up exactly there.
  resumed = _train(workdir, CPU8, result['step'] + 2)
  assert resumed['step'] == result['step'] + 2
  assert [m['step'] for m in read_metrics(workdir)][-3:] == [result['step'], result['step'] + 1, result['step'] + 2]


def test_changed_model_in_existing_workdir_is_refused(tmp_path):
  _train(tmp_path / 'w', CPU8, 1)
  with pytest.raises(ValueError, match='hidden_size'):
    _train(tmp_path / 'w', CPU8, 2, ['model.hidden_size=128'])


_COMPILE_CACHE_PROBE = '''
import json, os, sys
import jax, jax.numpy as jnp, numpy as np
from core.compile_cache import reuse_compilations
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
f = lambda x: jnp.sin(x) @ x.T
with reuse_compilations(sys.argv[1]):
  jax.jit(f)(np.ones((8, 8), np.float32)).block_until_ready()
  jax.jit(lambda x: f(x))(np.ones((8, 8), np.float32)).block_until_ready()  # a new closure, the same program
inside = sorted(os.listdir(sys.argv[1])) if os.path.isdir(sys.argv[1]) else []
jax.jit(lambda x: jnp.cos(x) + 1)(np.ones((8, 8), np.float32)).block_until_ready()  # after the block
print(json.dumps({'inside': inside, 'after': sorted(os.listdir(sys.argv[1])) if inside else [],
                  'cache_dir': jax.config.jax_compilation_cache_dir}))
'''


@pytest.mark.parametrize('own_cache', [False, True])
def test_reuse_compilations_keeps_programs_only_inside_the_block(tmp_path, own_cache):
  """`attrib counterfactual` trains many models with the same programs: they are compiled once into
  WORKDIR/cache/xla (one entry for two closures of one program), nothing after the job writes there,
  and a cache the process already has (JAX_COMPILATION_CACHE_DIR) is used instead."""
  import os
  import subprocess
  import sys
  from tests.helpers import ROOT
  env = {k: v for k, v in os.environ.items() if not k.startswith('JAX_COMPILATION_CACHE')}
  env['JAX_PLATFORMS'] = 'cpu'
  if own_cache:
    env['JAX_COMPILATION_CACHE_DIR'] = str(tmp_path / 'users')
  out = subprocess.run([sys.executable, '-c', _COMPILE_CACHE_PROBE, str(tmp_path / 'job')], env=env, cwd=ROOT,
                       capture_output=True, text=True, check=True)
  result = json.loads(out.stdout.strip().splitlines()[-1])
  if own_cache:
    assert result['inside'] == [] and result['cache_dir'] == str(tmp_path / 'users')
    assert len(os.listdir(tmp_path / 'users')) == 2  # the user's cache took both programs
  else:
    assert len(result['inside']) == 1 and result['inside'][0].startswith('jit_')
    assert result['after'] == result['inside'] and result['cache_dir'] is None


_TENSORBOARD_PROBE = '''
import json, struct, sys
from pathlib import Path
from core.metrics import MetricsLogger
logger = MetricsLogger(sys.argv[1], total_steps=2, start_step=0, tensorboard=True, progress_bar=False)
logger.log(1, {'loss': 2.5})
logger.log(2, {'loss': 1.25})
logger.close()
torch_loaded = 'torch' in sys.modules
import torch  # importable as usual afterwards
from tensorboardX.proto import event_pb2
scalars = []
for path in sorted(Path(sys.argv[1], 'tensorboard').glob('events.out.tfevents.*')):
  data, offset = path.read_bytes(), 0
  while offset < len(data):  # TFRecord framing: length, its crc, the event, its crc
    (length,) = struct.unpack('<Q', data[offset:offset + 8])
    event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
    offset += 16 + length
    scalars += [(event.step, v.tag, v.simple_value) for v in event.summary.value]
print(json.dumps({'torch_loaded_by_logger': torch_loaded, 'torch': torch.__name__, 'scalars': scalars}))
'''


def test_tensorboard_logging_does_not_load_torch_and_writes_the_scalars(tmp_path):
  """tensorboardX imports torch when it is installed (~2 s of a job's start-up); the logger loads it
  without torch, torch stays importable, and the event file holds the logged scalars."""
  import subprocess
  import sys
  from tests.helpers import ROOT
  out = subprocess.run([sys.executable, '-c', _TENSORBOARD_PROBE, str(tmp_path)], cwd=ROOT, capture_output=True,
                       text=True, check=True)
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result['torch_loaded_by_logger'] is False and result['torch'] == 'torch'
  assert [(step, value) for step, tag, value in result['scalars'] if tag.endswith('loss')] == [(1, 2.5), (2, 1.25)]



def _small_training_task(kind: str):
  if kind == 'denoising':
    from attrib.diffusion import ScheduleConfig
    from attrib.task import DenoisingTask
    from attrib.unet_config import UNetConfig
    return DenoisingTask(UNetConfig(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32),
                                    cross_attention_levels=(True, True), layers_per_block=1, num_attention_heads=2,
                                    cross_attention_dim=24, norm_num_groups=8), ScheduleConfig(), 5)
  if kind == 'tokenizer':
    from lvm.tokenizer import TokenizerConfig
    from lvm.tokenizer_task import TokenizerTask
    return TokenizerTask(TokenizerConfig(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4,
                                         codebook_size=16, norm_num_groups=4, image_size=16))
  from core.config import apply_overrides
  from lvm.config import LvmConfig
  from lvm.task import NextTokenTask
  lvm = apply_overrides(load_config_file(TINY, expect=LvmConfig), SMALL_MODEL)
  return NextTokenTask(lvm.model, lvm.data.seq_len)


# The U-Net's two init compiles take ~30 s on 2 cores (some 300 parameters, one loop each), so it
# runs with the slow tests; the quickstart's full-size U-Net, tokenizer, LVM and embedder were
# checked the same way when the option was set (docs/fresh_clones.md).
@pytest.mark.parametrize('kind', ['tokenizer', 'next token', pytest.param('denoising', marks=pytest.mark.slow)])
def test_cpu_init_program_compiles_at_o1_with_bit_identical_parameters(kind, monkeypatch):
  """The init program compiles at LLVM O1 on CPU (core/xla_flags.init_program_options): cheaper to
  compile, and a training task's initial parameters and optimizer state stay the same bits."""
  from core import train_loop, xla_flags
  from core.mesh import make_mesh
  from core.optim import OptimConfig
  from core.sharding import activation_sharding
  assert xla_flags.init_program_options('cpu') == {'xla_backend_optimization_level': 1}
  assert xla_flags.init_program_options('tpu') == {} and xla_flags.init_program_options('gpu') == {}
  task = _small_training_task(kind)
  preset = load_config_file(CPU1)
  mesh = make_mesh(preset)
  values = []
  for options in (xla_flags.init_program_options, lambda backend: {}):
    monkeypatch.setattr(train_loop, 'init_program_options', options)
    with activation_sharding(mesh, preset.logical_rules):
      init_fn = train_loop.init_state(task, mesh, preset.logical_rules, OptimConfig(), seed=3)[2]
    values.append([np.asarray(x) for x in jax.tree.leaves(init_fn())])
  o1, default = values
  assert len(o1) == len(default) > 10
  assert all(a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes() for a, b in zip(o1, default))


def test_an_unhashable_task_config_trains_without_program_reuse():
  """A config field given as a list cannot key the shared programs: the run loses the reuse, not its
  training (a TypeError here would stop it)."""
  from core.mesh import make_mesh
  from core.optim import OptimConfig
  from core.train_loop import _program_key
  from lvm.model_config import DecoderConfig
  from lvm.task import NextTokenTask
  preset = load_config_file(CPU1)
  mesh, model = make_mesh(preset), DecoderConfig()

  class ListConfigTask(NextTokenTask):
    def program_key(self):
      return (self.model_config, [self.seq_len])

  assert _program_key(NextTokenTask(model, 16), mesh, preset.logical_rules, OptimConfig(), 0, {}) is not None
  assert _program_key(ListConfigTask(model, 16), mesh, preset.logical_rules, OptimConfig(), 0, {}) is None


def test_diverged_training_stops_before_saving_a_non_finite_state(tmp_path):
  from core.errors import TrainingDiverged
  _train(tmp_path, CPU1, 4, ['train.checkpoint_every=4'])
  finite = _params(tmp_path)
  # Resumed with a learning rate that blows up within two updates (the gradient norm turns NaN at
  # step 6): stopped there, checkpoint 4 untouched, nothing non-finite saved over it.
  with pytest.raises(TrainingDiverged, match=r'training diverged: .*nan at step 6 \(finite at step 4\); the last '
                                             r'checkpoint, step 4, is kept in .*optim\.lr'):
    _train(tmp_path, CPU1, 12, ['train.checkpoint_every=4', 'optim.lr=1e9', 'optim.warmup_steps=0',
                                'train.log_every=3'])
  assert sorted(p.name for p in (tmp_path / 'checkpoints').iterdir()) == ['4']
  jax.tree.map(np.testing.assert_array_equal, _params(tmp_path), finite)
