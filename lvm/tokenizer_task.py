"""Training the VQGAN tokenizer on the engine: config, losses, metrics, dead-code restarts.

Loss = l1 · |x̂ - x| + l2 · (x̂ - x)² + codebook ||sg(z) - e||² + commitment · ||z - sg(e)||² (pixels in
[-1, 1]). Logged: PSNR of the reconstruction (pixels in [0, 1]), codebook perplexity (exp of the
entropy of the batch's code histogram) and the fraction of codes the batch used. Every
`restart_every` steps, codebook rows no position of the batch chose are moved onto randomly chosen
encoder outputs of that batch (the restart of Dhariwal et al., Jukebox), so codes do not stay dead.
Optional patch discriminator (`loss.discriminator_weight > 0`, lvm/discriminator.py): hinge losses as
taming-transformers' VQGAN. Both players train in the one engine step with one optimizer: the
discriminator's loss sees the reconstruction through stop_gradient (it moves only the
discriminator), and the generator's adversarial term sees the discriminator's parameters through
stop_gradient (it moves only the tokenizer), so the summed loss has exactly each player's gradient
(simultaneous updates). Its parameters live under `discriminator` in the checkpoint; encoding and
decoding ignore them. Optional LPIPS perceptual loss (`loss.perceptual_weight > 0`, lvm/perceptual.py):
only with weights the user gives (`loss.perceptual_weights`; VGG16's are not bundled), held frozen by
the engine (an input of the step, not a parameter). The tiny default reaches its PSNR without either.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from core.errors import ConfigError
from core.peak_flops import program_flops
from core.optim import OptimConfig
from core.train_loop import TrainConfig, refuse_validation_without_data
from lvm.discriminator import PatchDiscriminator
from lvm.perceptual import LPIPS, read_lpips_weights
from lvm.tokenizer import TokenizerConfig, VQGAN


@dataclasses.dataclass(frozen=True)
class TokenizerLoss:
  l1: float = 1.0
  l2: float = 1.0
  # Restart dead codebook rows every this many steps (0 = never).
  restart_every: int = 50
  # Weight of the generator's adversarial term (0 = no discriminator).
  discriminator_weight: float = 0.0
  # Patch discriminator: base width and number of strided layers.
  discriminator_channels: int = 64
  discriminator_layers: int = 3
  # Weight of the LPIPS perceptual term (taming-transformers' VQGAN: 1.0; 0 = none).
  perceptual_weight: float = 0.0
  # LPIPS-on-VGG16 weights: a file, or files joined by '+' (lvm/perceptual.py lists the key layouts).
  perceptual_weights: str = ''

  def __post_init__(self):
    if min(self.l1, self.l2) < 0 or self.l1 + self.l2 == 0:
      raise ConfigError(f'tokenizer loss weights l1={self.l1}, l2={self.l2}: both >= 0, not both 0')
    if self.restart_every < 0:
      raise ConfigError(f'loss.restart_every must be >= 0, got {self.restart_every}')
    if self.discriminator_weight < 0 or self.discriminator_channels < 1 or self.discriminator_layers < 1:
      raise ConfigError(f'loss.discriminator_weight must be >= 0 and its channels and layers >= 1, got '
                        f'{self.discriminator_weight}, {self.discriminator_channels}, {self.discriminator_layers}')
    if self.perceptual_weight < 0:
      raise ConfigError(f'loss.perceptual_weight must be >= 0, got {self.perceptual_weight}')
    if self.perceptual_weight > 0 and not self.perceptual_weights:
      raise ConfigError('loss.perceptual_weight > 0 needs loss.perceptual_weights: a file of LPIPS/VGG16 '
                        'weights (none is bundled; lvm/perceptual.py says which layouts are read)')


@dataclasses.dataclass(frozen=True)
class TokenizerImages:
  # 'builtin:digits', 'builtin:photos', 'builtin:skimage' (several joined by '+'), 'tfds:NAME:SPLIT', an image
  # folder, or 'frames:DIR' (the frames of its videos, one subfolder each).
  source: str = 'builtin:digits+photos'
  # 'auto': a folder or tfds split is decoded into memory before the first step when its images fit
  # in a quarter of the host's free memory, and streamed (decoded as the loader reads them) when
  # not; 'always' / 'never' choose. The same records either way (lvm/tokenizer_images.py).
  stream: str = 'auto'
  # Threads per host decoding streamed batches ahead of the step.
  read_threads: int = 8

  def __post_init__(self):
    if self.stream not in ('auto', 'always', 'never'):
      raise ConfigError(f"data.stream must be 'auto', 'always' or 'never', got {self.stream!r}")
    if self.read_threads < 1:
      raise ConfigError(f'data.read_threads must be >= 1, got {self.read_threads}')


@dataclasses.dataclass(frozen=True)
class TokenizerRunConfig:
  tokenizer: TokenizerConfig
  data: TokenizerImages = TokenizerImages()
  loss: TokenizerLoss = TokenizerLoss()
  optim: OptimConfig = OptimConfig()
  train: TrainConfig = TrainConfig()

  def __post_init__(self):
    refuse_validation_without_data(self.train, 'the tokenizer (it reports held-out PSNR at its end)')


def psnr(reconstruction, target) -> jax.Array:
  """Peak signal-to-noise ratio in dB of images in [0, 1] (mean over the batch of per-image PSNR)."""
  mse = jnp.mean(jnp.square(reconstruction - target), axis=tuple(range(1, target.ndim)))
  return jnp.mean(10 * jnp.log10(1 / jnp.maximum(mse, 1e-10)))


def adversarial_losses(discriminator, real, fake):
  """(generator term, discriminator hinge loss, real logits, fake logits), each term moving only its
  own player: see the module docstring."""
  graphdef, state = nnx.split(discriminator)
  frozen = nnx.merge(graphdef, jax.lax.stop_gradient(state))
  generator_term = -jnp.mean(frozen(fake))
  real_logits, fake_logits = discriminator(real), discriminator(jax.lax.stop_gradient(fake))
  hinge = 0.5 * (jnp.mean(jax.nn.relu(1 - real_logits)) + jnp.mean(jax.nn.relu(1 + fake_logits)))
  return generator_term, hinge, real_logits, fake_logits


class TokenizerTask:

  def __init__(self, config: TokenizerConfig, loss: TokenizerLoss = TokenizerLoss(), seed: int = 0):
    self.config, self.weights, self.seed = config, loss, seed
    if loss.perceptual_weight > 0:
      if config.in_channels not in (1, 3):
        raise ConfigError(f'the perceptual loss compares RGB (or grey) images; tokenizer.in_channels is '
                          f'{config.in_channels}')
      # Only the structure here: the weights are read when training starts (frozen_inputs), so
      # loading a trained tokenizer for encoding never needs the file.
      self.lpips_graphdef = nnx.split(nnx.eval_shape(lambda: LPIPS(nnx.Rngs(0))))[0]
      self.frozen_inputs = self._read_lpips

  def _read_lpips(self):
    if not hasattr(self, '_lpips_state'):
      _, self._lpips_state, self.lpips_checksum = read_lpips_weights(self.weights.perceptual_weights)
    return {'lpips': self._lpips_state}

  def make_model(self, rngs: nnx.Rngs) -> VQGAN:
    model = VQGAN(self.config, rngs)
    if self.weights.discriminator_weight > 0:
      model.discriminator = PatchDiscriminator(self.config.in_channels, self.weights.discriminator_channels,
                                               self.weights.discriminator_layers, rngs)
    return model

  def batch_logical_axes(self):
    return {'images': ('batch', None, None, None)}

  def batch_shapes(self) -> dict:
    """One batch row's arrays, name -> (shape, dtype): an image in [0, 1]."""
    size = self.config.image_size
    return {'images': ((size, size, self.config.in_channels), jnp.float32)}

  def abstract_frozen_inputs(self):
    """The frozen inputs' shapes (the fit check's; no weights file is read), or None."""
    if self.weights.perceptual_weight <= 0:
      return None
    return {'lpips': nnx.split(nnx.eval_shape(lambda: LPIPS(nnx.Rngs(0))))[1]}

  def loss(self, model: VQGAN, batch, frozen=None):
    images = batch['images']
    reconstruction, ids, codebook_loss, commitment_loss = model.reconstruct(images)
    target = images * 2 - 1
    l1 = jnp.mean(jnp.abs(reconstruction - target))
    l2 = jnp.mean(jnp.square(reconstruction - target))
    loss = (self.weights.l1 * l1 + self.weights.l2 * l2 + codebook_loss
            + self.config.commitment * commitment_loss)
    extra = {}
    if self.weights.perceptual_weight > 0:
      lpips = nnx.merge(self.lpips_graphdef, frozen['lpips'])
      rgb = (lambda x: jnp.tile(x, (1, 1, 1, 3))) if self.config.in_channels == 1 else (lambda x: x)
      perceptual = jnp.mean(lpips(rgb(reconstruction), rgb(target)))
      loss = loss + self.weights.perceptual_weight * perceptual
      extra['perceptual'] = perceptual
    if self.weights.discriminator_weight > 0:
      generator_term, discriminator_loss, real_logits, fake_logits = adversarial_losses(
          model.discriminator, target, reconstruction)
      loss = loss + self.weights.discriminator_weight * generator_term + discriminator_loss
      extra |= {'generator_adversarial': generator_term, 'discriminator_loss': discriminator_loss,
                'discriminator_real_logit': jnp.mean(real_logits),
                'discriminator_fake_logit': jnp.mean(fake_logits)}
    usage = jnp.bincount(ids.reshape(-1), length=self.config.codebook_size) / ids.size
    entropy = -jnp.sum(jnp.where(usage > 0, usage * jnp.log(jnp.maximum(usage, 1e-12)), 0.0))
    return loss, {'l1': l1, 'l2': l2, 'codebook_loss': codebook_loss, 'commitment_loss': commitment_loss,
                  'psnr': psnr(jnp.clip((reconstruction + 1) / 2, 0, 1), images),
                  'codebook_perplexity': jnp.exp(entropy), 'codes_used': jnp.mean(usage > 0), **extra}

  def after_update(self, graphdef, params, batch, step):
    every = self.weights.restart_every
    if every == 0:
      return params, {}

    def restart(params):
      model = nnx.merge(graphdef, params)
      z = jax.lax.stop_gradient(model.encode_latents(batch['images']))
      z = z.reshape(-1, z.shape[-1])
      counts = jnp.bincount(model.quantize.nearest(z), length=self.config.codebook_size)
      dead = counts == 0
      key = jax.random.fold_in(jax.random.key(self.seed), step)
      picks = jax.random.randint(key, (self.config.codebook_size,), 0, z.shape[0])
      rows = params['quantize']['embedding']['embedding']
      new_rows = jnp.where(dead[:, None], z[picks], rows)
      params = dict(params, quantize={'embedding': {'embedding': new_rows}})
      return params, jnp.sum(dead).astype(jnp.float32)

    return_params, restarted = jax.lax.cond((step + 1) % every == 0, restart,
                                            lambda p: (p, jnp.float32(0)), params)
    return return_params, {'codes_restarted': restarted}

  def flops_per_example(self) -> float:
    """Forward + backward ≈ 3x the forward FLOPs, from XLA's count of one image (lowered, not compiled)."""
    if not hasattr(self, '_flops'):
      model = nnx.eval_shape(lambda: VQGAN(self.config, nnx.Rngs(0)))
      graphdef, state = nnx.split(model)
      shape = jax.ShapeDtypeStruct((1, self.config.image_size, self.config.image_size, self.config.in_channels),
                                   jnp.float32)
      self._flops = 3.0 * program_flops(lambda s, x: nnx.merge(graphdef, s).reconstruct(x)[0], state, shape)
    return self._flops

  def tokens_per_example(self) -> int:
    return self.config.tokens_per_image
