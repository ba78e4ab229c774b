"""Config of a text-to-image diffusion run: U-Net, noise schedule, data, optimizer, loop."""
from __future__ import annotations

import dataclasses

from attrib.diffusion import ScheduleConfig
from core.errors import ConfigError
from attrib.unet_config import UNetConfig
from core.optim import OptimConfig
from core.train_loop import TrainConfig, refuse_validation_without_data


@dataclasses.dataclass(frozen=True)
class ImageDataConfig:
  # Training images + captions: 'builtin:digits' (scikit-learn digits with template captions).
  train_path: str = 'builtin:digits'
  # Images held out of training (by index, from the end) for prompts of generated queries.
  held_out: int = 197
  # Indices of training images to leave out (counterfactual retraining), comma-separated file or ''.
  exclude_path: str = ''
  # Probability that a caption is replaced by the empty one (classifier-free guidance training).
  caption_dropout: float = 0.1
  # Text tokens the encoder sees (captions are padded/truncated to this).
  text_len: int = 16

  def __post_init__(self):
    if not 0.0 <= self.caption_dropout <= 1.0:
      raise ConfigError(f'data.caption_dropout is a probability, in [0, 1]; got {self.caption_dropout}')
    # [CLS] and [SEP] take two; MiniLM has 512 positions (a length of 1 is not truncated at all).
    if not 2 <= self.text_len <= 512:
      raise ConfigError(f'data.text_len must be in [2, 512] (the text encoder\'s [CLS] and [SEP] and its 512 '
                        f'positions), got {self.text_len}')


@dataclasses.dataclass(frozen=True)
class SampleConfig:
  # 'ddim' (deterministic) or 'ddpm' (ancestral).
  method: str = 'ddim'
  # Denoising steps (must divide schedule.num_train_timesteps).
  num_steps: int = 50
  # Classifier-free guidance scale.
  guidance: float = 3.0

  def __post_init__(self):
    # Checked when the config is loaded, not after a whole training run (the samples come last).
    if self.method not in ('ddim', 'ddpm'):
      raise ConfigError(f"sample.method {self.method!r}: expected 'ddim' or 'ddpm'")
    if self.num_steps < 1:
      raise ConfigError(f'sample.num_steps must be >= 1, got {self.num_steps}')


@dataclasses.dataclass(frozen=True)
class DiffusionConfig:
  # The ε-prediction U-Net.
  unet: UNetConfig
  # DDPM noise schedule.
  schedule: ScheduleConfig = ScheduleConfig()
  # Images and captions.
  data: ImageDataConfig = ImageDataConfig()
  # How queries are generated.
  sample: SampleConfig = SampleConfig()
  # AdamW and its schedule.
  optim: OptimConfig = OptimConfig()
  # Steps, batch, logging, checkpoints.
  train: TrainConfig = TrainConfig()

  def __post_init__(self):
    refuse_validation_without_data(self.train, 'the diffusion model')
    total = self.schedule.num_train_timesteps
    if self.sample.num_steps > total or total % self.sample.num_steps:
      raise ConfigError(f'sample.num_steps {self.sample.num_steps} must divide schedule.num_train_timesteps {total}')
