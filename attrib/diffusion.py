"""DDPM noise schedule, ε-prediction loss, and DDPM / DDIM sampling with classifier-free guidance.

Numbers follow diffusers' DDPMScheduler / DDIMScheduler: Stable Diffusion's scaled-linear betas
(0.00085 to 0.012) by default, or the linear 1e-4 to 0.02 of `DDPMScheduler(1000)`, which FastGDA's
released MSCOCO model was trained with (tests check `add_noise` and the update steps against diffusers).
"""
from __future__ import annotations

from core.errors import ConfigError

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from core import progress


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
  # Diffusion steps of training.
  num_train_timesteps: int = 1000
  # 'scaled_linear': linspace(sqrt(start), sqrt(end))² (Stable Diffusion); 'linear': linspace(start, end).
  beta_schedule: str = 'scaled_linear'
  beta_start: float = 0.00085
  beta_end: float = 0.012
  # Clip predicted x0 to [-1, 1] while sampling (pixel-space models; off for latents).
  clip_sample: bool = False

  def __post_init__(self):
    # Checked when the config is loaded: a bad schedule would otherwise surface as NaN losses.
    if self.beta_schedule not in ('scaled_linear', 'linear'):
      raise ConfigError(f"schedule.beta_schedule {self.beta_schedule!r}: expected 'scaled_linear' or 'linear'")
    if self.num_train_timesteps < 1:
      raise ConfigError(f'schedule.num_train_timesteps must be >= 1, got {self.num_train_timesteps}')
    if not 0.0 < self.beta_start <= self.beta_end < 1.0:
      raise ConfigError(f'schedule betas need 0 < beta_start <= beta_end < 1, got beta_start={self.beta_start}, '
                        f'beta_end={self.beta_end}')


class NoiseSchedule:

  def __init__(self, config: ScheduleConfig):
    self.config = config
    if config.beta_schedule == 'scaled_linear':
      betas = np.linspace(config.beta_start ** 0.5, config.beta_end ** 0.5, config.num_train_timesteps,
                          dtype=np.float64) ** 2
    elif config.beta_schedule == 'linear':
      betas = np.linspace(config.beta_start, config.beta_end, config.num_train_timesteps, dtype=np.float64)
    else:
      raise ConfigError(f"schedule.beta_schedule {config.beta_schedule!r}: expected 'scaled_linear' or 'linear'")
    # float32 betas like diffusers; torch's cumprod accumulates float32 in float64, and so does this
    # (a float32 product drifts by ~3e-7 over 1000 steps), so add_noise agrees with diffusers.
    self.betas = jnp.asarray(betas, jnp.float32)
    alphas = 1.0 - np.asarray(betas, np.float32)
    self.alphas_cumprod = jnp.asarray(np.cumprod(alphas.astype(np.float64)), jnp.float32)

  def add_noise(self, x0: jax.Array, noise: jax.Array, timesteps_b: jax.Array) -> jax.Array:
    a = self.alphas_cumprod[timesteps_b].reshape((-1,) + (1,) * (x0.ndim - 1))
    return jnp.sqrt(a) * x0 + jnp.sqrt(1.0 - a) * noise

  def _pred_x0(self, x_t, eps, alpha_t):
    x0 = (x_t - jnp.sqrt(1 - alpha_t) * eps) / jnp.sqrt(alpha_t)
    return jnp.clip(x0, -1, 1) if self.config.clip_sample else x0

  def ddpm_step(self, eps, t: int, x_t, noise, step_size: int = 1):
    """One ancestral step t -> t - step_size with the 'fixed_small' variance (diffusers' default)."""
    alpha_t = self.alphas_cumprod[t]
    alpha_prev = self.alphas_cumprod[t - step_size] if t - step_size >= 0 else jnp.float32(1.0)
    beta_t = 1 - alpha_t / alpha_prev
    x0 = self._pred_x0(x_t, eps, alpha_t)
    mean = (jnp.sqrt(alpha_prev) * beta_t / (1 - alpha_t)) * x0 + \
           (jnp.sqrt(1 - beta_t) * (1 - alpha_prev) / (1 - alpha_t)) * x_t
    variance = jnp.maximum((1 - alpha_prev) / (1 - alpha_t) * beta_t, 1e-20)
    return mean + (jnp.sqrt(variance) * noise if t > 0 else 0.0)

  def ddim_step(self, eps, t: int, x_t, step_size: int):
    """Deterministic DDIM (eta = 0) step t -> t - step_size; the final step lands on alpha = 1."""
    alpha_t = self.alphas_cumprod[t]
    alpha_prev = self.alphas_cumprod[t - step_size] if t - step_size >= 0 else jnp.float32(1.0)
    x0 = self._pred_x0(x_t, eps, alpha_t)
    eps = (x_t - jnp.sqrt(alpha_t) * x0) / jnp.sqrt(1 - alpha_t) if self.config.clip_sample else eps
    return jnp.sqrt(alpha_prev) * x0 + jnp.sqrt(1 - alpha_prev) * eps


def epsilon_loss(predict_eps: Callable, schedule: NoiseSchedule, x0, context, noise, timesteps_b):
  """Per-example ε-prediction MSE [b] (the DDPM loss; AbU scores with this)."""
  eps = predict_eps(schedule.add_noise(x0, noise, timesteps_b), timesteps_b, context)
  return jnp.mean(jnp.square(eps - noise), axis=tuple(range(1, x0.ndim)))


@jax.jit
def _guide(eps, guidance):
  eps_uncond, eps_text = jnp.split(eps, 2)
  return eps_uncond + guidance * (eps_text - eps_uncond)


def sample(predict_eps: Callable, schedule: NoiseSchedule, *, shape, context, uncond_context,
           guidance: float, num_steps: int, method: str, key: jax.Array, desc: str | None = None) -> jax.Array:
  """DDPM (ancestral) or DDIM sampling with classifier-free guidance:
  ε = ε(∅) + guidance · (ε(text) − ε(∅)). Timesteps use diffusers' 'leading' spacing.

  `key`: one key for the batch, or one per row ([b] keys): row i then draws exactly the noise it
  would draw alone with key i, so images can be generated in batches and stay those of their seeds."""
  if method not in ('ddpm', 'ddim'):
    raise ConfigError(f"sampler must be 'ddpm' or 'ddim', got {method!r}")
  total = schedule.config.num_train_timesteps
  if not 1 <= num_steps <= total or total % num_steps:
    raise ConfigError(f'num_steps must divide {total}, got {num_steps}')
  step_size = total // num_steps
  per_row = key.shape != ()
  if per_row and key.shape != (shape[0],):
    raise ValueError(f'{key.shape[0]} keys for a batch of {shape[0]}')

  def split(key):
    return tuple(jax.vmap(jax.random.split)(key).transpose(1, 0)) if per_row else tuple(jax.random.split(key))

  def normal(key):
    return jax.vmap(lambda k: jax.random.normal(k, shape[1:]))(key) if per_row else jax.random.normal(key, shape)

  key, init_key = split(key)
  x = normal(init_key)
  both_context = jnp.concatenate([uncond_context, context], axis=0)

  def guided_eps(x, t):
    # `predict_eps` should be jitted once by the caller (see attrib.commands.generate): a jit made
    # here would be traced and compiled anew on every call, which costs more than 50 steps of a
    # small model.
    eps = predict_eps(jnp.concatenate([x, x]), jnp.full((2 * x.shape[0],), t), both_context)
    return _guide(eps, guidance)

  timesteps = range(total - step_size, -1, -step_size)
  for t in progress.bar(timesteps, total=num_steps, desc=desc or '', unit='step', enabled=desc is not None):
    eps = guided_eps(x, t)
    if method == 'ddim':
      x = schedule.ddim_step(eps, t, x, step_size)
    else:
      key, noise_key = split(key)
      x = schedule.ddpm_step(eps, t, x, normal(noise_key), step_size)
  return x
