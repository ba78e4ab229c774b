"""One writing job per workdir: a second job started on a workdir that another process is writing
into is refused before it writes anything, and the lock goes with its holder however that ends."""
import argparse
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from core.workdir_lock import WorkdirBusy, lock_file, writing_into
from launch import _CHILD_ENV, _written_workdir
from launch import main as launch_main
from tests.helpers import ROOT

_HOLDER = """
import sys
sys.path.insert(0, {root!r})
from core.workdir_lock import writing_into
with writing_into({workdir!r}, 'launch.py lvm train --workdir {workdir}'):
  print('held', flush=True)
  sys.stdin.read()  # holds until the test closes stdin or kills it
"""


def _start_holder(workdir):
  holder = subprocess.Popen([sys.executable, '-c', _HOLDER.format(root=str(ROOT), workdir=str(workdir))],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
  assert holder.stdout.readline().strip() == 'held'
  return holder


def _tokens_job(tmp_path, out):
  np.save(tmp_path / 'tokens.npy', np.arange(64, dtype=np.int32).reshape(8, 8))
  return ['data', 'tokens', '--input', str(tmp_path / 'tokens.npy'), '--out', str(out), '--seq-len', '8',
          '--vocab-size', '64']


def test_a_second_job_on_a_busy_workdir_is_refused_before_writing(tmp_path, capsys):
  out = tmp_path / 'shards'
  holder = _start_holder(out)
  try:
    assert launch_main(_tokens_job(tmp_path, out)) == 2
    message = capsys.readouterr().err
    assert message.startswith('error: ') and message.count('\n') == 1
    assert f'pid {holder.pid}' in message and 'launch.py lvm train' in message and str(out) in message
    assert not out.exists()  # refused before anything was written (or even created)
    # The same folder spelled another way is the same folder.
    assert launch_main(_tokens_job(tmp_path, tmp_path / 'x' / '..' / 'shards')) == 2
    assert not out.exists()
  finally:
    holder.kill()  # kill -9: no chance to clean up; the kernel drops the lock with the process
    holder.wait()
  assert launch_main(_tokens_job(tmp_path, out)) == 0
  assert [p.suffix for p in out.iterdir()] == ['.arrayrecord']


def test_the_lock_is_released_when_the_job_ends_or_fails(tmp_path):
  workdir = tmp_path / 'run'
  with writing_into(workdir, 'first'):
    with writing_into(workdir, 'the same process again'):  # a job's own code may take it again
      assert lock_file(workdir).read_text().count('first') == 1
    assert 'first' in lock_file(workdir).read_text()  # still held by the outer block
  with pytest.raises(RuntimeError):
    with writing_into(workdir, 'fails'):
      raise RuntimeError('the job failed')
  with writing_into(workdir, 'third'):  # neither the ended nor the failed job left it held
    pass
  assert lock_file(workdir).read_text() == ''  # released: no holder named
  with writing_into(tmp_path / 'other', 'elsewhere'), writing_into(workdir, 'fourth'):
    pass  # other workdirs are independent


def test_a_held_lock_names_its_holder_across_processes(tmp_path):
  holder = _start_holder(tmp_path / 'run')
  try:
    with pytest.raises(WorkdirBusy, match=f'pid {holder.pid}'):
      with writing_into(tmp_path / 'run', 'second'):
        pass
    holder.send_signal(signal.SIGTERM)
  finally:
    holder.wait()
  with writing_into(tmp_path / 'run', 'after'):
    pass


def test_a_bucket_folder_is_held_by_its_url_on_this_machine(tmp_path, capsys, monkeypatch):
  """Two `tpu run` jobs of one slice start their process 0 on the same worker: the second one into
  the same gs:// folder is refused there, before it reaches the bucket."""
  monkeypatch.delenv('STORAGE_EMULATOR_HOST', raising=False)
  holder = _start_holder('gs://runs/lvm')
  try:
    assert launch_main(_tokens_job(tmp_path, 'gs://runs/lvm/')) == 2  # a trailing slash names the same folder
    message = capsys.readouterr().err
    assert message.startswith('error: gs://runs/lvm/ is in use') and f'pid {holder.pid}' in message
    with writing_into('gs://runs/other', 'another folder of the bucket'):
      pass
  finally:
    holder.kill()
    holder.wait()


def _args(group, command=None, **fields):
  return argparse.Namespace(group=group, command=command, workdir=fields.get('workdir', 'W'), out='O',
                            lvm_only=False, attribution_only=False, full=False)


def test_which_commands_hold_which_folder(monkeypatch):
  assert _written_workdir(_args('lvm', 'train')) == 'W'
  assert _written_workdir(_args('attrib', 'distill')) == 'W'
  assert _written_workdir(_args('lvm', 'tokenize')) == 'O'
  assert _written_workdir(_args('data', 'tokens')) == 'O'
  assert str(_written_workdir(_args('quickstart'))) == 'W'
  for group, command in (('lvm', 'eval'), ('lvm', 'generate'), ('lvm', 'export-hf'), ('attrib', 'eval'),
                         ('attrib', 'query')):
    assert _written_workdir(_args(group, command)) is None, command  # readers: a run can be watched
  monkeypatch.setenv(_CHILD_ENV, '1')  # the quickstart's child: its parent holds the workdir
  assert _written_workdir(_args('quickstart')) is None
  monkeypatch.delenv(_CHILD_ENV)
  assert os.environ.get(_CHILD_ENV) is None
