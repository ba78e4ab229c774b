"""Parity with transformers' LlamaForCausalLM (torch CPU, random weights) through import-hf/export-hf."""
import json

import numpy as np
import pytest
import torch
import transformers

import jax
from lvm import commands
from tests.helpers import CPU8
from tests.tolerance import assert_network_close, total_fan_in

CONFIGS = {
    'mha': dict(num_attention_heads=4, num_key_value_heads=4),
    'grouped_kv': dict(num_attention_heads=8, num_key_value_heads=2),
}


def _hf_model(kind, tmp_path):
  torch.manual_seed(0)
  config = transformers.LlamaConfig(
      vocab_size=300, hidden_size=64, intermediate_size=112, num_hidden_layers=3,
      max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
      attention_bias=False, mlp_bias=False, initializer_range=0.02, **CONFIGS[kind])
  model = transformers.LlamaForCausalLM(config).eval()
  with torch.no_grad():  # HF inits norms to 1; perturb them so a swapped norm would show
    for name, p in model.named_parameters():
      if 'norm' in name:
        p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(tmp_path / 'hf', safe_serialization=True)
  return model


@pytest.mark.parametrize('kind', sorted(CONFIGS))
def test_import_matches_transformers_and_export_round_trips(kind, tmp_path):
  hf = _hf_model(kind, tmp_path)
  tokens = np.random.default_rng(1).integers(0, 300, (2, 128))
  with torch.no_grad():
    expected = hf(torch.tensor(tokens)).logits.numpy()

  commands.import_hf_command(str(tmp_path / 'hf'), str(tmp_path / 'work'), CPU8, seq_len=128)
  config, _ = commands.load_run_config(tmp_path / 'work')
  graphdef, params, mesh, preset, step = commands.restore_params(tmp_path / 'work', config, CPU8)
  assert step == 0 and config.model.num_kv_heads == CONFIGS[kind]['num_key_value_heads']
  from flax import nnx
  logits = np.asarray(jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))(params, tokens))
  # Every layer's matmuls plus its attention sums over the 128 positions (scores' softmax, then PV).
  assert_network_close(logits, expected, what='logits',
                       reduction_length=total_fan_in(hf.parameters()) + 2 * 3 * tokens.shape[1])

  commands.export_hf_command(str(tmp_path / 'work'), str(tmp_path / 'exported'), 'float32')
  from core.workdir import default_file_mode
  for written in (tmp_path / 'exported').iterdir():  # like every other file the jobs write (not 0600)
    assert written.stat().st_mode & 0o777 == default_file_mode(), written
  reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / 'exported').eval()
  for (name, a), (_, b) in zip(hf.state_dict().items(), reloaded.state_dict().items()):
    assert torch.equal(a, b), name
  assert json.loads((tmp_path / 'exported' / 'config.json').read_text())['num_key_value_heads'] == \
      CONFIGS[kind]['num_key_value_heads']


def test_import_rejects_unsupported_and_incomplete(tmp_path):
  _hf_model('mha', tmp_path)
  config_path = tmp_path / 'hf' / 'config.json'
  original = json.loads(config_path.read_text())
  config_path.write_text(json.dumps(dict(original, tie_word_embeddings=True)))
  with pytest.raises(ValueError, match='tie_word_embeddings'):
    commands.import_hf_command(str(tmp_path / 'hf'), str(tmp_path / 'w1'), CPU8, seq_len=128)
  config_path.write_text(json.dumps(dict(original, num_hidden_layers=4)))  # one layer too many
  with pytest.raises(ValueError, match='model.layers.3'):
    commands.import_hf_command(str(tmp_path / 'hf'), str(tmp_path / 'w2'), CPU8, seq_len=128)
  assert not (tmp_path / 'w2' / 'checkpoints').exists()  # nothing half-written
  with pytest.raises(ValueError, match='config.json is missing'):
    commands.import_hf_command(str(tmp_path), str(tmp_path / 'w3'), CPU8, seq_len=128)


def test_import_defaults_to_the_model_length_and_eval_scores_shorter_records(tmp_path):
  hf = _hf_model('grouped_kv', tmp_path)
  commands.import_hf_command(str(tmp_path / 'hf'), str(tmp_path / 'work'), CPU8, seq_len=None)
  config, _ = commands.load_run_config(tmp_path / 'work')
  assert config.data.seq_len == 256  # max_position_embeddings, not a 4096 the model cannot hold

  tokens = np.random.default_rng(2).integers(0, 300, (3, 64)).astype(np.int32)
  np.save(tmp_path / 'short.npy', tokens)
  result = commands.eval_command(str(tmp_path / 'work'), str(tmp_path / 'short.npy'), CPU8,
                                 target_tokens=16, batch_size=4)
  with torch.no_grad():  # the reference: transformers' NLL of the last 16 tokens of each record
    logits = hf(torch.tensor(tokens, dtype=torch.long)).logits.double()
    nll = -torch.log_softmax(logits[:, :-1], -1).gather(-1, torch.tensor(tokens[:, 1:, None], dtype=torch.long))
    expected = nll[:, -16:, 0].mean(-1).numpy()
  assert result['record_tokens'] == 64 and result['examples'] == 3
  assert_network_close(np.array([result['mean_nll']]), np.array([expected.mean()]), what='mean NLL',
                       reduction_length=total_fan_in(hf.parameters()) + 2 * 3 * 64 + 300)

  np.save(tmp_path / 'long.npy', np.zeros((1, 512), np.int32))
  with pytest.raises(ValueError, match='exceed the model.s max_seq_len 256'):
    commands.eval_command(str(tmp_path / 'work'), str(tmp_path / 'long.npy'), CPU8, None, 4)
