"""The Python API for prompting a trained LVM with images, as `Attributor` is for attribution:

    from lvm import Prompter
    lvm = Prompter.load('runs/lvm')                        # decoder + the tokenizer of its training data
    next_two = lvm.continue_sequence(['f1.png', 'f2.png', 'f3.png'], frames=2)  # float [2, s, s, 3] in [0, 1]
    b_prime = lvm.complete_analogy('a.png', 'a2.png', 'b.png')                 # [s, s, 3]
    y = lvm.solve_in_context([('x1.png', 'y1.png'), ('x2.png', 'y2.png')], 'xq.png')
    more = lvm.continue_sequence([*frames, *next_two], frames=1, temperature=0.8, top_p=0.9, seed=3)

The model and tokenizer are loaded once and the sampler compiled once per prompt length, so a
notebook's tenth prompt costs only its generation (each `launch.py lvm generate` loads both again).
`launch.py lvm generate` is this class plus a PNG grid. Images: paths, PIL images, uint8 arrays (grey,
RGB or RGBA, any size: resized and centre-cropped as the training images were) or float arrays
[s, s, 3] in [0, 1] at the tokenizer's size (what these methods return, so outputs chain as prompts);
a folder stands for its images in frame order (a video's frames: frame2.png before frame10.png), an
animated GIF, WebP or PNG for its frames.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import numpy as np

from core import progress
from core.config import ConfigError
from core.mesh import serving_preset
from core.paths import as_path
from data_pipelines.image_sources import (AnimationFrame, ImageDataError, animation_frames, array_to_rgb_square,
                                          load_image, prompt_files, to_rgb_square)
from lvm.prompting import check_prompt, check_same_tokenizer, generate_frames, tokenizer_of
from lvm.sampling import check_sampling


@dataclasses.dataclass(frozen=True)
class Generation:
  prompt: np.ndarray   # float32 [n, s, s, 3] in [0, 1]: the prompt images as the tokenizer saw them
  frames: np.ndarray   # float32 [frames, s, s, 3] in [0, 1]: the generated frames, decoded
  tokens: np.ndarray   # int32 [frames, tokens_per_image]: their codes


class Prompter:

  def __init__(self, workdir, config, params, tokenizer, tokenizer_dir, step: int, dtype: str = 'float32'):
    self.workdir, self.config, self.params, self.tokenizer = workdir, config, params, tokenizer
    self.tokenizer_dir, self.step, self.dtype = tokenizer_dir, step, dtype
    t = tokenizer.config.tokenizer
    self.image_size, self.tokens_per_image, self.codebook_size = t.image_size, t.tokens_per_image, t.codebook_size

  @classmethod
  def load(cls, workdir: str | Path, tokenizer: str | Path | None = None, tpu: str | None = None,
           dtype: str = 'float32') -> 'Prompter':
    """`workdir`: an `lvm train` / `import-hf` run (local or gs://). `tokenizer`: the tokenizer workdir,
    by default the one its training data's manifest names (refused if it is not the one that made
    them). `tpu`: a slice preset (default `core.mesh.serving_preset`). `dtype`: weights and KV cache, float32
    or bfloat16."""
    from lvm import commands
    from lvm.tokenizer_commands import load_tokenizer
    if dtype not in ('float32', 'bfloat16'):
      raise ConfigError(f"dtype {dtype!r}: choose 'float32' or 'bfloat16'")
    workdir = as_path(workdir)
    config, trained_tpu = commands.load_run_config(workdir)
    if config.data.train_path.startswith('builtin:'):  # any tokenizer's pictures of its tokens were noise
      raise ConfigError(f'{workdir} trained on {config.data.train_path}, one grey level per token, which no tokenizer '
                        'turns into pictures: prompt an LVM trained on `lvm tokenize` sentences (the quickstart\'s '
                        'runs/quickstart/lvm)')
    tpu = tpu or serving_preset(trained_tpu)  # the one device of a notebook, or the slice
    named_as = '--tokenizer' if tokenizer else 'the tokenizer at'
    tokenizer_dir = tokenizer or tokenizer_of(workdir, config)
    loaded = load_tokenizer(tokenizer_dir, tpu)
    check_same_tokenizer(workdir, config, tokenizer_dir, loaded.checksum, what=named_as)
    codebook = loaded.config.tokenizer.codebook_size
    if config.model.vocab_size < codebook:
      raise ConfigError(f'{workdir}: vocabulary {config.model.vocab_size} is smaller than the tokenizer\'s '
                        f'{codebook} codes ({tokenizer_dir}); not the tokenizer this model was trained with')
    _, params, _, _, step = commands.restore_params(workdir, config, tpu)
    return cls(workdir, config, jax.device_get(params), loaded, tokenizer_dir, step, dtype)

  def __repr__(self) -> str:
    return (f"Prompter('{self.workdir}': step {self.step}, {self.config.model.max_seq_len} tokens of context, "
            f"tokenizer {self.tokenizer_dir} ({self.image_size} px -> {self.tokens_per_image} codes of "
            f"{self.codebook_size}))")

  def images(self, images) -> np.ndarray:
    """Prompt images -> float32 [n, s, s, 3] in [0, 1], each checked (named by its position) first."""
    return self._decoded(self._entries(images))

  def _entries(self, images) -> list | np.ndarray:
    """A prompt's images as entries to decode (a folder or an animated file expanded into its frames),
    counted without decoding any."""
    if isinstance(images, (str, Path)) and (as_path(images).is_dir() or animation_frames(images) > 1):
      images = [images]  # a folder of frames, or an animated GIF, WebP or PNG: expanded below
    if isinstance(images, (str, Path, np.ndarray)) and not (isinstance(images, np.ndarray) and images.ndim == 4):
      raise ImageDataError('prompt images must be a list (or an [n, s, s, 3] array, a folder of frames or an animated '
                           'GIF, WebP or PNG), not one image')
    return images if isinstance(images, np.ndarray) else prompt_files(list(images))

  def _decoded(self, entries) -> np.ndarray:
    return np.stack([self._image(image, i) for i, image in enumerate(entries)]) if len(entries) else \
        np.zeros((0, self.image_size, self.image_size, 3), np.float32)

  def _image(self, image, i: int) -> np.ndarray:
    from PIL import Image
    s = self.image_size
    if isinstance(image, (str, Path, AnimationFrame)):
      return load_image(image, s)  # local or gs://
    if isinstance(image, Image.Image):
      return to_rgb_square(image, s)
    if not isinstance(image, np.ndarray):
      raise ImageDataError(f'prompt image {i} is a {type(image).__name__}: give a path, a PIL image or an array')
    if 0 in image.shape[:2]:
      raise ImageDataError(f'prompt image {i} of shape {image.shape} has no pixels')
    if image.dtype == np.uint8 and (image.ndim == 2 or (image.ndim == 3 and image.shape[-1] in (1, 3, 4))):
      return array_to_rgb_square(image, s)
    if np.issubdtype(image.dtype, np.floating):
      if image.shape != (s, s, 3):
        raise ImageDataError(f'prompt image {i}: a float array must be the tokenizer\'s own [{s}, {s}, 3] in '
                             f'[0, 1], got shape {image.shape} (pass uint8 or a PIL image to have it resized)')
      if not np.all(np.isfinite(image)) or image.min() < 0 or image.max() > 1:
        raise ImageDataError(f'prompt image {i}: float values must be in [0, 1], got [{image.min()}, {image.max()}]')
      return image.astype(np.float32)
    raise ImageDataError(f'prompt image {i}: dtype {image.dtype}, shape {image.shape}: expected uint8 [h, w], '
                         f'[h, w, 1|3|4] or float [{s}, {s}, 3] in [0, 1]')

  def generate(self, images, frames: int = 1, mode: str = 'sequence', *, temperature: float = 0.0,
               top_k: int = 0, top_p: float = 1.0, seed: int = 0) -> Generation:
    """The frames after `images` arranged for `mode` (lvm/prompting.py): sequence (`frames` new
    frames), analogy (A A' B -> B'), in-context (x1 y1 ... xq -> yq). temperature 0 = greedy."""
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
      raise ConfigError(f'frames must be an int >= 1, got {frames!r}')
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:  # JAX's own error named no argument
      raise ConfigError(f'seed must be an int >= 0, got {seed!r}')
    prompt = self.images(images)
    frames = check_prompt(mode, len(prompt), frames)
    check_sampling(temperature, top_k, top_p, self.config.model.vocab_size)
    self._note_unseen(len(prompt))
    return self._generate_rows([prompt], frames, [seed], dict(temperature=temperature, top_k=top_k, top_p=top_p))[0]

  def _note_unseen(self, count: int) -> None:
    # The sampler keeps the last frames that fit the model's context with the frame being made
    # (lvm/prompting.generate_frames): the first images of a longer prompt are not seen. Said, as an
    # in-context task whose first examples drop out answers from fewer examples than it was shown.
    seen = (self.config.model.max_seq_len - self.tokens_per_image) // self.tokens_per_image
    if count > seen:
      progress.say(f'note: the model\'s context ({self.config.model.max_seq_len} tokens) holds {seen} images of '
                   f'{self.tokens_per_image} tokens and the one being made: the first {count - seen} of the '
                   f'{count} prompt images are not seen')

  def _generate_rows(self, prompts: list[np.ndarray], frames: int, seeds: list[int], sampling: dict,
                     keep: int | None = None) -> list:
    """Prompts of one image count, generated together (row r samples with seeds[r] as it would alone);
    the first `keep` of them (the rest fill up a batch) decoded.
    The tokenizer encodes and decodes each prompt's images by themselves: XLA's convolutions round
    differently at another batch size, and a prompt's answer should not depend on its neighbours."""
    codes = {}
    for prompt in prompts:  # a batch filled up with copies of a prompt encodes it once
      if id(prompt) not in codes:
        codes[id(prompt)] = self.tokenizer.encode(prompt).reshape(-1)
    codes = np.stack([codes[id(prompt)] for prompt in prompts])
    new = generate_frames(self.params, self.config.model, codes, frames=frames, tokens_per_image=self.tokens_per_image,
                          codebook_size=self.codebook_size, seed=seeds[0] if len(seeds) == 1 else np.asarray(seeds),
                          dtype=self.dtype, **sampling)
    tokens = new.reshape(len(prompts), frames, self.tokens_per_image)
    return [Generation(prompt=p, frames=self.tokenizer.decode(t), tokens=t) for p, t in zip(prompts[:keep], tokens)]

  def generate_batch(self, prompts, frames: int = 1, mode: str = 'sequence', *, temperature: float = 0.0,
                     top_k: int = 0, top_p: float = 1.0, seed=0, batch_size: int = 16) -> list[Generation]:
    """Many prompts at once: item i is what `generate(prompts[i], frames, mode, seed=...)` returns (the
    same tokens and pictures), with prompts of one image count generated together, `batch_size` at a time (one model
    pass per token for the batch: faster than one prompt after another). `seed`: an int for every
    prompt (each then samples as it would alone with it), or one per prompt. Every prompt's arrangement
    is checked before any generation; `generate_iter` yields the answers batch by batch instead."""
    return [generation for _, generation in sorted(
        self.generate_iter(prompts, frames, mode, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                           batch_size=batch_size), key=lambda item: item[0])]

  def generate_iter(self, prompts, frames: int = 1, mode: str = 'sequence', *, temperature: float = 0.0,
                    top_k: int = 0, top_p: float = 1.0, seed=0, batch_size: int = 16):
    """`generate_batch` as (i, Generation) pairs, a batch at a time (prompts of one image count
    together, so not in list order): a list too long to hold its images and answers in memory at once
    is read and answered a batch at a time. The prompts are checked here, before the first batch."""
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
      raise ConfigError(f'frames must be an int >= 1, got {frames!r}')
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
      raise ConfigError(f'batch_size must be an int >= 1, got {batch_size!r}')
    if isinstance(prompts, (str, Path, np.ndarray)):
      raise ImageDataError('generate_batch takes a list of prompts, each a list of images (or a folder, an animated '
                           'file, an [n, s, s, 3] array): for one prompt, call generate')
    prompts = list(prompts)
    one_seed = isinstance(seed, (int, np.integer)) and not isinstance(seed, bool)
    seeds = [seed] * len(prompts) if one_seed else list(seed) if isinstance(seed, (list, tuple, np.ndarray)) else None
    bad_seed = lambda s: isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 0
    if seeds is None or len(seeds) != len(prompts) or any(bad_seed(s) for s in seeds):
      raise ConfigError(f'seed must be an int >= 0 or one per prompt ({len(prompts)}), got {seed!r}')
    check_sampling(temperature, top_k, top_p, self.config.model.vocab_size)
    entries = []
    for i, images in enumerate(prompts):
      try:
        entries.append(self._entries(images))
        check_prompt(mode, len(entries[-1]), frames)
      except (ImageDataError, ConfigError) as e:
        raise type(e)(f'prompt {i}: {e}') from None
    return self._batches(entries, frames, seeds, dict(temperature=temperature, top_k=top_k, top_p=top_p), batch_size)

  def _batches(self, entries: list, frames: int, seeds: list, sampling: dict, batch_size: int):
    by_count = {}
    for i, found in enumerate(entries):
      by_count.setdefault(len(found), []).append(i)
    for count, members in sorted(by_count.items()):
      self._note_unseen(count)
      for start in range(0, len(members), batch_size):
        rows = members[start:start + batch_size]
        # The last batch of a longer list is filled up with its first row's copies (dropped), so one
        # program, compiled once, decodes every batch of this prompt length.
        filled = rows + rows[:1] * (batch_size - len(rows)) if len(members) > batch_size else rows
        decoded = {}
        for i in rows:
          try:
            decoded[i] = self._decoded(entries[i])
          except ImageDataError as e:
            raise ImageDataError(f'prompt {i}: {e}') from None
        generations = self._generate_rows([decoded[i] for i in filled], frames, [seeds[i] for i in filled], sampling,
                                          keep=len(rows))
        yield from zip(rows, generations)

  def continue_sequence(self, images, frames: int = 1, **sampling) -> np.ndarray:
    """The next `frames` frames of a sequence (a video's frames, a rotating digit): [frames, s, s, 3]."""
    return self.generate(images, frames, 'sequence', **sampling).frames

  def complete_analogy(self, a, a_prime, b, **sampling) -> np.ndarray:
    """A : A' :: B : ?  ->  B' [s, s, 3]."""
    return self.generate([a, a_prime, b], 1, 'analogy', **sampling).frames[0]

  def solve_in_context(self, examples, query, **sampling) -> np.ndarray:
    """Pairs (x, y) of a task shown by example, then x of the query -> its y [s, s, 3]."""
    pairs = list(examples)
    if not pairs or any(not isinstance(p, (tuple, list)) or len(p) != 2 for p in pairs):
      raise ConfigError('examples must be one or more (x, y) pairs of images')
    return self.generate([image for pair in pairs for image in pair] + [query], 1, 'in-context', **sampling).frames[0]
