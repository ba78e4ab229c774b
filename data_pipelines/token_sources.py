"""Turn a data path from a config into a random-access token source, validated before training."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from data_pipelines import digit_sentences
from data_pipelines.token_formats import line_tokens, read_token_file
from data_pipelines.token_records import SHARD_SUFFIX, TokenDataError, TokenRecordSource, check_tokens, find_shards
from core.paths import as_path, local_data

BUILTIN_SIZES = {'digits': ('train', 4096), 'digits-eval': ('eval', 256)}


class InMemoryTokenSource:
  """Records held in one int32 [N, T] array (small files and the built-in data)."""

  def __init__(self, tokens_nt: np.ndarray, name: str):
    self.tokens_nt, self.name = tokens_nt, name

  def __len__(self) -> int:
    return len(self.tokens_nt)

  def __iter__(self):
    """Each record once (indexing wraps around for the loader's epochs; iteration does not)."""
    for index in range(len(self)):
      yield self[index]

  def __getitem__(self, index: int) -> np.ndarray:
    return self.tokens_nt[int(index) % len(self)]

  def __repr__(self) -> str:
    return f'{self.name} ({len(self)} records)'


def open_token_source(path: str, *, seq_len: int, vocab_size: int):
  """'builtin:digits' | 'builtin:digits-eval' | shard dir | .arrayrecord | .jsonl | .npy (local or gs://)."""
  path = local_data(path)
  if path.startswith('builtin:'):
    name = path.split(':', 1)[1]
    if name not in BUILTIN_SIZES:
      raise TokenDataError(f'unknown built-in data {path!r}; choose from '
                           f'{[f"builtin:{n}" for n in BUILTIN_SIZES]}')
    split, count = BUILTIN_SIZES[name]
    tokens = digit_sentences.digit_sentences(split, seq_len=seq_len, num_sentences=count)
    for row, record in enumerate(tokens):
      check_tokens(record, seq_len, vocab_size, f'{path} record {row}')
    return InMemoryTokenSource(tokens, path)
  if not path:
    raise TokenDataError('data.train_path is empty: give a shard directory, .jsonl or .npy file')
  suffix = Path(path).suffix
  if suffix in ('.jsonl', '.npy'):
    return InMemoryTokenSource(np.stack(list(read_token_file(path, seq_len=seq_len, vocab_size=vocab_size))),
                               path)
  return TokenRecordSource(find_shards(path), seq_len=seq_len, vocab_size=vocab_size)


def record_length(path: str) -> int | None:
  """Tokens per record of the data at `path`, read from its first record without loading the rest.

  None for built-in data (generated at any length) and for anything unreadable, whose reader then
  raises the precise error when the source is opened.
  """
  if path.startswith('builtin:') or not path:
    return None
  try:
    path = local_data(path)
    suffix = Path(path).suffix
    if suffix == '.npy':
      array = np.load(path, mmap_mode='r', allow_pickle=False)
      return int(array.shape[1]) if array.ndim == 2 else None
    if suffix == '.jsonl':
      with open(path) as f:
        line = next(line for line in f if line.strip())
      return len(line_tokens(line, path))
    import grain.python as grain
    return len(grain.ArrayRecordDataSource([str(find_shards(path)[0])])[0]) // 4
  except Exception:  # noqa: BLE001 (the source's own reader reports what is wrong)
    return None


def remote_shards(folder) -> list:
  """The shards of a gs:// folder, in the order find_shards gives a local one (a writer's temporary
  files left out), listed without copying any."""
  return sorted(p for p in as_path(folder).iterdir() if p.name.endswith(SHARD_SUFFIX) and not p.name.startswith('.'))


def shards_holding(shards: list, last: int) -> tuple[list[str], int]:
  """(local paths of the first shards that hold records 0..last, the records they hold). A gs:// shard
  is copied to this host's data cache only when needed: 8 records of a bucket's data set take one shard."""
  import grain.python as grain
  local, count = [], 0
  for shard in shards:
    local.append(local_data(str(shard)))
    count += len(grain.ArrayRecordDataSource([local[-1]]))
    if count > last:
      break
  return local, count
