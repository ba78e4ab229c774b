"""Annotated images for LVM's pair sentences [image, label] x n (`lvm tokenize --labels DIR`).

A label is an image file in the labels folder at the same relative path as its image, with the same
name stem and any image suffix (photos/cat/1.jpg <-> labels/cat/1.png): segmentation masks, depth or
normal maps, edges, keypoint renderings: any dense annotation drawn as a picture, as LVM's pairs are.

A label is resized with nearest-neighbour sampling (a class colour never blends into its neighbour's)
and centre-cropped exactly as its image, so the two stay pixel-aligned; a label whose aspect ratio
differs from its image's could not be aligned and is refused by name. Palette PNGs (PASCAL VOC's masks)
keep their palette's colours; `ids=True` paints the integer values of grey-level masks (ADE20K's class
ids 0-150 are nearly black as pictures, and a tokenizer would see black) with PASCAL VOC's colour map,
the palette of LVM's recoloured segmentations.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses

import numpy as np

from core import progress
from core.paths import is_remote
from data_pipelines.image_sources import (IMAGE_SUFFIXES, ImageDataError, _files_under, _folder, _os_metadata,
                                          as_8bit, as_rgb)

ASPECT_TOLERANCE = 0.02  # relative: a label saved at a rounded-down smaller size still aligns


def voc_colormap() -> np.ndarray:
  """uint8 [256, 3]: PASCAL VOC's colour of each class id (the bits of the id spread over R, G, B)."""
  colours = np.zeros((256, 3), np.uint8)
  for index in range(256):
    value, r, g, b = index, 0, 0, 0
    for bit in range(8):
      r |= ((value >> 0) & 1) << (7 - bit)
      g |= ((value >> 1) & 1) << (7 - bit)
      b |= ((value >> 2) & 1) << (7 - bit)
      value >>= 3
    colours[index] = (r, g, b)
  return colours


def _label_picture(image, ids: bool):
  """A PIL label -> RGB PIL image: class ids painted with VOC's colours (`ids`), else as it looks."""
  from PIL import Image
  if not ids:
    return as_rgb(image)
  values = np.asarray(image)  # a palette image's indices, a grey image's levels
  if values.ndim != 2:
    raise ValueError(f'class ids need a one-channel image (grey levels or a palette), got mode {image.mode}')
  if values.min() < 0 or values.max() > 255:
    raise ValueError(f'class ids must be in [0, 255], got [{values.min()}, {values.max()}]')
  return Image.fromarray(voc_colormap()[values.astype(np.uint8)])


def upright_size(path) -> tuple[int, int]:
  """(width, height) of an image file as the source reads it: turned by its EXIF orientation."""
  from data_pipelines.image_sources import _read_pil
  def size(image):
    w, h = image.size
    return (h, w) if image.getexif().get(0x0112, 1) in (5, 6, 7, 8) else (w, h)  # a quarter turn
  return _read_pil(path, size)


def load_label(label_path, image_wh: tuple[int, int], size: int, ids: bool = False) -> np.ndarray:
  """A label file -> float32 [size, size, 3] in [0, 1], on the grid of its image (`image_wh`, its
  upright size): nearest-neighbour, shorter side to `size`, centre crop. ImageDataError names it."""
  from PIL import Image
  from data_pipelines.image_sources import _read_pil
  label = _read_pil(label_path, lambda opened: (opened.load(), opened.copy())[1])
  (w, h), (lw, lh) = image_wh, label.size
  if abs(w / h - lw / lh) > ASPECT_TOLERANCE * w / h:
    raise ImageDataError(f'{label_path}: {lw}x{lh} does not align with its image ({w}x{h}, upright): a label '
                         'must have its image\'s aspect ratio')
  try:
    picture = _label_picture(label if ids else as_8bit(label), ids)
  except ValueError as e:
    raise ImageDataError(f'{label_path}: {e}') from None
  scale = size / min(lw, lh)
  picture = picture.resize((max(size, round(lw * scale)), max(size, round(lh * scale))), Image.NEAREST)
  left, top = (picture.width - size) // 2, (picture.height - size) // 2
  return np.asarray(picture.crop((left, top, left + size, top + size)), np.float32) / 255


@dataclasses.dataclass
class PairedFolder:
  """`labels` [n, s, s, 3] for each of the source folder's images; `paired` marks those with a label."""
  annotations: np.ndarray
  paired: np.ndarray
  labels_dir: str


def label_files(images_root, labels_root, image_paths: list[str]) -> tuple[list, list[str]]:
  """The label file of each image (or None), and the label files that match no image."""
  images_root, labels_root = _folder(images_root), _folder(labels_root)
  if not labels_root.is_dir():
    raise ImageDataError(f'--labels {labels_root}: no such folder of label images')
  by_key = {}
  for path in _files_under(labels_root):
    relative = path.relative_to(labels_root)
    if path.suffix.lower() in IMAGE_SUFFIXES and not _os_metadata(relative.parts):
      key = str(relative.with_suffix(''))
      if key in by_key:
        raise ImageDataError(f'--labels {labels_root}: {by_key[key].name} and {path.name} are both labels of '
                             f'{key}: keep one')
      by_key[key] = path
  matched = [by_key.pop(str(_folder(p).relative_to(images_root).with_suffix('')), None) for p in image_paths]
  return matched, sorted(str(p) for p in by_key.values())


def paired_folder(images_root, labels_root, image_paths: list[str], images: np.ndarray, strict: bool = False,
                  ids: bool = False) -> PairedFolder:
  """Each image of a folder source (`image_paths`, aligned with `images`) with its label. Images
  without one stay in the source for the other kinds, out of pair sentences (said, counted)."""
  matched, unmatched = label_files(images_root, labels_root, image_paths)
  annotations = np.zeros_like(images)
  paired = np.zeros(len(images), bool)
  todo = [index for index, label_path in enumerate(matched) if label_path is not None]
  def read(index):  # the label, or the ImageDataError naming it
    try:
      return load_label(matched[index], upright_size(image_paths[index]), images.shape[1], ids)
    except ImageDataError as e:
      return e
  if is_remote(labels_root):  # a bucket's objects 16 at a time, as the images are read: latencies overlap
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
      labels = list(pool.map(read, todo))
  else:
    labels = [read(index) for index in todo]
  for index, label in zip(todo, labels):
    if isinstance(label, ImageDataError):
      if strict:
        raise label
      progress.say(f'warning: skipped {label}')
      continue
    annotations[index], paired[index] = label, True
  if not paired.any():
    raise ImageDataError(f'--labels {labels_root}: none of its files is the label of one of the {len(images)} '
                         f'images of {images_root} (same relative path and name, any image suffix: '
                         f'{_folder(image_paths[0]).relative_to(_folder(images_root)).with_suffix(".png")} '
                         'for the first)')
  unlabelled = [p for p, label in zip(image_paths, matched) if label is None]
  if unlabelled:
    progress.say(f'note: {len(unlabelled)} of {len(images)} images have no label in {labels_root} and appear in no '
                 f'pairs sentence, e.g. {unlabelled[0]}')
  if unmatched:
    progress.say(f'note: {len(unmatched)} label files in {labels_root} match no image of {images_root} '
                 f'(left out), e.g. {unmatched[0]}')
  return PairedFolder(annotations, paired, str(labels_root))
