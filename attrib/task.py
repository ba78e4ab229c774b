"""Denoising (ε-prediction) training of the U-Net on the shared engine."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from attrib.diffusion import NoiseSchedule, ScheduleConfig, epsilon_loss
from attrib.unet import UNet2DConditionModel
from attrib.unet_config import UNetConfig
from core.peak_flops import program_flops


def example_noise(seed_b: jax.Array, shape, num_timesteps: int):
  """Per-example noise and timestep from the example's seed: identical under any device layout."""
  keys = jax.vmap(lambda s: jax.random.fold_in(jax.random.key(0), s))(seed_b)
  noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 0), shape))(keys)
  timesteps = jax.vmap(lambda k: jax.random.randint(jax.random.fold_in(k, 1), (), 0, num_timesteps))(keys)
  return noise, timesteps


class DenoisingTask:

  def __init__(self, unet: UNetConfig, schedule: ScheduleConfig, text_len: int):
    self.unet_config, self.schedule, self.text_len = unet, NoiseSchedule(schedule), text_len
    self._flops = None

  def make_model(self, rngs: nnx.Rngs) -> UNet2DConditionModel:
    return UNet2DConditionModel(self.unet_config, rngs)

  def program_key(self):
    # The model and the loss are these configs' alone (the images and captions are batch inputs).
    return self.unet_config, self.schedule.config, self.text_len

  def loss(self, model, batch):
    images = batch['images']
    noise, timesteps = example_noise(batch['seed'], images.shape[1:], self.schedule.config.num_train_timesteps)
    per_example = epsilon_loss(model, self.schedule, images, batch['context'], noise, timesteps)
    return jnp.mean(per_example), {}

  def batch_logical_axes(self):
    return {'images': ('batch', None, None, None), 'context': ('batch', None, None), 'seed': ('batch',)}

  def batch_shapes(self) -> dict:
    """One batch row's arrays, name -> (shape, dtype): an image (or latent), its caption's text states
    and its noise seed."""
    u = self.unet_config
    return {'images': ((u.sample_size, u.sample_size, u.in_channels), jnp.float32),
            'context': ((self.text_len, u.cross_attention_dim), jnp.float32), 'seed': ((), jnp.int32)}

  def tokens_per_example(self) -> int:
    return 1  # tokens/s in the metrics reads as images/s for this task

  def flops_per_example(self) -> float:
    if self._flops is None:  # XLA's own count of one forward, x3 for forward + backward
      self._flops = _forward_flops(self.unet_config, self.text_len)
    return self._flops


@functools.lru_cache(maxsize=8)
def _forward_flops(c: UNetConfig, text_len: int) -> float:
  """Training FLOPs of one example: XLA's count of one forward, x3 for forward + backward (once per
  U-Net config and process, however many models a job trains; counted without a compile)."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: UNet2DConditionModel(c, nnx.Rngs(0))))
  x = jax.ShapeDtypeStruct((1, c.sample_size, c.sample_size, c.in_channels), jnp.float32)
  ctx = jax.ShapeDtypeStruct((1, text_len, c.cross_attention_dim), jnp.float32)
  forward = lambda s, x, ctx: nnx.merge(graphdef, s)(x, jnp.zeros((1,), jnp.int32), ctx)
  return 3 * program_flops(forward, nnx.to_pure_dict(state), x, ctx)
