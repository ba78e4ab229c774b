"""Training images added to a distilled student's index after distillation (`Attributor.add_training_images`,
`launch.py attrib add`): a model retrained or fine-tuned with more images needs them attributable
without embedding the whole training set again.

Every addition is kept in `student/added_images.npz`: φ rows (`features`), `captions`, and the
digits' 16x16 arrays (`images`) or the full-scale image files (`paths`). The added images take the
training ids after the training set's: N, N+1, … in the order added. Their embedded rows, c(z) and
index rows are appended to the distill outputs (embeddings.npy, image_prior.npy, index, base_index),
which are written first; added_images.npz is written last and is what makes an addition count.
A save cut short leaves rows past N + (images in added_images.npz) in those files: `load` leaves
them out (removed from the indexes) and says so, and the next addition writes over them. A rerun of
`attrib distill` embeds the added images with the training set (distill.finish_student).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from core.paths import absolute, as_path
from core.workdir import load_npz, read_json, save_npz_atomic

ADDED_IMAGES = 'added_images.npz'


@dataclasses.dataclass
class Additions:
  features: np.ndarray            # [n, d] φ
  captions: list[str]
  images: np.ndarray | None       # [n, 16, 16, 1] in [-1, 1] (the digits), or None
  paths: list[str | None] | None  # image files (full scale; None: added as φ rows), or None

  def __len__(self) -> int:
    return len(self.features)

  def extended(self, other: 'Additions') -> 'Additions':
    images = None if self.images is None else np.concatenate([self.images, other.images])
    # Files of images added from files; None for those added as φ rows (features=), which have none.
    paths = None
    if self.paths is not None or other.paths is not None:
      paths = [*(self.paths or [None] * len(self)), *(other.paths or [None] * len(other))]
    return Additions(np.concatenate([self.features, other.features]), self.captions + other.captions, images, paths)


def empty_additions(dim: int, digits: bool, files: bool) -> Additions:
  return Additions(np.zeros((0, dim), np.float32), [], np.zeros((0, 16, 16, 1), np.float32) if digits else None,
                   [] if files else None)


def read_additions(student) -> Additions | None:
  path = as_path(student) / ADDED_IMAGES
  if not path.is_file():
    return None
  stored = load_npz(path)
  return Additions(np.asarray(stored['features'], np.float32), [str(c) for c in stored['captions']],
                   stored['images'] if 'images' in stored else None,
                   [str(p) or None for p in stored['paths']] if 'paths' in stored else None)


def write_additions(student, additions: Additions) -> None:
  arrays = {'features': additions.features, 'captions': np.asarray(additions.captions, dtype=str)}
  if additions.images is not None:
    arrays['images'] = additions.images
  if additions.paths is not None:
    arrays['paths'] = np.asarray(['' if p is None else p for p in additions.paths], dtype=str)
  save_npz_atomic(as_path(student) / ADDED_IMAGES, **arrays)


def distilled_rows(student, fallback: int) -> int:
  """N: the training images the student was distilled over (recorded in student/config.json), or
  `fallback` (rows held less those added) for a student from before that was recorded."""
  stored = read_json(as_path(student) / 'config.json')
  return int(stored.get('trained_on', {}).get('train_rows', fallback))


def new_training_images(attributor, images, captions, features) -> Additions:
  """Checked inputs of `Attributor.add_training_images`, with their φ (computed as for a query)."""
  from attrib.attributor import refuse_non_finite
  from attrib.query_images import AttributionError, digit_pixels
  from attrib.tower_features import TowerFeaturizer
  if attributor.featurizer is None:
    if features is None or images is not None:
      raise AttributionError(f'{attributor.workdir}: this student was loaded without a featurizer; add training '
                             'images as features=φ rows (the same base feature as its training set), or, for a '
                             'full-scale student, load it with dino= and clip= first')
    features = np.atleast_2d(np.asarray(features, np.float32))
    captions = [''] * len(features) if captions is None else captions
  elif features is not None or images is None or captions is None:
    raise AttributionError('this student computes φ itself: add training images as images= and captions=, '
                           'not features=')
  if isinstance(captions, str) or len(captions) != (len(images) if features is None else len(features)):
    raise AttributionError('captions: one string per new training image')
  if not len(captions):
    raise AttributionError('no new training images given')
  if features is None:
    tower = isinstance(attributor.featurizer[0], TowerFeaturizer)
    if tower and not all(isinstance(i, (str, Path)) for i in images):
      raise AttributionError('training images added to a full-scale student are image files (paths), which '
                             'query grids and results name')
    features = attributor.features(images, captions)
    pixels = None if tower else np.stack([digit_pixels(i) for i in images])
    # Resolved: the answers of later jobs, run from any folder, name these files (a relative name
    # was kept as typed, from the folder `attrib add` ran in).
    paths = [absolute(i) for i in images] if tower else None
  else:
    pixels, paths = None, None
  if features.ndim != 2 or features.shape[1] != attributor.input_dim or not len(features):
    raise AttributionError(f'features of shape {features.shape}: new training images need [n >= 1, {attributor.input_dim}]')
  refuse_non_finite(features)
  return Additions(np.asarray(features, np.float32), [str(c) for c in captions], pixels, paths)


def leave_out_unfinished_add(student, n_train: int, n_added: int, index, base_index, embeddings, prior):
  """(embeddings, prior) cut to the N + n rows that count; rows past them (from an addition whose
  save did not finish) are removed from the loaded indexes, with a warning. Fewer rows than that:
  the files are not of this student's training set."""
  import sys
  from attrib.index import IndexFileError
  kept = n_train + n_added
  held = {'index': index, 'base_index': base_index, 'embeddings.npy': embeddings, 'image_prior.npy': prior}
  rows = {name: len(value) for name, value in held.items() if value is not None}
  short = [f'{name} holds {count} rows' for name, count in rows.items() if count < kept]
  if short:
    raise IndexFileError(f'{student}: {", ".join(short)} for {n_train} distilled + {n_added} added training images '
                         f'({ADDED_IMAGES}): files of another training set; rerun `launch.py attrib distill`')
  extra = max(rows.values()) - kept
  if extra:
    print(f'warning: {student}: {extra} rows past the {kept} training images are from an addition whose save did '
          'not finish; they are left out (add those images again)', file=sys.stderr)
    for searcher in (index, base_index):
      if searcher is not None and len(searcher) > kept:
        ids = searcher.ids if hasattr(searcher, 'ids') else np.concatenate([s.ids for s in searcher.shards])
        searcher.delete(ids[ids >= kept])
  return (None if embeddings is None else embeddings[:kept]), (None if prior is None else prior[:kept])


def addition_keys(additions: Additions) -> list[tuple]:
  """What makes two added training images the same one: the caption and the image (the digits'
  pixels, or its file), or for an image added as a φ row, the row."""
  keys = []
  for i, caption in enumerate(additions.captions):
    if additions.images is not None:
      image = additions.images[i].tobytes()
    elif additions.paths is not None and additions.paths[i] is not None:
      image = additions.paths[i]
    else:
      image = additions.features[i].tobytes()
    keys.append((image, caption))
  return keys


def repeated_rows(additions: Additions, new: int, distilled: int) -> tuple[dict[int, int], dict[int, int]]:
  """Of the last `new` additions: {row: id} of those that repeat an earlier addition, and {row: row}
  of those that repeat an earlier row of the same list."""
  keys = addition_keys(additions)
  before = len(keys) - new
  earlier = {}
  for j, key in enumerate(keys[:before]):
    earlier.setdefault(key, distilled + j)
  seen, of_earlier, of_list = {}, {}, {}
  for row, key in enumerate(keys[before:]):
    if key in earlier:
      of_earlier[row] = earlier[key]
    elif key in seen:
      of_list[row] = seen[key]
    else:
      seen[key] = row
  return of_earlier, of_list


def add_command(workdir: str, images_list: str | None, features_path: str | None, dino: str | None = None,
                clip: str | None = None, train_list: str | None = None, allow_repeats: bool = False) -> dict:
  """`launch.py attrib add`: the images of a TSV (image<TAB>caption), or φ rows of an .npy for a
  student distilled on precomputed features, added to the student's index and saved.

  An image added before (same image and caption: `addition_keys`) is not added again unless
  `allow_repeats`: a rerun of a finished `attrib add` would otherwise put every image in the index
  twice, each answer naming both. A rerun of the whole list adds nothing and exits 0 (as any job
  rerun after it finished); a list that repeats some images is refused, naming them."""
  from attrib.attributor import Attributor
  from attrib.tower_features import read_image_list
  from core.errors import ConfigError
  from core.workdir import load_npy, versions, write_json_atomic
  if (images_list is None) == (features_path is None):
    raise ConfigError('attrib add takes --images LIST.tsv (lines of image path<TAB>caption) or --features F.npy '
                      '(φ rows, for a student distilled on precomputed features)')
  # The inputs are read (every image's header opened) before the student is loaded or anything written.
  paths, captions, features = None, None, None
  if images_list is not None:
    paths, captions = read_image_list(images_list)
  else:
    if not as_path(features_path).is_file():
      raise ConfigError(f'{features_path} not found (expected an .npy of φ rows [n, d])')
    try:
      features = np.asarray(load_npy(features_path), np.float32)
    except (OSError, ValueError, EOFError) as e:
      raise ConfigError(f'{features_path}: not an .npy file of φ rows [n, d] ({e})') from None
  attributor = Attributor.load(workdir, dino=dino, clip=clip, train_list=train_list)
  ids = attributor.add_training_images(images=paths, captions=captions, features=features)
  source = images_list or features_path
  of_earlier, of_list = ({}, {}) if allow_repeats else repeated_rows(attributor.additions, len(ids),
                                                                     attributor.distilled_rows)
  name = (lambda row: paths[row]) if paths else (lambda row: f'row {row}')
  if len(of_earlier) == len(ids):  # in memory only: nothing is saved
    from core import progress
    before = sorted(of_earlier.values())
    named = f'{before[0]}-{before[-1]}' if before == list(range(before[0], before[-1] + 1)) else \
        ', '.join(map(str, before[:5])) + (' ...' if len(before) > 5 else '')
    removed = sorted(set(before) & set(attributor.removed.tolist()))  # a takedown is not undone by a rerun
    progress.say(f'note: all {len(ids)} images of {source} were added before (ids {named}'
                 + (f'; removed since: {", ".join(map(str, removed[:5]))}{" ..." if len(removed) > 5 else ""}'
                    if removed else '') + '): nothing added (--allow-repeats adds them again, as more images)')
    result = {'job': 'attrib add', 'added': 0, 'already_added_ids': list(of_earlier.values()), 'source': source,
              'versions': versions()}
    write_json_atomic(as_path(workdir) / 'add_result.json', result)
    return result
  if of_earlier or of_list:
    said = [f'{name(r)} (added before as id {i})' for r, i in of_earlier.items()] + \
           [f'{name(r)} (listed before, as {name(first)})' if not paths else f'{name(r)} (listed twice)'
            for r, first in of_list.items()]
    raise ConfigError(f'{source}: {len(said)} of its {len(ids)} images repeat an image with the same caption: '
                      f'{", ".join(said[:5])}{" ..." if len(said) > 5 else ""}; nothing added. Leave them out, or '
                      '--allow-repeats to add them as more training images')
  attributor.save()
  result = {'job': 'attrib add', 'added': len(ids), 'first_id': int(ids[0]), 'last_id': int(ids[-1]),
            'distilled_training_images': attributor.distilled_rows,
            'added_training_images': len(attributor.additions), 'index_rows': len(attributor.index),
            'source': source, 'versions': versions()}
  write_json_atomic(as_path(workdir) / 'add_result.json', result)
  return result
