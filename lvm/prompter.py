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
    if isinstance(images, (str, Path)) and (as_path(images).is_dir() or animation_frames(images) > 1):
      images = [images]  # a folder of frames, or an animated GIF, WebP or PNG: expanded below
    if isinstance(images, (str, Path, np.ndarray)) and not (isinstance(images, np.ndarray) and images.ndim == 4):
      raise ImageDataError('prompt images must be a list (or an [n, s, s, 3] array, a folder of frames or an animated '
                           'GIF, WebP or PNG), not one image')
    if not isinstance(images, np.ndarray):
      images = prompt_files(list(images))
    return np.stack([self._image(image, i) for i, image in enumerate(images)]) if len(images) else \
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
    # The sampler keeps the last frames that fit the model's context with the frame being made
    # (lvm/prompting.generate_frames): the first images of a longer prompt are not seen. Said, as an
    # in-context task whose first examples drop out answers from fewer examples than it was shown.
    seen = (self.config.model.max_seq_len - self.tokens_per_image) // self.tokens_per_image
    if len(prompt) > seen:
      progress.say(f'note: the model\'s context ({self.config.model.max_seq_len} tokens) holds {seen} images of '
                   f'{self.tokens_per_image} tokens and the one being made: the first {len(prompt) - seen} of the '
                   f'{len(prompt)} prompt images are not seen')
    context = self.tokenizer.encode(prompt).reshape(1, -1)
    new = generate_frames(self.params, self.config.model, context, frames=frames,
                          tokens_per_image=self.tokens_per_image, codebook_size=self.codebook_size,
                          temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, dtype=self.dtype)
    tokens = new.reshape(frames, self.tokens_per_image)
    return Generation(prompt=prompt, frames=self.tokenizer.decode(tokens), tokens=tokens)

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
