"""Small helpers for the files every job writes into its workdir.

Every file a job writes goes through `atomic_path`: it is written under a temporary name next to its
final place and renamed when complete, so a reader, a rerun or a resumed job never sees half a file,
and a failing writer leaves nothing behind. On gs:// (no rename there) the file is uploaded in one
piece when complete: an object becomes visible only once its upload finishes, the same guarantee.
Paths are `core.paths.as_path`: local or gs:// alike.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import platform
import shutil
import tempfile
from importlib import metadata
from pathlib import Path

import jax
import numpy as np

from core.paths import as_path, is_remote

RUN_CONFIG_FILE = 'config.json'  # the run's config and slice preset: state later jobs read


def read_run_config(workdir: str | Path, config_type: type, made_by: str):
  """(config, preset path) a training or import job stored in `workdir`; a workdir of another kind
  (an LVM run given to a diffusion command, or the reverse) is named as such."""
  from core.config import from_dict
  from core.errors import ConfigError
  path = as_path(workdir) / RUN_CONFIG_FILE
  if not path.is_file():
    if enclosing := enclosing_workdir(workdir):
      raise ConfigError(f'{path} not found: {workdir} is a folder inside the workdir {enclosing}'
                        f'{what_it_holds(enclosing / RUN_CONFIG_FILE)}; pass {enclosing} itself')
    raise ConfigError(f'{path} not found: is {workdir} a workdir made by {made_by}?{quickstart_runs(workdir)}')
  try:
    stored = json.loads(path.read_text())
    config, tpu = from_dict(config_type, stored['config']), stored['tpu']
  except (ValueError, KeyError, TypeError) as e:
    key, kind = _held_kind(path)
    if kind and key not in {f.name for f in dataclasses.fields(config_type)}:
      # Another job's workdir: which one is all the user needs to know, not the dataclass's complaint.
      raise ConfigError(f'{workdir} was not made by {made_by}: it holds {kind}') from None
    raise ConfigError(f'{path} does not describe a {config_type.__name__} run ({type(e).__name__}: {e}); '
                      f'{workdir} was not made by {made_by}{what_it_holds(path)}') from None
  from core.mesh import recorded_preset
  return config, recorded_preset(tpu)


def config_of_run(config_path: str | None, workdir, config_type: type, made_by: str, example: str):
  """A training job's config: its --config file, or without one the config a rerun's workdir recorded
  when it started (continuing a run, say the quickstart's, for more steps needs no retyping of the
  file and every --set it was made with). --set overrides go on top of either."""
  from core.config import ConfigError, load_config_file
  if config_path:
    return load_config_file(config_path, expect=config_type)
  if not workdir or not (as_path(workdir) / RUN_CONFIG_FILE).is_file():
    raise ConfigError(f'--config: the config file of a new run, e.g. {example} (a rerun of a workdir may leave it '
                      f'out: it continues with the config the workdir recorded){quickstart_runs(workdir) if workdir else ""}')
  return read_run_config(workdir, config_type, made_by)[0]


# A run's config.json by its config's top-level groups: which job made it, for a workdir given to a
# command of another kind (a tokenizer's to `lvm generate`, an LVM's to `attrib teacher`).
_RUN_KINDS = (('tokenizer', 'a tokenizer run (`lvm train-tokenizer` / `lvm import-tokenizer`)'),
              ('unet', 'a diffusion model (`attrib train-model` / `attrib import-diffusers`)'),
              ('model', 'an LVM run (`lvm train` / `lvm import-hf`)'))


# The quickstart's folder holds its jobs' workdirs, not a run of its own (launch.py quickstart).
QUICKSTART_RUNS = (('tokenizer', 'its tokenizer'), ('lvm', 'its LVM'), ('attrib', 'its attribution workdir'))


def enclosing_workdir(folder) -> Path | None:
  """The workdir that `folder` lies in (its checkpoints/, a step folder, a student's index/), for a
  folder given where the workdir itself was meant; None when it is in none."""
  def is_workdir(parent) -> bool:  # a job's config.json, not any (a Hugging Face model folder has one)
    try:
      stored = json.loads((parent / RUN_CONFIG_FILE).read_text())
    except (OSError, ValueError):
      return False
    return isinstance(stored, dict) and isinstance(stored.get('config'), dict) and 'tpu' in stored

  try:
    folder = as_path(folder) if is_remote(folder) else as_path(folder).absolute()  # absolute() would make gs:// local
    return next((parent for parent in list(folder.parents)[:3] if is_workdir(parent)), None)
  except OSError:
    return None


def quickstart_runs(folder) -> str:
  """' (FOLDER holds jobs' workdirs, as the quickstart's folder: its LVM is FOLDER/lvm, ...)' for a folder
  holding runs under the quickstart's names (the quickstart's, or a user's runs/ of the README's names),
  given where one run is expected (`Attributor.load('runs/quickstart')`), else ''."""
  folder = as_path(folder)
  try:
    found = [f'{what} is {folder / name}' for name, what in QUICKSTART_RUNS
             if (folder / name / RUN_CONFIG_FILE).is_file()]
  except OSError:
    return ''
  return f' ({folder} holds jobs\' workdirs, as the quickstart\'s folder: {", ".join(found)})' if found else ''


def refuse_job_workdir(folder, flag: str = '--out') -> None:
  """Shards belong in a folder of their own: written into a job's workdir (an LVM run, a tokenizer)
  they lay among its checkpoints, and a later `lvm train --set data.train_path=` of that folder
  would read them as its data. Refused, naming what the folder holds."""
  from core.errors import ConfigError
  run_file = as_path(folder) / RUN_CONFIG_FILE
  if run_file.is_file():
    raise ConfigError(f'{flag} {folder} is the workdir of a job{what_it_holds(run_file)}; write the shards into a '
                      'folder of their own')


def what_it_holds(path) -> str:
  """': it holds <kind of run>' for a workdir's config.json (path), or '' when it cannot tell."""
  kind = _held_kind(path)[1]
  return f': it holds {kind}' if kind else ''


def _held_kind(path) -> tuple[str | None, str | None]:
  """(config group that tells, kind of run) of a workdir's config.json, or (None, None)."""
  try:
    stored = json.loads(path.read_text()).get('config', {})
  except (ValueError, OSError, AttributeError):
    return None, None
  return next(((key, what) for key, what in _RUN_KINDS if isinstance(stored, dict) and key in stored), (None, None))


def refuse_changed_run(workdir, previous, config, groups: tuple[str, ...], ignore=frozenset()) -> None:
  """Rerunning a training job into its workdir continues the run there; if the stored run's
  `groups` of settings (model shapes, data) differ from the new config, its checkpoints would not
  fit, or the run would go on with other data. Refused, naming every changed field; `ignore` holds
  (group, field) pairs that only change speed or memory."""
  from core.config import to_dict
  from core.errors import ConfigError
  for group in groups:
    old, new = to_dict(getattr(previous, group)), to_dict(getattr(config, group))
    changed = {k: f'{old.get(k)} -> {new[k]}' for k in new if old.get(k) != new[k] and (group, k) not in ignore}
    if changed:
      raise ConfigError(f'{workdir} holds a run with different {group} settings {changed}; use a new workdir')


# Settings that change how a run reports or saves itself, not what it learns; train.steps is what a
# rerun is expected to raise.
_BOOKKEEPING = frozenset(('train', name) for name in (
    'steps', 'log_every', 'checkpoint_every', 'keep_checkpoints', 'async_checkpoints', 'progress_bar',
    'tensorboard', 'preemption_check_every', 'eval_every', 'profile_from', 'profile_steps'))


def note_changed_training(workdir, previous, config, groups=('train', 'optim')) -> None:
  """A rerun continues the saved run with the settings it is given now. A batch size, learning rate
  or seed other than the run's own is allowed (a larger batch later in training is common), but
  a rerun that forgot a `--set` would change them silently: each change is noted."""
  from core import progress
  from core.config import to_dict
  checkpoints = as_path(workdir) / 'checkpoints'
  if not checkpoints.is_dir() or not any(p.name.isdigit() for p in checkpoints.iterdir()):
    return  # nothing saved: the run starts over with the new settings
  changed = []
  for group in groups:
    old, new = to_dict(getattr(previous, group)), to_dict(getattr(config, group))
    changed += [f'{group}.{k} {old.get(k)} -> {new[k]}' for k in new
                if old.get(k) != new[k] and (group, k) not in _BOOKKEEPING]
  if changed:
    progress.say(f'note: {workdir} continues its saved run with settings other than it trained with so far: '
                 f'{", ".join(changed)}')


def write_imported_run(workdir: str | Path, config, tpu_path: str | Path, params, source: str) -> None:
  """A workdir holding imported weights as step 0 of a run, as if training had produced them: its
  config and preset, then one checkpoint (written last, so a failure leaves no checkpoint to trust)."""
  from core import checkpoint
  from core.config import to_dict
  from core.mesh import preset_to_record
  workdir = make_workdir(workdir)
  write_json_atomic(workdir / RUN_CONFIG_FILE, {'config': to_dict(config), 'tpu': preset_to_record(tpu_path)})
  manager = checkpoint.make_manager(workdir, async_save=False)
  checkpoint.save(manager, 0, params=params, meta={'imported_from': str(source)}, force=True)
  manager.wait_until_finished()
  manager.close()


def make_workdir(path) -> Path:
  """Creates a job's workdir (local or gs://); a local path that is (or runs through) a file is a
  clear error."""
  from core.errors import UserError
  path = as_path(path)
  if not is_remote(path):
    for part in (path, *path.parents):
      if part.exists() and not part.is_dir():
        raise UserError(f'workdir {path}: {part} is a file, not a directory; choose another --workdir')
  path.mkdir(parents=True, exist_ok=True)
  return path


def check_writable(folder) -> None:
  """A command that writes into `folder` (made if missing) is refused before any work when it cannot:
  a folder the user may read but not write (a shared model, a read-only mount) ended in a traceback
  at the job's first file, after its work. gs:// is left to the bucket (its permissions are the
  server's). A path through a file is left to the jobs' own checks, which name it."""
  from core.errors import UserError
  if folder is None or is_remote(folder):
    return
  path = Path(folder).absolute()
  existing = next(p for p in (path, *path.parents) if p.exists())
  if existing.is_dir() and not os.access(existing, os.W_OK | os.X_OK):
    where = f'{folder} is' if existing == path else f'{folder}: its folder {existing} is'
    raise UserError(f'{where} not writable, and this command writes into it: copy it somewhere writable or choose '
                    'another (eval, query, generate and export-hf only read a workdir)')


def prepare_output_file(path, flag: str = '--out', image: bool = True):
  """The file a job will write at its end, checked (and its folder made) before any work starts, so
  a typo in `--out` does not throw away minutes of generation; a picture's name must end in a format
  `save_image_atomic` writes. Returns the path."""
  from core.errors import UserError
  path = as_path(path)
  if not is_remote(path) and path.is_dir():
    raise UserError(f'{flag} {path} is a directory; give a file name (e.g. {path / "grid.png"})')
  if image:
    image_format(path, flag)  # raises for a suffix no writer takes
  if is_remote(path):
    return path
  for part in path.parents:
    if part.exists() and not part.is_dir():
      raise UserError(f'{flag} {path}: {part} is a file, not a directory')
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
  except OSError as error:
    raise UserError(f'{flag} {path}: cannot create its folder ({error.strerror})') from None
  if not os.access(path.parent, os.W_OK):
    raise UserError(f'{flag} {path}: its folder {path.parent} is not writable')
  return path


def prepare_output_dir(path, flag: str = '--out'):
  """The folder a job will write its files into, checked and made before any work starts: a path
  that is, or runs through, a file is a clear error, not a traceback after the work. Returns it."""
  from core.errors import UserError
  path = as_path(path)
  if is_remote(path):
    return path
  for part in (path, *path.parents):
    if part.exists() and not part.is_dir():
      raise UserError(f'{flag} {path}: {part} is a file, not a directory')
  try:
    path.mkdir(parents=True, exist_ok=True)
  except OSError as error:
    raise UserError(f'{flag} {path}: cannot create it ({error.strerror})') from None
  if not os.access(path, os.W_OK):
    raise UserError(f'{flag} {path}: not writable')
  return path


@contextlib.contextmanager
def atomic_path(path):
  """Yields a local temporary path; it becomes `path` (a file or a folder) only if the block succeeds."""
  path = as_path(path)
  if is_remote(path):
    with tempfile.TemporaryDirectory(prefix='lvm_attrib_upload_') as folder:
      temp = Path(folder) / path.name
      yield temp
      _upload(temp, path)
    return
  path = Path(os.fspath(path))
  temp = path.with_name(f'.{path.name}.tmp{os.getpid()}')
  try:
    yield temp
    os.replace(temp, path)
  finally:
    if temp.is_dir():
      shutil.rmtree(temp, ignore_errors=True)
    else:
      temp.unlink(missing_ok=True)


def _upload(local: Path, remote) -> None:
  """A finished local file (or folder of files) to its object-store place, one object per file."""
  if local.is_dir():
    for file in sorted(p for p in local.rglob('*') if p.is_file()):
      target = remote / file.relative_to(local).as_posix()
      target.parent.mkdir(parents=True, exist_ok=True)
      target.write_bytes(file.read_bytes())
  else:
    remote.write_bytes(local.read_bytes())


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
  with atomic_path(path) as temp:
    temp.write_bytes(data)


def load_npy(path, mmap: bool = False) -> np.ndarray:
  """An .npy file, local (memory-mapped if asked) or gs:// (read whole: objects cannot be mapped).
  One cut short (a full disk, an interrupted copy) or not an .npy at all is a UserError naming it;
  numpy's ValueError named no file."""
  from core.errors import UserError
  path = as_path(path)
  try:
    if is_remote(path):
      return np.load(io.BytesIO(path.read_bytes()))
    return np.load(os.fspath(path), mmap_mode='r' if mmap else None)
  except FileNotFoundError:
    raise
  except (ValueError, EOFError, OSError) as e:
    raise UserError(f'{path}: not a readable .npy ({e}); it may be damaged or incomplete (a full disk, an '
                    'interrupted copy): rerun the job that wrote it') from None


def npy_shape(path) -> tuple[int, ...] | None:
  """The shape of an .npy file read from its header alone (a gs:// object is not downloaded whole);
  None when the file is missing or is not an .npy file."""
  path = as_path(path)
  if not path.is_file():
    return None
  try:
    with path.open('rb') as f:
      version = np.lib.format.read_magic(f)
      read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
      shape, _, _ = read(f)
  except (ValueError, OSError):
    return None
  return tuple(shape)


def load_npz(path) -> dict[str, np.ndarray]:
  """Every array of an .npz file, local or gs://."""
  path = as_path(path)
  source = io.BytesIO(path.read_bytes()) if is_remote(path) else os.fspath(path)
  with np.load(source) as stored:
    return {name: stored[name] for name in stored.files}


@contextlib.contextmanager
def local_copy(path):
  """A local file name for `path`, for libraries that take only those (ArrayRecord readers): the path
  itself when local, a temporary download of a gs:// object otherwise."""
  path = as_path(path)
  if not is_remote(path):
    yield Path(os.fspath(path))
    return
  with tempfile.TemporaryDirectory(prefix='lvm_attrib_download_') as folder:
    local = Path(folder) / path.name
    local.write_bytes(path.read_bytes())
    yield local


def save_npy_atomic(path: str | Path, array: np.ndarray) -> None:
  buffer = io.BytesIO()
  np.save(buffer, np.asarray(array))
  write_bytes_atomic(path, buffer.getvalue())


def save_npz_atomic(path: str | Path, **arrays) -> None:
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  write_bytes_atomic(path, buffer.getvalue())


IMAGE_FORMATS = {'.png': 'PNG', '.jpg': 'JPEG', '.jpeg': 'JPEG', '.webp': 'WEBP', '.bmp': 'BMP', '.tif': 'TIFF',
                 '.tiff': 'TIFF'}


def image_format(path, flag: str = '') -> str:
  """The format a picture is written in, from its file name: PNG unless the suffix names another."""
  from core.errors import UserError
  suffix = as_path(path).suffix.lower()
  if suffix and suffix not in IMAGE_FORMATS:
    raise UserError(f'{flag + " " if flag else ""}{path}: {suffix} is not an image format written here; end it in one of '
                    f'{", ".join(IMAGE_FORMATS)} (PNG keeps every pixel)')
  return IMAGE_FORMATS.get(suffix, 'PNG')


# The largest side each format can store (PIL raises a bare OSError past it); PNG's is 2^31 - 1.
MAX_SIDE = {'JPEG': 65_500, 'WEBP': 16_383}


def save_image_atomic(path: str | Path, pixels_hwc: np.ndarray) -> None:
  """uint8 [h, w] or [h, w, 3] pixels as an image file, in the format its name says (PNG by default)."""
  from PIL import Image
  from core.errors import UserError
  kind = image_format(path)
  if max(pixels_hwc.shape[:2]) > MAX_SIDE.get(kind, 2**31 - 1):
    raise UserError(f'{path}: a {pixels_hwc.shape[1]}x{pixels_hwc.shape[0]} picture is larger than {kind} can '
                    f'store ({MAX_SIDE[kind]:,} px a side); name it .png')
  with atomic_path(path) as temp:
    Image.fromarray(pixels_hwc).save(temp, format=kind)


def read_json(path):
  """A JSON file a job wrote (config.json, a manifest, a job state), local or gs://. One cut short
  (a full disk, an interrupted copy) is a UserError naming it, not json's bare 'Expecting value:
  line 3 column 16'; a missing one stays FileNotFoundError."""
  from core.errors import UserError
  path = as_path(path)
  try:
    return json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise UserError(f'{path}: not valid JSON ({e}); it may be damaged or incomplete (a full disk, an interrupted '
                    'copy): rerun the job that wrote it') from None


def write_json_atomic(path: str | Path, data: dict) -> None:
  """A job's JSON file, written by process 0 only (the other hosts hold the same numbers)."""
  if jax.process_index() != 0:
    return
  write_bytes_atomic(path, (json.dumps(data, indent=1, default=str) + '\n').encode())


def write_result_if_writable(path, result: dict) -> None:
  """The result file of a job that only reads its workdir (eval, query, generate, export-hf). A
  workdir may be readable and not writable (a shared model folder, a bucket with read access): the
  result is on stdout anyway, so a note replaces the file, where a traceback ended the finished job."""
  try:
    write_json_atomic(path, result)
  except OSError as error:  # local permissions, a read-only mount, gcsfs's 403 'Forbidden'
    from core import progress
    reason = (error.strerror or str(error) or type(error).__name__).splitlines()[0]
    progress.say(f'note: {path} not written ({reason}); the result is on stdout')


def default_file_mode() -> int:
  """The mode a plain `open(path, 'w')` gives a new file here (0666 less the umask)."""
  mask = os.umask(0)
  os.umask(mask)
  return 0o666 & ~mask


def versions() -> dict:
  out = {'python': platform.python_version()}
  for package in ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'grain', 'numpy'):
    try:
      out[package] = metadata.version(package)
    except metadata.PackageNotFoundError:
      pass
  return out
