"""FastGDA's released MSCOCO latent diffusion model (fastgda.md §1): 128 px images as 4x16x16 SD-VAE
latents, OpenCLIP text states (77 x 1024), `DDPMScheduler(1000)` (linear betas 1e-4 .. 0.02).

It is imported, not trained here (the weights and precomputed latents come from the FastGDA release):
  python launch.py attrib import-diffusers --weights data/coco/model.bin --config attrib/configs/mscoco.py \
      --set data.train_path=latents:data/coco/trainset --workdir runs/coco
"""
from attrib.config import DiffusionConfig, ImageDataConfig, SampleConfig
from attrib.diffusion import ScheduleConfig
from attrib.unet_config import MSCOCO
from core.optim import OptimConfig
from core.train_loop import TrainConfig


def get_config():
  return DiffusionConfig(
      unet=MSCOCO,
      schedule=ScheduleConfig(beta_schedule='linear', beta_start=1e-4, beta_end=0.02),
      data=ImageDataConfig(train_path='latents:data/coco/trainset', text_len=77, caption_dropout=0.0),
      # Queries of the paper: DDPM, 1000 steps, guidance 7.5 (AbU mscoco/generate_samples.py).
      sample=SampleConfig(method='ddpm', num_steps=1000, guidance=7.5),
      # AbU App. B.1 trained it with lr 1e-4 and batch 128 (only used if this config is trained further).
      optim=OptimConfig(lr=1e-4, end_lr=1e-4, warmup_steps=0, weight_decay=0.0),
      train=TrainConfig(global_batch=128),
  )
