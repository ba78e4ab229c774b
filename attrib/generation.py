"""`launch.py attrib generate`: an image from a trained digits model, for a prompt and a seed.

The attribution half answers "which training images made this generated image?"; this is how a user
of the built-in model gets a generated image to ask about. It samples exactly as the teacher makes
its queries (the run's sampler, steps and guidance; one noise key per seed), so the test query of
prompt P and seed q is the image `--prompt P --seed q` writes. The picture is written at the model's
own size (16x16 grey for the digits): `attrib query` and `Attributor.attribute` then read back the
model's pixels (to 8 bits) rather than a resampled copy.
"""
from __future__ import annotations

import time

import numpy as np

from core import progress
from core.errors import ConfigError
from core.paths import as_path
from core.workdir import prepare_output_file, save_image_atomic, versions, write_result_if_writable


def generate_command(workdir: str, prompt: str, seed: int, out: str | None, tpu_path: str | None = None) -> dict:
  from attrib.commands import DEFAULT_TPU, generate, load_run, restore_unet
  from attrib.released import LATENTS_PREFIX
  from attrib.text_encoder import shared_text_encoder
  workdir = as_path(workdir)
  config, trained_preset = load_run(workdir)
  if config.data.train_path.startswith(LATENTS_PREFIX):
    raise ConfigError(f'{workdir}: this U-Net denoises latents ({config.data.train_path}), which only the '
                      f"model's VAE turns into pictures; generate with diffusers and pass the image to attrib query")
  if seed < 0:
    raise ConfigError(f'--seed must be >= 0, got {seed}')
  out = prepare_output_file(out or workdir / 'generated.png')  # before the model is loaded
  tpu_path = tpu_path or trained_preset or DEFAULT_TPU
  started = time.time()
  text_encoder = shared_text_encoder(config.data.text_len)
  context = np.asarray(text_encoder([prompt])[0])
  uncond = np.asarray(text_encoder([''])[0][0])  # classifier-free guidance's empty caption, as in training
  graphdef, params, _, _, step = restore_unet(workdir, config, tpu_path)
  progress.say(f'attrib generate: {config.sample.method.upper()}, {config.sample.num_steps} steps, '
               f'guidance {config.sample.guidance}, seed {seed}')
  # A list of one seed: the per-image key the teacher's query batches use, so the two images agree.
  image = generate(graphdef, params, config, context, uncond, seed=[seed])[0]
  pixels = ((image + 1) * 127.5).round().astype(np.uint8)
  save_image_atomic(out, pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
  progress.say(f'attrib generate: wrote {out} ({pixels.shape[1]}x{pixels.shape[0]}, the model\'s own size); '
               f'attribute it: launch.py attrib query --workdir {workdir} --image {out} --prompt {prompt!r}')
  result = {'job': 'attrib generate', 'prompt': prompt, 'seed': seed, 'out': str(out), 'model_step': step,
            'sampler': {'method': config.sample.method, 'num_steps': config.sample.num_steps,
                        'guidance': config.sample.guidance},
            'wall_s': time.time() - started, 'versions': versions()}
  write_result_if_writable(workdir / 'generate_result.json', result)
  return result
