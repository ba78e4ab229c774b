"""The full-scale tokenizer: LVM's VQGAN shape (the aMUSEd-256 VQGAN it released, reference/lvm.md §2):
256-px images -> 16x16 = 256 tokens from an 8192-row codebook of 64-dim codes, five levels of
128-256-256-512-768 channels, no attention. Trained from scratch on a TPU slice, images from a
prepared tfds dataset or a folder (`--set data.source=gs://bucket/images`).

ImageNet's 1.28M training images would take 938 GiB decoded (float32, 0.75 MiB per 256-px image),
more than a v4 host's ~400 GB: they are streamed (`data.stream='auto'`), each host decoding its own
rows of each batch as the loader reads them, in `data.read_threads` threads (an ImageNet-size JPEG
takes ~5.4 ms of one CPU core to become a 256-px image: 0.35 core-seconds a batch of 64).

Will it fit? (compiled for the slice's TPU topology on this machine; the `tpu` extra):
  python launch.py lvm train-tokenizer --config lvm/configs/tokenizer_f16.py --tpu tpu_configs/v4_8.py --check
Then on the slice (README, "Run on a TPU pod"):
  python launch.py tpu run --tpu tpu_configs/v4_8.py --name tok -- lvm train-tokenizer \\
      --config lvm/configs/tokenizer_f16.py --workdir gs://BUCKET/tokenizer

Losses as taming-transformers' VQGAN without its two optional terms: the LPIPS perceptual loss needs
VGG16 weights the user gives (`--set loss.perceptual_weight=1 --set loss.perceptual_weights=FILE`),
and the patch discriminator (`--set loss.discriminator_weight=0.1`) is best started once the
reconstructions are sharp. To reuse the released weights instead: `lvm import-tokenizer`.
"""
from core.optim import OptimConfig
from core.train_loop import TrainConfig
from lvm.tokenizer import TokenizerConfig
from lvm.tokenizer_task import TokenizerImages, TokenizerLoss, TokenizerRunConfig


def get_config():
  return TokenizerRunConfig(
      tokenizer=TokenizerConfig(),  # the full-scale defaults: f16, 256 px, K=8192, D=64
      data=TokenizerImages(source='tfds:imagenet2012:train', read_threads=16),
      loss=TokenizerLoss(l1=1.0, l2=1.0, restart_every=100),
      # taming-transformers: Adam at 4.5e-6 per image of the batch (64 -> 2.9e-4), betas (0.5, 0.9).
      optim=OptimConfig(lr=2.9e-4, end_lr=2.9e-5, warmup_steps=1000, decay_steps=200_000, weight_decay=0.0,
                        b1=0.5, b2=0.9),
      train=TrainConfig(steps=200_000, global_batch=64, log_every=100, checkpoint_every=2000),
  )
