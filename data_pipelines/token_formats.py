"""Readers for token data as other tools write it: LVM's JSONL and plain `.npy` arrays.

LVM (`DATASET.md`) stores one visual sentence per line as `{"tokens": base64(int32[...])}`. A line
that holds the ids as a JSON list, `{"tokens": [12, 7, ...]}` (what `json.dumps` of a Python list
writes), is read too: users who write their own sentences reach for that first.
"""
from __future__ import annotations

import base64
import binascii
import json
from pathlib import Path
from typing import Iterator

import numpy as np

from data_pipelines.token_records import TokenDataError, check_tokens


def encode_lvm_jsonl_line(tokens: np.ndarray) -> str:
  return json.dumps({'tokens': base64.b64encode(np.asarray(tokens, '<i4').tobytes()).decode()})


def read_lvm_jsonl(path: str | Path, *, seq_len: int, vocab_size: int) -> Iterator[np.ndarray]:
  """Yields one int32 [seq_len] record per line; errors name the file and line number."""
  path = Path(path)
  if not path.is_file():
    raise TokenDataError(f'{path}: no such file')
  with path.open() as f:
    for line_number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      where = f'{path} line {line_number}'
      yield check_tokens(line_tokens(line, where), seq_len, vocab_size, where)


def line_tokens(line: str, where: str) -> np.ndarray:
  """The ids of one JSONL line, base64 int32 or a JSON list; errors name `where` (file and line)."""
  try:
    tokens = json.loads(line)['tokens']
    if isinstance(tokens, list):
      return _listed_ids(tokens, where)
    raw = base64.b64decode(tokens, validate=True)
  except (json.JSONDecodeError, KeyError, TypeError, binascii.Error) as e:
    raise TokenDataError(f'{where}: not an LVM token line {{"tokens": base64(int32)}} or '
                         f'{{"tokens": [ids]}} ({e!r})') from None
  if len(raw) % 4:
    raise TokenDataError(f'{where}: {len(raw)} bytes is not a whole number of int32 tokens')
  return np.frombuffer(raw, '<i4')


def _listed_ids(tokens: list, where: str) -> np.ndarray:
  for position, token in enumerate(tokens):
    # bool is an int to Python; 3.0 would pass silently through np.asarray as a float array.
    if isinstance(token, bool) or not isinstance(token, int):
      raise TokenDataError(f'{where}: token {token!r} at position {position} is not an integer id')
    if not -2**31 <= token < 2**31:  # numpy would refuse it with an OverflowError naming nothing
      raise TokenDataError(f'{where}: token id {token} at position {position} is outside the vocabulary')
  return np.asarray(tokens, np.int64)


def read_npy_tokens(path: str | Path, *, seq_len: int, vocab_size: int) -> Iterator[np.ndarray]:
  """Yields the rows of an int32 [N, seq_len] `.npy` array (memory-mapped, so N can be large)."""
  path = Path(path)
  try:
    array = np.load(path, mmap_mode='r', allow_pickle=False)
  except (OSError, ValueError) as e:
    raise TokenDataError(f'{path}: not a readable .npy array ({e})') from None
  if array.ndim != 2 or array.shape[1] != seq_len:
    raise TokenDataError(f'{path}: expected an int array of shape [N, {seq_len}], got {array.shape}')
  for row in range(array.shape[0]):
    yield check_tokens(np.asarray(array[row]), seq_len, vocab_size, f'{path} row {row}')


def read_token_file(path: str | Path, *, seq_len: int, vocab_size: int) -> Iterator[np.ndarray]:
  suffix = Path(path).suffix
  if suffix == '.jsonl':
    return read_lvm_jsonl(path, seq_len=seq_len, vocab_size=vocab_size)
  if suffix == '.npy':
    return read_npy_tokens(path, seq_len=seq_len, vocab_size=vocab_size)
  raise TokenDataError(f'{path}: unknown token file type {suffix!r} (expected .jsonl or .npy)')
