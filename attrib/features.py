"""Base features φ of training images and queries: what the student starts from.

Full scale (FastGDA, fastgda.md §3): DINO ViT-B/16 CLS ⊕ CLIP ViT-B/32 text, concatenated raw
(attrib/tower_features.py). The built-in digits have no downloadable weights, so their candidates
are features that need none, each stored L2-normalised so that concatenated parts weigh alike:

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

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attrib.student_data import FEATURE_FILES
from core import progress
from core.batching import map_batches
from core.errors import ConfigError
from core.paths import as_path
from core.workdir import load_npz, npy_shape, save_npy_atomic

DIGIT_PARTS = ('pixels', 'unet', 'text')


def parts_of(name: str) -> list[str]:
  parts = name.split('+')
  unknown = [p for p in parts if p not in DIGIT_PARTS]
  if unknown or not name:
    raise ConfigError(f'feature {name!r}: unknown part(s) {unknown}; digits features are {DIGIT_PARTS} '
                      f"joined by '+', e.g. 'unet+text'")
  refuse_repeated_parts(name, parts)
  return parts


def refuse_repeated_parts(name: str, parts: list[str]) -> None:
  """'unet+unet' is a typo, not a feature: the same columns twice would only double their weight."""
  repeated = sorted({p for p in parts if parts.count(p) > 1})
  if repeated:
    raise ConfigError(f'feature {name!r} names {repeated} more than once; each part once, e.g. '
                      f"{'+'.join(dict.fromkeys(parts))!r}")


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
