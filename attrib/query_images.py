"""A query image as the attributor's features take it, from whatever a user passes: a path (local or
gs://), a PIL image, or a numpy array. Anything else, an empty image, or values out of the model's
range is an `AttributionError` naming what was given, before any feature is computed.

  digit_pixels(image)  -> [16, 16, 1] float32 in [-1, 1]  (the built-in digits model's input)
  tower_image(image)   -> a PIL image                      (the DINO/CLIP towers resize and crop it)
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from core.errors import UserError
from core.paths import as_path, is_remote
from data_pipelines.image_sources import as_rgb

DIGIT_SIDE = 16


class AttributionError(UserError):
  """A query the attributor cannot take (wrong image shape or type, missing prompt, bad features)."""


def read_image(path):  # -> PIL.Image.Image
  from PIL import Image
  source = as_path(path) if is_remote(path) else path  # a URL other than gs:// refused as itself
  if as_path(path).is_dir():
    raise AttributionError(f'{path} is a folder: a query is one image (Attributor.attribute_batch takes many)')
  try:
    with source.open('rb') if is_remote(path) else open(path, 'rb') as f:
      opened = Image.open(f)
      opened.load()
  except (OSError, ValueError, Image.DecompressionBombError) as e:
    raise AttributionError(f'{path}: not a readable image ({e})') from None
  return _not_empty(opened, path)


def decode_image(data: bytes, what: str):  # -> PIL.Image.Image
  """An image file's bytes (a request's body), named `what` when they are not one."""
  import io
  from PIL import Image
  try:
    opened = Image.open(io.BytesIO(data))
    opened.load()
  except Image.UnidentifiedImageError:  # its message names a BytesIO object
    raise AttributionError(f'{what} ({len(data):,} bytes, starting {data[:8]!r}): not an image file of a '
                           'format Pillow reads (PNG, JPEG, WebP, ...)') from None
  except (OSError, ValueError, Image.DecompressionBombError) as e:
    raise AttributionError(f'{what} ({len(data):,} bytes): not a readable image ({e})') from None
  return _not_empty(opened, what)


def _not_empty(image, what):
  """An image with no pixels would be resized into a blank query that still gets an answer: refused."""
  size = image.size if not isinstance(image, np.ndarray) else image.shape[:2]
  if 0 in size:
    shown = f'of shape {image.shape}' if isinstance(image, np.ndarray) else f'of size {image.size[0]}x{image.size[1]}'
    raise AttributionError(f'{what} {shown} has no pixels')
  return image


def square_16(image):
  """A PIL image -> 16x16: the centred square of its short side, resized (bilinear). As the paper's
  resize-and-centre-crop, a wide or tall image is cropped, not squashed."""
  from PIL import Image
  w, h = image.size
  side = min(w, h)
  left, top = (w - side) // 2, (h - side) // 2
  return image.crop((left, top, left + side, top + side)).resize((DIGIT_SIDE, DIGIT_SIDE), Image.BILINEAR)


def tower_image(image):  # -> PIL.Image.Image
  """One query image for the full-scale towers (they resize and crop it themselves): a path, a PIL
  image, or uint8 [H, W, 3] / [H, W, 4] / [H, W] (RGBA as a PNG file of it: the paper's .convert('RGB'))."""
  from PIL import Image
  if isinstance(image, (str, Path)):
    return read_image(image)
  if isinstance(image, Image.Image):
    return _not_empty(image, 'image')
  if isinstance(image, np.ndarray) and image.dtype == np.uint8 and (
      image.ndim == 2 or (image.ndim == 3 and image.shape[-1] in (3, 4))):
    return Image.fromarray(_not_empty(image, 'image'))
  what = f'array of {image.dtype} {image.shape}' if isinstance(image, np.ndarray) else type(image).__name__
  raise AttributionError(f'image: expected a path, a PIL image or uint8 [H, W, 3] (or [H, W, 4], [H, W]), '
                         f'got {what}')


def digit_pixels(image) -> np.ndarray:
  """One query image -> [16, 16, 1] float32 in [-1, 1] (the digits model's input). uint8 arrays, PIL
  images and files of any size are cropped square and resized; float arrays are taken as the model's
  own pixels, so they must already be 16x16 in [-1, 1]."""
  from PIL import Image
  if isinstance(image, (str, Path)):
    image = read_image(image)
  if isinstance(image, np.ndarray):
    _not_empty(image, 'image')
  if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] in (3, 4):
    image = Image.fromarray(image)  # to grey as a PNG file of it would be (PIL's luma weights, alpha on white)
  if isinstance(image, Image.Image):
    # Any mode as the data pipelines read it (16-bit grey scaled, alpha on white), then PIL's grey.
    image = np.asarray(square_16(as_rgb(_not_empty(image, 'image')).convert('L')), np.uint8)
  if not isinstance(image, np.ndarray):
    raise AttributionError(f'image must be a numpy array, a PIL image or a path, got {type(image).__name__}')
  if image.dtype != np.uint8 and not np.issubdtype(image.dtype, np.floating):
    raise AttributionError(f'image dtype {image.dtype}: expected uint8 or float arrays (PIL images and '
                           'files of any bit depth are converted)')
  given = image.shape
  if image.ndim == 3 and image.shape[-1] in (1, 3):
    image = image.mean(axis=-1) if image.shape[-1] == 3 else image[..., 0]
  if image.ndim != 2:
    raise AttributionError(f'image of shape {given}: expected [H, W], [H, W, 1], [H, W, 3] (or uint8 [H, W, 4])')
  if image.dtype == np.uint8:
    if image.shape != (DIGIT_SIDE, DIGIT_SIDE):
      image = np.asarray(square_16(Image.fromarray(image)))
    image = image.astype(np.float32) / 127.5 - 1
  elif image.shape != (DIGIT_SIDE, DIGIT_SIDE):
    raise AttributionError(f'float image of shape {given}: the digits model takes {DIGIT_SIDE}x{DIGIT_SIDE} '
                           f'(pass uint8 or a PIL image to have it resized)')
  elif not np.all(np.isfinite(image)) or image.min() < -1.0001 or image.max() > 1.0001:
    raise AttributionError('float image values must be finite and in [-1, 1] (the model\'s pixel range)')
  return np.asarray(image, np.float32)[..., None]
