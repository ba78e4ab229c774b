"""`launch.py lvm show`: visual sentences decoded back into pictures, to look at the data before training.

One row per record: its frames, decoded by the tokenizer that made them (the manifest of `lvm
tokenize` names it; --tokenizer for data without one). Records are chosen by kind (the manifest's
shards of that kind) and position: `--records 0-7` or `--records 3,9,40`.
"""
from __future__ import annotations

import numpy as np

from core.config import ConfigError
from core.paths import as_path, is_remote, local_data
from core.workdir import prepare_output_file, read_json, save_image_atomic


def parse_records(spec: str | None, default_count: int = 8) -> list[int]:
  """'0-7', '3,9,40' or '0-3,10' -> record positions (default: the first `default_count`)."""
  if not spec:
    return list(range(default_count))
  positions = []
  for part in spec.split(','):
    try:
      first, _, last = part.strip().partition('-')
      positions.extend(range(int(first), int(last or first) + 1))
    except ValueError:
      raise ConfigError(f'--records {spec!r}: give positions and ranges, e.g. 0-7 or 3,9,40') from None
  if not positions:
    raise ConfigError(f'--records {spec!r}: no record in it')
  return positions


def sentence_grid(rows: np.ndarray, path, scale: int = 4) -> None:
  """Frames [records, frames, s, s, 3] in [0, 1] -> one PNG row per record, a 1-px white line between cells."""
  records, frames, side = rows.shape[:3]
  canvas = np.ones((records * (side + 1) - 1, frames * (side + 1) - 1, 3), np.float32)
  for r in range(records):
    for f in range(frames):
      canvas[r * (side + 1):r * (side + 1) + side, f * (side + 1):f * (side + 1) + side] = rows[r, f]
  canvas = np.repeat(np.repeat(canvas, scale, axis=0), scale, axis=1)
  save_image_atomic(path, (np.clip(canvas, 0, 1) * 255).round().astype(np.uint8))


def show_command(data: str, out: str | None, kind: str | None = None, records: str | None = None,
                 tokenizer_dir: str | None = None, tpu_path: str | None = None) -> dict:
  from data_pipelines.token_records import TokenRecordSource
  from data_pipelines.token_sources import shards_holding
  from lvm.sentences import manifest_tokenizer
  from lvm.tokenizer_commands import load_tokenizer
  folder = as_path(data)
  manifest = read_json(folder / 'manifest.json') if (folder / 'manifest.json').is_file() else None
  if manifest is None and folder.is_dir() and not tokenizer_dir:
    raise ConfigError(f'{data} has no manifest.json naming the tokenizer that made its codes (`lvm tokenize` '
                      'writes one): pass --tokenizer')
  if manifest is None and not folder.is_dir():
    raise ConfigError(f'{data}: not a folder of token shards (`lvm tokenize --out`, or `data tokens --out` with '
                      '--tokenizer)')
  out = prepare_output_file(out) if out else prepare_output_file(folder / 'sentences.png', 'the default --out')
  tokenizer_dir = tokenizer_dir or manifest_tokenizer(folder, manifest)
  tokenizer = load_tokenizer(tokenizer_dir, tpu_path)
  made_with = (manifest or {}).get('tokenizer_checksum')
  if made_with and made_with != tokenizer.checksum:
    raise ConfigError(f'--tokenizer {tokenizer_dir} (parameters {tokenizer.checksum}) is not the tokenizer {data} '
                      f'was made with ({manifest.get("tokenizer")}, parameters {made_with}): its codes would '
                      'decode into other pictures')
  tconfig = tokenizer.config.tokenizer
  shards, seq_len = _shards_of(folder, manifest, kind, data)
  if seq_len % tconfig.tokens_per_image:
    raise ConfigError(f'{data}: records of {seq_len} tokens are not whole frames of {tconfig.tokens_per_image} '
                      f'({tokenizer_dir}): not this tokenizer\'s codes')
  positions = parse_records(records)
  local_shards, available = shards_holding(shards, max(positions))
  if not records:  # the first 8, or all there are
    positions = positions[:available]
  outside = [p for p in positions if p >= available]
  if outside or not positions:
    raise ConfigError(f'--records {records!r}: {outside or "none"} outside the {available} records there')
  source = TokenRecordSource(local_shards, seq_len=seq_len, vocab_size=tconfig.codebook_size + 100)
  tokens = np.stack([source[p] for p in positions])
  special = np.argwhere(tokens >= tconfig.codebook_size)
  if len(special):
    row, column = special[0]
    raise ConfigError(f'{data}: record {positions[row]} holds the special token {tokens[row, column]} at {column}, '
                      f'which is no picture (codes are below {tconfig.codebook_size})')
  frames = seq_len // tconfig.tokens_per_image
  pictures = tokenizer.decode(tokens.reshape(-1, tconfig.tokens_per_image))
  sentence_grid(pictures.reshape(len(positions), frames, *pictures.shape[1:]), out)
  return {'job': 'lvm show', 'data': str(data), 'kind': kind, 'records': positions, 'frames': frames,
          'tokenizer': str(tokenizer_dir), 'png': str(out)}


def _shards_of(folder, manifest: dict | None, kind: str | None, data: str) -> tuple[list, int]:
  """(the shards to show, in order; tokens per record), of one kind when asked."""
  from data_pipelines.token_records import find_shards
  from data_pipelines.token_sources import record_length, remote_shards
  if manifest:
    shards = [folder / name for name in manifest['shards']]
  elif is_remote(data):  # listed in the bucket; find_shards reads local folders
    shards = remote_shards(folder)
  else:
    shards = find_shards(folder)
  if kind:
    kinds = sorted({name.split('-')[0] for name in manifest['shards']}) if manifest else []
    if kind not in kinds:
      raise ConfigError(f'--kind {kind!r}: {data} holds {kinds or "no kinds (it has no manifest)"}')
    shards = [path for path in shards if path.name.startswith(f'{kind}-')]
  if not shards:
    raise ConfigError(f'{data}: no .arrayrecord shards there')
  seq_len = manifest['seq_len'] if manifest else record_length(local_data(str(shards[0])))
  if not seq_len:
    raise ConfigError(f'{shards[0]}: not a readable .arrayrecord shard')
  return shards, seq_len
