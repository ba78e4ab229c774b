"""One path type for every file a job reads or writes: local paths and `gs://bucket/...` alike.

`etils.epath` is the path type orbax and grain already use for checkpoints; through it a workdir on
Cloud Storage is written by every host directly (no local copy that each host would keep to itself,
which is what `pathlib.Path('gs://b/run')` -> 'gs:/b/run' did). gs:// needs the `gcs` extra (gcsfs).
"""
from __future__ import annotations

import os

from etils import epath

from core.errors import ConfigError


def as_path(path) -> epath.Path:
  """`path` (str, pathlib.Path or epath.Path) as an epath.Path; gs:// kept intact."""
  if isinstance(path, epath.Path):
    return path
  text = os.fspath(path)
  if is_remote(text):
    import importlib.util
    if importlib.util.find_spec('gcsfs') is None:
      raise ConfigError(f'{text}: gs:// paths need gcsfs: pip install -e ".[gcs]"')
  return epath.Path(text)


def is_remote(path) -> bool:
  """True for object-store paths (no rename, no append, no local file name to hand to a library)."""
  return '://' in os.fspath(path) if not isinstance(path, epath.Path) else '://' in str(path)
