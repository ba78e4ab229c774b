"""A 2.5M-parameter LVM that trains on CPU in about a minute on the built-in digit sentences.

  python launch.py lvm train --config lvm/configs/tiny.py --tpu tpu_configs/cpu_8.py --workdir /tmp/lvm_tiny
  python launch.py lvm eval --workdir /tmp/lvm_tiny --data builtin:digits-eval
"""
from core.optim import OptimConfig
from core.train_loop import TrainConfig
from lvm.config import DataConfig, LvmConfig
from lvm.model_config import PRESETS


def get_config():
  return LvmConfig(
      model=PRESETS['tiny'],
      data=DataConfig(train_path='builtin:digits', seq_len=256),
      optim=OptimConfig(lr=3e-3, end_lr=3e-4, warmup_steps=20, decay_steps=280),
      train=TrainConfig(steps=300, global_batch=16, log_every=10, checkpoint_every=100),
  )
