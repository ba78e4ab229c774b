"""Running a function over many rows in batches sharded over the mesh (inference, features, scoring)."""
from __future__ import annotations

from typing import Callable

import jax
import numpy as np
from jax.sharding import NamedSharding

from core.sharding import logical_to_spec


def map_batches(fn: Callable, rows, mesh, rules, batch: int = 256) -> np.ndarray:
  """fn over `rows` (an array, or anything sliceable into arrays) in batches whose leading axis is
  sharded over the mesh's batch axes. The last batch is padded to a multiple of those axes by
  repeating its last row, and the padding is dropped from the output."""
  ways = mesh.shape['data'] * mesh.shape['fsdp']
  batch = max(ways, batch // ways * ways)
  out = []
  for start in range(0, len(rows), batch):
    chunk = np.asarray(rows[start:start + batch])
    pad = (-len(chunk)) % ways
    padded = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)]) if pad else chunk
    sharding = NamedSharding(mesh, logical_to_spec(('batch',) + (None,) * (chunk.ndim - 1), rules))
    out.append(np.asarray(fn(jax.device_put(padded, sharding)))[:len(chunk)])
  return np.concatenate(out)
