"""Visual sentences (LVM §2): images -> sequences of frames -> tokens -> ArrayRecord shards.

Kinds, each a fixed number of frames (`frames`, 4 by default; LVM uses 16 at 256 tokens each):
  video        frames of a real clip at a stride (a `frames:DIR` source: one subfolder of frames,
               or an animated GIF, WebP or PNG, per video), or, from still images, one image
               moving: rotated and shifted a little more in every frame
  edges        annotated pairs [X, edges(X), Y, edges(Y), ...] (LVM's HED-edge pairs; Sobel here)
  groups       `frames` different images of one category (class folders, digit labels)
  analogy      [A, T(A), B, T(B), ...]: one transformation T (flip, rotate 90°, invert, shift) per sentence
  colorization [grey(X), X, grey(Y), Y, ...]
  inpainting   [X with a square masked, X, ...]
  pairs        annotated images [X, label(X), Y, label(Y), ...] (LVM's pairs): a folder source with its
               labels folder (`--labels`: segmentation masks, depth maps, ... as pictures,
               data_pipelines/annotation_pairs.py)
Records are frames × tokens-per-image ids below the codebook size; ids from the codebook size up
(100 of them) are reserved for special tokens (8192–8291 at full scale), so `vocab_size` = K + 100.

The job is resumable shard by shard: sentence n of a kind is a pure function of (seed, kind, n), each
shard is written whole under a temporary name and renamed, and a rerun skips finished shards, so an
interrupted job loses and duplicates no record. `manifest.json` (written last) lists the shards,
the records per kind and the checksum of the tokenizer's parameters.
"""
from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import numpy as np

from core import progress
from core.config import ConfigError, check_at_least
from core.paths import absolute, as_path, is_remote, joined
from core.workdir import atomic_path, make_workdir, read_json, refuse_job_workdir, versions, write_json_atomic
from data_pipelines.token_records import SHARD_SUFFIX, SHARD_WRITER_OPTIONS, TOKEN_DTYPE

# Appended only: a kind's position seeds its sentences (a new kind changes no earlier kind's records).
KINDS = ('video', 'groups', 'analogy', 'colorization', 'inpainting', 'edges', 'pairs')
SPECIAL_TOKENS = 100
STATE_FILE = 'tokenize_state.json'
SPLITS = ('all', 'train', 'eval')  # eval = the last 10% of each class of a source's images, train = the rest


def held_out(labels: np.ndarray) -> np.ndarray:
  """Mask of the eval images: the last 10% of each class in source order (images outside any class,
  label -1, as one more class), at least one image in all. A folder of class subfolders lists its
  images class by class, so the last 10% of all of them had been the last class alone: eval
  sentences of one class, training sentences without it."""
  mask = np.zeros(len(labels), bool)
  for label in np.unique(labels):
    members = np.flatnonzero(labels == label)
    mask[members[len(members) - len(members) // 10:]] = True
  if not mask.any():
    mask[-1] = True
  return mask


def split_mask(labels: np.ndarray, split: str, source: str = 'the source') -> np.ndarray:
  """The images of `split`: held-out sentences are built from images no training sentence shows (`held_out`)."""
  if split not in SPLITS:
    raise ConfigError(f'--split {split!r}: choose from {list(SPLITS)}')
  if split == 'all':
    return np.ones(len(labels), bool)
  keep = held_out(labels) if split == 'eval' else ~held_out(labels)
  if not keep.any():  # one image: it is held out, and nothing is left to train on
    raise ConfigError(f'--split train: {source} has {len(labels)} image, which eval holds out (the last 10% '
                      'of each class, at least one): none is left for training sentences; use --split all')
  return keep


def split_images(images: np.ndarray, labels: np.ndarray, split: str,
                 source: str = 'the source') -> tuple[np.ndarray, np.ndarray]:
  keep = split_mask(labels, split, source)
  return images[keep], labels[keep]


def _rotate_shift(image: np.ndarray, degrees: float, dx: float, dy: float) -> np.ndarray:
  from PIL import Image
  pil = Image.fromarray((image * 255).round().astype(np.uint8))
  moved = pil.rotate(degrees, resample=Image.BILINEAR, translate=(dx, dy), fillcolor=(0, 0, 0))
  return np.asarray(moved, np.float32) / 255


def _grey(image):
  return np.repeat(image.mean(axis=-1, keepdims=True), 3, axis=-1)


def _edges(image):
  """Sobel gradient magnitude of the grey image, scaled to [0, 1], as an RGB annotation image."""
  from scipy import ndimage
  grey = image.mean(axis=-1)
  magnitude = np.hypot(ndimage.sobel(grey, axis=0), ndimage.sobel(grey, axis=1))
  magnitude = magnitude / max(float(magnitude.max()), 1e-6)
  return np.repeat(magnitude[..., None], 3, axis=-1).astype(np.float32)


ANALOGY_TRANSFORMS = {
    'flip': lambda x: x[:, ::-1],
    'rotate90': lambda x: np.rot90(x, 1, axes=(0, 1)),
    'invert': lambda x: 1 - x,
    'shift': lambda x: np.roll(x, x.shape[1] // 4, axis=1),
}


def sentence_frames(kind: str, n: int, images: np.ndarray, labels: np.ndarray, frames: int,
                    seed: int, videos: list[np.ndarray] | None = None, stride: int = 1, step: int = 4,
                    pairs: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
  """Frames [frames, s, s, 3] of sentence `n` of `kind`: the same for the same (seed, kind, n).
  `step`: pixels per frame of sliding still-image videos (the tokenizer's cell: one token per frame).
  `pairs`: (each image's label picture, the indexes of the images that have one), for kind pairs."""
  rng = np.random.default_rng([seed, KINDS.index(kind), n])
  pick = lambda: images[rng.integers(len(images))]
  if kind == 'pairs':  # frames/2 different labelled images, each followed by its label
    annotations, labelled = pairs
    chosen = labelled[rng.choice(len(labelled), frames // 2, replace=False)]
    return np.stack([frame for i in chosen for frame in (images[i], annotations[i])])
  if kind == 'video' and videos:
    long_enough = [v for v in videos if len(v) >= (frames - 1) * stride + 1]
    clip = long_enough[rng.integers(len(long_enough))]
    start = rng.integers(len(clip) - (frames - 1) * stride)
    return clip[start:start + (frames - 1) * stride + 1:stride]
  if kind == 'video':
    # A still image in steady motion: half the clips slide by `step` pixels per frame in one of
    # eight directions, half turn by a fixed angle per frame (5-15 degrees either way).
    start = pick()
    if rng.integers(2):
      dx, dy = [(1, 0), (-1, 0), (0, 1), (0, -1), (1, 1), (1, -1), (-1, 1), (-1, -1)][rng.integers(8)]
      return np.stack([_rotate_shift(start, 0, dx * step * i, dy * step * i) for i in range(frames)])
    turn = rng.uniform(5, 15) * rng.choice([-1, 1])
    return np.stack([_rotate_shift(start, turn * i, 0, 0) for i in range(frames)])
  if kind == 'groups':
    classes = group_classes(labels, frames)
    members = np.flatnonzero(labels == classes[rng.integers(len(classes))])
    return images[rng.choice(members, frames, replace=False)]
  pairs = []
  transform = list(ANALOGY_TRANSFORMS.values())[rng.integers(len(ANALOGY_TRANSFORMS))]
  for _ in range(frames // 2):
    x = pick()
    if kind == 'analogy':
      pairs += [x, transform(x)]
    elif kind == 'colorization':
      pairs += [_grey(x), x]
    elif kind == 'edges':
      pairs += [x, _edges(x)]
    else:  # inpainting: a quarter-side square at a random place, filled grey
      side = images.shape[1] // 4 * 2
      top, left = rng.integers(0, images.shape[1] - side + 1, 2)
      masked = x.copy()
      masked[top:top + side, left:left + side] = 0.5
      pairs += [masked, x]
  return np.stack(pairs)


def group_classes(labels: np.ndarray, frames: int) -> np.ndarray:
  """The classes that can give a groups sentence: those with at least `frames` images. One drawn
  from a smaller class repeated an image, and a sentence that repeats its images teaches copying."""
  classes, counts = np.unique(labels[labels >= 0], return_counts=True)
  return classes[counts >= frames]


def group_notes(labels: np.ndarray, frames: int, count: int) -> list[str]:
  """A note when some classes are too small for a groups sentence (they are left out of groups)."""
  classes = np.unique(labels[labels >= 0])
  small = len(classes) - len(group_classes(labels, frames))
  if not count or not small:
    return []
  return [f'note: {small} of {len(classes)} classes have fewer than {frames} images (--frames {frames}) and give '
          'no groups sentence (one would repeat an image)']


def split_videos(videos: list[np.ndarray], split: str, source: str = 'the source') -> list[np.ndarray]:
  """Whole clips go to one side: eval = the last 10% of the videos (at least one), train = the rest."""
  if split not in SPLITS:
    raise ConfigError(f'--split {split!r}: choose from {list(SPLITS)}')
  if split == 'all':
    return videos
  if len(videos) < 2:  # the same clip would be both training and held-out data
    raise ConfigError(f'--split {split}: {source} holds {len(videos)} video, and whole videos go to one side: '
                      'a held-out split needs at least 2; use --split all')
  cut = len(videos) - max(1, len(videos) // 10)
  return videos[:cut] if split == 'train' else videos[cut:]


def kinds_for(images: np.ndarray, source_labels: np.ndarray, requested: list[str] | None, frames: int,
              labelled: int | None = None) -> list[str]:
  """The kinds a job builds: those asked for, checked, or every kind the source supports.
  `labelled`: images with a label picture (--labels), None without labels."""
  kinds = list(requested or KINDS)
  if labelled is None:
    if requested and 'pairs' in requested:
      raise ConfigError('--kind pairs needs --labels DIR: a folder of label pictures for the source folder\'s images')
    if not requested:
      kinds.remove('pairs')
  elif labelled < frames // 2:
    raise ConfigError(f'--labels: {labelled} labelled images are too few for pairs sentences of {frames // 2} '
                      f'different ones (--frames {frames})')
  if not requested and np.ptp(images[:64], axis=-1).max() < 1e-3:
    kinds.remove('colorization')  # grey sources (the digits): nothing to colour
  unknown = [k for k in kinds if k not in KINDS]
  if unknown:
    raise ConfigError(f'--kind {unknown}: choose from {list(KINDS)}')
  if frames % 2 and any(k in ('analogy', 'colorization', 'inpainting', 'edges', 'pairs') for k in kinds):
    raise ConfigError(f'--frames {frames}: analogy, colorization, inpainting, edges and pairs sentences are pairs; '
                      'use an even count')
  if 'groups' in kinds and not (source_labels >= 0).any():
    if requested:
      raise ConfigError('--kind groups needs categories (class subfolders, or builtin:digits)')
    kinds.remove('groups')
  if 'groups' in kinds and not len(group_classes(source_labels, frames)):
    if requested:
      raise ConfigError(f'--kind groups: no class has {frames} images (--frames {frames}), and a group that '
                        'repeats an image teaches copying: add images to the classes or lower --frames')
    kinds.remove('groups')
  return kinds


def _write_shard(path: Path, records: np.ndarray) -> None:
  from array_record.python.array_record_module import ArrayRecordWriter
  with atomic_path(path) as temp:
    writer = ArrayRecordWriter(str(temp), SHARD_WRITER_OPTIONS)
    for record in records:
      writer.write(record.astype(TOKEN_DTYPE).tobytes())
    writer.close()


@dataclasses.dataclass(frozen=True)
class ShardSpec:
  """One output shard: sentences [start, stop) of `kind`, written to `name` under the job's out dir."""
  kind: str
  start: int
  stop: int
  name: str


@dataclasses.dataclass
class TokenizeJob:
  """A checked tokenize job: its inputs (tokenizer, images) and its shards. `lvm tokenize` writes the
  shards in a loop; the Beam pipeline (lvm/beam_tokenize.py) writes them on its workers."""
  tokenizer_dir: str
  out: Path
  spec: dict
  tokenizer: object
  images: np.ndarray
  labels: np.ndarray
  videos: list | None
  shards: list[ShardSpec]
  pairs: tuple[np.ndarray, np.ndarray] | None = None  # (label pictures, labelled image indexes)
  read_threads: int = 8  # a streamed source's sentences are built (their images decoded) in this many

  @property
  def seq_len(self) -> int:
    return self.spec['frames'] * self.tokenizer.config.tokenizer.tokens_per_image


def coverage_notes(counts: dict[str, int], num_images: int, frames: int, from_videos: bool,
                   labelled: int | None = None) -> list[str]:
  """A note per kind whose sentences leave most of the source unseen. Sentences draw their images at
  random (a pure function of seed, kind and n), so the default 2048 per kind covers a laptop folder
  many times over and a large dataset only in part; without a word, a user tokenizing 100k images
  would train on ~8% of them."""
  notes = []
  for kind, count in counts.items():
    per_sentence = frames if kind == 'groups' or (kind == 'video' and from_videos) else \
        1 if kind == 'video' else frames // 2
    drawn = count * per_sentence
    pool = labelled if kind == 'pairs' else num_images
    seen = 1 - np.exp(-drawn / pool)  # expected share drawn at least once (uniform, with replacement)
    if seen < 0.5:
      notes.append(f'note: {count} {kind} sentences draw {drawn:,} images from a source of {pool:,}: about '
                   f'{seen:.0%} of them appear; --sentences (or --kind-sentences {kind}=N) to use more of it')
  return notes


def video_notes(named: list[tuple[str, np.ndarray]], count: int, frames: int, stride: int) -> list[str]:
  """Videos too short for one clip give no video sentence, and `count` clips drawn from fewer distinct
  windows repeat them: a folder of 3 ten-frame videos at stride 2 has 12 windows, so the default
  2,048 sentences hold each about 170 times; said instead of done silently."""
  if not count:  # no video sentences asked for: their clips are not drawn
    return []
  span = (frames - 1) * stride + 1
  notes = []
  short = [name for name, video in named if len(video) < span]
  if short and len(short) < len(named):  # none long enough is an error (plan_tokenize_job)
    notes.append(f'note: {len(short)} of the {len(named)} videos {"has" if len(short) == 1 else "have"} fewer than {span} frames (--frames {frames} at '
                 f'--stride {stride}) and {"gives" if len(short) == 1 else "give"} no video sentence: {", ".join(short[:5])}{" ..." if len(short) > 5 else ""}')
  windows = sum(len(video) - span + 1 for _, video in named if len(video) >= span)
  if 0 < windows and count >= 2 * windows:  # each about twice or more: worth a word
    notes.append(f'note: {count:,} video sentences from {windows:,} distinct clips ({frames} frames at stride '
                 f'{stride}): each appears about {count / windows:,.0f} times (more videos, or fewer sentences: '
                 '--kind-sentences video=N)')
  return notes


def plan_tokenize_job(tokenizer_dir: str, source: str, kinds: list[str] | None, out: str, *, frames: int = 4,
                      sentences: int = 2048, records_per_shard: int = 512, strict: bool = False, seed: int = 0,
                      kind_sentences: dict[str, int] | None = None, split: str = 'all', stride: int = 1,
                      tpu_path: str | None = None, claim: bool = True, note_coverage: bool = True,
                      labels: str | None = None, label_ids: bool = False, stream: str = 'auto', read_threads: int = 8,
                      listed: tuple | None = None, scanned: dict | None = None) -> TokenizeJob:
  """Reads and checks every input before anything is written. `claim`: record the job in `out`
  (refusing a directory that holds another job's shards) and remove half-written shards of an
  interrupted run — the driver does this once; workers of a distributed run pass False.
  `note_coverage`: say which kinds leave most of the source unseen (`coverage_notes`). `labels`: a
  folder of label pictures for a folder source's images (pairs sentences); `label_ids`: they hold
  class ids, painted in PASCAL VOC's colours (data_pipelines/annotation_pairs.py). `stream`: the
  source decoded into memory or as sentences draw it, in `read_threads` threads
  (lvm/sentence_sources.py); `listed`: the folder's `image_files`, when listed already; `scanned`: a
  streamed folder's headers, read already (data_pipelines/image_headers.py, as JSON)."""
  from data_pipelines.image_headers import HeaderScan
  from lvm.sentence_sources import read_sentence_source, stream_choice, streamed_fingerprint
  check_at_least(1, frames=frames, sentences=sentences, records_per_shard=records_per_shard, stride=stride,
                 read_threads=read_threads,
                 **{f'kind_sentences {k}': v for k, v in (kind_sentences or {}).items()})
  check_at_least(0, seed=seed)  # numpy's generator takes no negative seed
  if labels is None and label_ids:
    raise ConfigError('--label-ids without --labels')
  if claim:
    refuse_job_workdir(out)
  from lvm.tokenizer_commands import load_tokenizer
  tokenizer = load_tokenizer(tokenizer_dir, tpu_path)
  tconfig = tokenizer.config.tokenizer
  streamed, listing = stream_choice(source, tconfig.image_size, stream, labels, out, STATE_FILE)
  images, classes, videos, pairs, notes = read_sentence_source(
      source, tconfig.image_size, split, strict, labels, label_ids,
      video_sentences=(kind_sentences or {}).get('video', sentences) if 'video' in (kinds or KINDS) else 0,
      frames=frames, stride=stride, streamed=streamed, listed=listed or listing,
      scanned=HeaderScan.from_json(scanned) if scanned else None)
  tconfig.check_images(images, source)
  labelled = None if pairs is None else len(pairs[1])
  kinds = kinds_for(images, classes, kinds, frames, labelled)
  unknown = sorted(set(kind_sentences or {}) - set(kinds))
  if unknown:
    raise ConfigError(f'--kind-sentences names kinds this job does not build: {unknown} (building {kinds})')
  counts = {kind: (kind_sentences or {}).get(kind, sentences) for kind in kinds}
  if claim and note_coverage:
    for note in (notes + group_notes(classes, frames, counts.get('groups', 0))
                 + coverage_notes(counts, len(images), frames, from_videos=videos is not None, labelled=labelled)):
      progress.say(note)
  spec = {'source': source, 'split': split, 'kinds': kinds, 'frames': frames, 'stride': stride, 'sentences': counts,
          'records_per_shard': records_per_shard, 'seed': seed, 'tokenizer_checksum': tokenizer.checksum,
          'source_images': (streamed_fingerprint(images, classes) if streamed
                            else images_fingerprint(images, classes, *(pairs or ())))}
  if labels is not None:  # only then: the specs of jobs without labels stay as they were
    spec.update(labels=absolute(labels), label_ids=label_ids)
  out = make_workdir(out) if claim else as_path(out)
  if claim:
    state_path = out / STATE_FILE
    if state_path.is_file():
      previous = read_json(state_path)
      previous.setdefault('source_images', spec['source_images'])  # a job started before it was recorded
      if 'sizes_sha256' not in previous['source_images']:  # streamed by a version that recorded names only
        spec['source_images'].pop('sizes_sha256', None)
      if previous['source_images'] != spec['source_images']:
        before, now = previous['source_images'], spec['source_images']
        digest = lambda fingerprint: fingerprint.get('sha256') or fingerprint.get('names_sha256')
        resized = digest(before) == digest(now)  # streamed: the same names, other sizes
        what = 'the same files, some of them now of other sizes' if resized else f'{now["count"]} images ({digest(now)})'
        raise ConfigError(f'{out} holds shards of {source} as it was when they were written ({before["count"]} '
                          f'images, fingerprint {digest(before)}); it now reads {what}: the rest would be built '
                          'from other images. Use a new --out')
      if previous != spec:
        changed = {k: (previous.get(k), v) for k, v in spec.items() if previous.get(k) != v}
        raise ConfigError(f'{out} holds shards of another tokenize job ({changed}); use a new --out')
    write_json_atomic(state_path, spec)  # process 0's (every host checks, one writes)
    import jax
    for stale in out.glob(f'.*{SHARD_SUFFIX}.tmp*') if jax.process_index() == 0 else ():
      stale.unlink()  # a shard an interrupted run was writing
  shards = []
  for kind in kinds:
    shards_per_kind = -(-counts[kind] // records_per_shard)
    for shard in range(shards_per_kind):
      shards.append(ShardSpec(kind, shard * records_per_shard, min(counts[kind], (shard + 1) * records_per_shard),
                              f'{kind}-{shard:05d}-of-{shards_per_kind:05d}{SHARD_SUFFIX}'))
  return TokenizeJob(str(tokenizer_dir), out, spec, tokenizer, images, classes, videos, shards, pairs, read_threads)


def images_fingerprint(images: np.ndarray, labels: np.ndarray, *pairs: np.ndarray) -> dict:
  """The source's images as a resumed job checks them: images added to (or changed in) a folder
  between two runs would build the remaining shards from another set than the first ones (and,
  with --labels, the label pictures and which images have one)."""
  import hashlib
  digest = hashlib.sha256(np.ascontiguousarray(images).tobytes())
  digest.update(np.ascontiguousarray(labels).tobytes())
  for array in pairs:
    digest.update(np.ascontiguousarray(array).tobytes())
  return {'count': int(len(images)), 'sha256': digest.hexdigest()[:16]}


def write_sentence_shard(job: TokenizeJob, shard: ShardSpec) -> None:
  """Builds, encodes and writes one shard (whole, under a temporary name, then renamed)."""
  tconfig = job.tokenizer.config.tokenizer

  def frames_of(n):
    return sentence_frames(shard.kind, n, job.images, job.labels, job.spec['frames'], job.spec['seed'], job.videos,
                           job.spec['stride'], step=tconfig.downsample_factor, pairs=job.pairs)
  # Built as the encoder asks, a batch at a time (lvm/shard_frames.py), not the shard's records x
  # frames images at once; a streamed source's sentences in threads (PIL decodes without the GIL).
  from lvm.shard_frames import ShardFrames
  threads = 1 if isinstance(job.images, np.ndarray) else job.read_threads
  with ShardFrames(frames_of, shard.start, shard.stop - shard.start, job.spec['frames'], threads) as frames:
    tokens = job.tokenizer.encode(frames)
  _write_shard(job.out / shard.name, tokens.reshape(shard.stop - shard.start, job.seq_len))


def finish_tokenize_job(job: TokenizeJob, written: int, started: float, runner: str = 'local') -> dict:
  """manifest.json (written last, once every shard exists) and tokenize_result.json."""
  missing = [s.name for s in job.shards if not (job.out / s.name).exists()]
  if missing:
    raise RuntimeError(f'{job.out}: {len(missing)} shards were not written (first: {missing[0]}); rerun the job')
  tconfig = job.tokenizer.config.tokenizer
  manifest = {'job': 'lvm tokenize', **job.spec, 'seq_len': job.seq_len, 'tokens_per_image': tconfig.tokens_per_image,
              'codebook_size': tconfig.codebook_size, 'vocab_size': tconfig.codebook_size + SPECIAL_TOKENS,
              'special_token_ids': [tconfig.codebook_size, tconfig.codebook_size + SPECIAL_TOKENS - 1],
              'records_per_kind': job.spec['sentences'], 'shards': [s.name for s in job.shards],
              'images': int(len(job.images)), **tokenizer_location(job.tokenizer_dir, job.out)}
  write_json_atomic(job.out / 'manifest.json', manifest)
  result = dict(manifest, shards_written_this_run=written, runner=runner, wall_s=time.time() - started,
                versions=versions())
  write_json_atomic(job.out / 'tokenize_result.json', result)
  return result


def tokenizer_location(tokenizer_dir, out) -> dict:
  """How a manifest names its tokenizer so that later jobs find it from any folder: its absolute
  path, and (both local) its path relative to the shards' folder, which still holds when the two
  are moved together (a copied run folder)."""
  location = {'tokenizer': absolute(tokenizer_dir)}
  if not is_remote(tokenizer_dir) and not is_remote(out):
    location['tokenizer_relative'] = os.path.relpath(absolute(tokenizer_dir), absolute(out))
  return location


def manifest_tokenizer(sentences_dir, manifest: dict) -> str:
  """The tokenizer a manifest names: beside the shards where it was when they were tokenized, else
  at its absolute path (a manifest from before the relative path was recorded: its path as given)."""
  sentences_dir = as_path(sentences_dir)
  relative = manifest.get('tokenizer_relative')
  candidates = ([joined(sentences_dir, relative)] if relative else []) + [manifest['tokenizer']]
  for candidate in candidates:
    if as_path(candidate).is_dir():
      return candidate
  raise ConfigError(f'{sentences_dir}/manifest.json names the tokenizer {manifest["tokenizer"]!r}, which is not there '
                    f'(looked at {candidates}); pass --tokenizer (Prompter.load(..., tokenizer=) in Python)')


def tokenize_command(tokenizer_dir: str, source: str, kinds: list[str] | None, out: str, **options) -> dict:
  """`lvm tokenize`: every shard, batched and sharded over this machine's devices, or on a slice of
  several hosts each shard on one host's devices (options: those of `plan_tokenize_job`)."""
  import jax
  from core.distributed import all_or_none, each_process
  started = time.time()
  listing = {}
  hosts, me = jax.process_count(), jax.process_index()
  # On several hosts (a slice) every host checks the job and process 0 claims the folder; then each
  # host writes every N-th shard, encoding on its own devices, and process 0 writes the manifest. A
  # step that fails on one host (a bad file under --strict, a full disk) stops every host.
  # Streamed or in memory: every host alike (a file truncated after its header is left out in
  # memory, replaced streamed), so every host streams when one would.
  streamed = any(each_process('tokenize: the source held in memory or streamed',
                              lambda: _host_stream_choice(tokenizer_dir, source, out, options, listing)))
  options = dict(options, stream='always' if streamed else 'never', listed=listing.get('listed'))
  if streamed and hosts > 1 and not source.startswith('tfds:'):
    # A streamed folder's headers (one open per file: minutes for ImageNet, more on gs://) are read
    # a share on each host, and what they found is put together on every host.
    from data_pipelines.image_headers import scan_on_every_host
    listed, scanned = scan_on_every_host(source, options['listed'], 'tokenize: image headers read, a share on each host')
    options.update(listed=listed, scanned=scanned.to_json())
  with all_or_none('tokenize: the output folder claimed'):
    job = plan_tokenize_job(tokenizer_dir, source, kinds, out, **options)
  if hosts > 1:
    job.tokenizer = job.tokenizer.on_this_host()
  written = 0
  with all_or_none('tokenize: every shard written'):
    for number, shard in enumerate(job.shards):
      if number % hosts != me or (job.out / shard.name).exists():
        continue  # another host's, or finished by an earlier run (the same records, by construction)
      write_sentence_shard(job, shard)
      written += 1
      progress.say(f'tokenize: {shard.name} ({shard.stop - shard.start} sentences of {job.seq_len} tokens)')
  if hosts > 1:
    from jax.experimental import multihost_utils
    written = int(np.sum(multihost_utils.process_allgather(np.int32(written))))
  with all_or_none('tokenize: the manifest written'):  # by process 0; the others wait for it
    result = finish_tokenize_job(job, written, started)
  return result


def _host_stream_choice(tokenizer_dir: str, source: str, out: str, options: dict, listing: dict) -> bool:
  """This host's choice for `--stream` (`stream_choice`; the folder's listing kept in `listing`)."""
  from core.workdir import read_run_config
  from lvm.sentence_sources import stream_choice
  from lvm.tokenizer_commands import MADE_BY
  from lvm.tokenizer_task import TokenizerRunConfig
  refuse_job_workdir(out)  # checked before the tokenizer, as in `plan_tokenize_job`
  size = read_run_config(tokenizer_dir, TokenizerRunConfig, MADE_BY)[0].tokenizer.image_size
  streamed, listing['listed'] = stream_choice(source, size, options.get('stream', 'auto'), options.get('labels'),
                                              out, STATE_FILE)
  return streamed
