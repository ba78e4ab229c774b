"""AbU, the unlearning teacher (Wang et al. 2024): unlearn a generated query image from the model and
rank training images by how much their loss rises.

Unlearning is the EWC Newton step restricted to the cross-attention key/value weights:
    θ ← θ + (α / N) · F⁻¹ ∇L(ẑ)          (gradient ascent on the query's loss)
with F the diagonal Fisher over training samples (mean squared per-sample gradient). A candidate's
score is L(z, θ_unlearned) − L(z, θ₀), both with the same noise and the timesteps {0, 50, …, 950}.
Everything is batched (vmap + jit) and the candidate axis is sharded over the mesh's batch axes.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from attrib.diffusion import NoiseSchedule, epsilon_loss
from core import progress
from core.errors import ConfigError
from core.sharding import logical_to_spec


@dataclasses.dataclass(frozen=True)
class TeacherConfig:
  # Per-sample gradients per training image in the diagonal Fisher.
  fisher_samples_per_image: int = 2
  # Training images the Fisher is estimated on (a fixed random subset; 0 = all of them).
  fisher_images: int = 0
  # (noise, timestep) samples averaged into the query gradient ∇L(ẑ).
  query_grad_samples: int = 64
  # Newton steps of unlearning (AbU on COCO: 1).
  unlearn_steps: int = 1
  # α of θ ← θ + (α/N)·F⁻¹∇L(ẑ).
  step_size: float = 0.01
  # Added to the Fisher before inverting, relative to its mean (keeps F⁻¹ finite).
  fisher_damping: float = 1e-3
  # Timestep stride of the scoring loss (the paper: 50, i.e. 20 timesteps).
  score_timestep_stride: int = 50
  # Added to each query's seed for the noise and timesteps of its gradient: another value ranks the
  # same queries with another draw, which measures how far the teacher agrees with itself
  # (benchmarks/teacher_agreement.py).
  query_seed_offset: int = 0
  # Candidates per jitted scoring call (per host). Measured on the digits' U-Net (2-core EPYC, 10
  # timesteps per call): 0.90-0.92 ms per candidate-timestep at 64-128, 1.05-1.17 at 256, 1.0 at 512
  # (a batch of 128 keeps the activations in cache); on COCO's 64x64 latents 128 is plenty to fill a chip.
  candidate_batch: int = 128

  def __post_init__(self):
    for name in ('fisher_samples_per_image', 'query_grad_samples', 'unlearn_steps', 'score_timestep_stride',
                 'candidate_batch'):
      if getattr(self, name) < 1:
        raise ConfigError(f'{name} must be >= 1, got {getattr(self, name)}')
    if self.fisher_images < 0 or self.step_size <= 0 or self.fisher_damping < 0:
      raise ConfigError('fisher_images must be >= 0, step_size > 0 and fisher_damping >= 0')


def is_unlearned(path: tuple) -> bool:
  """Cross-attention key/value projections: `attn2` `to_k`/`to_v` kernels (AbU's parameter subset)."""
  names = [str(p) for p in path]
  return 'attn2' in names and ('to_k' in names or 'to_v' in names) and names[-1] == 'kernel'


def _path(keys) -> tuple:
  return tuple(getattr(k, 'key', getattr(k, 'idx', None)) for k in keys)


def _name(path: tuple) -> str:
  return '/'.join(map(str, path))


def split_params(params: dict) -> tuple[dict, dict]:
  """(unlearned subset as {'a/b/c': array}, the full tree) — the subset is what gradients are taken of."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  subset = {_name(_path(keys)): leaf for keys, leaf in flat if is_unlearned(_path(keys))}
  if not subset:
    raise ValueError('the model has no cross-attention key/value weights to unlearn')
  return subset, params


def merge_params(params: dict, subset: dict) -> dict:
  def replace(keys, leaf):
    return subset.get(_name(_path(keys)), leaf)
  return jax.tree_util.tree_map_with_path(replace, params)


def padded_size(rows: int, step: int, ways: int) -> int:
  """Rows of the scoring call for `rows` candidates: the smaller of the next power of two and the
  next multiple of 32, rounded up to the batch ways, at most `step`. Candidate sets of every size
  reuse a handful of compiled shapes (1, 2, 4, ..., 32, 64, 96, 128) instead of one per size, a
  single query row stays one row, and 96 candidates are not padded to 128."""
  quantum = ways * -(-32 // ways)
  bucket = min(1 << (rows - 1).bit_length(), -(-rows // quantum) * quantum)
  return min(step, -(-bucket // ways) * ways)


@functools.lru_cache(maxsize=4)
def _programs(graphdef, schedule_config, score_timestep_stride: int, query_grad_samples: int, mesh, batch_spec):
  """The teacher's jitted programs for one model structure and teacher setting, shared by every Teacher
  in the process: the quickstart's and a user's test split after the train split, or a second model
  of the same shape, reuse what the first compiled (the digits' test split compiled four programs
  again, ~21 s on a 2-core EPYC without AVX-512). Nothing here holds parameters: θ₀ is an argument."""
  return _TeacherPrograms(graphdef, NoiseSchedule(schedule_config), score_timestep_stride, query_grad_samples,
                          NamedSharding(mesh, batch_spec))


class _TeacherPrograms:
  """Per-candidate losses, the Fisher's squared gradients and the query gradient, jitted."""

  def __init__(self, graphdef, schedule: NoiseSchedule, score_timestep_stride: int, query_grad_samples: int,
               batch_sharding: NamedSharding):
    self.graphdef, self.schedule, self.query_grad_samples = graphdef, schedule, query_grad_samples
    self.batch_sharding = batch_sharding
    mesh = batch_sharding.mesh
    self.ways = mesh.shape['data'] * mesh.shape['fsdp']
    self.score_timesteps = jnp.arange(0, schedule.config.num_train_timesteps, score_timestep_stride)
    # θ₀ is an argument of every jitted call, not a closure constant: constants are embedded in the
    # program (a 6 MB executable per digits model, gigabytes for a latent-diffusion U-Net) and make
    # every model's program a different one, so nothing compiled for one model served another.
    self.losses = jax.jit(self._losses)
    self.fisher_sum = jax.jit(self._fisher_sum)
    self.grad_of_query = jax.jit(self._grad_of_query)

  def _loss_fn(self, params, kv, images, context, noise, timesteps):
    model = nnx.merge(self.graphdef, merge_params(params, kv))
    return epsilon_loss(model, self.schedule, images, context, noise, timesteps)

  def _scoring_noise(self, ids_m, shape):
    # Seeded by candidate id and timestep index: the same before and after unlearning, on any layout.
    def one(i):
      keys = jax.vmap(lambda j: jax.random.fold_in(jax.random.fold_in(jax.random.key(1234), i), j))(
          jnp.arange(len(self.score_timesteps)))
      return jax.vmap(lambda k: jax.random.normal(k, shape))(keys)
    return jax.vmap(one)(ids_m)  # [m, T, h, w, c]

  def _losses(self, params, kv, images_m, context_m, ids_m):
    """Mean ε-MSE over the scoring timesteps, per candidate: [m]."""
    noise = self._scoring_noise(ids_m, images_m.shape[1:])
    def at_timestep(j):
      t = jnp.full((images_m.shape[0],), self.score_timesteps[j])
      return self._loss_fn(params, kv, images_m, context_m, noise[:, j], t)
    per_t = jax.lax.map(at_timestep, jnp.arange(len(self.score_timesteps)))  # [T, m]
    return per_t.mean(axis=0)

  def _fisher_sum(self, params, kv, images, context, seeds):
    def one(image, ctx, seed):
      key = jax.random.fold_in(jax.random.key(99), seed)
      noise = jax.random.normal(jax.random.fold_in(key, 0), image.shape)
      t = jax.random.randint(jax.random.fold_in(key, 1), (1,), 0, self.schedule.config.num_train_timesteps)
      grad = jax.grad(lambda kv: self._loss_fn(params, kv, image[None], ctx[None], noise[None], t)[0])(kv)
      return jax.tree.map(jnp.square, grad)
    squares = jax.vmap(one)(images, context, seeds)
    return jax.tree.map(lambda s: s.sum(axis=0), squares)

  def shard_rows(self, x):
    """x split by rows over the mesh's batch axes when they divide it (else replicated): the Fisher's
    and the query gradient's samples, which every device would otherwise compute in full."""
    if x.shape[0] % self.ways:
      return x
    if isinstance(x, np.ndarray):
      return jax.device_put(x, self.batch_sharding)
    return jax.lax.with_sharding_constraint(x, self.batch_sharding)

  def _grad_of_query(self, params, kv, image, context, seed):
    n = self.query_grad_samples
    key = jax.random.fold_in(jax.random.key(7), seed)
    noise = jax.random.normal(jax.random.fold_in(key, 0), (n,) + image.shape)
    t = jax.random.randint(jax.random.fold_in(key, 1), (n,), 0, self.schedule.config.num_train_timesteps)
    noise, t = self.shard_rows(noise), self.shard_rows(t)
    images = self.shard_rows(jnp.broadcast_to(image, (n,) + image.shape))
    contexts = self.shard_rows(jnp.broadcast_to(context, (n,) + context.shape))
    return jax.grad(lambda kv: self._loss_fn(params, kv, images, contexts, noise, t).mean())(kv)


class Teacher:
  """Holds one model (graphdef + θ₀); computes the Fisher, unlearns queries, scores candidates."""

  def __init__(self, graphdef, params, schedule: NoiseSchedule, config: TeacherConfig, *, mesh, rules,
               num_training_images: int):
    # Host arrays (a multi-host teacher's all-gathered θ₀) go to the devices once, not on every call.
    replicated = NamedSharding(mesh, jax.sharding.PartitionSpec())
    params = jax.tree.map(lambda x: x if isinstance(x, jax.Array) else jax.device_put(x, replicated), params)
    self.graphdef, self.params, self.schedule, self.config = graphdef, params, schedule, config
    self.mesh, self.rules, self.n = mesh, rules, num_training_images
    self.kv0, _ = split_params(params)
    programs = _programs(graphdef, schedule.config, config.score_timestep_stride, config.query_grad_samples,
                         mesh, logical_to_spec(('batch',), rules))
    self.score_timesteps = programs.score_timesteps
    self._batch_sharding = programs.batch_sharding
    self._shard_rows = programs.shard_rows
    self._per_example_loss = programs.losses
    self._fisher_batch = programs.fisher_sum
    self._query_grad = programs.grad_of_query

  def losses(self, kv, images, context, ids, desc: str | None = None, shaped_like: int = 0) -> np.ndarray:
    """Per-candidate losses, batched and sharded over the mesh's batch axes (`desc`: show a bar).

    `shaped_like=m`: every call is padded to at least the batch shape of a call for m rows, so a
    few rows (a query's candidates whose θ₀ losses are not cached yet: any count up to m) reuse the
    program compiled for m instead of compiling their own size. Digits U-Net, 2-core CPU without
    AVX-512: 7-9 s per compiled shape against 0.4 s for a 64-row call instead of a few rows. The
    padding costs at most one scoring batch per query, and only while the queries' candidates do
    not cover the training set (when they do, the teacher computes every θ₀ loss up front).
    """
    out = []
    ways = self.mesh.shape['data'] * self.mesh.shape['fsdp']
    step = max(ways, self.config.candidate_batch // ways * ways)
    smallest = padded_size(min(shaped_like, step), step, ways) if shaped_like else 0
    starts = range(0, len(images), step)
    for start in progress.bar(starts, total=len(starts), desc=desc or '', unit='batch', enabled=desc is not None):
      rows = np.arange(start, min(start + step, len(images)))
      bucket = max(smallest, padded_size(len(rows), step, ways))
      pad = bucket - len(rows)
      rows_padded = np.concatenate([rows, np.repeat(rows[-1:], pad)])
      # `images`/`context` may be lazy row views (memory-mapped data sets): only this batch is read.
      put = lambda x: jax.device_put(np.asarray(x[rows_padded]), self._batch_sharding)
      values = self._per_example_loss(self.params, kv, put(images), put(context), put(ids))
      out.append(np.asarray(values)[:len(rows)])
    return np.concatenate(out)

  # ---------------------------------------------------------------- Fisher
  def fisher(self, images, context, batch: int = 64) -> dict:
    """Diagonal Fisher: mean over (training image, noise, t) samples of the squared gradient."""
    total, count = jax.tree.map(jnp.zeros_like, self.kv0), 0
    for repeat in range(self.config.fisher_samples_per_image):
      for start in range(0, len(images), batch):
        rows = np.arange(start, min(start + batch, len(images)))
        seeds = rows + repeat * len(images)
        part = self._fisher_batch(self.params, self.kv0, self._shard_rows(np.asarray(images[rows])),
                                  self._shard_rows(np.asarray(context[rows])), self._shard_rows(seeds))
        # Wait for each call: on CPU devices that share a thread pool, two queued calls with an
        # all-reduce each can hold both threads and never meet (XLA aborts after 40 s).
        total = jax.block_until_ready(jax.tree.map(jnp.add, total, part))
        count += len(rows)
    return jax.tree.map(lambda s: s / count, total)

  # ---------------------------------------------------------------- unlearning
  def unlearn(self, fisher: dict, image, context, query_seed: int) -> dict:
    """θ_kv after `unlearn_steps` EWC Newton steps of gradient ascent on the query's loss."""
    damping = self.config.fisher_damping * float(np.mean([np.mean(np.asarray(f)) for f in fisher.values()]))
    kv = self.kv0
    for step in range(self.config.unlearn_steps):
      seed = (query_seed + self.config.query_seed_offset) * 1000 + step
      grad = jax.block_until_ready(self._query_grad(self.params, kv, image, context, seed))
      kv = jax.tree.map(lambda p, g, f: p + self.config.step_size / self.n * g / (f + damping), kv, grad, fisher)
    return kv

  def scores(self, unlearned_kv, base_losses, images, context, ids) -> np.ndarray:
    """τ(ẑ, z) = L(z, θ₋ẑ) − L(z, θ₀) for each candidate (higher = more influential)."""
    return self.losses(unlearned_kv, images, context, ids) - base_losses
