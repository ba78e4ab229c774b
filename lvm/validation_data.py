"""Held-out tokens that `lvm train` validates on every `train.eval_every` updates (data.eval_path).

`data.eval_examples` records, in whole batches of the training's micro-batch size, are read and
checked once before training starts (a bad record would otherwise stop the run at its first
validation, hours in); every validation then scores the same batches, in order. Sentences of
several task kinds (`lvm tokenize --split eval` of videos and pairs, a merged folder) are taken
from each kind in turn: their shards are sorted by kind, so the first records alone would measure
one kind (the first 256 of a video + pairs split: pairs only, 'pairs-' sorting before 'video-').
Other data gives its first records. A bucket's shards are copied only as far as the records taken.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from core.errors import ConfigError
from core.paths import as_path, is_remote
from core.workdir import read_json
from data_pipelines.token_loader import token_batches
from data_pipelines.token_records import SHARD_SUFFIX, TokenRecordSource, find_shards
from data_pipelines.token_sources import (InMemoryTokenSource, open_token_source, record_length, remote_shards,
                                          shards_holding)
from lvm.config import LvmConfig


def _tokenizer_of(path: str) -> str | None:
  """The tokenizer checksum in the manifest beside `lvm tokenize` sentences; 'builtin' for the
  built-in grey-level digits; None where the data does not say (a user's .npy or JSONL)."""
  if path.startswith('builtin:'):
    return 'builtin'
  folder = as_path(path)
  manifest = folder / 'manifest.json' if folder.is_dir() else None
  if manifest is None or not manifest.is_file():
    return None
  return read_json(manifest).get('tokenizer_checksum')


def _held_out_shards(path: str, wanted: int) -> list[list[str]] | None:
  """Local shard paths of a folder of held-out shards, one list per task kind its manifest names
  (one list for shards of no kind), a bucket's copied only as far as `wanted` records of each kind;
  None for other data (.npy, .jsonl, built-in), which is read as it is."""
  if not path or path.startswith('builtin:') or Path(path).suffix in ('.jsonl', '.npy', SHARD_SUFFIX):
    return None
  folder = as_path(path)
  if not folder.is_dir():
    return None
  shards = remote_shards(folder) if is_remote(path) else find_shards(path)
  if not shards:
    return None  # open_token_source names what the folder lacks
  manifest = folder / 'manifest.json'
  kinds = (read_json(manifest).get('kinds') or []) if manifest.is_file() else []
  longest_first = sorted(kinds, key=len, reverse=True)
  groups: dict = {kind: [] for kind in kinds}  # in the manifest's order of kinds
  for shard in shards:  # a kind's shards start with its name (merged ones too: video-input2-...)
    groups.setdefault(next((k for k in longest_first if shard.name.startswith(f'{k}-')), None), []).append(shard)
  groups = {kind: group for kind, group in groups.items() if group}
  if is_remote(path):
    return [shards_holding(group, wanted - 1)[0] for group in groups.values()]
  return [[str(shard) for shard in group] for group in groups.values()]


def _first_records(source, count: int) -> np.ndarray:
  read_batch = getattr(source, 'read_batch', None)  # checks every token against the vocabulary
  return read_batch(range(count)) if read_batch else np.stack([source[i] for i in range(count)])


def check_same_tokens(config: LvmConfig) -> None:
  """Held-out tokens of another kind than the training tokens (grey levels against a tokenizer's codes,
  or two tokenizers' codes) give a validation loss that measures nothing: refused where both say."""
  trained, held_out = _tokenizer_of(config.data.train_path), _tokenizer_of(config.data.eval_path)
  if trained and held_out and trained != held_out:
    kind = lambda t: 'the built-in grey-level digits' if t == 'builtin' else f'codes of tokenizer {t}'
    raise ConfigError(f'data.eval_path {config.data.eval_path} holds {kind(held_out)}, data.train_path '
                      f'{config.data.train_path} {kind(trained)}: a validation loss across them measures nothing; '
                      'hold out sentences of the same tokenizer (`lvm tokenize --split eval`)')


def held_out_batches(config: LvmConfig, batch: int):
  """`make_eval_batches(process_index, process_count)` for core's train loop: one pass over this
  host's rows of the held-out batches of `batch` records (the training's micro-batch)."""
  path, wanted = config.data.eval_path, config.data.eval_examples
  check_same_tokens(config)
  groups = _held_out_shards(path, wanted)
  length = record_length(groups[0][0] if groups else path)
  if length is not None and length != config.data.seq_len:
    raise ConfigError(f'data.eval_path {path} holds records of {length} tokens, the training data '
                      f'{config.data.seq_len} (data.seq_len): hold out records of the same length')
  if groups:
    sources = [TokenRecordSource(g, seq_len=config.data.seq_len, vocab_size=config.model.vocab_size) for g in groups]
  else:
    sources = [open_token_source(path, seq_len=config.data.seq_len, vocab_size=config.model.vocab_size)]
  # Kind by kind in turn: record 0 of each kind, then record 1 of each, ...
  order = [(s, i) for i in range(wanted) for s in range(len(sources)) if i < len(sources[s])][:wanted]
  used = len(order) // batch * batch
  if used == 0:
    there = sum(len(source) for source in sources)
    there = f'at least {there}' if is_remote(path) and there >= wanted else there  # a bucket's first shards
    raise ConfigError(f'data.eval_path {path}: {len(order)} records '
                      f'(data.eval_examples {wanted}, {there} there) are fewer than one '
                      f'validation batch of {batch} (train.global_batch / optim.grad_accum)')
  order = order[:used]
  taken = [_first_records(source, sum(1 for s, _ in order if s == k)) for k, source in enumerate(sources)]
  tokens = np.stack([taken[s][i] for s, i in order])
  held_out = InMemoryTokenSource(np.asarray(tokens), f'{path} ({used} records)')

  def make_eval_batches(process_index: int, process_count: int):
    return token_batches(held_out, global_batch=batch, seed=0, shuffle=False, num_epochs=1,
                         process_index=process_index, process_count=process_count)
  return make_eval_batches
