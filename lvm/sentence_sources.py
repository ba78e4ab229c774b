"""The images a tokenize job draws its sentences from: decoded into memory, or streamed.

Sentence n of a kind draws a few images from anywhere in the source (lvm/sentences.py), so the job
needs random access to all of it. Decoded into memory (float32) that is simplest and fastest for
what fits; ImageNet's 1.28M images at 256 px are 960 GiB. A streamed source (a folder, local or
gs://, or a prepared tfds split) is a `StreamedImageArray`: each image is decoded when a sentence
asks for it, the sentences of a shard built in `read_threads` threads. The images, their order,
labels and splits are the same either way, and so are the shards, byte for byte (a test holds it);
the one difference is a file whose header reads but whose pixels do not (truncated after its
header): in memory it is left out, streamed it is replaced by the next readable file, with a warning
(--strict fails on it either way).

`--stream auto` (the default) streams when the decoded images would take more than a quarter of a
host's free memory; on a slice, every host streams when any host would (their shards must agree),
and a resumed job keeps the choice it was started with (its fingerprint of the source is the pixels'
in memory, the files' names and sizes streamed).
"""
from __future__ import annotations

import hashlib

import numpy as np

from core import progress
from core.config import ConfigError
from core.paths import as_path
from core.workdir import read_json
from data_pipelines.image_headers import HeaderScan
from data_pipelines.image_sources import image_files, open_images
from data_pipelines.streamed_images import FolderImageStream, StreamedImageArray, TfdsImageStream, streamable
from lvm.sentences import split_mask, split_videos, video_notes

STREAM_MODES = ('auto', 'always', 'never')


def _recorded_mode(out, state_file: str) -> bool | None:
  """Whether the job in `out` (if one was started there) streamed its source."""
  state = as_path(out) / state_file
  if not state.is_file():
    return None
  fingerprint = read_json(state).get('source_images', {})
  return bool(fingerprint.get('streamed')) if fingerprint else None


def stream_choice(source: str, size: int, stream: str, labels: str | None, out, state_file: str) -> tuple[bool, tuple | None]:
  """(stream the source?, the folder's listing when it was listed for the count). `stream`: one of
  STREAM_MODES; `labels`: the job's label folder (pairs sentences hold their images in memory)."""
  from lvm.tokenizer_images import available_memory_gib, decoded_gib, size_text
  if stream not in STREAM_MODES:
    raise ConfigError(f'--stream {stream!r}: choose from {list(STREAM_MODES)}')
  if not streamable(source) or labels is not None:
    if stream == 'always':
      what = 'with --labels' if labels is not None else 'built-in images and video frames'
      raise ConfigError(f'--stream always: {source} {what} are decoded into memory (image folders and '
                        'tfds:NAME:SPLIT stream)')
    return False, None
  recorded = _recorded_mode(out, state_file)
  if recorded is not None and stream != 'auto' and recorded != (stream == 'always'):
    was = 'streamed' if recorded else 'held in memory'
    raise ConfigError(f'{out} holds shards of a job that {was} its source: rerun it with --stream '
                      f'{"always" if recorded else "never"} (or auto), or use a new --out')
  if recorded is not None:
    return recorded, None
  if stream != 'auto':
    return stream == 'always', None
  listed = None
  if source.startswith('tfds:'):
    from data_pipelines.tfds_images import image_records
    count = len(image_records(source)[0])
  else:
    listed = image_files(source)
    count = len(listed[1])
  free = available_memory_gib()
  if decoded_gib(count, size) <= free / 4:
    return False, listed
  what = 'images' if source.startswith('tfds:') else 'image files'
  progress.say(f'{source}: {count} {what} decode to {size_text(decoded_gib(count, size))}, more than a quarter of '
               f"this host's {size_text(free)} of free memory: they are streamed, each decoded when a sentence draws "
               'it (--stream never holds them in memory)')
  return True, listed


def still_images(source: str, size: int, strict: bool, streamed: bool, listed: tuple | None,
                 scanned: HeaderScan | None = None):
  """(images, int32 labels) of a folder, tfds split or built-in source: an array in memory, or a
  `StreamedImageArray` over the same images in the same order with the same labels (`scanned`: a
  streamed folder's headers, read already)."""
  if not streamed:
    if listed is not None:  # listed already (for the count): not twice
      from data_pipelines.image_sources import folder_images
      found = folder_images(source, size, strict, listed=listed)
      return found.images, found.labels
    return open_images(source, size, strict)
  if source.startswith('tfds:'):
    stream = TfdsImageStream(source, size)
    return StreamedImageArray(stream), stream.read_labels()
  stream = FolderImageStream(source, size, listed=listed, strict=strict, scanned=scanned)
  return StreamedImageArray(stream), stream.labels


def streamed_fingerprint(images: StreamedImageArray, labels: np.ndarray) -> dict:
  """A streamed source as a resumed job checks it: its files' names (a tfds split: its record
  numbers) and labels, and the folder's file sizes (read with the headers), not its pixels, which
  would mean decoding it all. A file added, removed, renamed or rewritten at another size is found;
  one rewritten at its very size is not."""
  digest = hashlib.sha256('\n'.join(images.record_names()).encode())
  digest.update(np.ascontiguousarray(labels).tobytes())
  fingerprint = {'count': int(len(images)), 'names_sha256': digest.hexdigest()[:16], 'streamed': True}
  if images.stream.sizes_sha256 is not None:
    fingerprint['sizes_sha256'] = images.stream.sizes_sha256
  return fingerprint


def read_sentence_source(source: str, size: int, split: str, strict: bool, labels: str | None, label_ids: bool, *,
                         video_sentences: int, frames: int, stride: int, streamed: bool = False,
                         listed: tuple | None = None, scanned: HeaderScan | None = None):
  """(images, their classes, videos or None, pairs or None, notes) of `split` of a source."""
  if labels is not None:  # a folder with its label pictures: every kind of the folder, and pairs
    if source.startswith(('frames:', 'tfds:', 'builtin:')):
      raise ConfigError(f'--labels pairs label pictures with the images of a folder source, not {source}')
    from data_pipelines.annotation_pairs import paired_folder
    from data_pipelines.image_sources import folder_images
    found = folder_images(source, size, strict)
    labelled = paired_folder(source, labels, found.paths, found.images, strict, label_ids)
    keep = split_mask(found.labels, split, source)
    pairs = (labelled.annotations[keep], np.flatnonzero(labelled.paired[keep]))
    return found.images[keep], found.labels[keep], None, pairs, []
  if source.startswith('frames:'):  # real clips: still-image kinds use their frames as images
    from data_pipelines.image_sources import named_videos
    named = split_videos(named_videos(source[len('frames:'):], size, strict), split, source)
    videos = [frames_of_one for _, frames_of_one in named]
    notes = video_notes(named, video_sentences, frames, stride)
    if not any(len(v) >= (frames - 1) * stride + 1 for v in videos):
      raise ConfigError(f'{source}: no video has {(frames - 1) * stride + 1} frames (--frames {frames}, '
                        f'--stride {stride})')
    images = np.concatenate(videos)
    return images, np.full(len(images), -1, np.int32), videos, None, notes
  images, classes = still_images(source, size, strict, streamed, listed, scanned)
  keep = split_mask(classes, split, source)
  images = images[keep] if isinstance(images, np.ndarray) else images.subset(keep)
  return images, classes[keep], None, None, []
