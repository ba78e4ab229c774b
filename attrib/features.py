"""Base features φ of training images and queries: what the student starts from.

Full scale (FastGDA, fastgda.md §3): DINO ViT-B/16 CLS ⊕ CLIP ViT-B/32 text, concatenated raw. The
built-in digits have no downloadable weights, so their candidates are features that need none,
each stored L2-normalised so that concatenated parts weigh alike:

  pixels  the 16×16 image itself (256-d)
  unet    the trained diffusion model's bottleneck, averaged over space, on the clean image with the
          empty prompt (64-d): the generator's own view of an image
  text    MiniLM sentence embedding of the caption (training image) or prompt (query) (384-d)
  a+b     concatenation of parts, e.g. `unet+text`

`launch.py attrib features --workdir DIR` writes FastGDA's layout, one directory per feature:
WORKDIR/features/<name>/{data_feats, train_query_feats, test_query_feats}.npy. Each file is computed
in batches sharded over the mesh, written atomically, and skipped when present (rerun = resume).
"""
from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attrib.student_data import FEATURE_FILES
from core import progress
from core.batching import map_batches
from core.errors import ConfigError
from core.paths import as_path, is_remote
from core.workdir import load_npz, npy_shape, save_npy_atomic

DIGIT_PARTS = ('pixels', 'unet', 'text')


def parts_of(name: str) -> list[str]:
  parts = name.split('+')
  unknown = [p for p in parts if p not in DIGIT_PARTS]
  if unknown or not name:
    raise ConfigError(f'feature {name!r}: unknown part(s) {unknown}; digits features are {DIGIT_PARTS} '
                      f"joined by '+', e.g. 'unet+text'")
  return parts


def _unit(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float32).reshape(len(x), -1)
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class DigitFeaturizer:
  """φ parts for images [b, 16, 16, 1] in [-1, 1] and their texts, from a diffusion workdir."""

  def __init__(self, workdir):
    from attrib.commands import load_run, restore_unet
    from attrib.text_encoder import shared_text_encoder
    self.config, tpu = load_run(workdir)
    self.graphdef, self.params, self.mesh, preset, _ = restore_unet(workdir, self.config, tpu)
    self.rules = preset.logical_rules
    self.text_encoder = shared_text_encoder(self.config.data.text_len)
    uncond = jnp.asarray(self.text_encoder([''])[0][0])
    graphdef = self.graphdef

    @jax.jit
    def unet_features(params, images):
      context = jnp.broadcast_to(uncond, (images.shape[0],) + uncond.shape)
      model = nnx.merge(graphdef, params)
      return model.mid_block_features(images, jnp.zeros((images.shape[0],), jnp.int32), context)
    self._unet = unet_features

  def part(self, name: str, images: np.ndarray, texts: list[str]) -> np.ndarray:
    if name == 'pixels':
      return _unit(images)
    if name == 'text':
      return np.concatenate([np.asarray(self.text_encoder.sentence_embedding(texts[i:i + 256]))
                             for i in range(0, len(texts), 256)]).astype(np.float32)
    return _unit(map_batches(lambda x: self._unet(self.params, x), images, self.mesh, self.rules))

  def __call__(self, name: str, images: np.ndarray, texts: list[str]) -> np.ndarray:
    return np.concatenate([self.part(p, images, texts) for p in parts_of(name)], axis=1)


def digit_feature_sets(workdir) -> dict[str, tuple[np.ndarray, list[str]] | None]:
  """(images, texts) of the training set and of each query split that the teacher has generated."""
  from attrib.commands import load_run
  from attrib.curation import SPLIT_DIRS
  from data_pipelines.digit_captions import digit_captions
  workdir = as_path(workdir)
  config, _ = load_run(workdir)
  images, _, captions = digit_captions()
  cut = len(images) - config.data.held_out
  sets = {'train': (images[:cut], list(captions[:cut]))}
  for split, which in (('train', 'train_queries'), ('test', 'test_queries')):
    path = workdir / SPLIT_DIRS[split] / 'queries.npz'
    if path.exists():
      stored = load_npz(path)
      sets[which] = (stored['images'], [str(p) for p in stored['prompts']])
    else:
      sets[which] = None
  return sets


def features_command(workdir: str, names: list[str]) -> dict:
  """Writes every requested feature of the training set and of the queries generated so far."""
  workdir = as_path(workdir)
  for name in names:
    parts_of(name)
  featurizer = DigitFeaturizer(workdir)
  sets = digit_feature_sets(workdir)
  written, skipped = [], []
  for name in names:
    out = workdir / 'features' / name
    out.mkdir(parents=True, exist_ok=True)
    for which, data in sets.items():
      path = out / FEATURE_FILES[which]
      if data is None:
        skipped.append(f'{name}/{which} (no queries yet: run attrib teacher --split '
                       f'{"train" if which == "train_queries" else "test"})')
        continue
      images, texts = data
      if (npy_shape(path) or (None,))[0] == len(images):  # written by an earlier run
        continue
      progress.say(f'features: {name} of {len(images)} {which.replace("_", " ")}')
      save_npy_atomic(path, featurizer(name, images, texts))
      written.append(str(path))
  for line in skipped:
    progress.say(f'features: skipped {line}')
  return {'job': 'attrib features', 'features': names, 'written': written, 'skipped': skipped,
          'directory': str(workdir / 'features')}


# ---------------------------------------------------------------- full scale: DINO + CLIP towers

TOWER_PARTS = ('dino', 'clip', 'clip_text')


class TowerFeaturizer:
  """FastGDA's φ parts from imported checkpoints: 'dino' (ViT-B/16 CLS, 768), 'clip' (image, 512) and
  'clip_text' (512); a name like 'dino+clip_text' concatenates them raw, as the paper does."""

  def __init__(self, dino_dir: str | None, clip_dir: str | None, mesh, rules, batch: int = 64):
    from attrib.vision_towers import ClipTokenizer, load_tower
    self.mesh, self.rules, self.batch = mesh, rules, batch
    self.dino = load_tower(dino_dir, 'dino') if dino_dir else None
    self.clip_vision = load_tower(clip_dir, 'clip_vision') if clip_dir else None
    self.clip_text = load_tower(clip_dir, 'clip_text') if clip_dir else None
    self.tokenizer = ClipTokenizer(clip_dir) if clip_dir else None

  def part(self, name: str, images: list, texts: list[str]) -> np.ndarray:
    from attrib.vision_towers import preprocess_clip, preprocess_dino
    tower = {'dino': self.dino, 'clip': self.clip_vision, 'clip_text': self.clip_text}[name]
    if tower is None:
      raise ConfigError(f"feature part {name!r} needs the {'--dino' if name == 'dino' else '--clip'} checkpoint")
    apply, params, _ = tower
    if name == 'clip_text':
      ids, mask = self.tokenizer(texts)
      rows = np.concatenate([ids, mask], axis=1)
      t = ids.shape[1]
      return map_batches(lambda r: apply(params, r[:, :t], r[:, t:]), rows, self.mesh, self.rules, self.batch)
    prepare = preprocess_dino if name == 'dino' else preprocess_clip
    out = []
    for start in range(0, len(images), self.batch):  # decode and preprocess one batch at a time
      pixels = np.stack([prepare(_open_image(i)) for i in images[start:start + self.batch]])
      out.append(map_batches(lambda x: apply(params, x), pixels, self.mesh, self.rules, self.batch))
    return np.concatenate(out).astype(np.float32)

  def __call__(self, name: str, images: list, texts: list[str]) -> np.ndarray:
    parts = name.split('+')
    unknown = [p for p in parts if p not in TOWER_PARTS]
    if unknown:
      raise ConfigError(f'feature {name!r}: unknown part(s) {unknown}; full-scale parts are {TOWER_PARTS}')
    return np.concatenate([self.part(p, images, texts) for p in parts], axis=1)


def _open_image(image):
  from PIL import Image
  if isinstance(image, Image.Image):
    return image
  try:
    if is_remote(image):
      with as_path(image).open('rb') as f:
        opened = Image.open(f)
        opened.load()
      return opened
    opened = Image.open(image)
    opened.load()
    return opened
  except (OSError, ValueError) as e:
    raise ConfigError(f'{image}: not a readable image ({e})') from None


def read_image_list(path: str | Path) -> tuple[list[str], list[str]]:
  """A TSV of `image path<TAB>caption` lines (relative paths are taken from the list's folder); the
  list and the images may be local or gs://."""
  path = as_path(path)
  if not path.is_file():
    raise ConfigError(f'{path} not found (expected lines of: image path <TAB> caption)')
  images, captions = [], []
  for number, line in enumerate(path.read_text().splitlines(), 1):
    if not line.strip():
      continue
    if '\t' not in line:
      raise ConfigError(f'{path}:{number}: expected `image path<TAB>caption`, got {line[:80]!r}')
    image, caption = line.split('\t', 1)
    image_path = as_path(image) if is_remote(image) or Path(image).is_absolute() else path.parent / image
    if not image_path.is_file():
      raise ConfigError(f'{path}:{number}: image {image_path} not found')
    images.append(str(image_path))
    captions.append(caption)
  if not images:
    raise ConfigError(f'{path}: no images listed')
  return images, captions


def tower_features_command(workdir: str, names: list[str], dino_dir: str | None, clip_dir: str | None,
                           lists: dict[str, str], tpu_path: str) -> dict:
  """Full-scale φ for image lists (training set, training queries, test queries) into
  WORKDIR/features/<name>/ in FastGDA's layout; files already written are kept (resume)."""
  from core.mesh import load_preset, make_mesh
  sets = {which: read_image_list(path) for which, path in lists.items() if path}  # all lists checked first
  if 'train' not in sets:
    raise ConfigError('--train-list is required (the training images and their first captions)')
  preset = load_preset(tpu_path)
  featurizer = TowerFeaturizer(dino_dir, clip_dir, make_mesh(preset), preset.logical_rules)
  written = []
  for name in names:
    out = as_path(workdir) / 'features' / name
    out.mkdir(parents=True, exist_ok=True)
    for which, (images, captions) in sets.items():
      path = out / FEATURE_FILES[which]
      if (npy_shape(path) or (None,))[0] == len(images):  # written by an earlier run
        continue
      progress.say(f'features: {name} of {len(images)} {which.replace("_", " ")}')
      save_npy_atomic(path, featurizer(name, images, captions))
      written.append(str(path))
  return {'job': 'attrib features', 'features': names, 'written': written,
          'directory': str(as_path(workdir) / 'features')}
