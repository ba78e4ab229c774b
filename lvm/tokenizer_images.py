"""The tokenizer's training images: decoded into memory before the first step, or streamed from
disk as the loader reads them when they would not fit (data_pipelines/streamed_images.py). Either
way the loader sees the same records in the same order, so the choice changes memory and read
time, not the run."""
from __future__ import annotations

import os

import numpy as np

from core import progress
from core.errors import ConfigError
from data_pipelines.image_sources import folder_images, image_files, open_images
from data_pipelines.streamed_images import FolderImageStream, TfdsImageStream, streamable
from data_pipelines.tfds_images import image_records

# The closing reconstruction report's images: all of a source up to this many, else this many
# spread evenly over it (the same ones whether the source was streamed or held in memory).
REPORT_IMAGES = 4096


class InMemoryImages:
  """Random access over an image array as {'images': ...} records (for the grain loader)."""

  def __init__(self, images: np.ndarray, name: str):
    self.images, self.name = images, name

  def __len__(self):
    return len(self.images)

  def __getitem__(self, index):
    return {'images': self.images[int(index) % len(self.images)]}

  def images_at(self, indices) -> np.ndarray:
    return self.images[np.asarray(indices, np.int64)]

  def __repr__(self):
    return f'{self.name} ({len(self)} images)'


def available_memory_gib() -> float:
  """This host's memory free for new allocations (Linux: MemAvailable), else its physical memory."""
  try:
    with open('/proc/meminfo') as f:
      for line in f:
        if line.startswith('MemAvailable:'):
          return int(line.split()[1]) / 2**20
  except OSError:
    pass
  return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30


def decoded_gib(count: int, size: int) -> float:
  """Memory of `count` images decoded as float32 [size, size, 3]."""
  return count * size * size * 3 * 4 / 2**30


def size_text(gib: float) -> str:
  return f'{gib:.1f} GiB' if gib >= 0.1 else f'{gib * 1024:.1f} MiB'


def stream_plan(source: str, size: int, stream: str) -> tuple[bool, tuple | None]:
  """(stream the source?, a folder's listing when it was listed). `stream` ('auto', 'always',
  'never'): 'auto' streams a folder or tfds split whose decoded images would take more than a
  quarter of this host's free memory (decoding holds each image twice for a moment, while the array
  is stacked)."""
  if stream == 'always' and not streamable(source):
    raise ConfigError(f'data.stream=always: {source} is decoded into memory (folders and tfds:NAME:SPLIT '
                      'stream; the built-in images and video frames do not)')
  if stream == 'never' or not streamable(source):
    return False, None
  listed = None
  if source.startswith('tfds:'):
    count = len(image_records(source)[0])
  else:
    listed = image_files(source)  # listed once, for the count and for reading
    count = len(listed[1])
  if stream == 'auto':
    free = available_memory_gib()
    if decoded_gib(count, size) <= free / 4:
      return False, listed
    what = 'images' if source.startswith('tfds:') else 'image files'
    progress.say(f'{source}: {count} {what} decode to {size_text(decoded_gib(count, size))}, more than a quarter of '
                 f"this host's {size_text(free)} of free memory: they are streamed, decoded as the loader reads "
                 'them (data.stream=never holds them in memory)')
  return True, listed


def training_images(source: str, size: int, stream: str, listed: tuple | None = None, scanned=None):
  """The records `lvm train-tokenizer` trains on, held in memory or streamed (`stream_plan`).
  `listed`: the folder's listing, when listed already; `scanned`: a streamed folder's headers, read
  already (on a slice, a share on each host: `slice_stream_plan`)."""
  streamed, plan_listed = stream_plan(source, size, stream) if listed is None else (stream == 'always', listed)
  listed = listed or plan_listed
  if not streamed:
    if listed is not None:
      return InMemoryImages(folder_images(source, size, listed=listed).images, source)
    return InMemoryImages(open_images(source, size)[0], source)
  if source.startswith('tfds:'):
    return TfdsImageStream(source, size)
  return FolderImageStream(source, size, listed=listed, scanned=scanned)


def slice_stream_plan(source: str, size: int, stream: str) -> dict:
  """On a slice of several hosts: every host streams when any host would (a file truncated after
  its header is left out in memory and replaced streamed, so mixed hosts would disagree on the
  records), and a streamed folder's headers are read a share on each host and put together on
  every one (data_pipelines/image_headers.py). The keyword arguments of `training_images`."""
  from core.distributed import each_process
  from data_pipelines.image_headers import scan_on_every_host
  plan = {}

  def host_choice():
    streamed, plan['listed'] = stream_plan(source, size, stream)
    return streamed
  streamed = any(each_process('train-tokenizer: the images held in memory or streamed', host_choice))
  if streamed and not source.startswith('tfds:'):
    plan['listed'], plan['scanned'] = scan_on_every_host(source, plan['listed'],
                                                         'train-tokenizer: image headers read, a share on each host')
  return dict(plan, stream='always' if streamed else 'never')


def report_images(source) -> np.ndarray:
  """The closing report's images of a training source (REPORT_IMAGES)."""
  count = len(source)
  indices = np.arange(count) if count <= REPORT_IMAGES else np.linspace(0, count - 1, REPORT_IMAGES).round()
  return source.images_at(indices.astype(np.int64))
