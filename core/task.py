"""What a model family gives the engine: how to build the model and how to score a batch."""
from __future__ import annotations

from typing import Protocol

import jax
from flax import nnx


class Task(Protocol):

  def make_model(self, rngs: nnx.Rngs) -> nnx.Module:
    """Builds the model (called under `jax.jit` / `nnx.eval_shape`: no side effects)."""

  def loss(self, model: nnx.Module, batch: dict[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean loss over the batch and auxiliary scalars to log."""

  def batch_logical_axes(self) -> dict[str, tuple[str | None, ...]]:
    """Logical axis names of each batch field, e.g. {'tokens': ('batch', 'act_seq')}."""

  def flops_per_example(self) -> float:
    """Training FLOPs (forward + backward) of one example, for MFU."""

  def tokens_per_example(self) -> int:
    """Tokens trained on per example, for tokens/s."""

  # Optional: `after_update(graphdef, params, batch, step) -> (params, metrics)` runs inside the
  # jitted step after the optimizer update, for changes that are not gradient steps. It must be a
  # pure function of its arguments (seed randomness from `step`) so resumed runs stay identical.
  #
  # Optional: `frozen_inputs() -> pytree of host arrays` (e.g. a pretrained perceptual network). The
  # loop replicates them on the mesh once and calls `loss(model, batch, frozen)`; they get no
  # gradient, no optimizer state and no place in checkpoints.
  #
  # Optional: `program_key() -> hashable` names everything the model and the loss are built from
  # (configs, not data). Two runs in one process whose tasks return equal keys, with the same
  # optimizer, seed, mesh and rules, share their compiled init and step programs (core.train_loop):
  # a job that retrains one recipe on many subsets traces and compiles once. Return None to opt out.
