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
  repeating its last row, and the padding is dropped from the output.

  On several processes (a multi-host slice) every process passes the same rows and gets the whole
  output: each batch's rows are computed once, on their devices, and gathered to every host."""
  ways = mesh.shape['data'] * mesh.shape['fsdp']
  batch = max(ways, batch // ways * ways)
  out = []
  for start in range(0, len(rows), batch):
    chunk = np.asarray(rows[start:start + batch])
    pad = (-len(chunk)) % ways
    padded = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)]) if pad else chunk
    sharding = NamedSharding(mesh, logical_to_spec(('batch',) + (None,) * (chunk.ndim - 1), rules))
    out.append(_to_host(fn(jax.device_put(padded, sharding)))[:len(chunk)])
  return np.concatenate(out)


def _to_host(result) -> np.ndarray:
  """The whole of a (possibly multi-process) array on this host."""
  if result.is_fully_addressable:
    return np.asarray(result)
  # Another host's devices hold part of it: np.asarray would refuse to fetch those rows.
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(result, tiled=True))
