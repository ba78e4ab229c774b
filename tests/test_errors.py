"""The error boundary: bad input ends in one `error:` line and exit 2, never a traceback, and
changes nothing on disk; --debug shows the traceback."""
import hashlib

import numpy as np
import pytest

from core.errors import UserError
from launch import main as launch_main
from tests.helpers import CPU8, ROOT, TINY


def _tree_digest(path):
  digest = hashlib.sha256()
  for f in sorted(p for p in path.rglob('*') if p.is_file()):
    digest.update(str(f.relative_to(path)).encode() + f.read_bytes())
  return digest.hexdigest()


def _bad_inputs(tmp):
  np.save(tmp / 'short.npy', np.zeros((6, 64), np.int32))
  np.save(tmp / 'floats.npy', np.zeros((6, 256), np.float32))
  (tmp / 'truncated.npy').write_bytes((tmp / 'short.npy').read_bytes()[:100])
  (tmp / 'bad.jsonl').write_text('{"tokens": "not base64!"}\n')
  (tmp / 'a_file').write_text('x')
  train = ['lvm', 'train', '--config', TINY, '--tpu', CPU8, '--workdir', str(tmp / 'w')]
  tokens = ['data', 'tokens', '--out', str(tmp / 'out'), '--seq-len', '256', '--input']
  return {
      'cpu preset for a TPU': (['tpu', 'create', '--tpu', CPU8, '--name', 'x'], 'CPU preset'),
      'unknown --set key': (train + ['--set', 'train.stepz=3'], "unknown config key 'train.stepz'"),
      'negative steps': (train + ['--set', 'train.steps=-1'], 'train.steps must be >= 1'),
      'wrong type': (train + ['--set', 'train.steps=many'], 'train.steps'),
      'missing config': (['lvm', 'train', '--config', str(tmp / 'nope.py'), '--tpu', CPU8, '--workdir',
                          str(tmp / 'w')], 'nope.py'),
      'short records': (tokens + [str(tmp / 'short.npy')], 'short.npy'),
      'float records': (tokens + [str(tmp / 'floats.npy')], 'floats.npy'),
      'truncated npy': (tokens + [str(tmp / 'truncated.npy')], 'truncated.npy'),
      'corrupt jsonl': (tokens + [str(tmp / 'bad.jsonl')], 'bad.jsonl'),
      'eval of no workdir': (['lvm', 'eval', '--workdir', str(tmp / 'none'), '--data', 'builtin:digits-eval'], 'none'),
      'teacher on no workdir': (['attrib', 'teacher', '--workdir', str(tmp / 'none'), '--queries', '1'], 'none'),
      'sampler typo (checked before training)': (['attrib', 'train-model', '--config', str(ROOT / 'attrib/configs/digits.py'),
                                                   '--workdir', str(tmp / 'w'), '--set', 'sample.method=euler'], 'euler'),
      'distill without features': (['attrib', 'distill', '--workdir', str(tmp / 'w')], 'data_feats.npy'),
      'attribute with no student': (['attrib', 'query', '--workdir', str(tmp / 'w'), '--image', 'x.png', '--prompt', 'p'],
                                    'attrib distill'),
      'shell text in a string': (train[:-1] + [str(tmp / 'w'), '--set', 'data.train_path=$(rm -rf /); x'],
                                 '$(rm -rf /); x'),
  }


CASES = ['cpu preset for a TPU', 'unknown --set key', 'negative steps', 'wrong type', 'missing config',
         'short records', 'float records', 'truncated npy', 'corrupt jsonl', 'eval of no workdir',
         'teacher on no workdir', 'shell text in a string', 'sampler typo (checked before training)',
         'distill without features', 'attribute with no student']


@pytest.mark.parametrize('case', CASES)
def test_bad_input_is_one_line_and_exit_2(case, tmp_path, capsys):
  cases = _bad_inputs(tmp_path)
  assert sorted(cases) == sorted(CASES)
  argv, named = cases[case]
  before = _tree_digest(tmp_path)
  assert launch_main(argv) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith('error: ') and 'Traceback' not in err[0], err
  assert named in err[0], err
  assert _tree_digest(tmp_path) == before  # nothing written, nothing half-written


def test_debug_shows_the_traceback(tmp_path):
  with pytest.raises(UserError, match='CPU preset'):
    launch_main(['--debug', 'tpu', 'create', '--tpu', CPU8, '--name', 'x'])
