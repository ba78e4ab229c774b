"""Training images decoded when the loader reads them: for sources larger than a host's memory.

Decoding a source into memory before the first step (`image_sources.open_images`) is simplest and
fastest for what fits, but ImageNet's 1.28M training images at 256 px are 960 GiB as float32. A
streamed source is random access over a folder's files (local or gs://) or a prepared tfds split:
record i is decoded when the grain loader asks for it, in the loader's threads, and each host
decodes only its own rows of each batch. The records are the same images in the same order as in
memory (the same decoding, `to_rgb_square`), so a run trains identically either way (a test holds it
to that); only memory and read time differ.

Bad files in a folder: before the first step every file's header is read (in threads;
data_pipelines/image_headers.py, where `lvm tokenize` on a slice reads a share on each host), and
files that are not images are left out with a warning naming them, as the in-memory path leaves
them out. A file whose header reads but
whose pixels do not (truncated after its header) is only found when the loader gets to it: a warning
names it and the next readable file is used in its place, so the run goes on and stays
deterministic (every host substitutes the same file). That one case differs from memory, where
the file is left out and the records after it move up by one.
"""
from __future__ import annotations

import concurrent.futures

import numpy as np

from core import progress
from core.config import ConfigError
from data_pipelines.image_headers import HeaderScan, listing_digest, scan_headers, unreadable_files
from data_pipelines.image_sources import ImageDataError, array_to_rgb_square, image_files, load_image


def _decode_all(decode, indices) -> np.ndarray:
  """float32 [len(indices), size, size, 3]: `decode(i)` of each, in threads (PIL and the tfds
  reader release the GIL while they decode)."""
  with concurrent.futures.ThreadPoolExecutor(16) as pool:
    return np.stack(list(pool.map(decode, indices)))


class _ImageStream:
  """Records {'images': image(i)} for the grain loader; subclasses give `image`, `__len__`, `name`."""

  def __getitem__(self, index):
    return {'images': self.image(int(index) % len(self))}

  def read_batch(self, indices):
    return [self[index] for index in indices]

  def images_at(self, indices) -> np.ndarray:
    return _decode_all(self.image, [int(i) for i in indices])

  def __repr__(self):
    return f'{self.name} ({len(self)} images, streamed)'


class FolderImageStream(_ImageStream):
  """Every readable image under a folder, in name order (as `folder_images`), decoded on read.
  `strict`: an unreadable file fails (naming it) instead of being left out or replaced."""

  def __init__(self, root, size: int, header_threads: int = 32, listed: tuple | None = None, strict: bool = False,
               scanned: HeaderScan | None = None):
    self.root, files = listed or image_files(root)  # `listed`: image_files(root), when done already
    self.name = str(self.root)
    self.size, self.strict = size, strict
    # `scanned`: the headers read already (by the hosts of a slice, a share each, or a Beam driver)
    if scanned is None:
      scanned = scan_headers(self.root, files, header_threads)
    elif (scanned.count, scanned.listing) != (len(files), listing_digest(self.root, files)):
      raise ConfigError(f'{self.root} lists {len(files)} image files here and {scanned.count} where its headers '
                        'were read (files added or removed since): rerun the job')
    unreadable = unreadable_files(scanned, files, str(self.root), strict)
    self.scan = scanned  # passed on to Beam workers, which then read no header
    self.sizes_sha256 = scanned.sizes_sha256  # a resumed job's check (lvm/sentence_sources.py)
    self.files = [f for i, f in enumerate(files) if i not in unreadable]
    self.skipped = [str(files[i]) for i in sorted(unreadable)]
    if not self.files:
      raise ImageDataError(f'{self.root}: none of {len(files)} image files could be read')
    # Categories as `folder_images` numbers them: the first-level subfolders of every listed file.
    classes = sorted({f.relative_to(self.root).parts[0] for f in files if len(f.relative_to(self.root).parts) > 1})
    self.labels = np.asarray([classes.index(f.relative_to(self.root).parts[0])
                              if len(f.relative_to(self.root).parts) > 1 else -1 for f in self.files], np.int32)
    self._substituted = set()

  def __len__(self) -> int:
    return len(self.files)

  def record_names(self, indices) -> list[str]:
    return [str(self.files[i].relative_to(self.root)) for i in indices]

  def image(self, index: int) -> np.ndarray:
    """File `index`'s pixels; a file that fails to decode is named once and the next readable one is used."""
    for offset in range(len(self.files)):
      position = (index + offset) % len(self.files)
      try:
        return load_image(self.files[position], self.size)
      except ImageDataError as e:
        if self.strict:
          raise
        if position not in self._substituted:
          self._substituted.add(position)
          progress.say(f'warning: {e}; the next readable file is used in its place')
    raise ImageDataError(f'{self.root}: none of its {len(self.files)} image files decodes')


class TfdsImageStream(_ImageStream):
  """Every example's image of a prepared tfds split (`tfds:NAME:SPLIT`), decoded on read."""

  def __init__(self, source: str, size: int):
    from data_pipelines.tfds_images import image_records
    self.name, self.size = source, size
    self.records, self.key = image_records(source)

  def __len__(self) -> int:
    return len(self.records)

  def record_names(self, indices) -> list[str]:
    return [str(i) for i in indices]

  sizes_sha256 = None  # records of a prepared split: tfds checked them when it wrote them

  def read_labels(self) -> np.ndarray:
    """int32 label of every record (-1 without a label field, as `tfds_images`), read with the images
    left undecoded (a pass over the split's files, but no image decoding)."""
    from data_pipelines.tfds_images import LABEL_KEYS, undecoded_records
    label_key = next((k for k in LABEL_KEYS if k in self.records[0]), None)
    if label_key is None:
      return np.full(len(self), -1, np.int32)
    undecoded = undecoded_records(self.name, self.key)
    chunks = range(0, len(self), 4096)
    labels = [[int(example[label_key]) for example in undecoded.__getitems__(list(range(i, min(i + 4096, len(self)))))]
              for i in progress.bar(chunks, total=len(chunks), desc=f'{self.name}: labels', unit='chunk')]
    return np.asarray([label for chunk in labels for label in chunk], np.int32)

  def image(self, index: int) -> np.ndarray:
    try:  # tfds checked the split when it prepared it: a record that does not read is a damaged file
      example = self.records[index]
    except Exception as e:  # noqa: BLE001 (the ArrayRecord reader and the feature decoders raise several)
      raise ImageDataError(f'{self.name}[{index}]: the record does not read ({type(e).__name__}: {e})') from None
    return array_to_rgb_square(example[self.key], self.size)


class StreamedImageArray:
  """Rows of a stream as an image array decoded on indexing, for the tokenize job's sentences, which
  draw a few images each from anywhere in the source: `images[i]` is one image, `images[indices]`
  (a slice, an index array) a stacked batch (decoded in the calling thread: the job decodes whole
  sentences in parallel), and `subset(mask)` a view of fewer rows (a split)."""
  dtype = np.float32

  def __init__(self, stream: _ImageStream, rows: np.ndarray | None = None):
    self.stream = stream
    self.rows = np.arange(len(stream)) if rows is None else rows

  @property
  def shape(self) -> tuple:
    return (len(self.rows), self.stream.size, self.stream.size, 3)

  def __len__(self) -> int:
    return len(self.rows)

  def __getitem__(self, key):
    if isinstance(key, (int, np.integer)):
      return self.stream.image(int(self.rows[key]))
    rows = self.rows[key]
    if not len(rows):
      return np.zeros((0, *self.shape[1:]), np.float32)
    return np.stack([self.stream.image(int(row)) for row in rows])

  def subset(self, mask: np.ndarray) -> 'StreamedImageArray':
    return StreamedImageArray(self.stream, self.rows[mask])

  def record_names(self) -> list[str]:
    """Each row's file (relative to the folder) or record number: what a resumed job compares."""
    return self.stream.record_names(self.rows)


def streamable(source: str) -> bool:
  """Folders and tfds splits stream; the built-in images and video frames are decoded into memory."""
  return not source.startswith(('builtin:', 'frames:'))
