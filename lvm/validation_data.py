"""Held-out tokens that `lvm train` validates on every `train.eval_every` updates (data.eval_path).

The first `data.eval_examples` records, in whole batches of the training's micro-batch size, are
read and checked once before training starts (a bad record would otherwise stop the run at its
first validation, hours in); every validation then scores the same batches, in order.
"""
from __future__ import annotations

import numpy as np

from core.errors import ConfigError
from core.paths import as_path
from data_pipelines.token_loader import token_batches
from data_pipelines.token_records import TokenRecordSource
from data_pipelines.token_sources import (InMemoryTokenSource, open_token_source, record_length,
                                          staged_first_records)
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
  from core.workdir import read_json
  return read_json(manifest).get('tokenizer_checksum')


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
  staged = staged_first_records(path, wanted)  # a bucket's held-out shards: only those read are copied
  shards = staged if isinstance(staged, list) else None
  length = record_length(shards[0] if shards else path)
  if length is not None and length != config.data.seq_len:
    raise ConfigError(f'data.eval_path {path} holds records of {length} tokens, the training data '
                      f'{config.data.seq_len} (data.seq_len): hold out records of the same length')
  check_same_tokens(config)
  source = TokenRecordSource(shards, seq_len=config.data.seq_len, vocab_size=config.model.vocab_size) if shards else \
      open_token_source(path, seq_len=config.data.seq_len, vocab_size=config.model.vocab_size)
  used = min(wanted, len(source)) // batch * batch
  if used == 0:
    there = f'at least {len(source)}' if shards and len(source) >= wanted else len(source)  # a bucket's first shards
    raise ConfigError(f'data.eval_path {path}: {min(wanted, len(source))} records '
                      f'(data.eval_examples {wanted}, {there} there) are fewer than one '
                      f'validation batch of {batch} (train.global_batch / optim.grad_accum)')
  read = getattr(source, 'read_batch', None)  # checks every token against the vocabulary
  tokens = read(range(used)) if read else np.stack([source[i] for i in range(used)])
  held_out = InMemoryTokenSource(np.asarray(tokens), f'{path} (first {used})')

  def make_eval_batches(process_index: int, process_count: int):
    return token_batches(held_out, global_batch=batch, seed=0, shuffle=False, num_epochs=1,
                         process_index=process_index, process_count=process_count)
  return make_eval_batches
