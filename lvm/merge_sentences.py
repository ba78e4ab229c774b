"""`launch.py lvm merge-sentences --inputs A B ... --out DIR`: one training set from several
`lvm tokenize` jobs, as LVM trains on videos, images and annotated pairs together.

Sentences from different sources need jobs of their own (video clips from `frames:clips/`, pairs
from photos and `--labels`, groups from an image folder), and a tokenize job refuses a folder that
already holds shards, so that two data sets never mix by accident. This is the deliberate mix: the
inputs must agree on everything a record's meaning depends on (the tokenizer's parameters, record
length, tokens per image, codebook and vocabulary), checked before anything is written. Each
input's shards are hard-linked into DIR (copied across file systems or into gs://) as
`<kind>-input<i>-<rest>`, so a kind's shards still start with its name (`lvm eval` per kind, `lvm
show --kind`), and a manifest.json is written last, summing the records per kind and naming the
inputs; training then reads DIR as any sentences folder (every record once an epoch, shuffled), or
with `--weights 3 1 1` each input's share of every epoch as the weights say, recorded in the
manifest (data_pipelines/mixture.py: an input is seen more or less often without tokenizing it
again). A rerun after an interruption finishes the same merge.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from core.config import ConfigError
from core.paths import absolute, as_path, is_remote, local_data
from core.workdir import atomic_path, prepare_output_dir, read_json, refuse_job_workdir, versions, write_json_atomic

# What a record means: inputs that differ in any of these cannot be trained on as one data set.
MUST_AGREE = ('tokenizer_checksum', 'seq_len', 'tokens_per_image', 'codebook_size', 'vocab_size', 'special_token_ids')


def _read_input(path: str) -> tuple[str, dict]:
  folder = local_data(path)  # gs:// sentences: staged to this host's disk once
  manifest_file = Path(folder) / 'manifest.json'
  if not manifest_file.is_file():
    raise ConfigError(f'--inputs {path}: no manifest.json of `lvm tokenize` (the tokenizer and kinds of its '
                      'sentences); merge folders that lvm tokenize (or merge-sentences) wrote')
  manifest = read_json(manifest_file)
  missing = [key for key in MUST_AGREE + ('shards', 'kinds', 'records_per_kind') if key not in manifest]
  if missing:
    raise ConfigError(f'--inputs {path}: its manifest.json lacks {missing}: not one `lvm tokenize` wrote')
  if any('weight' in entry for entry in manifest.get('inputs') or []):
    raise ConfigError(f'--inputs {path}: a weighted merge (--weights); merge the folders it was made of, with '
                      'the weights of this merge')
  for shard in manifest['shards']:
    if not (Path(folder) / shard).is_file():
      raise ConfigError(f'--inputs {path}: shard {shard}, listed in its manifest.json, is not there (an '
                        'unfinished tokenize job? rerun it first)')
  return folder, manifest


def _merged_name(shard: str, kinds: list[str], index: int) -> str:
  kind = next((k for k in sorted(kinds, key=len, reverse=True) if shard.startswith(k + '-')), None)
  if kind is None:
    raise ConfigError(f'shard {shard} is named after none of its manifest\'s kinds {kinds}')
  return f'{kind}-input{index}-{shard[len(kind) + 1:]}'


def _place(source: Path, target) -> None:
  """A hard link where the two share a file system (no copy of GBs of shards), else a copy."""
  if not is_remote(target):
    try:
      os.link(source, target)
      return
    except OSError:
      pass
  with atomic_path(target) as temp:
    shutil.copyfile(source, temp)


def merge_sentences_command(inputs: list[str], out: str, weights: list[float] | None = None) -> dict:
  from core import progress
  from data_pipelines.mixture import check_weights
  from lvm.sentences import manifest_tokenizer, tokenizer_location
  started = time.time()
  if len(inputs) < 2:
    raise ConfigError(f'--inputs: give two or more sentence folders to merge (got {len(inputs)})')
  check_weights(weights, len(inputs))
  if len({absolute(p) for p in inputs}) < len(inputs):
    raise ConfigError('--inputs names a folder twice: each would count its sentences twice')
  read = [_read_input(path) for path in inputs]
  first_path, (_, first) = inputs[0], read[0]
  for path, (_, manifest) in zip(inputs[1:], read[1:]):
    differ = [key for key in MUST_AGREE if manifest[key] != first[key]]
    if differ:
      key = differ[0]
      raise ConfigError(f'--inputs {path} and {first_path} differ in {", ".join(differ)} ({key} {manifest[key]!r} '
                        f'against {first[key]!r}): their records mean different things; tokenize both with one '
                        'tokenizer and the same --frames')
  out_path = as_path(out)
  refuse_job_workdir(out_path)
  plan = [(Path(folder) / shard, _merged_name(shard, manifest['kinds'], i), i)
          for i, (folder, manifest) in enumerate(read, 1) for shard in manifest['shards']]
  names = {name for _, name, _ in plan}
  if out_path.is_dir():
    if (out_path / 'manifest.json').exists():
      raise ConfigError(f'--out {out}: already holds a finished data set (manifest.json); merge into a new folder')
    foreign = sorted(p.name for p in out_path.glob('*.arrayrecord') if p.name not in names)
    if foreign:  # anything but this merge's own shards, from an interrupted run
      raise ConfigError(f'--out {out}: holds shards of another data set ({foreign[0]}, ...); merge into a new folder')
  out_path = prepare_output_dir(out_path)  # a path through a file: named, before anything is written
  for source, name, _ in plan:
    target = out_path / name
    if not (target.exists() and target.stat().length == source.stat().st_size):
      _place(source, target)
  kinds = list(dict.fromkeys(kind for _, manifest in read for kind in manifest['kinds']))
  records = {kind: sum(m['records_per_kind'].get(kind, 0) for _, m in read) for kind in kinds}
  tokenizer = manifest_tokenizer(read[0][0], first)
  manifest = {'job': 'lvm merge-sentences', **{key: first[key] for key in MUST_AGREE},
              'inputs': [{'path': absolute(path), 'source': m.get('source'), 'records_per_kind': m['records_per_kind'],
                          'shards': [name for _, name, owner in plan if owner == i],
                          **({'weight': weights[i - 1]} if weights else {})}
                         for i, (path, (_, m)) in enumerate(zip(inputs, read), 1)],
              'kinds': kinds, 'records_per_kind': records, 'shards': sorted(names),
              'images': sum(m.get('images', 0) for _, m in read), **tokenizer_location(tokenizer, out)}
  write_json_atomic(out_path / 'manifest.json', manifest)  # last: the folder is a data set once it exists
  counts = ', '.join(f'{kind} {n}' for kind, n in records.items())
  weighed = f', weighted {" : ".join(f"{w:g}" for w in weights)}' if weights else ''
  progress.say(f'merge-sentences: {sum(records.values())} sentences ({counts}) from {len(inputs)} folders into '
               f'{out}{weighed}')
  return {'job': 'lvm merge-sentences', 'out': str(out), 'records_per_kind': records, 'shards': len(names),
          **({'weights': weights} if weights else {}), 'wall_s': time.time() - started, 'versions': versions()}
