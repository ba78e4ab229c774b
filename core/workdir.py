"""Small helpers for the files every job writes into its workdir."""
from __future__ import annotations

import json
import os
import platform
from importlib import metadata
from pathlib import Path

import jax


def write_json_atomic(path: str | Path, data: dict) -> None:
  """Write to a temp name, then rename: readers never see a half-written file (process 0 only)."""
  if jax.process_index() != 0:
    return
  path = Path(path)
  temp = path.with_name(f'.{path.name}.tmp')
  temp.write_text(json.dumps(data, indent=1, default=str) + '\n')
  os.replace(temp, path)


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
