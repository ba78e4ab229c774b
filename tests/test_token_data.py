"""Token records: formats in, ArrayRecord shards, grain loader; bad input named before training."""
import json

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

from data_pipelines.token_formats import encode_lvm_jsonl_line, read_lvm_jsonl, read_npy_tokens
from data_pipelines.token_loader import token_batches
from data_pipelines.token_records import TokenDataError, TokenRecordSource, find_shards, write_token_shards
from data_pipelines.token_sources import open_token_source, record_length
from lvm import commands
from tests.helpers import CPU8, SMALL_MODEL, TINY

T, V = 16, 8292


def _records(n, seed=0):
  return np.random.default_rng(seed).integers(0, V, (n, T)).astype(np.int32)


def test_round_trip_through_every_format(tmp_path):
  records = _records(10)
  (tmp_path / 'a.jsonl').write_text(''.join(encode_lvm_jsonl_line(r) + '\n' for r in records))
  np.save(tmp_path / 'a.npy', records)
  from_jsonl = np.stack(list(read_lvm_jsonl(tmp_path / 'a.jsonl', seq_len=T, vocab_size=V)))
  from_npy = np.stack(list(read_npy_tokens(tmp_path / 'a.npy', seq_len=T, vocab_size=V)))
  paths = write_token_shards(from_jsonl, tmp_path / 'shards', seq_len=T, vocab_size=V, records_per_shard=4)
  assert [p.name for p in paths] == [f'tokens-0000{i}-of-00003.arrayrecord' for i in range(3)]
  source = TokenRecordSource(find_shards(tmp_path / 'shards'), seq_len=T, vocab_size=V)
  np.testing.assert_array_equal(np.stack([source[i] for i in range(len(source))]), records)
  np.testing.assert_array_equal(from_npy, records)


def test_the_folder_above_the_shards_or_their_manifest_names_where_they_are(tmp_path):
  """The quickstart's data/ (train/ and eval/ below it) and a manifest.json given for the shards
  said 'no *.arrayrecord shards' and 'not a readable ArrayRecord shard (should be at least 64KB)'."""
  for split in ('train', 'eval'):
    write_token_shards(_records(4), tmp_path / 'data' / split, seq_len=T, vocab_size=V)
  (tmp_path / 'data' / 'train' / 'manifest.json').write_text('{}')
  (tmp_path / 'data' / 'notes').mkdir()
  with pytest.raises(TokenDataError, match=r'data: no \*.arrayrecord shards in this directory; its subfolders eval, '
                                           r'train hold shards: pass one of them$'):
    find_shards(tmp_path / 'data')
  with pytest.raises(TokenDataError, match=rf'manifest.json is not a shard: pass its folder {tmp_path / "data" / "train"}'):
    find_shards(tmp_path / 'data' / 'train' / 'manifest.json')
  with pytest.raises(TokenDataError, match=r'notes: no \*.arrayrecord shards in this directory$'):
    find_shards(tmp_path / 'data' / 'notes')
  # A folder of images given as token data: the LVM reads visual sentences of them.
  (tmp_path / 'photos' / 'cats').mkdir(parents=True)
  (tmp_path / 'photos' / 'cats' / 'a.JPG').write_bytes(b'')
  with pytest.raises(TokenDataError, match=r'photos: no \*.arrayrecord shards in this directory; it holds images, '
                                           r'which the LVM reads as tokens: make visual sentences of them first '
                                           rf'\(launch.py lvm tokenize --tokenizer TOKENIZER_DIR --source {tmp_path / "photos"}'):
    find_shards(tmp_path / 'photos')


def test_jsonl_lines_may_list_the_ids(tmp_path):
  """`{"tokens": [ids]}` (json.dumps of a list) reads as the base64 form does; a float, a bool or an
  id past int64 is named by line and position, not rounded or wrapped."""
  records = _records(4, seed=2)
  lines = [encode_lvm_jsonl_line(r) if i % 2 else json.dumps({'tokens': r.tolist()}) for i, r in enumerate(records)]
  (tmp_path / 'mixed.jsonl').write_text('\n'.join(lines) + '\n')
  read = list(read_lvm_jsonl(tmp_path / 'mixed.jsonl', seq_len=T, vocab_size=V))
  np.testing.assert_array_equal(np.stack(read), records)
  assert all(r.dtype == np.int32 for r in read)
  assert record_length(str(tmp_path / 'mixed.jsonl')) == T  # what `lvm eval --data` sizes its model by
  for bad, message in [(3.0, r'token 3.0 at position 2 is not an integer id'),
                       (True, r'token True at position 2 is not an integer id'),
                       (2**70, rf'token id {2**70} at position 2 is outside the vocabulary'), (V, rf'token id {V} at position 2 is outside')]:
    ids = records[0].tolist()
    ids[2] = bad
    (tmp_path / 'bad.jsonl').write_text(lines[0] + '\n' + json.dumps({'tokens': ids}) + '\n')
    with pytest.raises(TokenDataError, match=rf'bad.jsonl line 2: {message}'):
      list(read_lvm_jsonl(tmp_path / 'bad.jsonl', seq_len=T, vocab_size=V))


def _raw_shard(path, payloads):
  writer = ArrayRecordWriter(str(path), 'group_size:1')
  for payload in payloads:
    writer.write(payload)
  writer.close()


def test_bad_shard_records_name_shard_and_record(tmp_path):
  good = _records(3)
  _raw_shard(tmp_path / 'short.arrayrecord', [good[0].tobytes(), good[1][:-1].tobytes()])
  source = TokenRecordSource([tmp_path / 'short.arrayrecord'], seq_len=T, vocab_size=V)
  with pytest.raises(TokenDataError, match=r'short.arrayrecord record 1: 60 bytes, expected 16 int32'):
    source[1]
  bad = good[2].copy()
  bad[5] = V  # one past the vocabulary
  _raw_shard(tmp_path / 'oov.arrayrecord', [bad.tobytes()])
  with pytest.raises(TokenDataError, match=rf'oov.arrayrecord record 0: token id {V} at position 5'):
    TokenRecordSource([tmp_path / 'oov.arrayrecord'], seq_len=T, vocab_size=V)  # caught up front
  (tmp_path / 'garbage.arrayrecord').write_bytes(b'not an array record file at all')
  with pytest.raises(TokenDataError, match='garbage.arrayrecord'):
    TokenRecordSource([tmp_path / 'garbage.arrayrecord'], seq_len=T, vocab_size=V)


def test_writer_validates_everything_and_never_clobbers(tmp_path):
  records = list(_records(5, seed=1))
  records[3] = records[3].copy()
  records[3][0] = -1
  with pytest.raises(TokenDataError, match='input record 3: token id -1 at position 0'):
    write_token_shards(records, tmp_path / 'bad', seq_len=T, vocab_size=V)
  assert list((tmp_path / 'bad').iterdir()) == []  # no temp files left, no shard
  first = write_token_shards(_records(9), tmp_path / 'good', seq_len=T, vocab_size=V, records_per_shard=4)
  before = [p.read_bytes() for p in first]
  # A second data set into the same folder (here 1 shard beside 3) would mix with the first.
  def untouched():
    yield from ()
    raise AssertionError('records were read before the folder was checked')
  with pytest.raises(TokenDataError, match=r'good already holds 3 token shard\(s\) \(tokens-00000-of-00003'):
    write_token_shards(untouched(), tmp_path / 'good', seq_len=T, vocab_size=V)
  assert [p.read_bytes() for p in first] == before
  assert sorted(p.name for p in (tmp_path / 'good').iterdir()) == [p.name for p in first]


def test_jsonl_and_npy_errors_name_line_and_shape(tmp_path):
  lines = [encode_lvm_jsonl_line(r) for r in _records(3)]
  lines[1] = '{"tokens": "%%%not base64"}'
  (tmp_path / 'bad.jsonl').write_text('\n'.join(lines) + '\n')
  with pytest.raises(TokenDataError, match='bad.jsonl line 2'):
    list(read_lvm_jsonl(tmp_path / 'bad.jsonl', seq_len=T, vocab_size=V))
  (tmp_path / 'long.jsonl').write_text(encode_lvm_jsonl_line(np.zeros(T + 1, np.int32)) + '\n')
  with pytest.raises(TokenDataError, match=f'long.jsonl line 1: expected {T} tokens'):
    list(read_lvm_jsonl(tmp_path / 'long.jsonl', seq_len=T, vocab_size=V))
  np.save(tmp_path / 'wrong.npy', np.zeros((4, T + 2), np.int32))
  with pytest.raises(TokenDataError, match=rf'wrong.npy: expected an int array of shape \[N, {T}\], got \(4, {T + 2}\)'):
    list(read_npy_tokens(tmp_path / 'wrong.npy', seq_len=T, vocab_size=V))
  with pytest.raises(TokenDataError, match='no such file or directory'):
    open_token_source(str(tmp_path / 'missing'), seq_len=T, vocab_size=V)


def test_loader_resumes_exactly_and_hosts_partition_the_global_batch(tmp_path):
  records = np.arange(40 * T, dtype=np.int32).reshape(40, T) % V
  write_token_shards(records, tmp_path, seq_len=T, vocab_size=V, records_per_shard=16)
  source = TokenRecordSource(find_shards(tmp_path), seq_len=T, vocab_size=V)
  straight = token_batches(source, global_batch=8, seed=3)
  batches = [next(straight)['tokens'] for _ in range(12)]  # crosses two epoch boundaries
  resumed = token_batches(source, global_batch=8, seed=3)
  for _ in range(5):
    next(resumed)
  state = json.loads(json.dumps(resumed.get_state()))  # survives serialisation
  restarted = token_batches(source, global_batch=8, seed=3)
  restarted.set_state(state)
  for k in range(5, 12):
    np.testing.assert_array_equal(next(restarted)['tokens'], batches[k])
  # Each epoch is a permutation, different from the last.
  first_epoch = np.concatenate(batches[:5])[:, 0] // T
  assert sorted(first_epoch) == list(range(40))
  assert not np.array_equal(first_epoch, np.concatenate(batches[5:10])[:, 0] // T)
  # Two hosts read disjoint halves whose concatenation is the one-host global batch.
  hosts = [token_batches(source, global_batch=8, seed=3, process_index=h, process_count=2) for h in (0, 1)]
  for k in range(6):
    np.testing.assert_array_equal(np.concatenate([next(h)['tokens'] for h in hosts]), batches[k])


def test_batched_reads_keep_grains_order_and_name_a_bad_record(tmp_path):
  """The loader reads whole batches by index; it must give exactly the batches of grain's own
  record pipeline (so runs and checkpoints from before keep their data order), from brotli shards
  written by older versions as from today's zstd ones, and a bad record met mid-stream is named."""
  import grain
  records = _records(40)
  new_shards = write_token_shards(records[:24], tmp_path / 'mixed', seq_len=T, vocab_size=V, records_per_shard=12)
  for path in new_shards:
    reader = ArrayRecordReader(str(path))
    assert 'zstd:1' in reader.writer_options_string(), reader.writer_options_string()
    reader.close()
  _raw_shard(tmp_path / 'mixed' / 'tokens-old-brotli.arrayrecord', [r.tobytes() for r in records[24:]])
  source = TokenRecordSource(find_shards(tmp_path / 'mixed'), seq_len=T, vocab_size=V)
  reference = (grain.MapDataset.source(source).shuffle(seed=5).repeat(None)
               .batch(8, drop_remainder=True, batch_fn=np.stack))
  ours = token_batches(source, global_batch=8, seed=5)
  for k in range(12):  # two and a half epochs
    np.testing.assert_array_equal(next(ours)['tokens'], reference[k])
  batch = source.read_batch([39, 0, 30])
  np.testing.assert_array_equal(batch, records[[39, 0, 30]])
  assert batch.dtype == np.int32 and batch.flags.writeable

  bad = records[:3].copy()
  bad[2, 7] = V
  _raw_shard(tmp_path / 'late.arrayrecord', [r.tobytes() for r in bad])  # record 0 passes the up-front check
  source = TokenRecordSource([tmp_path / 'late.arrayrecord'], seq_len=T, vocab_size=V)
  loader = token_batches(source, global_batch=3, seed=0, shuffle=False)
  with pytest.raises(TokenDataError, match=rf'late.arrayrecord record 2: token id {V} at position 7'):
    next(loader)


def test_train_rejects_bad_data_before_any_work(tmp_path):
  bad = _records(32)
  bad[17, 3] = 9000
  np.save(tmp_path / 'bad.npy', np.pad(bad, ((0, 0), (0, 128 - T))))
  with pytest.raises(TokenDataError, match=r'bad.npy row 17: token id 9000 at position 3'):
    commands.train_command(TINY, CPU8, str(tmp_path / 'work'), SMALL_MODEL + [f'data.train_path={tmp_path}/bad.npy'])
  assert not (tmp_path / 'work').exists()
