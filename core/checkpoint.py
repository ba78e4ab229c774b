"""Orbax checkpoints of a training run: parameters, optimizer state, step, and the data iterator.

Items are kept apart so that a reader can take only what it needs: evaluation restores `params`;
a workdir made by a weight import has `params` only, and training from it starts a fresh optimizer.
Each host stores its own grain iterator state (grain's handler writes one file per process).
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint._src.metadata import array_metadata_store  # orbax's own default, pinned version

from core.io_noise import DropMessage, drop_abandoned_io_noise
from core.paths import as_path, is_remote


def _absolute(path):
  """orbax wants absolute paths; gs:// ones already are."""
  return path if is_remote(path) else path.absolute()


def _save_replicas_whole_on_cpu() -> None:
  """On CPU, save each replicated array from one replica instead of a slice from every replica.

  orbax's replica-parallel save splits a replicated array's write among its replicas, which pays off
  when replicas sit on different hosts or accelerators. CPU devices (forced host devices, one
  process) share one memory, so the split buys nothing there and costs a jitted slice program per
  array shape at the first save: 28 of them, ~3 s, in a 20-step tiny LVM run on `cpu_8` (29.5-31.9 s
  per job, 26.5-28.9 s without). It is a save-side choice only: a checkpoint written either way
  reads back the same (tested), so checkpoints move freely between CPU and accelerator runs."""
  if jax.default_backend() != 'cpu':
    return
  current = ocp.type_handlers.get_type_handler(jax.Array)
  if isinstance(current, ocp.type_handlers.ArrayHandler) and getattr(current, '_use_replica_parallel', False):
    # The override is deliberate; without the filter orbax logs it as a warning on every command.
    absl_logger = logging.getLogger('absl')
    quiet = DropMessage('Type handler registry')
    absl_logger.addFilter(quiet)
    try:
      ocp.type_handlers.register_type_handler(
          jax.Array, ocp.type_handlers.ArrayHandler(array_metadata_store=array_metadata_store.Store(),
                                                    use_replica_parallel=False), override=True)
    finally:
      absl_logger.removeFilter(quiet)


def make_manager(workdir: str | Path, *, keep: int = 3, async_save: bool = True) -> ocp.CheckpointManager:
  _save_replicas_whole_on_cpu()
  directory = _absolute(as_path(workdir)) / 'checkpoints'
  handlers = None
  if is_remote(directory) and os.environ.get('STORAGE_EMULATOR_HOST'):
    # A local GCS emulator (tests) does not implement the generation-conditional writes that
    # OCDBT's manifest relies on (tensorstore: "Malformed StorageGeneration"); there, each array is
    # written as its own zarr tree instead. Real Cloud Storage keeps orbax's default (OCDBT).
    handlers = {'params': ocp.StandardCheckpointHandler(use_ocdbt=False),
                'opt_state': ocp.StandardCheckpointHandler(use_ocdbt=False),
                'meta': ocp.JsonCheckpointHandler(), 'data': grain.checkpoint.CheckpointHandler()}
  return ocp.CheckpointManager(
      directory, item_handlers=handlers,
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
  return {p.name for p in (as_path(manager.directory) / str(step)).iterdir() if p.is_dir()}


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
  try:
    restored = manager.restore(step, args=ocp.args.Composite(**items))
  except Exception as e:  # noqa: BLE001 (TensorStore, orbax and grain each raise their own types)
    raise damaged_checkpoint(manager, step, e) from e
  return {name: restored.get(name) if name in restored else None
          for name in ('params', 'opt_state', 'meta', 'data')}


def check_room_for_a_save(workdir: str | Path, params: Any, opt_state: Any) -> None:
  """Refuses to start a training whose first checkpoint cannot fit on the workdir's local disk.

  A save needs room for the whole new checkpoint before orbax deletes the oldest one; on a nearly
  full disk the run otherwise trains until its first save (minutes, or hours on a large model) and
  then fails in orbax's writer threads. The parameters' bytes are a floor (trained floats do not
  compress); the optimizer state can compress below its bytes (zstd, in OCDBT: Adam's moments of
  embedding rows that the data never uses stay zero; a tiny LVM's 10-step checkpoint is 19.9 MB of
  30.2 MB of arrays), so short of the floor is refused and short of the whole only noted.
  This host's share is counted; buckets (gs://) have no such limit to check."""
  import shutil
  from core.errors import UserError
  path = as_path(workdir)
  if is_remote(path):
    return
  def share(tree):
    return sum(int(leaf.size) * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree)
               if hasattr(leaf, 'dtype')) // jax.process_count()
  floor, whole = share(params), share(params) + share(opt_state)
  free = shutil.disk_usage(path).free
  if free < floor:
    raise UserError(f'the disk of {path} has {free / 1e6:,.1f} MB free, and a checkpoint of this run needs '
                    f'at least {floor / 1e6:,.1f} MB (its parameters; up to {whole / 1e6:,.1f} MB with the '
                    'optimizer state): free space there or choose another --workdir')
  if free < whole and jax.process_index() == 0:
    print(f'note: the disk of {path} has {free / 1e6:,.1f} MB free; a checkpoint of this run may need up to '
          f'{whole / 1e6:,.1f} MB', file=sys.stderr, flush=True)


def damaged_checkpoint(manager: ocp.CheckpointManager, step: int, error: BaseException) -> Exception:
  """The error for a checkpoint that does not read back (a file truncated by a full disk or an
  interrupted copy): which one, the reader's first line, and the way back to an earlier one."""
  from core.errors import UserError
  drop_abandoned_io_noise()
  folder = as_path(manager.directory) / str(step)
  while error.__cause__ is not None or error.__context__ is not None:  # the reader's own words, not orbax's wrap
    error = error.__cause__ or error.__context__
  first_line = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
  first_line = first_line.split(' [tensorstore_spec')[0]  # the rest is the store's whole spec as JSON
  if 'is not compatible with the stored shape' in first_line:
    # Every step of the run would fail alike: the arrays are whole, the shapes asked for are not theirs.
    return UserError(f'{folder}: the checkpoint of step {step} holds arrays of other shapes than '
                     f'{folder.parent.parent / "config.json"} describes ({first_line.split(". ")[0]}): that file no '
                     'longer describes the model trained here (edited, or copied from another run); the checkpoints '
                     'are not damaged, do not move them')
  earlier = [s for s in manager.all_steps() if s < step]
  way_back = (f'move that folder away, and the run is read (and continues) from step {max(earlier)}' if earlier else
              'there is no earlier checkpoint to fall back on')
  return UserError(f'{folder}: the checkpoint of step {step} cannot be read ({first_line}); it may be damaged or '
                   f'incomplete (a full disk, an interrupted copy): {way_back}')


def abstract_like(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
