"""The built-in tokenizer: 32-px images -> 8x8 = 64 tokens from a 128-row codebook, trained on the
bundled digits and photo crops in about a minute on a 2-core CPU (31 dB PSNR on them).

A small codebook on purpose: the tiny LVM learns 128 codes that each stand for a stroke piece far
faster than 512 finer ones (at 512 codes and 1000 steps the tokenizer reaches 37 dB, but 300 LVM
steps then predict frames worse than copying the last one).

  python launch.py lvm train-tokenizer --config lvm/configs/tokenizer_tiny.py --tpu tpu_configs/cpu_1.py --workdir runs/tokenizer
"""
from core.optim import OptimConfig
from core.train_loop import TrainConfig
from lvm.tokenizer import TokenizerConfig
from lvm.tokenizer_task import TokenizerImages, TokenizerLoss, TokenizerRunConfig


def get_config():
  return TokenizerRunConfig(
      tokenizer=TokenizerConfig(block_out_channels=(16, 32, 64), layers_per_block=1, latent_channels=16,
                                codebook_size=128, norm_num_groups=8, image_size=32),
      data=TokenizerImages(source='builtin:digits+photos'),
      loss=TokenizerLoss(l1=1.0, l2=1.0, restart_every=25),
      optim=OptimConfig(lr=2e-3, end_lr=2e-4, warmup_steps=50, decay_steps=350, weight_decay=0.0),
      train=TrainConfig(steps=400, global_batch=32, log_every=50, checkpoint_every=200),
  )
