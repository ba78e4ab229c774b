"""One path type for every file a job reads or writes: local paths and `gs://bucket/...` alike.

`etils.epath` is the path type orbax and grain already use for checkpoints; through it a workdir on
Cloud Storage is written by every host directly (no local copy that each host would keep to itself,
which is what `pathlib.Path('gs://b/run')` -> 'gs:/b/run' did). gs:// needs the `gcs` extra (gcsfs).
"""
from __future__ import annotations

import os
import shutil

from etils import epath

from core.errors import ConfigError

# Bytes per read while staging a gs:// data file onto this host's disk.
COPY_CHUNK = 16 << 20


def as_path(path) -> epath.Path:
  """`path` (str, pathlib.Path or epath.Path) as an epath.Path; gs:// kept intact."""
  if isinstance(path, epath.Path):
    return path
  text = os.fspath(path)
  if is_remote(text):
    if not text.startswith('gs://'):  # etils would raise KeyError('https://'); nothing downloads
      raise ConfigError(f'{text}: only local paths and gs:// are read (nothing is downloaded at run time: '
                        'save the file and give its path)')
    import importlib.util
    if importlib.util.find_spec('gcsfs') is None:
      raise ConfigError(f'{text}: gs:// paths need gcsfs: pip install -e ".[gcs]"')
  return epath.Path(text)


def is_remote(path) -> bool:
  """True for object-store paths (no rename, no append, no local file name to hand to a library)."""
  return '://' in os.fspath(path) if not isinstance(path, epath.Path) else '://' in str(path)


def absolute(path) -> str:
  """`path` as the text a later job (maybe on another host or in another folder) can open again:
  a local path resolved, a gs:// path as it is."""
  path = as_path(path)
  return str(path) if is_remote(path) else str(path.resolve())


def within(path, workdir) -> str:
  """`path` as a later job records it: relative to `workdir` when inside it (so that the workdir can
  be copied or moved, to another machine or bucket, and still be read), else absolute."""
  path, root = absolute(path), absolute(workdir).rstrip('/') + '/'
  return path[len(root):] if path.startswith(root) else path


def joined(folder, relative: str) -> str:
  """`folder`/`relative` with its '..' resolved, keeping a gs:// prefix (normpath would fold its '//')."""
  text = str(folder)
  scheme, sep, rest = text.partition('://') if is_remote(text) else ('', '', text)
  return scheme + sep + os.path.normpath(os.path.join(rest, relative))


def resolve_within(recorded: str, workdir) -> str:
  """The inverse of `within`: an absolute path (or gs:// URL) of what `workdir` recorded."""
  if is_remote(recorded) or os.path.isabs(recorded):
    return recorded
  return absolute(as_path(workdir) / recorded)


def local_data(path: str) -> str:
  """Data given as gs://... (token shards, a .jsonl or .npy file) as a local path: copied once into
  this host's cache (LVM_ATTRIB_DATA_CACHE, default ~/.cache/lvm_attrib/data) and reused while the
  sizes match. Readers that open files by name (ArrayRecord's) need a local file; data larger than a
  host's disk belongs on a gcsfuse mount instead, given as a local path. Local paths pass through."""
  if not path or not is_remote(path):
    return path
  from pathlib import Path
  source = as_path(path)
  cache = Path(os.environ.get('LVM_ATTRIB_DATA_CACHE', Path.home() / '.cache' / 'lvm_attrib' / 'data'))
  target = cache / str(source).split('://', 1)[1]
  files = [source] if source.is_file() else sorted(p for p in source.iterdir() if p.is_file())
  if not files:
    raise ConfigError(f'{path}: no such object or folder')
  for remote in files:
    local = target / remote.name if len(files) > 1 or not source.is_file() else target
    if local.exists() and local.stat().st_size == remote.stat().length:
      continue
    local.parent.mkdir(parents=True, exist_ok=True)
    partial = local.with_name(f'.{local.name}.partial{os.getpid()}')
    try:
      with remote.open('rb') as source_file, partial.open('wb') as local_file:  # streamed: a shard of GBs
        shutil.copyfileobj(source_file, local_file, COPY_CHUNK)                   # never whole in memory
      os.replace(partial, local)  # a killed copy never leaves a file that looks complete
    finally:  # a failed one (a full disk) leaves no partial file to fill the disk on the rerun too
      partial.unlink(missing_ok=True)
  return str(target)
