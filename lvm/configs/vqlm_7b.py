"""LVM 7B as released: LVM's README recipe (32 x 4096 tokens per micro-step, 4 accumulated).

  python launch.py tpu create --tpu tpu_configs/v5p_128.py --name lvm7b
  python launch.py tpu run --tpu tpu_configs/v5p_128.py --name lvm7b -- \
      lvm train --config lvm/configs/vqlm_7b.py --tpu tpu_configs/v5p_128.py --workdir gs://BUCKET/lvm7b \
      --set data.train_path=gs://BUCKET/tokens
"""

from core.optim import OptimConfig
from core.train_loop import TrainConfig
from lvm.config import DataConfig, LvmConfig
from lvm.model_config import PRESETS


def get_config(preset='vqlm_7b'):
  return LvmConfig(
      model=PRESETS[preset],
      data=DataConfig(train_path='', seq_len=4096, read_threads=16),
      optim=OptimConfig(lr=1.5e-4, end_lr=3e-5, warmup_steps=8000, decay_steps=288000, grad_accum=4),
      train=TrainConfig(steps=400000, global_batch=128, log_every=50, checkpoint_every=1000),
  )
