"""How far the AbU teacher agrees with itself: the same queries ranked twice, with two noise draws.

The only random part of a query's ranking is the noise and timesteps of its gradient (the Fisher and
the scoring noise are fixed), so a second ranking with `query_seed_offset` set is what an equally good
teacher could have said. mAP(L) of one ranking against the other's top L is the ceiling that a
student's mAP against the teacher cannot be expected to reach.

  cp -r runs/quickstart/attrib /tmp/again && rm -r /tmp/again/teacher/queries /tmp/again/teacher/settings.json
  python launch.py attrib teacher --workdir /tmp/again --split test --queries 20 --candidates all \\
      --set score_timestep_stride=100 --set query_seed_offset=7919
  python benchmarks/teacher_agreement.py runs/quickstart/attrib/teacher/ranks.arrayrecord \\
      /tmp/again/teacher/ranks.arrayrecord --map-at 16 48 160
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from attrib.evaluation import average_precision  # noqa: E402
from attrib.student_data import load_ranks  # noqa: E402


def agreement(first: np.ndarray, second: np.ndarray, map_at) -> dict:
  """Per L: AP of `second` against `first`'s top L (and the reverse), mean ± s.e., and top-L overlap."""
  n = min(len(first), len(second))
  first, second = np.asarray(first[:n]), np.asarray(second[:n])
  out = {'queries': n, 'identical_rankings': int((first == second).all(axis=1).sum())}
  for top_l in map_at:
    forward = np.array([average_precision(b, a[:top_l]) for a, b in zip(first, second)])
    backward = np.array([average_precision(a, b[:top_l]) for a, b in zip(first, second)])
    overlap = np.array([len(np.intersect1d(a[:top_l], b[:top_l])) / top_l for a, b in zip(first, second)])
    out[f'mAP({top_l})'] = {'second_vs_first': float(forward.mean()),
                            'stderr': float(forward.std(ddof=1) / np.sqrt(n)) if n > 1 else float('nan'),
                            'first_vs_second': float(backward.mean()), 'top_overlap': float(overlap.mean())}
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('first', help='ranks (ranks.arrayrecord, .npy or a FastGDA pickle)')
  parser.add_argument('second', help='the same queries ranked again')
  parser.add_argument('--map-at', type=int, nargs='+', default=[16, 48, 160])
  args = parser.parse_args()
  first, second = load_ranks(args.first), load_ranks(args.second)
  if first.shape[1] != second.shape[1]:
    raise SystemExit(f'{args.first} ranks {first.shape[1]} candidates per query, {args.second} {second.shape[1]}')
  result = agreement(first, second, args.map_at)
  for key, value in result.items():
    if key.startswith('mAP'):
      print(f"{key}: {value['second_vs_first']:.3f} ± {value['stderr']:.3f} (reverse {value['first_vs_second']:.3f}), "
            f"top-L overlap {value['top_overlap']:.3f}")
  print(json.dumps(result))


if __name__ == '__main__':
  main()
