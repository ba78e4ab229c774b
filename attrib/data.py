"""The captioned training set of a diffusion run, its text states, and held-out query prompts."""
from __future__ import annotations

from core.errors import ConfigError
from core.paths import as_path
from core.workdir import load_npy, save_npy_atomic

import hashlib
from pathlib import Path

import numpy as np

from attrib.config import ImageDataConfig


class CaptionedImages:
  """Training images with their captions' text-encoder states (computed once, cached in workdir)."""

  def __init__(self, config: ImageDataConfig, text_encoder, cache_dir: Path | None = None):
    if config.train_path != 'builtin:digits':
      raise ConfigError(f"data.train_path {config.train_path!r}: only 'builtin:digits' is available so far")
    from data_pipelines.digit_captions import digit_captions
    images, labels, captions = digit_captions()
    if not 0 < config.held_out < len(images):
      raise ConfigError(f'data.held_out must be in (0, {len(images)})')
    cut = len(images) - config.held_out
    self.images, self.labels, self.captions = images[:cut], labels[:cut], captions[:cut]
    self.held_out_images, self.held_out_labels = images[cut:], labels[cut:]
    self.held_out_captions = captions[cut:]
    self.index = np.arange(cut)  # training-set ids, stable across exclusions
    keep = np.setdiff1d(self.index, read_index_file(config.exclude_path, cut)) if config.exclude_path else None
    self.text_encoder = text_encoder
    # The whole training set's states, then the kept rows: a run without some images (the
    # counterfactual's retrainings) conditions on exactly its parent's states and shares their cache.
    self.context = self._encode(self.captions, cache_dir)
    if keep is not None:
      self.images, self.labels, self.index = self.images[keep], self.labels[keep], self.index[keep]
      self.captions, self.context = [self.captions[i] for i in keep], self.context[keep]
    self.uncond = np.asarray(text_encoder([''])[0][0])

  def _encode(self, captions, cache_dir):
    digest = hashlib.sha1('\n'.join(captions).encode()).hexdigest()[:12]
    cache = cache_dir / f'text_states_{digest}.npy' if cache_dir else None
    if cache is not None and cache.exists():
      return load_npy(cache)
    states = np.concatenate([np.asarray(self.text_encoder(captions[i:i + 256])[0])
                             for i in range(0, len(captions), 256)])
    if cache is not None:
      cache.parent.mkdir(parents=True, exist_ok=True)
      save_npy_atomic(cache, states)
    return states

  def __len__(self) -> int:
    return len(self.images)

  def __getitem__(self, i: int) -> dict:
    i = int(i) % len(self)
    return {'images': self.images[i], 'context': self.context[i]}


def read_index_file(path: str, size: int | None, what: str = 'data.exclude_path') -> np.ndarray:
  """Sorted distinct training ids of a file (comma or newline separated), each in [0, size) unless size is None."""
  source = as_path(path)  # local or gs://
  if not source.is_file():
    raise ConfigError(f'{what} {path}: no such file (expected comma/newline-separated training image ids)')
  text = source.read_text().replace('\n', ',')
  try:
    ids = np.array(sorted({int(x) for x in text.split(',') if x.strip()}), np.int64)
  except ValueError as e:
    raise ConfigError(f'{path}: expected comma/newline-separated training image ids ({e})') from None
  if size is not None and len(ids) and (ids.min() < 0 or ids.max() >= size):
    raise ConfigError(f'{path}: ids must be in [0, {size}), got {ids.min()}..{ids.max()}')
  return ids


class CaptionDropout:
  """grain map_with_index: adds the per-example seed and drops captions for guidance training."""

  def __init__(self, uncond: np.ndarray, probability: float):
    self.uncond, self.probability = uncond, probability

  def __call__(self, index: int, record: dict) -> dict:
    # A cheap deterministic hash of the stream position (same on every host and every rerun).
    drop = ((index * 2654435761) % 2**32) / 2**32 < self.probability
    return {'images': record['images'], 'context': self.uncond if drop else record['context'],
            'seed': np.int32(index % 2**31)}
