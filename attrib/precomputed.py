"""Training sets and queries given as precomputed latents and text states (FastGDA's released MSCOCO data).

Layout of a directory (as `prepare_latents_text_embeds.py` / `generate_samples.py` of FastGDA write it):
  latents.npy           [R, C, S, S] float   VAE latents × scaling factor, NCHW. Training sets hold
                                             R = 2N rows: N images, then the same N flipped
                                             horizontally; query sets hold R = Q rows.
  text_embeddings.npy   [N, K, L, D] float   K captions' token states per image (K = 5 for COCO
                                             training images, 1 for queries); [N, L, D] means K = 1.
Both files are memory-mapped: a 118k-image set (37 GB of text states per caption) is read one batch
of rows at a time.
"""
from __future__ import annotations

from core.errors import UserError

from pathlib import Path

import numpy as np

from attrib.unet_config import UNetConfig

LATENTS, TEXT = 'latents.npy', 'text_embeddings.npy'


class PrecomputedDataError(UserError):
  pass


class LazyRows:
  """rows -> array, read on indexing: `view[idx]` is `fetch(idx)`; a stand-in for an in-memory array."""

  def __init__(self, fetch, length: int):
    self._fetch, self._length = fetch, length

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, idx) -> np.ndarray:
    idx = np.asarray(idx)
    # np.memmap fancy indexing is fastest on sorted rows; the result is put back in request order.
    order = np.argsort(idx, kind='stable')
    out = self._fetch(idx[order])
    result = np.empty_like(out)
    result[order] = out
    return result


class PrecomputedLatents:
  """A directory of latents + text states, checked against the U-Net config before any compute."""

  def __init__(self, directory: str | Path, unet: UNetConfig, *, flipped_copies: bool):
    self.directory = Path(directory)
    latents_path, text_path = self.directory / LATENTS, self.directory / TEXT
    for path in (latents_path, text_path):
      if not path.is_file():
        raise PrecomputedDataError(f'{path} not found (expected {LATENTS} and {TEXT} in {self.directory})')
    try:
      self.latents = np.load(latents_path, mmap_mode='r')
      text = np.load(text_path, mmap_mode='r')
    except ValueError as e:
      raise PrecomputedDataError(f'{self.directory}: cannot read the .npy files ({e})') from None
    self.text = text[:, None] if text.ndim == 3 else text
    expected = (unet.in_channels, unet.sample_size, unet.sample_size)
    if self.latents.ndim != 4 or tuple(self.latents.shape[1:]) != expected:
      raise PrecomputedDataError(f'{latents_path}: shape {self.latents.shape}, expected [rows, {expected[0]}, '
                                 f'{expected[1]}, {expected[2]}] for unet.in_channels/sample_size')
    if self.text.ndim != 4 or self.text.shape[-1] != unet.cross_attention_dim:
      raise PrecomputedDataError(f'{text_path}: shape {text.shape}, expected [images, captions, tokens, '
                                 f'{unet.cross_attention_dim}] (unet.cross_attention_dim)')
    for path, array in ((latents_path, self.latents), (text_path, self.text)):
      if not np.issubdtype(array.dtype, np.floating):
        raise PrecomputedDataError(f'{path}: dtype {array.dtype}, expected floating point')
    self.num_images, self.num_captions = self.text.shape[0], self.text.shape[1]
    self.num_flips = len(self.latents) // max(self.num_images, 1)
    allowed = (1, 2) if flipped_copies else (1,)
    if self.num_images == 0 or self.num_flips not in allowed or len(self.latents) != self.num_flips * self.num_images:
      want = f'{self.num_images} or {2 * self.num_images}' if flipped_copies else f'{self.num_images}'
      raise PrecomputedDataError(f'{latents_path}: {len(self.latents)} rows for {self.num_images} images in '
                                 f'{text_path}; expected {want}')
    self.text_len = self.text.shape[2]

  def latent_rows(self) -> LazyRows:
    """Rows [0, flips·N) -> NHWC float32 latents."""
    fetch = lambda rows: np.asarray(self.latents[rows], np.float32).transpose(0, 2, 3, 1)
    return LazyRows(fetch, len(self.latents))

  def text_rows(self, caption: int) -> LazyRows:
    """Image ids [0, N) -> float32 token states of their caption `caption`."""
    return LazyRows(lambda ids: np.asarray(self.text[ids, caption], np.float32), self.num_images)

  def features(self) -> np.ndarray:
    """Cheap base features for picking candidates without a neighbour file: unit latent ⊕ unit mean text.

    Reads every unflipped latent and first caption once, a chunk of rows at a time.
    """
    latents = np.asarray(self.latents[:self.num_images], np.float32).reshape(self.num_images, -1)
    text = np.concatenate([np.asarray(self.text[start:start + 4096, 0], np.float32).mean(axis=1)
                           for start in range(0, self.num_images, 4096)])
    unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return np.concatenate([unit(latents), unit(text)], axis=1) / np.sqrt(2)
