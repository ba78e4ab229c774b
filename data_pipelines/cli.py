"""The `launch.py data ...` commands: their flags, and which job each runs."""
from __future__ import annotations


def add_parser(sub) -> None:
  d = sub.add_parser('data', help='data preparation').add_subparsers(dest='command', required=True)
  dt = d.add_parser('tokens', help='LVM .jsonl or int32 .npy -> ArrayRecord token shards')
  dt.add_argument('--input', required=True)
  dt.add_argument('--out', required=True, help='a new folder for the shards (local or gs://)')
  dt.add_argument('--seq-len', type=int, required=True)
  dt.add_argument('--vocab-size', type=int, default=8292)
  dt.add_argument('--records-per-shard', type=int, default=4096)


class _counted:
  """Passes an iterable through and counts what went by."""

  def __init__(self, iterable):
    self.iterable, self.count = iterable, 0

  def __iter__(self):
    for item in self.iterable:
      self.count += 1
      yield item


def run(args) -> dict:
  from core import progress
  from core.config import check_at_least
  from data_pipelines.token_formats import read_token_file
  from data_pipelines.token_records import write_token_shards
  check_at_least(1, seq_len=args.seq_len, vocab_size=args.vocab_size, records_per_shard=args.records_per_shard)
  counted = _counted(read_token_file(args.input, seq_len=args.seq_len, vocab_size=args.vocab_size))
  paths = write_token_shards(counted, args.out, seq_len=args.seq_len, vocab_size=args.vocab_size,
                             records_per_shard=args.records_per_shard, source=args.input)
  progress.say(f'data tokens: wrote {counted.count} records of {args.seq_len} tokens into {len(paths)} '
               f'shard(s) in {args.out}')
  return {'job': 'data tokens', 'records': counted.count, 'shards': [str(p) for p in paths]}
