"""`lvm train` validating on held-out tokens (data.eval_path, train.eval_every): the logged loss is the
held-out loss of the model at that step (against transformers), training is untouched by it, a
resumed run validates as an uninterrupted one, and bad settings or data stop it before it starts."""
import json

import numpy as np
import pytest
import torch

from launch import main as launch_main
from lvm import commands
from tests.helpers import CPU1, ROOT
from tests.tolerance import assert_network_close, total_fan_in

TINY = str(ROOT / 'lvm/configs/tiny.py')
# global batch 8 in 2 micro-batches: validation batches of 4 records; 18 held-out records -> 16 used.
SMALL = ['--set', 'train.global_batch=8', '--set', 'optim.grad_accum=2', '--set', 'train.log_every=3',
         '--set', 'train.progress_bar=false', '--set', 'train.tensorboard=false']
VALIDATED = ['--set', 'data.eval_path=builtin:digits-eval', '--set', 'data.eval_examples=18',
             '--set', 'train.eval_every=2']
TRAINING_KEYS = ('loss', 'grad_norm', 'perplexity', 'learning_rate')


def _train(workdir, steps: int, *extra, tpu=CPU1) -> list[dict]:
  assert launch_main(['lvm', 'train', '--config', TINY, *(['--tpu', tpu] if tpu else []), '--workdir', str(workdir),
                      '--set', f'train.steps={steps}', *SMALL, *extra]) == 0
  return [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]


def test_validation_loss_is_the_held_out_loss_and_leaves_training_as_it_was(tmp_path):
  validated = _train(tmp_path / 'validated', 6, *VALIDATED)
  # Every eval_every steps and at the end, on the line of that step's training metrics.
  assert [line['step'] for line in validated] == [2, 3, 4, 6]
  assert [line['step'] for line in validated if 'eval_loss' in line] == [2, 4, 6]
  for line in validated[::2] + validated[-1:]:
    assert line['eval_perplexity'] == pytest.approx(np.exp(line['eval_loss']), rel=1e-12)
  assert validated[0]['eval_loss'] > validated[-1]['eval_loss']  # it learns something that holds out
  result = json.loads((tmp_path / 'validated' / 'train_result.json').read_text())
  assert result['final_metrics']['eval_loss'] == validated[-1]['eval_loss']

  # The same run without validation trains exactly the same (validation reads, never writes).
  plain = _train(tmp_path / 'plain', 6)
  assert [line['step'] for line in plain] == [3, 6]
  for step in (3, 6):
    [with_eval] = [line for line in validated if line['step'] == step]
    [without] = [line for line in plain if line['step'] == step]
    assert {k: with_eval[k] for k in TRAINING_KEYS} == {k: without[k] for k in TRAINING_KEYS}

  # Stopped at step 3 and continued: the validations after it are the uninterrupted run's, bit for bit.
  _train(tmp_path / 'resumed', 3, *VALIDATED)
  resumed = _train(tmp_path / 'resumed', 6, *VALIDATED, tpu=None)  # continued on the preset it trained with
  later = lambda lines: [(line['step'], line['loss'], line['eval_loss']) for line in lines if line['step'] > 3]
  assert later(resumed) == later(validated)

  # The held-out loss of the final model, computed by transformers from the exported weights: the
  # mean next-token cross-entropy over the first 16 held-out records.
  import transformers
  from data_pipelines.token_sources import open_token_source
  config, _ = commands.load_run_config(tmp_path / 'validated')
  commands.export_hf_command(str(tmp_path / 'validated'), str(tmp_path / 'hf'), 'float32')
  hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / 'hf', torch_dtype=torch.float32).eval()
  source = open_token_source('builtin:digits-eval', seq_len=256, vocab_size=config.model.vocab_size)
  tokens = torch.tensor(np.stack([source[i] for i in range(16)]), dtype=torch.long)
  with torch.no_grad():
    logits = hf(tokens).logits
  expected = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), tokens[:, 1:]).item()
  length = total_fan_in(hf.parameters()) + 2 * 3 * 256 + config.model.vocab_size + 16 * 255
  assert_network_close(validated[-1]['eval_loss'], expected, reduction_length=length, what='held-out loss')


def test_bad_validation_settings_and_data_stop_the_run_before_it_starts(tmp_path, capsys):
  vocab = 8292
  np.save(tmp_path / 'short.npy', np.zeros((20, 128), np.int32))
  out_of_range = np.zeros((20, 256), np.int32)
  out_of_range[3, 7] = vocab
  np.save(tmp_path / 'bad_ids.npy', out_of_range)
  (tmp_path / 'sentences').mkdir()
  (tmp_path / 'sentences' / 'manifest.json').write_text(json.dumps({'tokenizer_checksum': 'abc123'}))
  cases = {
      'eval_every without data': (['--set', 'train.eval_every=2'], 'train.eval_every 2 needs held-out tokens'),
      'other record length': (['--set', f'data.eval_path={tmp_path / "short.npy"}', '--set', 'train.eval_every=2'],
                              'holds records of 128 tokens, the training data 256'),
      'token id past the vocabulary': (['--set', f'data.eval_path={tmp_path / "bad_ids.npy"}'],
                                       'bad_ids.npy row 3: token id 8292 at position 7 is outside the vocabulary'),
      'fewer records than a batch': (['--set', 'data.eval_path=builtin:digits-eval', '--set', 'data.eval_examples=3'],
                                     'fewer than one validation batch of 4'),
      'another tokenizer\'s codes': (['--set', f'data.eval_path={tmp_path / "sentences"}'],
                                     'codes of tokenizer abc123, data.train_path builtin:digits the built-in'),
      'a negative cadence': (['--set', 'train.eval_every=-1'], 'train.eval_every must be >= 0'),
  }
  for name, (settings, message) in cases.items():
    capsys.readouterr()
    workdir = tmp_path / name.replace(' ', '_').replace("'", '')
    assert launch_main(['lvm', 'train', '--config', TINY, '--tpu', CPU1, '--workdir', str(workdir),
                        '--set', 'train.steps=2', *SMALL, *settings]) == 2, name
    error = capsys.readouterr().err
    assert message in error, (name, error)
    assert not workdir.exists(), name  # nothing written
  # Jobs without held-out data refuse the setting instead of ignoring it.
  for job in (['lvm', 'train-tokenizer', '--config', str(ROOT / 'lvm/configs/tokenizer_tiny.py')],
              ['attrib', 'train-model', '--config', str(ROOT / 'attrib/configs/digits.py')]):
    assert launch_main([*job, '--workdir', str(tmp_path / 'other'), '--set', 'train.eval_every=5']) == 2
    assert 'has no held-out data to validate on' in capsys.readouterr().err
