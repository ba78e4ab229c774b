"""The built-in tokenizer: 32-px images -> 8x8 = 64 tokens from a 512-row codebook, trained on the
bundled digits and photo crops in about two minutes on a 2-core CPU.

  python launch.py lvm train-tokenizer --config lvm/configs/tokenizer_tiny.py --tpu tpu_configs/cpu_1.py --workdir runs/tokenizer
"""
from core.optim import OptimConfig
from core.train_loop import TrainConfig
from lvm.tokenizer import TokenizerConfig
from lvm.tokenizer_task import TokenizerImages, TokenizerLoss, TokenizerRunConfig


def get_config():
  return TokenizerRunConfig(
      tokenizer=TokenizerConfig(block_out_channels=(32, 64, 64), layers_per_block=1, latent_channels=16,
                                codebook_size=512, norm_num_groups=8, image_size=32),
      data=TokenizerImages(source='builtin:digits+photos'),
      loss=TokenizerLoss(l1=1.0, l2=1.0, restart_every=25),
      optim=OptimConfig(lr=2e-3, end_lr=2e-4, warmup_steps=50, decay_steps=950, weight_decay=0.0),
      train=TrainConfig(steps=1000, global_batch=64, log_every=50, checkpoint_every=500),
  )
