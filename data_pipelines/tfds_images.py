"""Images and videos from TensorFlow Datasets through `tfds.data_source` (random access over
ArrayRecord, no TensorFlow needed), and `bundled_digits`: a tfds dataset built from scikit-learn's digits on this
machine, with no download, so the tfds path can be used (and is tested) offline.

  source 'tfds:NAME[:SPLIT]' (SPLIT as tfds writes it, slices too: train[:10%]), and
  'frames:tfds:NAME[:SPLIT]' for a dataset of videos (each example one clip),
  read from $TFDS_DATA_DIR (default ~/tensorflow_datasets);
  python -m data_pipelines.tfds_images --build-bundled-digits [--data-dir DIR]
"""
from __future__ import annotations

import functools
import os

import numpy as np

from data_pipelines.image_sources import ImageDataError, array_to_rgb_square

IMAGE_KEYS = ('image', 'img', 'frame')
LABEL_KEYS = ('label', 'labels', 'category')
VIDEO_KEYS = ('video', 'image_sequence', 'frames', 'image_main', 'rgb')


def _data_source(source: str, data_dir: str | None, decoders: dict | None = None):
  """`tfds.data_source` of 'tfds:NAME[:SPLIT]', its first example checked to exist."""
  import tensorflow_datasets as tfds
  _, name, *rest = source.split(':', 2)  # the split may hold ':' itself: train[:1000]
  if not name or (rest and not rest[0]):
    raise ImageDataError(f'{source}: expected tfds:NAME or tfds:NAME:SPLIT (e.g. tfds:mnist:test, tfds:mnist:train[:10%])')
  split = rest[0] if rest else 'train'
  data_dir = data_dir or os.environ.get('TFDS_DATA_DIR')
  try:
    records = tfds.data_source(name, split=split, data_dir=data_dir, download=False, decoders=decoders)
  except ModuleNotFoundError as e:
    if e.name != 'tensorflow':
      raise
    raise ImageDataError(f'{source}: tfds reads this dataset\'s features with TensorFlow (a tfds Video feature, as '
                         'ucf101\'s or moving_mnist\'s, is built on it): pip install tensorflow-cpu') from None
  except NotImplementedError as e:
    if 'Random access' not in str(e):
      raise
    # Prepared, but as TFRecord (tfds' default): records cannot be read by index without TensorFlow.
    folder = f'{data_dir or "~/tensorflow_datasets"}/{name.split("/")[0]}'
    raise ImageDataError(f'{source}: prepared as TFRecord files, which are not read by index; convert it once '
                         f'(`tfds convert_format --dataset_dir={folder} --out_file_format=array_record`) or '
                         f'prepare it so (`tfds build {name.split("/")[0]} --file_format=array_record`)') from None
  except Exception as e:  # tfds raises several types for a missing or unprepared dataset
    # Only the first line of tfds' message: the rest lists every dataset tfds knows (~250 names).
    reason = str(e).strip().splitlines()[0] if str(e).strip() else ''
    raise ImageDataError(f'{source}: not a prepared tfds dataset in {data_dir or "~/tensorflow_datasets"} '
                         f'(prepare it first; nothing downloads at run time) ({type(e).__name__}: {reason})') from None
  if not len(records):
    raise ImageDataError(f'{source}: the split is empty')
  return records


def image_records(source: str, data_dir: str | None = None) -> tuple:
  """(the split's `tfds.data_source`, the name of its image field), refused when it has none."""
  records = _data_source(source, data_dir)
  first = records[0]
  image_key = next((k for k in IMAGE_KEYS if k in first), None)
  if image_key is None:
    videos = ('; a dataset of videos: give frames:' + source) if any(k in first for k in VIDEO_KEYS) else ''
    raise ImageDataError(f'{source}: examples have no image field (one of {IMAGE_KEYS}); fields: {sorted(first)}'
                         + videos)
  return records, image_key


def undecoded_records(source: str, image_key: str, data_dir: str | None = None):
  """The split's records with the image field left encoded (a label pass decodes no pixels)."""
  import tensorflow_datasets as tfds
  return _data_source(source, data_dir, decoders={image_key: tfds.decode.SkipDecoding()})


def tfds_images(source: str, size: int, data_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(float32 [n, size, size, 3] in [0, 1], int32 labels or -1) of every example of a tfds split."""
  records, image_key = image_records(source, data_dir)
  first = records[0]
  label_key = next((k for k in LABEL_KEYS if k in first), None)
  images, labels = [], []
  for index in range(len(records)):
    example = records[index]
    images.append(array_to_rgb_square(example[image_key], size))
    labels.append(int(example[label_key]) if label_key else -1)
  return np.stack(images), np.asarray(labels, np.int32)


def tfds_videos(source: str, size: int, data_dir: str | None = None) -> list[tuple[str, np.ndarray]]:
  """(name, float32 [frames, size, size, 3] in [0, 1]) of every example of a tfds split of videos
  (`frames:tfds:NAME:SPLIT`: moving_mnist, bair_robot_pushing_small, ucf101, ...), each named
  NAME:SPLIT[index]; the clip is the first field of VIDEO_KEYS the examples hold."""
  records = _data_source(source, data_dir)
  first = records[0]
  key = next((k for k in VIDEO_KEYS if k in first), None)
  if key is None:
    raise ImageDataError(f'{source}: examples have no video field (one of {VIDEO_KEYS}); fields: {sorted(first)}')
  videos = []
  for index in range(len(records)):
    clip = np.asarray(records[index][key])
    if clip.dtype != np.uint8 or clip.ndim not in (3, 4) or (clip.ndim == 4 and clip.shape[-1] not in (1, 3, 4)):
      raise ImageDataError(f'{source}[{index}]: field {key!r} of dtype {clip.dtype} and shape {clip.shape} is not a '
                           'clip of uint8 frames [frames, height, width(, 1|3|4)]')
    videos.append((f'{source.removeprefix("tfds:")}[{index}]',
                   np.stack([array_to_rgb_square(frame, size) for frame in clip])))
  return videos


def build_bundled_digits(data_dir: str) -> str:
  """Prepares `bundled_digits` (1,797 8x8 digits, labels 0-9) under `data_dir`; returns the source name."""
  _bundled_digits_builder()(data_dir=data_dir, file_format='array_record').download_and_prepare()
  return 'tfds:bundled_digits:train'


@functools.cache
def _bundled_digits_builder():
  """The builder class, defined once: tfds registers a builder by name and refuses a second one."""
  import tensorflow_datasets as tfds

  class BundledDigits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn's handwritten digits as a tfds dataset (ArrayRecord; uint8 tensors, so no TF)."""
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          'image': tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
          'label': tfds.features.ClassLabel(num_classes=10)}))

    def _split_generators(self, dl_manager):
      return {'train': self._generate_examples()}

    def _generate_examples(self):
      from data_pipelines.bundled import load_digits
      for i, (image, label) in enumerate(zip(*load_digits())):
        yield i, {'image': (image / 16 * 255).round().astype(np.uint8)[..., None], 'label': int(label)}

  return BundledDigits


if __name__ == '__main__':
  import argparse
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--build-bundled-digits', action='store_true', required=True)
  parser.add_argument('--data-dir', default=os.environ.get('TFDS_DATA_DIR', os.path.expanduser('~/tensorflow_datasets')))
  print(build_bundled_digits(parser.parse_args().data_dir))
