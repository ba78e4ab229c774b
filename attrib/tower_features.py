"""Full-scale base features φ (FastGDA, fastgda.md §3): DINO ViT-B/16 CLS ⊕ CLIP ViT-B/32 text (and
image), concatenated raw, for image lists (TSV of `image<TAB>caption`), in FastGDA's layout:
WORKDIR/features/<name>/{data_feats, train_query_feats, test_query_feats}.npy.

Every listed image is checked (it exists, its header reads) before a tower runs; each file is
computed in parts of `rows_per_part` rows written as they are done, so that a failure costs one part.
"""
from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from attrib.student_data import FEATURE_FILES
from core import progress
from core.batching import map_batches
from core.errors import ConfigError, UserError
from core.paths import as_path, is_remote
from core.workdir import load_npy, npy_shape, read_json, save_npy_atomic, write_json_atomic

TOWER_PARTS = ('dino', 'clip', 'clip_text')


class TowerFeaturizer:
  """FastGDA's φ parts from imported checkpoints: 'dino' (ViT-B/16 CLS, 768), 'clip' (image, 512) and
  'clip_text' (512); a name like 'dino+clip_text' concatenates them raw, as the paper does."""

  def __init__(self, dino_dir: str | None, clip_dir: str | None, mesh, rules, batch: int = 64):
    from attrib.vision_towers import ClipTokenizer, load_tower
    from core.paths import local_data
    self.mesh, self.rules, self.batch = mesh, rules, batch
    # A gs:// checkpoint is copied once into this host's data cache (safetensors maps local files).
    dino_dir, clip_dir = (local_data(str(d)) if d else None for d in (dino_dir, clip_dir))

    def placed(tower):
      # The weights live on the devices (replicated over the mesh): handed over as numpy arrays, each
      # call would copy them again (DINO ViT-B/16 on one image: 205 ms that way, 122 ms placed).
      apply, params, config = tower
      return apply, jax.device_put(params, NamedSharding(mesh, PartitionSpec())), config
    self.dino = placed(load_tower(dino_dir, 'dino')) if dino_dir else None
    self.clip_vision = placed(load_tower(clip_dir, 'clip_vision')) if clip_dir else None
    self.clip_text = placed(load_tower(clip_dir, 'clip_text')) if clip_dir else None
    self.tokenizer = ClipTokenizer(clip_dir) if clip_dir else None

  def part(self, name: str, images: list, texts: list[str]) -> np.ndarray:
    from attrib.vision_towers import preprocess_clip, preprocess_dino
    apply, params, _ = self._tower(name)
    if name == 'clip_text':
      ids, mask = self.tokenizer(texts)
      rows = np.concatenate([ids, mask], axis=1)
      t = ids.shape[1]
      return map_batches(lambda r: apply(params, r[:, :t], r[:, t:]), rows, self.mesh, self.rules, self.batch)
    prepare = preprocess_dino if name == 'dino' else preprocess_clip
    out = []
    for start in range(0, len(images), self.batch):  # decode and preprocess one batch at a time
      pixels = np.stack([prepare(_open_image(i)) for i in images[start:start + self.batch]])
      out.append(map_batches(lambda x: apply(params, x), pixels, self.mesh, self.rules, self.batch))
    return np.concatenate(out).astype(np.float32)

  def _tower(self, name: str):
    tower = {'dino': self.dino, 'clip': self.clip_vision, 'clip_text': self.clip_text}[name]
    if tower is None:
      raise ConfigError(f"feature part {name!r} needs the {'--dino' if name == 'dino' else '--clip'} checkpoint")
    return tower

  @staticmethod
  def parts(name: str) -> list[str]:
    parts = name.split('+')
    unknown = [p for p in parts if p not in TOWER_PARTS]
    if unknown:
      raise ConfigError(f'feature {name!r}: unknown part(s) {unknown}; full-scale parts are {TOWER_PARTS}')
    from attrib.features import refuse_repeated_parts
    refuse_repeated_parts(name, parts)
    return parts

  def dim(self, name: str) -> int:
    """Width of feature `name`: each part's projection (CLIP) or hidden size (DINO's CLS), summed."""
    return sum(self._tower(p)[2].projection_dim or self._tower(p)[2].hidden for p in self.parts(name))

  def __call__(self, name: str, images: list, texts: list[str]) -> np.ndarray:
    return np.concatenate([self.part(p, images, texts) for p in self.parts(name)], axis=1)


def query_featurizer(dino_dir: str | None, clip_dir: str | None) -> TowerFeaturizer:
  """The towers on this process's first device, for the Attributor: queries come a few at a time."""
  import jax
  from core.mesh import load_preset, make_mesh
  preset = load_preset(str(Path(__file__).resolve().parent.parent / 'tpu_configs' / 'cpu_1.py'))
  return TowerFeaturizer(dino_dir, clip_dir, make_mesh(preset, jax.local_devices()[:1]), preset.logical_rules,
                         batch=16)


def _open_image(image):
  from PIL import Image
  if isinstance(image, Image.Image):
    return image
  source = as_path(image) if is_remote(image) else image  # a URL other than gs:// refused as itself
  try:
    if is_remote(image):
      with source.open('rb') as f:
        opened = Image.open(f)
        opened.load()
      return opened
    opened = Image.open(image)
    opened.load()
    return opened
  except (OSError, ValueError, Image.DecompressionBombError) as e:
    raise ConfigError(f'{image}: not a readable image ({e})') from None


def read_image_list(path: str | Path, check_images: bool = True) -> tuple[list[str], list[str]]:
  """A TSV of `image path<TAB>caption` lines (relative paths are taken from the list's folder); the
  list and the images may be local or gs://. With `check_images`, every image must exist and open as
  an image (its header only: no pixels are decoded) before any tower runs."""
  images, captions, _ = read_listed_images(path, 'caption', check_images)
  return images, captions


def read_listed_images(path: str | Path, text: str, check_images: bool = True):
  """`read_image_list` for any `image<TAB>text` list (training captions, query prompts): images,
  texts and each one's line number in the list, for errors about it later."""
  path = as_path(path)
  if not path.is_file():
    raise ConfigError(f'{path} not found (expected lines of: image path <TAB> {text})')
  images, texts, lines = [], [], []
  # A byte-order mark (a list saved by Excel or Notepad) would otherwise start the first file's name.
  for number, line in enumerate(path.read_text().removeprefix('\ufeff').splitlines(), 1):
    if not line.strip():
      continue
    if '\t' not in line:
      raise ConfigError(f'{path}:{number}: expected `image path<TAB>{text}`, got {line[:80]!r}')
    image, caption = line.split('\t', 1)
    image_path = as_path(image) if is_remote(image) or Path(image).is_absolute() else path.parent / image
    images.append(str(image_path))
    texts.append(caption)
    lines.append(number)
  if not images:
    raise ConfigError(f'{path}: no images listed')
  if check_images:
    _check_headers(images, lines, path)
  return images, texts, lines


def _header_problem(image: str) -> str | None:
  from PIL import Image
  try:
    image = as_path(image)
  except UserError as e:  # a URL: named with its line of the list
    return str(e)
  if not image.is_file():
    return f'image {image} not found'
  try:
    with image.open('rb') as f, Image.open(f):
      return None
  except (OSError, ValueError, Image.DecompressionBombError) as e:
    return f'{image} is not a readable image ({e})'


def _check_headers(images: list[str], lines: list[int], listing) -> None:
  """Each listed file exists and is an image (a saved error page or an empty download is not),
  checked in threads: on gs:// or a gcsfuse mount every check is a round trip. On a slice of several
  hosts each checks every N-th file, and a bad one stops every host (core.distributed.all_or_none)."""
  from core.distributed import all_or_none
  with all_or_none(f'{listing}: every listed image checked'):
    share = range(jax.process_index(), len(images), jax.process_count())
    problem = first_header_problem([images[i] for i in share], [lines[i] for i in share], listing)
    if problem:
      raise ConfigError(problem)


def first_header_problem(images: list[str], lines: list[int], listing) -> str | None:
  """`<list>:<line>: <problem>` for the first of `images` that is missing or not an image, else None."""
  import concurrent.futures
  with concurrent.futures.ThreadPoolExecutor(max_workers=32) as pool:
    for number, problem in zip(lines, pool.map(_header_problem, images)):
      if problem:
        return f'{listing}:{number}: {problem}'
  return None


def _list_fingerprint(images: list[str], captions: list[str], *sources) -> str:
  import hashlib
  digest = hashlib.sha256()
  for value in (*images, *captions, *map(str, sources)):
    digest.update(value.encode() + b'\0')
  return digest.hexdigest()


def features_in_parts(featurizer, name: str, images: list[str], captions: list[str], path, rows_per_part: int,
                      fingerprint: str) -> None:
  """φ of a long list, `rows_per_part` rows at a time, each part written as it is done
  (`<file>.parts/`), so that a failure (a truncated image, a preempted host) loses one part: the rerun
  keeps the parts of the same list and towers (`fingerprint`) and computes the rest. The parts are
  joined into the file and removed once every part is there.

  On several hosts each computes every N-th part on its own devices (no image is read twice), and
  process 0 joins them."""
  from core.distributed import all_or_none
  hosts, me = jax.process_count(), jax.process_index()
  parts = path.parent / f'{path.name}.parts'
  stamp = parts / 'list.json'
  with all_or_none(f'{path}: parts folder checked'):
    if me == 0:
      if parts.exists() and not (stamp.is_file() and read_json(stamp) ==
                                 {'fingerprint': fingerprint, 'rows_per_part': rows_per_part}):
        parts.rmtree()  # another list, other towers or another part size: nothing in it is ours
      parts.mkdir(parents=True, exist_ok=True)
      write_json_atomic(stamp, {'fingerprint': fingerprint, 'rows_per_part': rows_per_part})
  starts = range(0, len(images), rows_per_part)
  computed = {}
  # A host's part that fails (an image truncated after its header) stops every host, each saying why.
  with all_or_none(f'{path}: every part written'):
    for n, start in enumerate(starts):
      part, rows = parts / f'{start:011d}.npy', min(rows_per_part, len(images) - start)
      if n % hosts != me or (npy_shape(part) or (None,))[0] == rows:  # another host's, or done before
        continue
      if len(starts) > 1:
        progress.say(f'features: {name} part {n + 1}/{len(starts)} (rows {start}-{start + rows - 1})')
      computed[start] = featurizer(name, images[start:start + rows], captions[start:start + rows])
      save_npy_atomic(part, computed[start])
  with all_or_none(f'{path}: written'):
    if me == 0:
      save_npy_atomic(path, np.concatenate([computed[start] if start in computed
                                            else load_npy(parts / f'{start:011d}.npy') for start in starts]))
      parts.rmtree()


def featurizer_mesh(preset):
  """The preset's mesh on one host. On several, this host's devices alone, data parallel: each host
  featurizes parts of its own (features_in_parts), and no batch waits for another host's images."""
  from core.mesh import host_mesh, make_mesh
  return make_mesh(preset) if jax.process_count() == 1 else host_mesh()


def tower_features_command(workdir: str, names: list[str], dino_dir: str | None, clip_dir: str | None,
                           lists: dict[str, str], tpu_path: str, rows_per_part: int = 8192) -> dict:
  """Full-scale φ for image lists (training set, training queries, test queries) into
  WORKDIR/features/<name>/ in FastGDA's layout; files already written are kept, and a file cut short
  resumes from its last written part of `rows_per_part` rows."""
  from core.mesh import load_preset
  if rows_per_part < 1:
    raise ConfigError(f'--rows-per-part must be >= 1, got {rows_per_part}')
  if 'train' not in lists or not lists['train']:
    raise ConfigError('--train-list is required (the training images and their first captions)')
  sets = {which: read_image_list(path) for which, path in lists.items() if path}  # all lists checked first
  preset = load_preset(tpu_path)
  featurizer = TowerFeaturizer(dino_dir, clip_dir, featurizer_mesh(preset), preset.logical_rules)
  written = []
  for name in names:
    out = as_path(workdir) / 'features' / name
    out.mkdir(parents=True, exist_ok=True)
    for which, (images, captions) in sets.items():
      path = out / FEATURE_FILES[which]
      if (npy_shape(path) or (None,))[0] == len(images):  # written by an earlier run
        continue
      progress.say(f'features: {name} of {len(images)} {which.replace("_", " ")}')
      fingerprint = _list_fingerprint(images, captions, name, dino_dir, clip_dir)
      features_in_parts(featurizer, name, images, captions, path, rows_per_part, fingerprint)
      written.append(str(path))
  return {'job': 'attrib features', 'features': names, 'written': written,
          'directory': str(as_path(workdir) / 'features')}
