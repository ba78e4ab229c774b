"""LVM perplexity against a torch computation, the quickstart end to end, gcloud command building."""
import argparse
import json
import math
import os
import shlex
from pathlib import Path

import numpy as np
import torch

from launch import main as launch_main
from lvm import commands
from tests.helpers import CPU8
from tests.test_hf_interop import _hf_model
from tests.tolerance import assert_network_close, total_fan_in


def test_eval_perplexity_matches_lvm_formula_in_torch(tmp_path):
  hf = _hf_model('grouped_kv', tmp_path)
  tokens = np.random.default_rng(2).integers(0, 300, (12, 128)).astype(np.int32)
  np.save(tmp_path / 'eval.npy', tokens)
  commands.import_hf_command(str(tmp_path / 'hf'), str(tmp_path / 'work'), CPU8, seq_len=128)
  # 12 examples in batches of 8: the padded last batch must not leak into the score.
  result = commands.eval_command(str(tmp_path / 'work'), str(tmp_path / 'eval.npy'), CPU8, 32, 8)
  with torch.no_grad():
    logits = hf(torch.tensor(tokens, dtype=torch.long)).logits
  nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), torch.tensor(tokens[:, 1:]).long(),
                                          reduction='none')[:, -32:].mean(-1)
  expected = torch.exp(nll).mean().item()  # LVM: per-example exp(mean target NLL), averaged
  assert result['examples'] == 12 and result['target_tokens'] == 32
  # The decoder's sums, then the softmax over the vocabulary and the mean over 32 targets x 12 examples.
  length = total_fan_in(hf.parameters()) + 2 * 3 * 128 + 300 + 32 * 12
  assert_network_close(result['perplexity'], expected, reduction_length=length, what='perplexity')
  assert_network_close(result['corpus_perplexity'], math.exp(nll.mean().item()), reduction_length=length,
                       what='corpus perplexity')
  assert json.loads((tmp_path / 'work' / 'eval_result.json').read_text())['job'] == 'lvm eval'
  # The workdir on another machine, where the checkout that made it is not: it recorded its preset by
  # that checkout's path, and this checkout's preset of the same name stands in (was 'not found').
  run = json.loads((tmp_path / 'work' / 'config.json').read_text())
  (tmp_path / 'work' / 'config.json').write_text(json.dumps({**run, 'tpu': '/home/someone/lvm/tpu_configs/cpu_8.py'}))
  assert commands.eval_command(str(tmp_path / 'work'), str(tmp_path / 'eval.npy'), None, 32, 8)['perplexity'] == \
      result['perplexity']


def test_quickstart_end_to_end(tmp_path, capsys, monkeypatch):
  """Real images to a trained LVM at tiny sizes: tokenizer (30 steps) -> sentences -> LVM (40 steps)."""
  assert launch_main(['quickstart', '--lvm-only', '--workdir', str(tmp_path), '--set', 'train.steps=40',
                      '--set', 'train.progress_bar=false', '--set-tokenizer', 'train.steps=30',
                      '--set-tokenizer', 'train.progress_bar=false']) == 0
  result = json.loads((tmp_path / 'quickstart_result.json').read_text())['lvm']
  assert result['train']['step'] == 40 and result['tokenizer']['psnr_db'] > 12
  # Data parallel over 8 devices by default (tpu_configs/cpu_8_data.py): every parameter replicated.
  assert result['train']['mesh'] == {'data': 8, 'fsdp': 1, 'tensor': 1}
  assert result['sentences']['train'] == {'video': 4096, **{k: 256 for k in ('groups', 'analogy', 'inpainting', 'edges')}}
  assert len(list((tmp_path / 'data' / 'train').glob('*.arrayrecord'))) == 4 + 4  # videos: 4 shards of 1024
  # The held-out sentences use digits no training sentence shows; 40 steps beat token frequencies.
  assert result['eval']['perplexity'] < result['baseline_unigram_perplexity']
  assert json.loads((tmp_path / 'lvm' / 'eval_result.json').read_text())['job'] == 'lvm eval'
  assert (tmp_path / 'lvm' / 'next_frame.png').exists() and result['next_frame']['sentences'] == 64
  assert list((tmp_path / 'lvm' / 'tensorboard').glob('events.out.tfevents.*'))
  said = capsys.readouterr()
  assert 'note: ' not in said.out + said.err  # its sentence counts are chosen for its time budget
  # It ends on its summary, not on a page of JSON (that is in the file it names).
  assert said.out.rstrip().endswith(f'quickstart: every number above, and more, in {tmp_path / "quickstart_result.json"}')
  assert '"job"' not in said.out
  # The command it prints to look at the training sentences works as printed.
  [show] = [line.split('decoded: ')[1] for line in said.out.splitlines() if 'the sentences it trained on' in line]
  monkeypatch.chdir(tmp_path)
  assert launch_main(shlex.split(show)[2:]) == 0 and (tmp_path / 'analogies.png').exists()
  # So does the one that trains the LVM on (here for one more update of the 40 it would add).
  [train_on] = [line.split('twice as long: ')[1] for line in said.out.splitlines() if 'train the LVM on' in line]
  assert train_on.endswith('--set train.steps=80')
  assert launch_main(shlex.split(train_on)[2:] + ['--set', 'train.steps=41']) == 0
  assert json.loads((tmp_path / 'lvm' / 'train_result.json').read_text())['step'] == 41


def test_sigterm_stops_the_quickstart_after_the_stage_it_interrupts(tmp_path):
  """SIGTERM while the quickstart's tokenizer trains (in its one-device child): the child saves a
  checkpoint and exits, and the quickstart stops there with exit code 143 instead of building visual
  sentences from the half-trained tokenizer (the rerun, which finishes the tokenizer, could not use
  them: a token shard records its tokenizer's checksum)."""
  import signal
  import time
  from tests.helpers import launch
  small = ['train.steps=100000', 'train.log_every=1', 'train.progress_bar=false', 'train.tensorboard=false',
           'train.global_batch=8', 'tokenizer.block_out_channels=(8,8,8)', 'tokenizer.norm_num_groups=4']
  proc = launch(['quickstart', '--lvm-only', '--workdir', str(tmp_path), *[a for o in small for a in ('--set-tokenizer', o)]])
  metrics = tmp_path / 'tokenizer' / 'metrics.jsonl'
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  out = proc.communicate(timeout=300)[0]
  assert proc.returncode == 143, out[-3000:]
  step = json.loads((tmp_path / 'tokenizer' / 'train_result.json').read_text())['step']
  assert f'stopped: quickstart: the tokenizer stopped by SIGTERM at step {step} (saved)' in out
  assert 'rerun the same command to continue' in out
  assert (tmp_path / 'tokenizer' / 'checkpoints' / str(step)).is_dir()
  assert not (tmp_path / 'data').exists() and not (tmp_path / 'quickstart_result.json').exists()


def test_the_attribution_quickstart_stops_when_a_training_was_preempted(tmp_path, monkeypatch):
  """A preempted diffusion training ends the attribution half before the teacher ranks anything with
  the half-trained model (its rankings name the model step, so the rerun's teacher would refuse them)."""
  import pytest
  from attrib import commands, curation
  from attrib import quickstart as attribution_quickstart
  from core.errors import Stopped
  monkeypatch.setattr(commands, 'train_model_command', lambda *a, **k: {'preempted': True, 'step': 7})
  monkeypatch.setattr(curation, 'teacher_command', lambda *a, **k: pytest.fail('the teacher ran after a preemption'))
  with pytest.raises(Stopped, match='the diffusion model stopped by SIGTERM at step 7'):
    attribution_quickstart.run(tmp_path)


class _FakeChild:
  """Stands in for a quickstart child process: records how it was started, writes a result."""
  started = []

  def __init__(self, command, env, code=0):
    self.command, self.env, self.code = command, env, code
    _FakeChild.started.append(self)
    workdir = Path(command[command.index('--workdir') + 1])
    if code == 0 and 'train-tokenizer' in command:
      (workdir / 'train_result.json').write_text(json.dumps({'reconstruction': {'psnr_db': 30.0}}))
    elif code == 0:
      (workdir / 'quickstart_result.json').write_text(json.dumps({'attribution': {'stage_seconds': {'teacher': 1.0}}}))

  def wait(self):
    return self.code


def test_quickstart_runs_one_device_jobs_in_a_child(tmp_path, monkeypatch):
  """With 8 forced CPU devices (the LVM's preset), the tokenizer and the attribution half run in child
  processes with one device: no forced device count in their XLA_FLAGS, the cpu_1 preset, the user's
  settings passed on, and a child's exit code becomes the command's."""
  import subprocess
  import launch
  monkeypatch.setattr(subprocess, 'Popen', _FakeChild)
  _FakeChild.started.clear()
  (tmp_path / 'tokenizer').mkdir()
  args = argparse.Namespace(full=True, tpu=str(Path(launch.__file__).parent / 'tpu_configs/cpu_8.py'),
                            set_tokenizer=['train.steps=3', 'model.codebook_size=64'])
  assert launch._train_quickstart_tokenizer(args, tmp_path) == {'reconstruction': {'psnr_db': 30.0}}
  assert launch._attribution_quickstart(args, tmp_path) == {'stage_seconds': {'teacher': 1.0}}
  tokenizer, attribution = _FakeChild.started
  assert tokenizer.command[2:4] == ['lvm', 'train-tokenizer']
  assert tokenizer.command[-4:] == ['--set', 'train.steps=3', '--set', 'model.codebook_size=64']
  assert attribution.command[1:5] == [str(Path(launch.__file__).resolve()), 'quickstart', '--attribution-only', '--workdir']
  assert '--full' in attribution.command
  for child in (tokenizer, attribution):
    assert child.command[child.command.index('--tpu') + 1].endswith('tpu_configs/cpu_1.py')
    assert 'xla_force_host_platform_device_count' not in child.env['XLA_FLAGS']
    assert child.env['LVM_ATTRIB_QUICKSTART_CHILD'] == '1'
  assert 'xla_force_host_platform_device_count=8' in os.environ['XLA_FLAGS']  # this process keeps its 8
  monkeypatch.setattr(subprocess, 'Popen', lambda command, env: _FakeChild(command, env, code=2))
  assert launch_main(['quickstart', '--attribution-only', '--workdir', str(tmp_path / 'bad')]) == 2
  assert launch_main(['quickstart', '--attribution-only', '--lvm-only', '--workdir', str(tmp_path)]) == 2


def test_digit_captions_describe_the_images():
  from data_pipelines.digit_captions import digit_captions
  images, labels, captions = digit_captions()
  assert images.shape == (1797, 16, 16, 1) and images.min() == -1.0 and images.max() == 1.0
  assert captions[7] == 'a right-slanted handwritten seven' and captions[0] == 'a handwritten zero'
  thick = np.array(['thick' in c for c in captions])
  thin = np.array(['thin' in c for c in captions])
  ink = images.reshape(len(images), -1).sum(1)
  both = [d for d in range(10) if (thick & (labels == d)).any() and (thin & (labels == d)).any()]
  assert len(both) >= 8
  for digit in both:  # within a class, 'thick' images carry more ink than 'thin' ones
    assert ink[thick & (labels == digit)].mean() > ink[thin & (labels == digit)].mean()


def test_the_full_quickstart_defaults_to_its_own_workdir():
  """In the quick run's workdir --full would continue the 400-step model under its rankings."""
  import types
  from pathlib import Path

  from launch import quickstart_workdir
  assert quickstart_workdir(types.SimpleNamespace(workdir=None, full=False)) == Path('runs/quickstart')
  assert quickstart_workdir(types.SimpleNamespace(workdir=None, full=True)) == Path('runs/quickstart_full')
  assert quickstart_workdir(types.SimpleNamespace(workdir='runs/mine', full=True)) == Path('runs/mine')
