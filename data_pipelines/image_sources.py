"""Images for the tokenizer, as float32 [size, size, 3] in [0, 1]: bundled real images (no download)
and image folders (nested class folders too), with every odd file converted or skipped by name.

Bundled: scikit-learn's 1,797 handwritten digits (8x8, 17 grey levels, upscaled), crops of its
two sample photographs (china.jpg, flower.jpg), and crops of the images scikit-image ships inside its
package (`skimage/data`: astronaut, camera, coffee, coins, the Hubble deep field, ...; read straight
from the package folder, so nothing is fetched). Folders (local or gs://): any file PIL reads; grayscale, palette,
RGBA (composited on white) and 16-bit images are converted to RGB, photos turned upright by their
EXIF orientation (as every viewer shows them); the shorter side is resized to
`size` (bicubic) and the centre cropped. A corrupt or truncated file is skipped with a warning that
names it and is counted (`strict=True` raises instead); hidden files and folders and `__MACOSX/`
(a Mac's metadata, named like the images) are left out, counted. Videos (`frames:DIR`): a subfolder
of frame images each, or an animated GIF, WebP or PNG each (PIL decodes those; other video files
are named, with the ffmpeg line that gives their frames).
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np

from core import progress
from core.errors import UserError
from core.paths import as_path, is_remote

IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.bmp', '.gif', '.tif', '.tiff', '.webp', '.apng')
# Clips that PIL decodes itself, with no video decoder: an animated GIF, WebP or PNG is a video in a
# folder of videos (`frames:DIR`) and a prompt of several frames; a still one is one image.
ANIMATED_SUFFIXES = ('.gif', '.webp', '.png', '.apng')
VIDEO_SUFFIXES = ('.mp4', '.mov', '.avi', '.mkv', '.webm', '.m4v', '.mpg', '.mpeg', '.wmv', '.flv')


class ImageDataError(UserError):
  pass


def digit_images(size: int) -> tuple[np.ndarray, np.ndarray]:
  """(images [1797, size, size, 3] in [0, 1], labels 0-9): the digits, smoothly upscaled, grey as RGB."""
  from PIL import Image
  from data_pipelines.bundled import load_digits
  digit_grey, labels = load_digits()
  grey = (digit_grey / 16.0 * 255).round().astype(np.uint8)
  images = np.stack([np.asarray(Image.fromarray(g).resize((size, size), Image.BICUBIC)) for g in grey])
  images = np.repeat(images[..., None], 3, axis=-1).astype(np.float32) / 255
  return images, labels.astype(np.int32)


def sample_photo_crops(size: int, count: int, seed: int = 0) -> np.ndarray:
  """`count` random square crops (64 to 256 px, resized to `size`) of scikit-learn's two photos."""
  from PIL import Image
  from data_pipelines.bundled import load_sample_photos
  photos = load_sample_photos()
  rng = np.random.default_rng(seed)
  crops = []
  for i in range(count):
    photo = photos[i % len(photos)]
    side = int(rng.integers(64, 257))
    top, left = rng.integers(0, photo.shape[0] - side), rng.integers(0, photo.shape[1] - side)
    crop = Image.fromarray(photo[top:top + side, left:left + side]).resize((size, size), Image.BICUBIC)
    crops.append(np.asarray(crop, np.float32) / 255)
  return np.stack(crops)


def skimage_files() -> list[Path]:
  """The image files scikit-image bundles in its package (no download: its other images need pooch)."""
  import importlib.util
  spec = importlib.util.find_spec('skimage')
  if spec is None or not spec.origin:
    raise ImageDataError("builtin:skimage needs scikit-image: pip install -e '.[data]'")
  folder = Path(spec.origin).parent / 'data'
  return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def skimage_crops(size: int, count: int, seed: int = 0, min_side: int = 64) -> tuple[np.ndarray, list[str]]:
  """(`count` random square crops of scikit-image's bundled images, resized to `size`, as float32
  [count, size, size, 3] in [0, 1]; the files used). Crops take 64 px up to the image's shorter side
  (at most 256), cycling through the images. Files PIL cannot read (a multi-page RGB TIFF) or smaller
  than `min_side` are skipped with a warning that names them."""
  from PIL import Image
  photos, used, skipped = [], [], []
  for path in skimage_files():
    try:
      with Image.open(path) as image:
        image.load()
        rgb = np.asarray(as_rgb(image))
    except (OSError, ValueError, SyntaxError) as e:
      skipped.append(f'{path.name} ({type(e).__name__})')
      continue
    if min(rgb.shape[:2]) < min_side:
      skipped.append(f'{path.name} ({rgb.shape[1]}x{rgb.shape[0]} px)')
      continue
    photos.append(rgb)
    used.append(path.name)
  if skipped:
    progress.say(f'builtin:skimage: skipped {len(skipped)} of {len(skipped) + len(used)} files: {", ".join(skipped)}')
  if not photos:
    raise ImageDataError('builtin:skimage: no readable image in scikit-image\'s data folder')
  rng = np.random.default_rng(seed)
  crops = []
  for i in range(count):
    photo = photos[i % len(photos)]
    height, width = photo.shape[:2]
    largest = min(256, height, width)
    side = int(rng.integers(min(min_side, largest), largest + 1))
    top, left = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
    crop = Image.fromarray(photo[top:top + side, left:left + side]).resize((size, size), Image.BICUBIC)
    crops.append(np.asarray(crop, np.float32) / 255)
  return np.stack(crops), used


BUILTIN_PARTS = ('digits', 'photos', 'skimage')


def builtin_images(name: str, size: int) -> np.ndarray:
  """'builtin:digits' | 'builtin:photos' | 'builtin:skimage', or several joined by '+'
  (e.g. 'builtin:digits+photos') -> float32 [N, size, size, 3]."""
  parts = name.split(':', 1)[1].split('+')
  unknown = [p for p in parts if p not in BUILTIN_PARTS]
  if unknown:
    raise ImageDataError(f'unknown built-in images {name!r}: choose from '
                         f'{", ".join("builtin:" + p for p in BUILTIN_PARTS)}, or several joined by \'+\'')
  out = []
  for part in parts:
    if part == 'digits':
      out.append(digit_images(size)[0])
    elif part == 'photos':
      out.append(sample_photo_crops(size, 1024))
    else:
      out.append(skimage_crops(size, 1024)[0])
  return np.concatenate(out)


def as_8bit(image):
  """16/32-bit grey PIL images scaled to 8 bits by their maximum (PIL's own conversion clips them at
  255: a 16-bit scan would come out almost all white); other modes are returned as they are."""
  from PIL import Image
  if image.mode in ('I;16', 'I;16B', 'I;16L', 'I', 'F'):
    array = np.asarray(image, np.float64)
    image = Image.fromarray((array / max(array.max(), 1) * 255).astype(np.uint8))
  return image


def as_rgb(image):
  """A PIL image of any mode -> an 8-bit RGB PIL image: 16/32-bit grey scaled to 8 bits, alpha
  composited on white."""
  from PIL import Image
  image = as_8bit(image)
  if image.mode in ('RGBA', 'LA', 'P', 'PA'):
    image = Image.alpha_composite(Image.new('RGBA', image.size, (255, 255, 255, 255)), image.convert('RGBA'))
  return image.convert('RGB')


def to_rgb_square(image, size: int) -> np.ndarray:
  """A PIL image of any mode -> float32 [size, size, 3] in [0, 1]: turned upright by its EXIF
  orientation, converted by `as_rgb`, shorter side resized to `size` (bicubic), centre cropped."""
  from PIL import Image, ImageOps
  # A phone stores a portrait photo as landscape pixels plus an EXIF Orientation tag; every viewer
  # turns it upright, and so must the tokenizer, or a folder of phone photos becomes sentences of
  # sideways images. (The attribution towers do not: FastGDA's released features were computed on
  # the stored pixels, and an added training image must be featurized the same way.)
  image = ImageOps.exif_transpose(image)
  image = as_rgb(image)
  w, h = image.size
  scale = size / min(w, h)
  image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
  w, h = image.size
  left, top = (w - size) // 2, (h - size) // 2
  return np.asarray(image.crop((left, top, left + size, top + size)), np.float32) / 255


def array_to_rgb_square(array: np.ndarray, size: int) -> np.ndarray:
  """uint8 [h, w], [h, w, 1|3|4] (a tfds image) -> float32 [size, size, 3] in [0, 1]."""
  from PIL import Image
  array = np.asarray(array)
  if array.ndim == 3 and array.shape[-1] == 1:
    array = array[..., 0]
  return to_rgb_square(Image.fromarray(array), size)


@dataclasses.dataclass(frozen=True)
class AnimationFrame:
  """Frame `index` (from 0) of an animated image file: how a prompt names one frame of a GIF clip."""
  path: str
  index: int

  def __str__(self) -> str:
    return f'{self.path}[frame {self.index}]'


def _read_pil(path, read):
  """`read(opened PIL image)` of one file (local or gs://); an unreadable file raises ImageDataError naming it."""
  import io
  from PIL import Image, UnidentifiedImageError
  if _is_video_file(path):
    raise video_files_error(path, [path], then='give frames of it as the images')
  source = as_path(path) if is_remote(path) else path  # a URL other than gs:// refused as itself
  try:
    # A gs:// object is fetched whole in one request: PIL's seeks on a remote file are round trips.
    with Image.open(io.BytesIO(source.read_bytes()) if is_remote(path) else path) as image:
      return read(image)
  # DecompressionBombError: over twice PIL's pixel limit (Image.MAX_IMAGE_PIXELS), not an OSError.
  # EOFError: a frame past an animation's end (a file that changed since it was listed).
  except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
    raise ImageDataError(f'{path}: not a readable image ({type(e).__name__}: {e})') from None


def load_image(path, size: int) -> np.ndarray:
  """One file (local or gs://), or an `AnimationFrame` of one, -> float32 [size, size, 3] in [0, 1];
  raises ImageDataError naming the file. An animated file gives its first frame."""
  if isinstance(path, AnimationFrame):
    def frame(image):
      image.seek(path.index)  # PIL composes a GIF's frames from the first, as a player shows them
      return to_rgb_square(image, size)
    return _read_pil(path.path, frame)

  def first(image):
    image.load()
    return to_rgb_square(image, size)
  return _read_pil(path, first)


def load_frames(path, size: int) -> np.ndarray:
  """Every frame of an image file (local or gs://): an animated GIF, WebP or PNG's in order, a still
  image's one -> float32 [frames, size, size, 3] in [0, 1]."""
  from PIL import ImageSequence
  return _read_pil(path, lambda image: np.stack([to_rgb_square(frame, size)
                                                        for frame in ImageSequence.Iterator(image)]))


def check_image_file(path) -> None:
  """That a file (local or gs://) exists and its header is an image's: ImageDataError naming it if not."""
  if not (as_path(path) if is_remote(path) else Path(path)).is_file():
    raise ImageDataError(f'{path}: no such image file')
  _read_pil(path, lambda image: None)


def animation_frames(path) -> int:
  """Frames in an image file (1 for a still image or a format that cannot animate), read from its header."""
  if Path(str(path)).suffix.lower() not in ANIMATED_SUFFIXES:
    return 1
  return _read_pil(path, lambda image: int(getattr(image, 'n_frames', 1)))


@dataclasses.dataclass
class FolderImages:
  """Every image under a folder, in sorted order; `labels` = index of the first-level subfolder
  (class folders), or -1 for files at the top."""
  images: np.ndarray
  labels: np.ndarray
  paths: list[str]
  classes: list[str]
  skipped: list[str]


def _is_video_file(path) -> bool:
  return Path(str(path)).suffix.lower() in VIDEO_SUFFIXES


def video_files_error(where, videos: list, then: str = 'give --source frames:frames/') -> 'ImageDataError':
  """What to do with video files, which are not decoded here (no video decoder is a dependency):
  their frames, one folder per video, are what every command reads."""
  first = Path(str(videos[0]))
  more = f' and {len(videos) - 1} more' if len(videos) > 1 else ''
  return ImageDataError(f'{where}: video files are not decoded here ({first.name}{more}): extract their frames '
                        f'first, one folder per video (mkdir -p frames/{first.stem} && ffmpeg -i {first.name} '
                        f'frames/{first.stem}/frame%d.png), '
                        f'then {then}')


def _folder(root):
  """A local folder as pathlib.Path, a gs:// one as epath (pathlib would read 'gs://b' as 'gs:/b')."""
  return as_path(root) if is_remote(root) else Path(root)


def _files_under(folder) -> list:
  """Every file below `folder`, sorted. On gs:// folder by folder (epath refuses a recursive glob
  there: one listing per folder, and class folders are few)."""
  if not is_remote(folder):
    return sorted(p for p in folder.rglob('*') if p.is_file())
  files = []
  for entry in folder.iterdir():
    files.extend(_files_under(entry) if entry.is_dir() else [entry])
  return sorted(files)


def _os_metadata(parts: tuple) -> bool:
  """A hidden file or folder (macOS's '._photo.jpg' beside each copied photo, '.ipynb_checkpoints/')
  or the '__MACOSX/' folder of a zip made on a Mac: metadata with an image's name, not an image,
  and as a folder it would become a class."""
  return any(part.startswith('.') or part == '__MACOSX' for part in parts)


def _loaded(files: list, size: int, remote: bool) -> list:
  """Each file's pixels, or the ImageDataError naming it, in the files' order. Objects in a bucket
  are fetched 16 at a time: one by one, each request's latency would add up."""
  def load(path):
    try:
      return load_image(path, size)
    except ImageDataError as e:
      return e
  if not remote:
    return [load(path) for path in files]
  import concurrent.futures
  with concurrent.futures.ThreadPoolExecutor(16) as pool:
    return list(pool.map(load, files))


def frame_order(path) -> tuple:
  """Frames in the order their numbers say: 'frame2.png' before 'frame10.png' (ffmpeg's `%d`
  names are not zero-padded, and in plain name order frame10 would come between frame1 and frame2)."""
  pieces = tuple((0, int(piece), '') if piece.isdigit() else (1, 0, piece) for piece in re.split(r'(\d+)', str(path)))
  return pieces, str(path)  # 'f2' and 'f02' tie on their numbers: then by name


def prompt_files(entries: list) -> list:
  """Prompt images as given, with a folder among them standing for its images in frame order (the
  frames of a video, as the quickstart writes them to lvm/next_frame_prompt/) and an animated GIF,
  WebP or PNG for its frames (`AnimationFrame`s); entries that are not paths (arrays, PIL images)
  pass as they are."""
  files = []
  for entry in entries:
    if not isinstance(entry, (str, Path)):
      files.append(entry)
      continue
    if not _folder(entry).is_dir():
      frames = animation_frames(entry) if _folder(entry).is_file() else 1
      files.extend([AnimationFrame(str(entry), i) for i in range(frames)] if frames > 1 else [entry])
      continue
    folder = _folder(entry)
    images = sorted((p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                     and not _os_metadata((p.name,))), key=frame_order)
    if not images:
      raise ImageDataError(f'{entry}: a folder with no image files ({", ".join(IMAGE_SUFFIXES)}) given as a prompt')
    files.extend(str(p) for p in images)
  return files


def image_files(root: str | Path, frames: bool = False) -> tuple:
  """(the folder as a path, every image file under it in name order, or `frame_order` with `frames`):
  hidden files and OS metadata left out (said), a folder of videos or without images refused."""
  root = _folder(root)
  if not root.is_dir():
    if _is_video_file(root):
      raise video_files_error(root, [root])
    if root.is_file():  # one image: a source is a folder of them (class subfolders give categories)
      raise ImageDataError(f'{root} is a file: a source is a folder of images (class subfolders give categories); '
                           f'put it in one, or give the folder it is in ({root.parent})')
    raise ImageDataError(f'{root}: no such image folder')
  everything = _files_under(root)
  files = [p for p in everything if p.suffix.lower() in IMAGE_SUFFIXES]
  if frames:
    files.sort(key=frame_order)
  metadata = [p for p in files if _os_metadata(p.relative_to(root).parts)]
  if metadata:  # not images at all: neither skipped as unreadable nor a failure under --strict
    files = [p for p in files if not _os_metadata(p.relative_to(root).parts)]
    progress.say(f'{root}: left out {len(metadata)} hidden or OS metadata files (names starting with ".", '
                 f'__MACOSX/), e.g. {metadata[0]}')
  if not files:
    videos = [p for p in everything if _is_video_file(p)]
    if videos:
      raise video_files_error(root, videos)
    raise ImageDataError(f'{root}: no image files ({", ".join(IMAGE_SUFFIXES)})')
  return root, files


def folder_images(root: str | Path, size: int, strict: bool = False, frames: bool = False,
                  listed: tuple | None = None) -> FolderImages:
  """Every image under `root` (local or gs://), in name order; `frames`: in `frame_order`.
  `listed`: `image_files(root)` when the caller listed the folder already."""
  root, files = listed or image_files(root, frames)
  classes = sorted({p.relative_to(root).parts[0] for p in files if len(p.relative_to(root).parts) > 1})
  images, labels, paths, skipped = [], [], [], []
  for path, loaded in zip(files, _loaded(files, size, is_remote(root))):
    if isinstance(loaded, ImageDataError):
      if strict:
        raise loaded
      skipped.append(str(path))
      progress.say(f'warning: skipped {loaded}')
      continue
    images.append(loaded)
    parts = path.relative_to(root).parts
    labels.append(classes.index(parts[0]) if len(parts) > 1 else -1)
    paths.append(str(path))
  if not images:
    raise ImageDataError(f'{root}: none of {len(files)} image files could be read')
  if skipped:
    progress.say(f'{root}: skipped {len(skipped)} of {len(files)} files (unreadable; --strict fails instead)')
  return FolderImages(np.stack(images), np.asarray(labels, np.int32), paths, classes, skipped)


def open_images(source: str, size: int, strict: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """(images, labels) of a `builtin:...` name, a `tfds:NAME:SPLIT` dataset, an image folder, or
  `frames:DIR` (every frame of its videos, unlabelled: a tokenizer trained on the clips that
  `lvm tokenize --source frames:DIR` will turn into sentences)."""
  if source.startswith('frames:'):
    images = np.concatenate(video_frames(source[len('frames:'):], size, strict))
    return images, np.full(len(images), -1, np.int32)
  if source.startswith('tfds:'):
    from data_pipelines.tfds_images import tfds_images
    return tfds_images(source, size)
  if source.startswith('builtin:'):
    if source == 'builtin:digits':
      return digit_images(size)
    images = builtin_images(source, size)
    return images, np.full(len(images), -1, np.int32)
  found = folder_images(source, size, strict)
  return found.images, found.labels


def named_videos(root: str | Path, size: int, strict: bool = False) -> list[tuple[str, np.ndarray]]:
  """A folder of videos -> (name, float32 [frames, size, size, 3]) per video, in name order. A video
  is a subfolder of frame images (in `frame_order`) or an animated GIF, WebP or PNG file (in its own
  order). Unreadable frames and files are skipped (counted) or, strict, an error; still images at
  the top of the folder, frames of no video, are left out and said. `tfds:NAME:SPLIT`: a tfds
  dataset of videos, one clip per example (data_pipelines/tfds_images.py)."""
  if str(root).startswith('tfds:'):
    from data_pipelines.tfds_images import tfds_videos
    return tfds_videos(str(root), size)
  root = _folder(root)
  if not root.is_dir():
    if _is_video_file(root):
      raise video_files_error(root, [root])
    raise ImageDataError(f'{root}: no such folder of videos')
  videos, stills = [], []
  for entry in sorted(p for p in root.iterdir() if not _os_metadata((p.name,))):
    if entry.is_dir():
      videos.append((str(entry), folder_images(entry, size, strict, frames=True).images))
    elif entry.suffix.lower() in IMAGE_SUFFIXES:
      try:
        frames = load_frames(entry, size) if entry.suffix.lower() in ANIMATED_SUFFIXES else None
      except ImageDataError as e:
        if strict:
          raise
        progress.say(f'warning: skipped {e}')
        continue
      if frames is not None and len(frames) > 1:
        videos.append((str(entry), frames))
      else:
        stills.append(entry.name)
  if stills:
    progress.say(f'{root}: left out {len(stills)} still images at its top level, e.g. {stills[0]} (a video is a '
                 'subfolder of frame images or an animated GIF, WebP or PNG)')
  if not videos:
    video_files = [p for p in _files_under(root) if _is_video_file(p)]
    if video_files:
      raise video_files_error(root, video_files)
    raise ImageDataError(f'{root}: no videos (a subfolder of frame images, or an animated GIF, WebP or PNG, '
                         'per video)')
  return videos


def video_frames(root: str | Path, size: int, strict: bool = False) -> list[np.ndarray]:
  """The videos of `named_videos`, without their names."""
  return [frames for _, frames in named_videos(root, size, strict)]
