"""Orbax checkpoints of a training run: parameters, optimizer state, step, and the data iterator.

Items are kept apart so that a reader can take only what it needs: evaluation restores `params`;
a workdir made by a weight import has `params` only, and training from it starts a fresh optimizer.
Each host stores its own grain iterator state (grain's handler writes one file per process).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp


def make_manager(workdir: str | Path, *, keep: int = 3, async_save: bool = True) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      Path(workdir).absolute() / 'checkpoints',
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                           create=True))


def save(manager: ocp.CheckpointManager, step: int, *, params: Any, opt_state: Any = None,
         data_iterator: Any = None, meta: dict | None = None, force: bool = False) -> bool:
  items = {'params': ocp.args.StandardSave(params),
           'meta': ocp.args.JsonSave(dict(meta or {}, step=int(step)))}
  if opt_state is not None:
    items['opt_state'] = ocp.args.StandardSave(opt_state)
  if data_iterator is not None:
    items['data'] = grain.checkpoint.CheckpointSave(data_iterator)
  return manager.save(step, args=ocp.args.Composite(**items), force=force)


def item_names(manager: ocp.CheckpointManager, step: int) -> set[str]:
  return {p.name for p in (Path(manager.directory) / str(step)).iterdir() if p.is_dir()}


def restore(manager: ocp.CheckpointManager, step: int, *, abstract_params: Any,
            abstract_opt_state: Any = None, data_iterator: Any = None) -> dict:
  """Restores into the given shardings (`jax.ShapeDtypeStruct`s with `.sharding`); missing items
  (no optimizer state after a weight import) come back as None."""
  present = item_names(manager, step)
  items = {'params': ocp.args.StandardRestore(abstract_params), 'meta': ocp.args.JsonRestore()}
  if abstract_opt_state is not None and 'opt_state' in present:
    items['opt_state'] = ocp.args.StandardRestore(abstract_opt_state)
  if data_iterator is not None and 'data' in present:
    items['data'] = grain.checkpoint.CheckpointRestore(data_iterator)
  restored = manager.restore(step, args=ocp.args.Composite(**items))
  return {name: restored.get(name) if name in restored else None
          for name in ('params', 'opt_state', 'meta', 'data')}


def abstract_like(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
