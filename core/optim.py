"""Optimizer factory: AdamW as LVM trains it (EasyLM defaults), with linear warmup + cosine decay.

Gradient accumulation is done by the train step (a scan over micro-batches), so the schedule and
every step counter count optimizer updates, never micro-steps (the optax.MultiSteps pitfall).
"""
from __future__ import annotations

from core.errors import ConfigError

import dataclasses

import optax


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  # Peak learning rate reached at the end of warmup.
  lr: float = 1.5e-4
  # Learning rate at the end of the cosine decay.
  end_lr: float = 3e-5
  # Optimizer updates of linear warmup from 0 to lr.
  warmup_steps: int = 8000
  # Optimizer updates of cosine decay after warmup (LVM: 288k).
  decay_steps: int = 288000
  # AdamW first-moment decay.
  b1: float = 0.9
  # AdamW second-moment decay.
  b2: float = 0.95
  # AdamW epsilon.
  eps: float = 1e-8
  # Decoupled weight decay, applied to all parameters as LVM does.
  weight_decay: float = 0.1
  # Global gradient-norm clip (0 = none, as torch's AdamW).
  clip_norm: float = 1.0
  # Micro-batches summed into one optimizer update (the global batch is split this many ways).
  grad_accum: int = 1

  def __post_init__(self):
    if self.lr <= 0 or self.end_lr < 0:
      raise ConfigError(f'optim.lr must be > 0 and optim.end_lr >= 0, got {self.lr}, {self.end_lr}')
    if self.warmup_steps < 0 or self.decay_steps < 1:
      raise ConfigError('optim.warmup_steps must be >= 0 and optim.decay_steps >= 1')
    if self.clip_norm < 0:
      raise ConfigError(f'optim.clip_norm must be >= 0 (0 = no clipping), got {self.clip_norm}')
    if self.grad_accum < 1:
      raise ConfigError(f'optim.grad_accum must be >= 1, got {self.grad_accum}')
    # Adam's moment decays: 1 or more never forgets (and its bias correction divides by zero).
    if not (0 <= self.b1 < 1 and 0 <= self.b2 < 1):
      raise ConfigError(f'optim.b1 and optim.b2 must be in [0, 1), got {self.b1}, {self.b2}')
    if self.eps < 0 or self.weight_decay < 0:
      raise ConfigError(f'optim.eps and optim.weight_decay must be >= 0, got {self.eps}, {self.weight_decay}')


def learning_rate_schedule(config: OptimConfig) -> optax.Schedule:
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.lr, warmup_steps=config.warmup_steps,
      decay_steps=config.warmup_steps + config.decay_steps, end_value=config.end_lr)


def make_optimizer(config: OptimConfig) -> optax.GradientTransformation:
  # identity() has the same (empty) state as the clip, so checkpoints do not depend on the choice.
  return optax.chain(
      optax.clip_by_global_norm(config.clip_norm) if config.clip_norm > 0 else optax.identity(),
      optax.adamw(learning_rate_schedule(config), b1=config.b1, b2=config.b2, eps=config.eps,
                  weight_decay=config.weight_decay),
  )
