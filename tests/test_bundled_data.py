"""The built-in images, read from scikit-learn's package folder without importing scikit-learn, are
exactly scikit-learn's own."""
import subprocess
import sys

import numpy as np
import pytest

from core.errors import UserError
from data_pipelines import bundled
from tests.helpers import ROOT


def test_digits_and_photos_equal_scikit_learns():
  from sklearn.datasets import load_digits, load_sample_images
  digits = load_digits()
  images, labels = bundled.load_digits()
  np.testing.assert_array_equal(images, digits.images)
  np.testing.assert_array_equal(labels, digits.target)
  assert images.shape == (1797, 8, 8) and labels.dtype == np.int64
  images[0, 0, 0] = 99  # a caller's copy: the next caller still gets the file's values
  assert bundled.load_digits()[0][0, 0, 0] == digits.images[0, 0, 0]
  photos = bundled.load_sample_photos()
  expected = load_sample_images().images
  assert len(photos) == len(expected) == 2
  for ours, theirs in zip(photos, expected):
    np.testing.assert_array_equal(ours, theirs)


def test_reading_them_imports_no_scikit_learn():
  code = ('import sys; from data_pipelines.image_sources import digit_images, sample_photo_crops; '
          'from data_pipelines.digit_sentences import load_digits; '
          'images, labels = digit_images(16); crops = sample_photo_crops(16, 2); digits, _ = load_digits(); '
          'print(images.shape, crops.shape, digits.shape, "sklearn" in sys.modules)')
  out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
  assert out.split() == ['(1797,', '16,', '16,', '3)', '(2,', '16,', '16,', '3)', '(1797,', '8,', '8)', 'False']


def test_a_missing_bundled_file_names_it(tmp_path, monkeypatch):
  bundled._digits_table.cache_clear()
  monkeypatch.setattr(bundled, '_sklearn_datasets_dir', lambda: tmp_path)
  try:
    with pytest.raises(UserError, match=r'digits\.csv\.gz'):
      bundled.load_digits()
    with pytest.raises(UserError, match=str(tmp_path / 'images')):
      bundled.load_sample_photos()
  finally:
    bundled._digits_table.cache_clear()


def test_a_run_without_some_images_conditions_on_its_parents_text_states(tmp_path):
  """`data.exclude_path` (the counterfactual's retrainings) drops images, not text states: the kept
  rows are the parent run's states to the bit, read from the parent's cache without encoding again."""
  import dataclasses
  from attrib.config import ImageDataConfig
  from attrib.data import CaptionedImages
  encoded = []

  def text_encoder(captions):  # states that depend on the caption alone; counts what it encodes
    encoded.extend(captions)
    codes = np.array([[sum(map(ord, c)) % 997, len(c)] for c in captions], np.float32)
    return (np.repeat(codes[:, None, :], 3, axis=1),)

  config = ImageDataConfig()
  parent = CaptionedImages(config, text_encoder, cache_dir=tmp_path)
  (tmp_path / 'excluded.txt').write_text('0,5,7')
  encoded.clear()
  child = CaptionedImages(dataclasses.replace(config, exclude_path=str(tmp_path / 'excluded.txt')), text_encoder,
                          cache_dir=tmp_path)
  assert encoded == ['']  # the unconditional caption only
  kept = np.setdiff1d(parent.index, [0, 5, 7])
  np.testing.assert_array_equal(child.index, kept)
  np.testing.assert_array_equal(child.context, parent.context[kept])
  np.testing.assert_array_equal(child.images, parent.images[kept])
  assert child.captions == [parent.captions[i] for i in kept]
  assert len(list(tmp_path.glob('text_states_*.npy'))) == 1
