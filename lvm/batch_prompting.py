"""`launch.py lvm generate --prompts list.txt`: many prompts in one run (an in-context task over a
test set, the next frames of many clips), answered in batches by `Prompter.generate_iter`.

The list holds one prompt per line, its images as `--prompt` takes them (shell quoting for a name
with spaces; a folder stands for its frames, an animated GIF, WebP or PNG for its frames; relative
paths count from the list's folder, gs:// too); blank lines and `#` comments are skipped. Every line is
checked first (its files exist and open, its image count suits --mode), naming the line, before the
model loads. Each line is answered as `lvm generate --prompt <its images>` would answer it alone
(the same seed, the same tokens), but prompts of one image count run together, --batch-size at a
time. Into OUT: each prompt's generated frames (00001_frame1.png, ... at the tokenizer's size),
results.jsonl (one JSON object per prompt in list order, its images as read: a folder's frames, an
animation's `clip.gif[frame i]`; written whole at the end: a failed run leaves an earlier one as it
was) and with --grids OUT/grids/00001.png (prompt | generation). With --samples N, N candidates of
every line (sample s with --seed + s - 1), OUT/00001_s1_frame1.png ... and a grid row each.
"""
from __future__ import annotations

import json
import shlex
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from core.config import ConfigError
from core.paths import as_path, is_remote
from core.workdir import prepare_output_dir, save_image_atomic, versions, write_bytes_atomic, write_result_if_writable


def read_prompt_list(listing) -> tuple[list[list[str]], list[int]]:
  """The prompts of a list file, each a list of image paths, and each one's line number."""
  listing = as_path(listing)
  if not listing.is_file():
    raise ConfigError(f'--prompts {listing}: not found (expected one prompt per line: its image paths)')
  prompts, lines = [], []
  for number, line in enumerate(listing.read_text().removeprefix('\ufeff').splitlines(), 1):
    try:
      words = shlex.split(line, comments=True)
    except ValueError as e:  # an unclosed quote
      raise ConfigError(f'{listing}:{number}: {e} in {line[:80]!r}') from None
    if words:
      prompts.append([w if is_remote(w) or Path(w).is_absolute() else str(listing.parent / w) for w in words])
      lines.append(number)
  if not prompts:
    raise ConfigError(f'--prompts {listing}: no prompts listed (one per line: its image paths)')
  return prompts, lines


def check_prompt_list(listing, prompts: list[list[str]], lines: list[int], mode: str, frames: int) -> list[list]:
  """Every line's arrangement for `mode` and every file it names (a header read: it exists and is an
  image), named by its line, in threads (on gs:// each check is a round trip). Returns the prompts with
  each folder and animated file expanded into its frames."""
  from data_pipelines.image_sources import AnimationFrame, ImageDataError, check_image_file, prompt_files
  from lvm.prompting import check_prompt
  files, expanded = [], []
  for prompt, line in zip(prompts, lines):
    try:
      expanded.append(prompt_files(prompt))
      check_prompt(mode, len(expanded[-1]), frames)
    except (ImageDataError, ConfigError) as e:
      raise type(e)(f'{listing}:{line}: {e}') from None
    files += [(entry, line) for entry in expanded[-1] if not isinstance(entry, AnimationFrame)]

  def problem(item):
    try:
      check_image_file(item[0])
    except ImageDataError as e:
      return f'{listing}:{item[1]}: {e}'
  with ThreadPoolExecutor(16) as pool:
    found = next((p for p in pool.map(problem, files) if p), None)
  if found:
    raise ImageDataError(found)
  return expanded


def batch_generate_command(workdir: str, listing: str, frames: int, out: str | None, *, mode: str = 'sequence',
                           grids: bool = False, batch_size: int = 16, tokenizer_dir: str | None = None,
                           temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                           dtype: str = 'float32', tpu_path: str | None = None, samples: int = 1) -> dict:
  """`samples` > 1: that many candidates of every line, sample s with seed + s - 1 (as `lvm generate
  --prompt <its images> --seed seed+s-1` alone), into OUT/00001_s2_frame1.png, ...; one results.jsonl
  line per candidate, and a grid per prompt with a row per candidate."""
  from core import progress
  from core.config import check_at_least
  from lvm import commands
  from lvm.prompter import Prompter
  from lvm.prompting import check_samples, grid_png
  from lvm.sampling import check_sampling
  check_samples(samples, temperature)
  check_at_least(1, frames=frames, batch_size=batch_size)
  started = time.time()
  workdir = as_path(workdir)
  config, _ = commands.load_run_config(workdir)
  check_sampling(temperature, top_k, top_p, config.model.vocab_size)
  prompts, lines = read_prompt_list(listing)
  prompts = check_prompt_list(as_path(listing), prompts, lines, mode, frames)
  out_dir = prepare_output_dir(out if out else workdir / 'generations', '--out' if out else 'the default --out')
  grid_dir = prepare_output_dir(out_dir / 'grids', '--out') if grids else None
  prompter = Prompter.load(workdir, tokenizer_dir, tpu_path, dtype)
  candidates = [p for p in prompts for _ in range(samples)]  # prompt i's candidate s at i * samples + s
  answers = prompter.generate_iter(candidates, frames, mode, temperature=temperature, top_k=top_k, top_p=top_p,
                                   seed=[seed + s for _ in prompts for s in range(samples)], batch_size=batch_size)
  records, rows = [None] * len(candidates), {}  # rows: a prompt's candidates until its grid has them all
  for j, generation in progress.bar(answers, total=len(candidates), desc='prompts', unit='prompt',
                                    enabled=len(candidates) > batch_size):
    i, s = divmod(j, samples)
    number = i + 1
    stem = f'{number:05d}' if samples == 1 else f'{number:05d}_s{s + 1}'
    pngs = [out_dir / f'{stem}_frame{f + 1}.png' for f in range(frames)]
    for png, picture in zip(pngs, generation.frames):
      save_image_atomic(png, (np.clip(picture, 0, 1) * 255).round().astype(np.uint8))
    grid = None
    if grid_dir is not None:
      grid = grid_dir / f'{number:05d}.png'
      rows.setdefault(i, {})[s] = np.concatenate([generation.prompt, generation.frames])
      if len(rows[i]) == samples:
        grid_png([rows[i][c] for c in range(samples)], len(generation.prompt), grid)
        del rows[i]
    records[j] = {'prompt': number, 'line': lines[i], 'sample': s + 1, 'seed': seed + s,
                  'images': [str(p) for p in prompts[i]], 'frames': [str(p) for p in pngs],
                  'grid': None if grid is None else str(grid), 'tokens': generation.tokens.tolist()}
  results = out_dir / 'results.jsonl'
  write_bytes_atomic(results, ''.join(json.dumps(r) + '\n' for r in records).encode())
  wall = time.time() - started
  result = {'job': 'lvm generate', 'mode': mode, 'list': str(listing), 'prompts': len(prompts), 'frames': frames,
            'step': prompter.step, 'tokenizer': str(prompter.tokenizer_dir), 'temperature': temperature,
            'top_k': top_k, 'top_p': top_p, 'seed': seed, 'samples': samples, 'batch_size': batch_size,
            'out': str(out_dir),
            'results': str(results), 'grids': None if grid_dir is None else str(grid_dir),
            'first': {k: v for k, v in records[0].items() if k != 'tokens'}, 'wall_s': wall, 'versions': versions()}
  write_result_if_writable(workdir / 'generate_result.json', result)
  return result
