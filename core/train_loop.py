"""The one train loop every model uses. Sections: setup, sharded init, resume, step, loop, finish.

The task supplies the model and its loss; the loop owns the mesh, sharding, optimizer, data feeding,
checkpoints, metrics and preemption. Rerunning with the same workdir continues from the latest
checkpoint, data iterator included; SIGTERM saves a checkpoint and returns cleanly, Ctrl-C saves one
and raises KeyboardInterrupt. Given held-out
batches, it validates every `train.eval_every` updates (forward only, the same loss) and logs
`eval_loss` beside the training metrics.
"""
from __future__ import annotations

from core.paths import as_path
from core.errors import ConfigError, TrainingDiverged, UserError

import collections
import contextvars
import dataclasses
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from core import checkpoint, tracing_fix  # noqa: F401  (tracing_fix: linear-time model init)
from core.compile_check import check_batch_splits
from core.mesh import SliceConfig, make_mesh
from core.peak_flops import mesh_peak_flops
from core.profiling import StepProfiler
from core.metrics import MetricsLogger
from core.optim import OptimConfig, learning_rate_schedule, make_optimizer
from core.sharding import activation_sharding, logical_to_spec, tree_shardings
from core.task import Task
from core.xla_flags import init_program_options, program_options
from core.workdir import make_workdir


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  # Total optimizer updates; rerun with a larger value to continue a finished run.
  steps: int = 1000
  # Examples per optimizer update, over all hosts and micro-batches.
  global_batch: int = 8
  # Write metrics every this many updates (loss, tokens/s, step time, MFU).
  log_every: int = 10
  # Save a checkpoint every this many updates (and always at the end and on SIGTERM).
  checkpoint_every: int = 200
  # Checkpoints kept on disk.
  keep_checkpoints: int = 3
  # Seed of parameter init and data order.
  seed: int = 0
  # Write checkpoints in a background thread while training continues.
  async_checkpoints: bool = True
  # Show a progress bar on process 0 (in a log file or pipe: a line every 30 s, core/progress.py).
  progress_bar: bool = True
  # Write TensorBoard event files next to metrics.jsonl.
  tensorboard: bool = True
  # With several hosts, agree on a SIGTERM (preemption) or Ctrl-C every this many updates: one small
  # cross-host exchange per check, instead of a host sync after every step. A TPU VM gets ~30 s
  # between SIGTERM and shutdown, so keep (check interval x step time) well under that.
  preemption_check_every: int = 10
  # Validate on the job's held-out data (the LVM's data.eval_path) every this many updates and at
  # the end; 0 = at every checkpoint save. Jobs without held-out data refuse a value above 0.
  eval_every: int = 0
  # Trace updates profile_from .. profile_from + profile_steps - 1 with the profiler, every host, into
  # WORKDIR/tensorboard/plugins/profile/ (core/profiling.py); 0 = none.
  profile_from: int = 0
  profile_steps: int = 3

  def __post_init__(self):
    for name in ('steps', 'global_batch', 'log_every', 'checkpoint_every', 'keep_checkpoints',
                 'preemption_check_every'):
      if getattr(self, name) < 1:
        raise ConfigError(f'train.{name} must be >= 1, got {getattr(self, name)}')
    if self.eval_every < 0:
      raise ConfigError(f'train.eval_every must be >= 0 (0 = at every checkpoint save), got {self.eval_every}')
    if self.profile_from < 0 or self.profile_steps < 1:
      raise ConfigError(f'train.profile_from must be >= 0 (0 = no trace) and train.profile_steps >= 1, got '
                        f'{self.profile_from} and {self.profile_steps}')
    if self.profile_from > self.steps:
      raise ConfigError(f'train.profile_from {self.profile_from} is past train.steps {self.steps}: no update to trace')

  def validating_at(self, step: int) -> bool:
    return step % (self.eval_every or self.checkpoint_every) == 0 or step == self.steps


def refuse_validation_without_data(train_config: TrainConfig, job: str) -> None:
  """For the configs of jobs that have no held-out data to validate on."""
  if train_config.eval_every:
    raise ConfigError(f'train.eval_every {train_config.eval_every}: {job} has no held-out data to validate on '
                      '(the LVM does, with data.eval_path); leave it at 0')


class _StopRequests:
  """SIGTERM (a preemption, `tpu stop`, a kill) and a first Ctrl-C become a flag the loop checks after
  each step: it saves that step and stops, so an interrupted run loses no update. A second Ctrl-C
  stops at once, as Ctrl-C always did (the steps since the last checkpoint lost). A process that
  ignores Ctrl-C (started with nohup or `&`) or handles it itself keeps doing so."""

  def __init__(self):
    self.requested = False
    self.interrupted = False  # by Ctrl-C on this host: the job then ends as interrupted (exit 130)
    self._previous = {}
    if threading.current_thread() is threading.main_thread():
      self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._handle)
      if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._handle)

  def _handle(self, signum, frame):
    if signum == signal.SIGINT:
      if self.interrupted:
        raise KeyboardInterrupt
      self.interrupted = True
      print('\nCtrl-C: saving after this step, then stopping (Ctrl-C again stops at once, without saving)',
            file=sys.stderr, flush=True)
    self.requested = True

  def agreed(self, step: int, check_every: int) -> bool:
    """Whether to save and stop after `step`. Every host must stop at the same step, or the
    collective save would hang: hosts exchange their flags at the same steps (multiples of
    `check_every`), so all of them see the same answer."""
    if jax.process_count() == 1:
      return self.requested
    if step % check_every:
      return False
    flags = multihost_utils.process_allgather(np.array([self.requested]))
    return bool(np.any(flags))

  def restore(self):
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)


def _global_batch(local: dict[str, np.ndarray], shardings: dict[str, NamedSharding], global_batch: int):
  """Host-local rows -> one global jax.Array per field, without any host holding the full batch."""
  return {name: jax.make_array_from_process_local_data(shardings[name], value,
                                                       (global_batch,) + value.shape[1:])
          for name, value in local.items()}


def init_state(task: Task, mesh, rules, optim: OptimConfig, seed: int):
  """Sharded init: shapes via eval_shape, then one jit whose outputs land directly in their shards.

  Returns (graphdef, init_fn, abstract params, abstract optimizer state); nothing is allocated
  until `init_fn()` runs, so a resume never materialises a throwaway copy of the model.
  """
  abstract_model = nnx.eval_shape(lambda: task.make_model(nnx.Rngs(params=seed)))
  graphdef, abstract_state = nnx.split(abstract_model)
  param_shardings = tree_shardings(nnx.to_pure_dict(nnx.get_partition_spec(abstract_state)), mesh, rules,
                                   nnx.to_pure_dict(abstract_state))
  tx = make_optimizer(optim)
  abstract_params = checkpoint.abstract_like(nnx.to_pure_dict(abstract_state), param_shardings)
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  replicated = NamedSharding(mesh, P())
  # Optimizer moments mirror the parameters' shardings; counters are replicated.
  opt_shardings = optax.tree_map_params(
      tx, lambda _, sharding: sharding, abstract_opt, param_shardings,
      transform_non_params=lambda _: replicated, is_leaf=lambda x: isinstance(x, NamedSharding))
  abstract_opt = checkpoint.abstract_like(abstract_opt, opt_shardings)

  def init_fn():
    params = nnx.to_pure_dict(nnx.split(task.make_model(nnx.Rngs(params=seed)))[1])
    return params, tx.init(params)

  platform = next(iter(jax.tree.leaves(param_shardings)[0].device_set)).platform
  init_fn = jax.jit(init_fn, out_shardings=(param_shardings, opt_shardings),
                    compiler_options=init_program_options(platform) or None)
  return graphdef, tx, init_fn, abstract_params, abstract_opt


def make_train_step(task: Task, graphdef, tx, optim: OptimConfig, batch_shardings):
  schedule = learning_rate_schedule(optim)

  def loss_fn(params, batch, frozen):
    model = nnx.merge(graphdef, params)
    return task.loss(model, batch) if frozen is None else task.loss(model, batch, frozen)

  # Gradients of the parameters only: `frozen` (the task's frozen_inputs) is an input, not trained.
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def train_step(step, params, opt_state, batch, frozen=None):
    if optim.grad_accum == 1:
      (loss, aux), grads = grad_fn(params, batch, frozen)
    else:
      # Micro-batch m takes rows m, m+A, m+2A, ...: every device keeps an equal share of each.
      def split(x):
        x = x.reshape((x.shape[0] // optim.grad_accum, optim.grad_accum) + x.shape[1:])
        return jnp.swapaxes(x, 0, 1)
      micro_batches = jax.tree.map(split, batch)

      def accumulate(grad_sum, micro_batch):
        micro_batch = jax.tree.map(jax.lax.with_sharding_constraint, micro_batch, batch_shardings)
        (loss, aux), grads = grad_fn(params, micro_batch, frozen)
        return jax.tree.map(jnp.add, grad_sum, grads), (loss, aux)

      zeros = jax.tree.map(jnp.zeros_like, params)
      grad_sum, (losses, auxs) = jax.lax.scan(accumulate, zeros, micro_batches)
      grads = jax.tree.map(lambda g: g / optim.grad_accum, grad_sum)
      loss, aux = jnp.mean(losses), jax.tree.map(jnp.mean, auxs)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    metrics = {'loss': loss, 'grad_norm': optax.tree.norm(grads), 'learning_rate': schedule(step),
               **aux}
    if hasattr(task, 'after_update'):  # a non-gradient change (e.g. restarting dead codebook rows)
      params, extra = task.after_update(graphdef, params, batch, step)
      metrics.update(extra)
    return params, opt_state, metrics

  return train_step


def jit_eval_step(task: Task, graphdef, abstract_params):
  """Forward only: the task's loss and its metrics on one held-out batch, with the trained parameters."""
  def eval_step(params, batch, frozen=None):
    model = nnx.merge(graphdef, params)
    loss, aux = task.loss(model, batch) if frozen is None else task.loss(model, batch, frozen)
    return {'loss': loss, **aux}
  platform = next(iter(jax.tree.leaves(abstract_params)[0].sharding.device_set)).platform
  options = program_options(getattr(task, 'program_kind', 'convolutional'), backend=platform)
  return jax.jit(eval_step, compiler_options=options or None)


def validate(task: Task, eval_step, params, frozen, batches: Iterable[dict], shardings) -> dict[str, float]:
  """{'eval_loss': mean over the held-out batches, 'eval_<metric>': ...}. Batches are equal in size, so
  the mean of their mean losses is the mean over every example; `task.eval_summary(loss)`, where a
  task has it, gives metrics that are not means (a perplexity is exp of the mean loss)."""
  totals, count = None, 0
  for local in batches:
    rows = len(next(iter(local.values())))
    metrics = eval_step(params, _global_batch(local, shardings, rows * jax.process_count()), frozen)
    totals = metrics if totals is None else jax.tree.map(jnp.add, totals, metrics)
    count += 1
  means = {name: float(value) / count for name, value in jax.device_get(totals).items()}
  means.update(getattr(task, 'eval_summary', lambda loss: {})(means['loss']))
  return {f'eval_{name}': value for name, value in means.items()}


def jit_train_step(task: Task, graphdef, tx, optim: OptimConfig, batch_shardings, abstract_params, abstract_opt):
  """The step exactly as the loop runs it (the fit check compiles this same program): parameters
  and optimizer state are donated, so their buffers are reused for the updated ones."""
  train_step = make_train_step(task, graphdef, tx, optim, batch_shardings)
  param_shardings = jax.tree.map(lambda a: a.sharding, abstract_params)
  opt_shardings = jax.tree.map(lambda a: a.sharding, abstract_opt)
  # A task without convolutions may compile with other CPU dot fusions (core/xla_flags.py); the
  # platform is the mesh's, not this process's default (the fit check compiles for a TPU here).
  platform = next(iter(jax.tree.leaves(param_shardings)[0].device_set)).platform
  options = program_options(getattr(task, 'program_kind', 'convolutional'), backend=platform)
  return jax.jit(train_step, donate_argnums=(1, 2), out_shardings=(param_shardings, opt_shardings, None),
                 compiler_options=options or None)


class BackgroundCompile:
  """`jitted.lower(*args).compile()` on its own thread; the jitted function's next call with arguments
  of the same shapes and shardings reuses that executable (JAX caches lowering and compilation).

  The thread runs in a copy of this thread's context, so `activation_sharding` is in effect there too
  and the program traced is the one the caller's own call would trace.
  """

  def __init__(self, jitted, *args):
    self._error: BaseException | None = None
    context = contextvars.copy_context()
    self._thread = threading.Thread(target=context.run, args=(self._compile, jitted, args),
                                    name='compile-ahead')
    self._thread.start()

  def _compile(self, jitted, args):
    try:
      jitted.lower(*args).compile()
    except BaseException as error:  # handed to the caller's thread by result()
      self._error = error

  def wait(self):
    self._thread.join()

  def result(self):
    self.wait()
    if self._error is not None:
      raise self._error


# The init and step programs of the latest runs in this process, keyed by everything they are traced
# from. Retraining one recipe many times (`attrib counterfactual`: a model per seed, and per query one
# per ranking plus one without random images)
# otherwise traces, lowers and loads both programs per model: ~6 of a digits retraining's 15 s.
_RECENT_PROGRAMS: collections.OrderedDict = collections.OrderedDict()
_RECENT_PROGRAMS_KEPT = 2


def _program_key(task: Task, mesh, rules, optim: OptimConfig, seed: int, batch_shardings) -> tuple | None:
  key = getattr(task, 'program_key', lambda: None)()
  if key is None:
    return None
  key = (type(task), key, mesh, tuple(rules), optim, seed, tuple(sorted(batch_shardings.items())))
  try:
    hash(key)
  except TypeError:  # e.g. a config field given as a list: only the reuse is lost, not the run
    return None
  return key


def setup_programs(task: Task, mesh, rules, optim: OptimConfig, seed: int, batch_shardings):
  """(graphdef, tx, init_fn, abstract params, abstract optimizer state, step_fn, reused): the jitted
  programs of an earlier run of an equal task (`Task.program_key`) when this process has them, so
  their calls hit JAX's in-memory executables; otherwise new ones."""
  key = _program_key(task, mesh, rules, optim, seed, batch_shardings)
  if key is not None and key in _RECENT_PROGRAMS:
    _RECENT_PROGRAMS.move_to_end(key)
    return (*_RECENT_PROGRAMS[key], True)
  with activation_sharding(mesh, rules):
    graphdef, tx, init_fn, abstract_params, abstract_opt = init_state(task, mesh, rules, optim, seed)
  step_fn = jit_train_step(task, graphdef, tx, optim, batch_shardings, abstract_params, abstract_opt)
  programs = (graphdef, tx, init_fn, abstract_params, abstract_opt, step_fn)
  if key is not None:
    _RECENT_PROGRAMS[key] = programs
    while len(_RECENT_PROGRAMS) > _RECENT_PROGRAMS_KEPT:
      _RECENT_PROGRAMS.popitem(last=False)
  return (*programs, False)


def forget_programs() -> None:
  """Drops the programs kept for reuse (tests that count compiles start from here)."""
  _RECENT_PROGRAMS.clear()


def replicate_frozen_inputs(task: Task, mesh):
  """The task's frozen arrays (e.g. a perceptual loss network), on every device of the mesh, or None.

  Built from host arrays on every process, so this works on a multi-host mesh without a transfer."""
  if not hasattr(task, 'frozen_inputs'):
    return None
  replicated = NamedSharding(mesh, P())
  return jax.tree.map(lambda value: jax.make_array_from_callback(
      np.shape(value), replicated, lambda index, v=value: np.asarray(v)[index]), task.frozen_inputs())


def check_batch_layout(train_config: TrainConfig, optim: OptimConfig, preset: SliceConfig, mesh=None, *,
                       records: int | None = None, data: str = '') -> None:
  """Raises ConfigError unless train.global_batch splits into optim.grad_accum micro-batches, over the
  hosts, and over the mesh axes that shard the batch, and (given `records`, the training set's size)
  the data `data` fills one batch. Cheap (no compile): commands call it before they write anything,
  else jax raises IndivisibleError from inside the first batch's transfer."""
  if records is not None and records < train_config.global_batch:
    raise ConfigError(f'{data}: {records} training records are fewer than one batch '
                      f'(train.global_batch {train_config.global_batch}); add data or lower train.global_batch')
  if train_config.global_batch % (optim.grad_accum * jax.process_count()):
    raise ConfigError(f'train.global_batch {train_config.global_batch} must split into '
                      f'optim.grad_accum={optim.grad_accum} micro-batches on {jax.process_count()} hosts')
  mesh = mesh if mesh is not None else make_mesh(preset)
  check_batch_splits(train_config.global_batch // optim.grad_accum, mesh,
                     logical_to_spec(('batch',), preset.logical_rules)[0], preset.name)


def train(task: Task, *, train_config: TrainConfig, optim: OptimConfig, preset: SliceConfig,
          workdir: str | Path, make_data_iterator: Callable[[int, int], Iterator],
          meta: dict | None = None, on_setup: Callable[[], None] | None = None,
          make_eval_batches: Callable[[int, int], Iterable[dict]] | None = None) -> dict:
  """Trains until `train_config.steps` optimizer updates are done; returns a summary dict.

  `make_data_iterator(process_index, process_count)` returns this host's grain iterator of
  host-local batches (global_batch / process_count rows). `make_eval_batches(process_index,
  process_count)`, when given, returns one pass over this host's rows of the held-out batches (the
  same ones at every validation).
  """
  if make_eval_batches is None:
    refuse_validation_without_data(train_config, 'this job')
  # ---------------------------------------------------------------- setup
  workdir = as_path(workdir)
  make_workdir(workdir)
  mesh = make_mesh(preset)
  rules = preset.logical_rules
  check_batch_layout(train_config, optim, preset, mesh)
  batch_shardings = {name: NamedSharding(mesh, logical_to_spec(axes, rules))
                     for name, axes in task.batch_logical_axes().items()}
  data_iterator = make_data_iterator(jax.process_index(), jax.process_count())

  # ---------------------------------------------------------------- sharded init / resume
  graphdef, tx, init_fn, abstract_params, abstract_opt, step_fn, reused = setup_programs(
      task, mesh, rules, optim, train_config.seed, batch_shardings)
  checkpoint.check_room_for_a_save(workdir, abstract_params, abstract_opt)
  manager = checkpoint.make_manager(workdir, keep=train_config.keep_checkpoints,
                                    async_save=train_config.async_checkpoints)
  frozen = replicate_frozen_inputs(task, mesh)
  start_step = manager.latest_step()
  first_batch, step_compiled = None, None
  if start_step is None:
    first_batch = _global_batch(next(data_iterator), batch_shardings, train_config.global_batch)
    if not reused:
      # A fresh run compiles its step on a second thread while the init program compiles and runs:
      # neither XLA compilation keeps every core busy (digits U-Net on 2 cores: 73 -> 55 s for both).
      with activation_sharding(mesh, rules):  # as the loop traces it
        step_compiled = BackgroundCompile(step_fn, jnp.int32(0), abstract_params, abstract_opt,
                                          first_batch, frozen)
    try:
      params, opt_state = init_fn()
    finally:
      if step_compiled is not None:
        step_compiled.wait()
    start_step = 0
  else:
    restored = checkpoint.restore(manager, start_step, abstract_params=abstract_params,
                                  abstract_opt_state=abstract_opt, data_iterator=data_iterator)
    params, opt_state = restored['params'], restored['opt_state']
    if jax.process_index() == 0:
      print(f'resuming {workdir} from step {start_step} of {train_config.steps}', file=sys.stderr, flush=True)
    if opt_state is None:  # a weight import: fine-tune from its parameters with a fresh optimizer
      opt_state = jax.jit(tx.init, out_shardings=jax.tree.map(lambda a: a.sharding, abstract_opt))(params)
  if on_setup is not None:
    on_setup()

  if step_compiled is not None:
    step_compiled.result()  # a compile error surfaces here, before the loop
  eval_step = jit_eval_step(task, graphdef, abstract_params) if make_eval_batches is not None else None

  # ---------------------------------------------------------------- the loop
  logger = MetricsLogger(workdir, total_steps=train_config.steps, start_step=start_step,
                         tensorboard=train_config.tensorboard, progress_bar=train_config.progress_bar)
  profiler = StepProfiler(workdir, train_config.profile_from, train_config.profile_steps, start_step)
  examples_per_step = train_config.global_batch
  flops_per_step = task.flops_per_example() * examples_per_step
  peak_flops = mesh_peak_flops(preset, mesh)
  step = start_step
  last_finite_step = start_step
  last_metrics: dict[str, float] = {}
  window_start, window_steps = time.perf_counter(), 0
  preempted = False
  stop_requests = _StopRequests()  # right before the try whose finally restores the signal handlers
  try:
    with activation_sharding(mesh, rules):
      while step < train_config.steps:
        if first_batch is not None:  # drawn before init, so that the step could compile meanwhile
          batch, first_batch = first_batch, None
        else:
          batch = _global_batch(next(data_iterator), batch_shardings, train_config.global_batch)
        profiler.before_update(step + 1)
        params, opt_state, metrics = step_fn(jnp.int32(step), params, opt_state, batch, frozen)
        step += 1
        profiler.after_update(step, (params, opt_state, metrics))
        window_steps += 1
        logger.advance()
        saving = step % train_config.checkpoint_every == 0 or step == train_config.steps
        validating = eval_step is not None and train_config.validating_at(step)
        if step % train_config.log_every == 0 or step == train_config.steps or validating:
          metrics = jax.device_get(metrics)  # the host sync of a logging window (a save syncs too)
          _stop_if_not_finite(metrics, step, last_finite_step, manager, workdir)
          last_finite_step = step
          elapsed = time.perf_counter() - window_start
          step_time = elapsed / window_steps
          last_metrics = {k: float(v) for k, v in metrics.items()}
          last_metrics.update(step_time_s=step_time,
                              tokens_per_s=task.tokens_per_example() * examples_per_step / step_time,
                              mfu=flops_per_step / step_time / peak_flops)
          if validating:  # on the same line as the step's training metrics; not timed as training
            last_metrics.update(validate(task, eval_step, params, frozen,
                                         make_eval_batches(jax.process_index(), jax.process_count()),
                                         batch_shardings))
          logger.log(step, last_metrics)
          window_start, window_steps = time.perf_counter(), 0
        if stop_requests.agreed(step, train_config.preemption_check_every):
          preempted = True
        if preempted or saving:
          # Never save a non-finite state: finite loss and gradient at this step mean finite updates.
          _stop_if_not_finite(jax.device_get(metrics), step, last_finite_step, manager, workdir)
          last_finite_step = step
          checkpoint.save(manager, step, params=params, opt_state=opt_state,
                          data_iterator=data_iterator, meta=meta, force=True)
        if preempted:
          break
  finally:
    profiler.close()
    stop_requests.restore()
    manager.wait_until_finished()
    manager.close()
    logger.close()
  if stop_requests.interrupted:  # Ctrl-C here: the job ends as interrupted, after the save above
    print(f'Ctrl-C: saved step {step} in {workdir}, rerun the same command to continue', file=sys.stderr, flush=True)
    raise KeyboardInterrupt
  if preempted and jax.process_index() == 0:
    print(f'SIGTERM: saved step {step} in {workdir}, rerun the same command to continue', file=sys.stderr, flush=True)

  # ---------------------------------------------------------------- finish
  return {'step': step, 'preempted': preempted, 'final_metrics': last_metrics,
          'num_devices': int(mesh.devices.size), 'mesh': dict(mesh.shape),
          'params': int(sum(np.prod(a.shape) for a in jax.tree.leaves(abstract_params))),
          'trained_params': params}


def _stop_if_not_finite(metrics: dict, step: int, last_finite_step: int, manager, workdir) -> None:
  """Raises TrainingDiverged when this step's loss or gradient norm is NaN or infinite."""
  bad = {name: float(metrics[name]) for name in ('loss', 'grad_norm')
         if name in metrics and not np.isfinite(metrics[name])}
  if not bad:
    return
  manager.wait_until_finished()  # a save in flight is finished (it holds an earlier, finite step)
  saved = manager.latest_step()
  kept = f'the last checkpoint, step {saved}, is kept' if saved is not None else 'no checkpoint was saved'
  values = ', '.join(f'{name} {value}' for name, value in bad.items())
  raise TrainingDiverged(f'training diverged: {values} at step {step} (finite at step {last_finite_step}); '
                         f'{kept} in {workdir}. Lower optim.lr, lengthen optim.warmup_steps or set '
                         'optim.clip_norm, and check the data for NaN or infinity')


def restore_latest_params(task: Task, workdir: str | Path, preset: SliceConfig):
  """The latest checkpoint's parameters, sharded for `preset`'s mesh (for eval, sampling, export).

  Returns (graphdef, params, mesh, step).
  """
  # A run still before its first save (evaluated while it trains), or one that failed before it.
  # Looked at before making the manager, which would create the folder.
  manager = checkpoint.make_manager(workdir, async_save=False) if (as_path(workdir) / 'checkpoints').is_dir() else None
  step = manager.latest_step() if manager else None
  if step is None:
    if manager:
      manager.close()
    raise UserError(f'{workdir} holds no checkpoint yet: its training has not saved one (it saves every '
                    f'train.checkpoint_every steps, at its end and when stopped); wait for the first save, '
                    f'or rerun the training command to continue it')
  mesh = make_mesh(preset)
  with activation_sharding(mesh, preset.logical_rules):
    graphdef, _, _, abstract_params, _ = init_state(task, mesh, preset.logical_rules, OptimConfig(), 0)
  params = checkpoint.restore(manager, step, abstract_params=abstract_params)['params']
  manager.close()
  return graphdef, params, mesh, step
