"""Fixed-length int32 token records in ArrayRecord shards.

One record = one visual sentence = `seq_len` little-endian int32 token ids, nothing else, so a record's
byte length alone tells whether it was written for this sequence length. Every id is checked against
the vocabulary when written and again when read; errors name the shard and record.
"""
from __future__ import annotations

from core.errors import UserError

import bisect
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter
import grain

SHARD_SUFFIX = '.arrayrecord'
TOKEN_DTYPE = np.dtype('<i4')
# group_size:1 for random access. zstd level 1 rather than ArrayRecord's default brotli: for
# 4096-token records of ids < 8292, 9.31 vs 9.19 KB per record, and the loader reads 1.25x more
# tokens/s (131 vs 104 M; uncompressed: 194 M at 16.1 KB). Readers take any compression, so older
# brotli shards still load.
SHARD_WRITER_OPTIONS = 'group_size:1,zstd:1'


class TokenDataError(UserError):
  """A token file or record is malformed; the message names the file and record."""


def check_tokens(tokens: np.ndarray, seq_len: int, vocab_size: int, where: str) -> np.ndarray:
  """Returns `tokens` as int32 [seq_len] or raises naming `where` (e.g. 'shard x record 7')."""
  tokens = np.asarray(tokens)
  if tokens.ndim != 1 or tokens.shape[0] != seq_len:
    raise TokenDataError(f'{where}: expected {seq_len} tokens, got shape {tokens.shape}')
  if not np.issubdtype(tokens.dtype, np.integer):
    raise TokenDataError(f'{where}: token ids must be integers, got dtype {tokens.dtype}')
  if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
    bad = int(np.flatnonzero((tokens < 0) | (tokens >= vocab_size))[0])
    raise TokenDataError(f'{where}: token id {int(tokens[bad])} at position {bad} is outside the '
                         f'vocabulary [0, {vocab_size})')
  return tokens.astype(np.int32, copy=False)


def write_token_shards(records: Iterable[np.ndarray], out_dir: str | Path, *, seq_len: int,
                       vocab_size: int, records_per_shard: int = 4096,
                       prefix: str = 'tokens', source: str = 'the input') -> list[Path]:
  """Writes records to `out_dir/{prefix}-00000-of-000NN.arrayrecord`; returns the shard paths.
  `source` names where the records come from, in errors.

  Every record is validated before anything is written to its final name: shards are written to
  temporary names and renamed only when all records passed, so a bad record never leaves a
  half-written data set behind. A folder that already holds shards is refused before any record is
  read (the new set would replace or mix with the old one).
  """
  from core.paths import as_path, is_remote
  from core.workdir import refuse_job_workdir
  if is_remote(out_dir):  # pathlib made 'gs://b/x' a local folder 'gs:/b/x'
    return _write_and_upload(records, as_path(out_dir), seq_len=seq_len, vocab_size=vocab_size,
                             records_per_shard=records_per_shard, prefix=prefix, source=source)
  out_dir = Path(out_dir)
  for part in (out_dir, *out_dir.parents):
    if part.exists() and not part.is_dir():
      raise TokenDataError(f'--out {out_dir}: {part} is a file; give a directory for the shards')
  refuse_job_workdir(out_dir)
  _refuse_existing_shards(out_dir, prefix)
  out_dir.mkdir(parents=True, exist_ok=True)
  temp_paths: list[Path] = []
  writer = None
  count = 0
  try:
    for index, record in enumerate(records):
      record = check_tokens(record, seq_len, vocab_size, f'input record {index}')
      if count % records_per_shard == 0:
        if writer is not None:
          writer.close()
        temp_paths.append(out_dir / f'.tmp-{prefix}-{len(temp_paths):05d}{SHARD_SUFFIX}')
        writer = ArrayRecordWriter(str(temp_paths[-1]), SHARD_WRITER_OPTIONS)
      writer.write(record.astype(TOKEN_DTYPE).tobytes())
      count += 1
    if writer is not None:
      writer.close()
      writer = None
  except BaseException:
    if writer is not None:
      writer.close()
    for path in temp_paths:
      path.unlink(missing_ok=True)
    raise
  if count == 0:
    raise TokenDataError(f'{source}: no records to write (it holds no rows); nothing was written to {out_dir}')
  final_paths = []
  for shard, temp in enumerate(temp_paths):
    final = out_dir / f'{prefix}-{shard:05d}-of-{len(temp_paths):05d}{SHARD_SUFFIX}'
    os.replace(temp, final)
    final_paths.append(final)
  return final_paths


def _refuse_existing_shards(out_dir, prefix: str) -> None:
  existing = sorted(out_dir.glob(f'{prefix}-*{SHARD_SUFFIX}')) if out_dir.is_dir() else []
  if existing:
    # Shards of another count would stay beside the new ones, and a reader of the folder would
    # take both data sets as one; same-named ones would be replaced. Neither is what a user meant.
    raise TokenDataError(f'{out_dir} already holds {len(existing)} token shard(s) ({existing[0].name}'
                         f'{", ..." if len(existing) > 1 else ""}); choose a new --out, or delete them first')


def _write_and_upload(records, out_dir, *, prefix: str, **options) -> list:
  """Shards into a gs:// folder: ArrayRecord writes local files, so they are written (every record
  checked) into a local temporary folder, then uploaded: the bucket gets a whole data set or nothing."""
  import tempfile
  from core.workdir import refuse_job_workdir
  refuse_job_workdir(out_dir)
  _refuse_existing_shards(out_dir, prefix)
  with tempfile.TemporaryDirectory(prefix='lvm_attrib_shards_') as folder:
    written = write_token_shards(records, folder, prefix=prefix, **options)
    for path in written:
      (out_dir / path.name).write_bytes(path.read_bytes())
  return [out_dir / path.name for path in written]


def find_shards(path: str | Path) -> list[Path]:
  """A shard file, or every `*.arrayrecord` in a directory (sorted), or a clear error."""
  path = Path(path)
  if path.is_file() and path.suffix != SHARD_SUFFIX and any(path.parent.glob(f'*{SHARD_SUFFIX}')):
    # The tokenize job's manifest.json (or state) beside its shards, given for them.
    raise TokenDataError(f'{path} is not a shard: pass its folder {path.parent}, which holds the shards')
  if path.is_file():
    return [path]
  if path.is_dir():
    shards = sorted(p for p in path.glob(f'*{SHARD_SUFFIX}') if not p.name.startswith('.tmp-'))
    if shards:
      return shards
    # A tokenize job's --split train/eval runs, or its kinds, each in a folder of their own under this one.
    holding = sorted(p.name for p in path.iterdir() if p.is_dir() and any(p.glob(f'*{SHARD_SUFFIX}')))
    from data_pipelines.image_sources import IMAGE_SUFFIXES
    images = any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.rglob('*'))
    raise TokenDataError(f'{path}: no *{SHARD_SUFFIX} shards in this directory'
                         + (f'; its subfolders {", ".join(holding)} hold shards: pass one of them' if holding else '')
                         + ('; it holds images, which the LVM reads as tokens: make visual sentences of them first '
                            f'(launch.py lvm tokenize --tokenizer TOKENIZER_DIR --source {path} --out DIR)'
                            if images and not holding else ''))
  raise TokenDataError(f'{path}: no such file or directory')


class TokenRecordSource(grain.sources.RandomAccessDataSource):
  """Random access over the records of several shards, validated as they are read."""

  def __init__(self, shard_paths: Sequence[str | Path], *, seq_len: int, vocab_size: int):
    self.shard_paths = [str(p) for p in shard_paths]
    self.seq_len, self.vocab_size = seq_len, vocab_size
    self._shards = []
    for path in self.shard_paths:
      try:
        self._shards.append(grain.sources.ArrayRecordDataSource([path]))
      except Exception as e:  # array_record raises bare RuntimeErrors on corrupt files
        raise TokenDataError(f'{path}: not a readable ArrayRecord shard ({e})') from None
    self._starts = np.cumsum([0] + [len(s) for s in self._shards]).tolist()
    # Cheap up-front check: the first record of every shard, before any training work starts.
    for shard_index, shard in enumerate(self._shards):
      if len(shard):
        self._decode(shard_index, 0)

  def __len__(self) -> int:
    return self._starts[-1]

  def shard_ranges(self) -> list[tuple[str, int, int]]:
    """(path, first record, records) of each shard, in the order the records are numbered."""
    return [(path, start, end - start) for path, start, end in zip(self.shard_paths, self._starts, self._starts[1:])]

  def _decode(self, shard_index: int, record_index: int) -> np.ndarray:
    where = f'{self.shard_paths[shard_index]} record {record_index}'
    raw = self._shards[shard_index][record_index]
    if len(raw) != self.seq_len * TOKEN_DTYPE.itemsize:
      raise TokenDataError(f'{where}: {len(raw)} bytes, expected {self.seq_len} int32 tokens '
                           f'({self.seq_len * TOKEN_DTYPE.itemsize} bytes)')
    return check_tokens(np.frombuffer(raw, TOKEN_DTYPE), self.seq_len, self.vocab_size, where)

  def __iter__(self):
    """Each record once (indexing wraps around for the loader's epochs; iteration does not)."""
    for index in range(len(self)):
      yield self[index]

  def _locate(self, index: int) -> tuple[int, int]:
    index = int(index) % len(self)
    shard_index = bisect.bisect_right(self._starts, index) - 1
    return shard_index, index - self._starts[shard_index]

  def __getitem__(self, index: int) -> np.ndarray:
    return self._decode(*self._locate(index))

  def read_batch(self, indices: Sequence[int]) -> np.ndarray:
    """int32 [len(indices), seq_len]: the loader's path, checked as one array instead of record by record.

    Reading and validating a batch at once skips grain's per-record source bookkeeping and the
    per-record numpy calls, which together cost more than reading the record itself. A bad record
    is reported exactly as `__getitem__` reports it (shard and record named).
    """
    locations = [self._locate(index) for index in indices]
    raw = [self._shards[shard][record] for shard, record in locations]
    record_bytes = self.seq_len * TOKEN_DTYPE.itemsize
    if all(len(r) == record_bytes for r in raw):
      # bytearray: one copy, and the batch is writable like the np.stack of records it replaces.
      batch = np.frombuffer(bytearray().join(raw), TOKEN_DTYPE).reshape(len(raw), self.seq_len)
      if not batch.size or (batch.min() >= 0 and batch.max() < self.vocab_size):
        return batch.astype(np.int32, copy=False)
    for shard, record in locations:  # something is wrong: find it and name it
      self._decode(shard, record)
    raise AssertionError('unreachable: a bad batch has a bad record')

  def __repr__(self) -> str:
    return f'TokenRecordSource({len(self.shard_paths)} shards, {len(self)} records, T={self.seq_len})'
