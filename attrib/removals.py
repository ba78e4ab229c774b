"""Training images taken out of a student's answers (`Attributor.remove_training_images`, `launch.py
attrib remove`): a takedown, an image whose rights lapsed, a file that may no longer be shown.

The removed training ids are kept in `student/removed_images.json` (sorted, written whole under a
temporary name), which a reviewer can read. The index files are not rewritten: a search asks ScaNN
for r more neighbours (r = images removed) and drops the removed ones, so an answer is the index's
top k among the images that remain, for one small file written per takedown however large the
index. Ids stay stable: the images after a removed one keep theirs, and `add_training_images`
goes on numbering after the training set and earlier additions. A rerun of `attrib distill` or
`attrib index` keeps the list (the ids name the same images). `attrib eval` measures the student
against the teacher's rankings of the whole training set, so removals leave its table as it was.
"""
from __future__ import annotations


import numpy as np

from core.paths import as_path
from core.workdir import read_json, write_json_atomic

REMOVED_IMAGES = 'removed_images.json'


def read_removed(student, total: int) -> np.ndarray:
  """Sorted removed ids of a student with `total` training images (distilled + added); none: empty."""
  from attrib.index import IndexFileError
  path = as_path(student) / REMOVED_IMAGES
  if not path.is_file():
    return np.zeros(0, np.int64)
  try:
    ids = np.asarray(read_json(path)['removed_ids'], np.int64).reshape(-1)
  except (ValueError, KeyError, TypeError) as e:
    raise IndexFileError(f'{path}: not a list of removed training ids ({type(e).__name__}: {e})') from None
  if len(ids) and (ids.min() < 0 or ids.max() >= total or len(np.unique(ids)) != len(ids)):
    raise IndexFileError(f'{path}: ids must be distinct and in [0, {total}) (the student\'s training images), got '
                         f'{ids.min()}..{ids.max()}: written for another training set')
  return np.sort(ids)


def write_removed(student, removed: np.ndarray) -> None:
  write_json_atomic(as_path(student) / REMOVED_IMAGES, {'removed_ids': [int(i) for i in removed]})


def checked_ids(ids, total: int, purpose: str = 'to remove') -> np.ndarray:
  """Training ids a caller gave (to remove, or to answer among), as int64: integers in [0, total), each once."""
  from attrib.query_images import AttributionError
  array = np.asarray(ids).reshape(-1)
  if not len(array):
    raise AttributionError(f'no training ids {purpose} given')
  if array.dtype == bool or not np.issubdtype(array.dtype, np.integer):  # 1.5 or True is no id
    raise AttributionError(f'training ids {purpose} must be integers, got {array.dtype} {array[:5].tolist()}')
  array = array.astype(np.int64)
  outside = array[(array < 0) | (array >= total)]
  if len(outside):
    raise AttributionError(f'training ids {outside[:5].tolist()} are not in [0, {total}) (the student\'s '
                           'training images and those added)')
  if len(np.unique(array)) != len(array):
    raise AttributionError(f'training ids {purpose}: each id once')
  return array


def first_kept(ids_qk: np.ndarray, removed: np.ndarray, k: int, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
  """The first `k` columns of each row whose id is not removed, in their order: ids, then `arrays`
  (scores of the same neighbours) cut alike. The caller fetched k + len(removed) neighbours, so k remain."""
  if not len(removed):
    return (ids_qk[:, :k], *(a[:, :k] for a in arrays))
  order = np.argsort(np.isin(ids_qk, removed), axis=1, kind='stable')[:, :k]  # kept first, in order
  return tuple(np.take_along_axis(a, order, axis=1) for a in (ids_qk, *arrays))


def ids_from_flags(text: str | None, file: str | None, flag: str) -> list[int] | None:
  """Training ids given inline (`--ids 3,17,250`) or in a file (`--ids-file F`, comma or newline
  separated, repeats dropped); None when neither flag was given."""
  from attrib.data import read_index_file
  from core.errors import ConfigError
  if text is not None:
    try:
      return [int(x) for x in text.split(',') if x.strip()]
    except ValueError:
      raise ConfigError(f'{flag} {text!r}: expected comma-separated training ids, e.g. 3,17,250') from None
  return None if file is None else read_index_file(file, None, what=f'{flag}-file').tolist()


def remove_command(workdir: str, ids_text: str | None, ids_file: str | None) -> dict:
  """`launch.py attrib remove`: training ids given inline (3,17,250) or in a file (comma or newline
  separated) taken out of the student's answers and saved. The student is loaded without its towers
  or training list (a full-scale one too): a removal computes no feature."""
  from attrib.attributor import Attributor
  from core.errors import ConfigError
  from core.workdir import versions
  if (ids_text is None) == (ids_file is None):
    raise ConfigError('attrib remove takes --ids 3,17,250 or --ids-file F (training ids, comma or newline separated)')
  ids = ids_from_flags(ids_text, ids_file, '--ids')
  attributor = Attributor.load(workdir)
  removed = attributor.remove_training_images(ids)
  attributor.save()
  result = {'job': 'attrib remove', 'removed': len(removed), 'already_removed': len(ids) - len(removed),
            'removed_training_images': len(attributor.removed), 'index_rows': len(attributor.index),
            'answerable_training_images': len(attributor.index) - len(attributor.removed),
            'source': ids_file or '--ids', 'versions': versions()}
  write_json_atomic(as_path(workdir) / 'remove_result.json', result)
  return result
