"""Pixel-space text-to-image model of the built-in digits (16x16, MiniLM captions), CPU-sized.

  python launch.py attrib train-model --config attrib/configs/digits.py --workdir runs/digits
"""
from attrib.config import DiffusionConfig, ImageDataConfig
from attrib.diffusion import ScheduleConfig
from attrib.unet_config import UNetConfig
from core.optim import OptimConfig
from core.train_loop import TrainConfig


def get_config():
  return DiffusionConfig(
      unet=UNetConfig(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(32, 64, 64),
                      cross_attention_levels=(False, True, True), layers_per_block=1, num_attention_heads=4,
                      cross_attention_dim=384, norm_num_groups=8),
      schedule=ScheduleConfig(clip_sample=True),
      data=ImageDataConfig(),
      optim=OptimConfig(lr=2e-3, end_lr=1e-4, warmup_steps=100, decay_steps=1900, weight_decay=0.0),
      train=TrainConfig(steps=2000, global_batch=64, log_every=50, checkpoint_every=500),
  )
