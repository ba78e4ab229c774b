"""The real images that ship inside scikit-learn's wheel (the built-in default data), read from its
package folder without importing scikit-learn.

Importing `sklearn.datasets` costs ~1.4 s (2-core EPYC) in every job that starts from the digits, for
two files that numpy and PIL read in milliseconds. tests/test_bundled_data.py checks that what is
read here equals `sklearn.datasets.load_digits()` and `load_sample_images()` exactly.
"""
from __future__ import annotations

import functools
import gzip
import importlib.util
from pathlib import Path

import numpy as np

from core.errors import UserError

INSTALL_HINT = "the built-in data need scikit-learn: pip install -e '.[data]'"


def _sklearn_datasets_dir() -> Path:
  spec = importlib.util.find_spec('sklearn')  # finds the package; runs none of its code
  if spec is None or not spec.submodule_search_locations:
    raise ImportError(INSTALL_HINT)
  return Path(spec.submodule_search_locations[0]) / 'datasets'


def _bundled_file(relative: str) -> Path:
  path = _sklearn_datasets_dir() / relative
  if not path.is_file():
    raise UserError(f'{path}: scikit-learn has no bundled {relative} here; reinstall it ({INSTALL_HINT})')
  return path


@functools.lru_cache(maxsize=1)
def _digits_table() -> np.ndarray:
  with gzip.open(_bundled_file('data/digits.csv.gz'), 'rt') as f:
    table = np.loadtxt(f, delimiter=',')
  table.flags.writeable = False  # shared by every caller in the process
  return table


def load_digits() -> tuple[np.ndarray, np.ndarray]:
  """(images [1797, 8, 8] float64 in 0..16, labels [1797] int64): `sklearn.datasets.load_digits()`'s
  `images` and `target`, from the same file."""
  table = _digits_table()
  return table[:, :-1].reshape(-1, 8, 8).copy(), table[:, -1].astype(np.int64)


def load_sample_photos() -> list[np.ndarray]:
  """The two bundled photos (427 x 640 x 3 uint8), in `sklearn.datasets.load_sample_images()`'s order."""
  from PIL import Image
  paths = sorted(_sklearn_datasets_dir().joinpath('images').glob('*.jpg'))
  if not paths:
    raise UserError(f'{_sklearn_datasets_dir() / "images"}: no bundled photos ({INSTALL_HINT})')
  photos = []
  for path in paths:
    with Image.open(path) as image:
      photos.append(np.asarray(image))
  return photos
