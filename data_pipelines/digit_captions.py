"""Built-in text-to-image data: scikit-learn's 1797 real handwritten digits, upscaled to 16x16, with
captions from a template plus attributes measured on each image ("a thick, right-slanted
handwritten seven"), so prompts say more than the class and a model has something to attend to.
"""
from __future__ import annotations

import numpy as np

from data_pipelines.digit_sentences import load_digits

WORDS = ('zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine')
IMAGE_SIZE = 16


def upscale(images_n88: np.ndarray) -> np.ndarray:
  """[n, 8, 8] grey levels 0..16 -> [n, 16, 16, 1] float32 in [-1, 1] (bilinear, edge-clamped)."""
  x = images_n88.astype(np.float32) / 16.0
  coords = (np.arange(IMAGE_SIZE) + 0.5) / 2 - 0.5
  lo = np.clip(np.floor(coords).astype(int), 0, 7)
  hi = np.clip(lo + 1, 0, 7)
  frac = np.clip(coords - lo, 0, 1)
  rows = x[:, lo, :] * (1 - frac)[None, :, None] + x[:, hi, :] * frac[None, :, None]
  out = rows[:, :, lo] * (1 - frac)[None, None, :] + rows[:, :, hi] * frac[None, None, :]
  return (out * 2 - 1)[..., None].astype(np.float32)


def attributes(images_n88: np.ndarray, labels: np.ndarray) -> list[str]:
  """'thick'/'thin' by ink relative to the class median; slant from the ink's x-y covariance."""
  ink = images_n88.reshape(len(images_n88), -1).sum(1).astype(np.float64)
  ys, xs = np.mgrid[0:8, 0:8]
  out = []
  for image, label, mass in zip(images_n88.astype(np.float64), labels, ink):
    class_ink = np.median(ink[labels == label])
    words = []
    if mass > 1.15 * class_ink:
      words.append('thick')
    elif mass < 0.85 * class_ink:
      words.append('thin')
    w = image / max(image.sum(), 1e-9)
    cx, cy = (w * xs).sum(), (w * ys).sum()
    slope = ((w * (xs - cx) * (ys - cy)).sum()) / max((w * (ys - cy) ** 2).sum(), 1e-9)
    if slope < -0.15:
      words.append('right-slanted')  # x grows as y goes up the image: leans right
    elif slope > 0.15:
      words.append('left-slanted')
    out.append(', '.join(words))
  return out


def caption(label: int, attribute: str) -> str:
  return f'a {attribute + " " if attribute else ""}handwritten {WORDS[int(label)]}'


def digit_captions() -> tuple[np.ndarray, np.ndarray, list[str]]:
  """(images [1797, 16, 16, 1] in [-1, 1], labels [1797], captions)."""
  images, labels = load_digits()
  return upscale(images), labels, [caption(l, a) for l, a in zip(labels, attributes(images, labels))]
