"""`launch.py attrib generate`: an image from a trained digits model, for a prompt and a seed.

The attribution half answers "which training images made this generated image?"; this is how a user
of the built-in model gets a generated image to ask about. It samples exactly as the teacher makes
its queries (the run's sampler, steps and guidance; one noise key per seed), so the test query of
prompt P and seed q is the image `--prompt P --seed q` writes. The picture is written at the model's
own size (16x16 grey for the digits): `attrib query` and `Attributor.attribute` then read back the
model's pixels (to 8 bits) rather than a resampled copy.

With `--seeds 0-99` (or `0,3,7`) it writes one image per seed into a folder, sampled in batches,
each the image `--seed` would write, and a `queries.tsv` of `file<TAB>prompt` lines beside them:
`attrib query --queries OUT/queries.tsv` attributes them all. Files are named by prompt and seed, and
the list keeps the lines of earlier runs into the same folder (another prompt adds to it).
"""
from __future__ import annotations

import time

import numpy as np

from core import progress
from core.errors import ConfigError
from core.paths import as_path
from core.workdir import prepare_output_file, save_image_atomic, versions, write_result_if_writable


# Seeds sampled together by --seeds: one batch through the sampler's steps.
SEEDS_AT_ONCE = 64


def parse_seeds(text: str) -> list[int]:
  """'0-99', '0,3,7' or '0-9,20' -> the seeds in the order given, each once."""
  seeds = []
  for part in text.split(','):
    first, dash, last = part.strip().partition('-')
    try:
      span = range(int(first), int(last) + 1) if dash else [int(first)]
    except ValueError:
      raise ConfigError(f'--seeds {text!r}: expected seeds and ranges such as 0-99 or 0,3,7') from None
    if dash and not len(span):
      raise ConfigError(f'--seeds {text!r}: the range {part.strip()} is empty (write the lower seed first)')
    seeds += [s for s in span if s not in seeds]
  return seeds


def _file_stem(prompt: str) -> str:
  """A prompt as the start of a file name: letters and digits, the rest as single underscores."""
  import re
  return re.sub(r'[^0-9A-Za-z]+', '_', prompt).strip('_')[:48] or 'prompt'


def _load_model(workdir, tpu_path):
  from attrib.commands import DEFAULT_TPU, load_run
  from attrib.released import LATENTS_PREFIX
  config, trained_preset = load_run(workdir)
  if config.data.train_path.startswith(LATENTS_PREFIX):
    raise ConfigError(f'{workdir}: this U-Net denoises latents ({config.data.train_path}), which only the '
                      f"model's VAE turns into pictures; generate with diffusers and pass the image to attrib query")
  return config, tpu_path or trained_preset or DEFAULT_TPU


def generate_command(workdir: str, prompt: str, seed: int, out: str | None, tpu_path: str | None = None) -> dict:
  from attrib.commands import generate, restore_unet
  from attrib.text_encoder import shared_text_encoder
  workdir = as_path(workdir)
  config, tpu_path = _load_model(workdir, tpu_path)
  if seed < 0:
    raise ConfigError(f'--seed must be >= 0, got {seed}')
  out = prepare_output_file(out or workdir / 'generated.png')  # before the model is loaded
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


def generate_seeds_command(workdir: str, prompt: str, seeds: str, out: str | None,
                           tpu_path: str | None = None) -> dict:
  from attrib.commands import generate, restore_unet
  from attrib.text_encoder import shared_text_encoder
  from core.workdir import prepare_output_dir, write_bytes_atomic
  workdir = as_path(workdir)
  config, tpu_path = _load_model(workdir, tpu_path)
  seed_list = parse_seeds(seeds)
  if min(seed_list) < 0:
    raise ConfigError(f'--seeds must be >= 0, got {min(seed_list)}')
  folder = prepare_output_dir(out or workdir / 'generated', '--out' if out else 'the default --out')
  listing = folder / 'queries.tsv'
  earlier = listing.read_text().splitlines() if listing.is_file() else []
  started = time.time()
  text_encoder = shared_text_encoder(config.data.text_len)
  context = np.asarray(text_encoder([prompt])[0])
  uncond = np.asarray(text_encoder([''])[0][0])
  graphdef, params, _, _, step = restore_unet(workdir, config, tpu_path)
  progress.say(f'attrib generate: {len(seed_list)} images, {config.sample.method.upper()}, '
               f'{config.sample.num_steps} steps, guidance {config.sample.guidance}')
  names = [f'{_file_stem(prompt)}_seed{s}.png' for s in seed_list]
  for start in range(0, len(seed_list), SEEDS_AT_ONCE):
    batch = seed_list[start:start + SEEDS_AT_ONCE]
    images = generate(graphdef, params, config, np.repeat(context, len(batch), axis=0), uncond, seed=batch,
                      desc=f'seeds {start + 1}-{start + len(batch)} of {len(seed_list)}')
    for name, image in zip(names[start:start + len(batch)], images):
      pixels = ((image + 1) * 127.5).round().astype(np.uint8)
      save_image_atomic(folder / name, pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
  # The list keeps earlier runs' lines (a rerun of a seed replaces its line, as it replaced its file).
  written = set(names)
  kept = [line for line in earlier if line.split('\t', 1)[0] not in written]
  write_bytes_atomic(listing, ''.join(f'{line}\n' for line in kept + [f'{n}\t{prompt}' for n in names]).encode())
  progress.say(f'attrib generate: wrote {len(names)} images into {folder}; attribute them: launch.py attrib query '
               f'--workdir {workdir} --queries {listing}')
  return {'job': 'attrib generate', 'prompt': prompt, 'seeds': seed_list, 'out': str(folder),
          'queries': str(listing), 'model_step': step,
          'sampler': {'method': config.sample.method, 'num_steps': config.sample.num_steps,
                      'guidance': config.sample.guidance},
          'wall_s': time.time() - started, 'versions': versions()}
