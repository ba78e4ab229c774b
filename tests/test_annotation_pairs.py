"""LVM's annotated pairs from a user's data: `lvm tokenize --source FOLDER --labels LABELS` pairs each
image with the label picture of the same name, pixel-aligned, into sentences [x, label(x), y, label(y)].
The tokenize job's own tests, which need a trained tokenizer, are in test_tokenizer_jobs.py (its fixture)."""
import numpy as np
import pytest
from PIL import Image

from data_pipelines.annotation_pairs import paired_folder, voc_colormap
from data_pipelines.image_sources import ImageDataError, folder_images

RED = (128, 0, 0)  # VOC class 1


def _scene(rng, block: bool) -> tuple[Image.Image, Image.Image]:
  """A 96x64 photo of noise with a bright block at x 40-71, y 16-47 (or none), and its mask: a
  palette PNG whose class 1 (red in VOC's palette) is exactly the block."""
  pixels = rng.integers(0, 100, (64, 96, 3)).astype(np.uint8)
  ids = np.zeros((64, 96), np.uint8)
  if block:
    pixels[16:48, 40:72] = 250
    ids[16:48, 40:72] = 1
  mask = Image.fromarray(ids, 'P')
  mask.putpalette(voc_colormap().reshape(-1).tolist())
  return Image.fromarray(pixels), mask


def _folder(tmp_path, count: int = 8):
  """photos/{a,b}/i.bmp with labels/{a,b}/i.png (another suffix: matched by name); photos/b/extra.bmp has
  no label, labels/a/ghost.png no photo."""
  rng = np.random.default_rng(0)
  for i in range(count):
    cls = 'ab'[i % 2]
    for folder in ('photos', 'labels'):
      (tmp_path / folder / cls).mkdir(parents=True, exist_ok=True)
    photo, mask = _scene(rng, block=i % 4 != 3)
    photo.save(tmp_path / 'photos' / cls / f'{i}.bmp')
    mask.save(tmp_path / 'labels' / cls / f'{i}.png')
  _scene(rng, True)[0].save(tmp_path / 'photos' / 'b' / 'extra.bmp')
  _scene(rng, True)[1].save(tmp_path / 'labels' / 'a' / 'ghost.png')
  return tmp_path / 'photos', tmp_path / 'labels'


def test_each_label_lands_on_its_images_pixels(tmp_path, capsys):
  photos, labels = _folder(tmp_path)
  found = folder_images(photos, 32)
  paired = paired_folder(photos, labels, found.paths, found.images)
  said = capsys.readouterr().err
  assert 'note: 1 of 9 images have no label' in said and 'b/extra.bmp' in said
  assert 'note: 1 label files in' in said and 'ghost.png' in said
  assert paired.paired.tolist() == [not p.endswith('extra.bmp') for p in found.paths]
  # 96x64 -> 48x32, centre crop from x 8: the block, x 40-71 y 16-47, is x 12-27 y 8-23 in both.
  block = np.zeros((32, 32), bool)
  block[8:24, 12:28] = True
  for path, image, label, has_label in zip(found.paths, found.images, paired.annotations, paired.paired):
    if not has_label:
      continue
    with_block = not path.endswith(('3.bmp', '7.bmp'))
    red = np.all(np.round(label * 255) == RED, axis=-1)
    np.testing.assert_array_equal(red, block & with_block)  # nearest: the class colour exactly, nowhere else
    assert np.all(label[~red] == 0)  # class 0 is black in VOC's palette
    if with_block:  # the image's bright block (bicubic: its inner pixels) under the label's
      assert image[9:23, 13:27].min() > 0.9 and image[~block].max() < 0.5


def test_class_ids_are_painted_and_depth_maps_scaled(tmp_path):
  photo, _ = _scene(np.random.default_rng(1), True)
  (tmp_path / 'photos').mkdir()
  (tmp_path / 'ids').mkdir()
  (tmp_path / 'depth').mkdir()
  photo.save(tmp_path / 'photos' / 'x.bmp')
  ids = np.zeros((64, 96), np.uint8)
  ids[:, 48:] = 15  # ADE-style grey-level class ids: 15 is VOC's person
  Image.fromarray(ids).save(tmp_path / 'ids' / 'x.png')
  depth = np.full((64, 96), 1000, np.uint16)
  depth[:32] = 4000
  Image.fromarray(depth).save(tmp_path / 'depth' / 'x.png')
  found = folder_images(tmp_path / 'photos', 32)
  painted = paired_folder(tmp_path / 'photos', tmp_path / 'ids', found.paths, found.images, ids=True).annotations[0]
  assert tuple(np.round(painted[0, -1] * 255)) == tuple(voc_colormap()[15]) == (192, 128, 128)
  assert tuple(np.round(painted[0, 0] * 255)) == (0, 0, 0)
  grey = paired_folder(tmp_path / 'photos', tmp_path / 'ids', found.paths, found.images).annotations[0]
  assert np.round(grey[0, -1, 0] * 255) == 15  # as it looks: nearly black
  scaled = paired_folder(tmp_path / 'photos', tmp_path / 'depth', found.paths, found.images).annotations[0]
  assert np.round(scaled[0, 0, 0] * 255) == 255 and np.round(scaled[-1, 0, 0] * 255) == 255 * 1000 // 4000  # by its maximum
  with pytest.raises(ImageDataError, match='x.png: class ids need a one-channel image'):
    Image.fromarray(np.zeros((64, 96, 3), np.uint8)).save(tmp_path / 'ids' / 'x.png')
    paired_folder(tmp_path / 'photos', tmp_path / 'ids', found.paths, found.images, strict=True, ids=True)


def test_a_label_that_cannot_align_is_skipped_by_name(tmp_path, capsys):
  photos, labels = _folder(tmp_path)
  Image.new('P', (64, 64)).save(labels / 'a' / '0.png')  # square, for a 3:2 photo
  found = folder_images(photos, 32)
  paired = paired_folder(photos, labels, found.paths, found.images)
  assert f'warning: skipped {labels / "a" / "0.png"}: 64x64 does not align with its image (96x64' in \
      capsys.readouterr().err
  assert paired.paired.sum() == 7
  with pytest.raises(ImageDataError, match='0.png: 64x64 does not align'):
    paired_folder(photos, labels, found.paths, found.images, strict=True)
  (tmp_path / 'other').mkdir()
  Image.new('P', (96, 64)).save(tmp_path / 'other' / 'zzz.png')
  with pytest.raises(ImageDataError, match=r'none of its files is the label of one of the 9 images .* a/0.png for'):
    paired_folder(photos, tmp_path / 'other', found.paths, found.images)
