"""Hugging Face LlamaForCausalLM safetensors <-> our parameter tree.

This is how a user loads the released LVM 7B (`Emma02/LVM_ckpts`, a LlamaForCausalLM). Our RoPE uses
HF's rotate-half layout, so q/k weights move across unpermuted; only the matrix layout changes
(torch Linear stores [out, in]; we store [in, heads, head_dim] so heads can be sharded by name).
Tensors are converted one at a time, so peak host memory is one stacked parameter, not the model.
"""
from __future__ import annotations

from core.errors import UserError

import json
import os
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from core.workdir import default_file_mode
from lvm.model_config import DecoderConfig


class HFImportError(UserError):
  """The Hugging Face directory is missing files or describes a model we do not implement."""


def decoder_config_from_hf(hf_config: dict, where: str) -> DecoderConfig:
  unsupported = {
      'hidden_act': lambda v: v not in ('silu', None),
      'tie_word_embeddings': bool,
      'attention_bias': bool,
      'mlp_bias': bool,
      'rope_scaling': lambda v: v not in (None, {}),
  }
  if not isinstance(hf_config, dict):
    raise HFImportError(f'{where}: expected a JSON object, got {type(hf_config).__name__}')
  if hf_config.get('model_type', 'llama') != 'llama':
    raise HFImportError(f"{where}: model_type={hf_config['model_type']!r}; this decoder imports LlamaForCausalLM "
                        "checkpoints (model_type 'llama')")
  for key, is_bad in unsupported.items():
    if key in hf_config and is_bad(hf_config[key]):
      raise HFImportError(f'{where}: {key}={hf_config[key]!r} is not supported by this decoder')
  sizes = ('vocab_size', 'hidden_size', 'intermediate_size', 'num_hidden_layers', 'num_attention_heads')
  missing = [key for key in sizes if key not in hf_config]
  if missing:
    raise HFImportError(f'{where}: missing {", ".join(missing)} (a LlamaForCausalLM config.json has them)')
  for key in sizes + ('num_key_value_heads', 'head_dim', 'max_position_embeddings'):
    value = hf_config.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
      raise HFImportError(f'{where}: {key}={value!r} is not a positive integer')
  heads = hf_config['num_attention_heads']
  head_dim = hf_config.get('head_dim') or hf_config['hidden_size'] // heads
  if head_dim * heads != hf_config['hidden_size']:
    raise HFImportError(f'{where}: head_dim {head_dim} x {heads} heads != hidden_size {hf_config["hidden_size"]}')
  return DecoderConfig(
      vocab_size=hf_config['vocab_size'], hidden_size=hf_config['hidden_size'],
      intermediate_size=hf_config['intermediate_size'], num_layers=hf_config['num_hidden_layers'],
      num_heads=heads, num_kv_heads=hf_config.get('num_key_value_heads') or heads,
      max_seq_len=hf_config.get('max_position_embeddings', 4096),
      rms_eps=hf_config.get('rms_norm_eps', 1e-6), rope_theta=hf_config.get('rope_theta', 1e4),
      init_std=hf_config.get('initializer_range', 0.02))


def hf_config_from_decoder(config: DecoderConfig, torch_dtype: str) -> dict:
  return {
      'architectures': ['LlamaForCausalLM'], 'model_type': 'llama',
      'vocab_size': config.vocab_size, 'hidden_size': config.hidden_size,
      'intermediate_size': config.intermediate_size, 'num_hidden_layers': config.num_layers,
      'num_attention_heads': config.num_heads, 'num_key_value_heads': config.num_kv_heads,
      'head_dim': config.head_dim, 'max_position_embeddings': config.max_seq_len,
      'rms_norm_eps': config.rms_eps, 'rope_theta': config.rope_theta, 'hidden_act': 'silu',
      'initializer_range': config.init_std, 'tie_word_embeddings': False, 'attention_bias': False,
      'mlp_bias': False, 'torch_dtype': torch_dtype,
      # LVM's generation_config uses eos 2, an ordinary VQ code; we set none (see reference notes).
      'bos_token_id': None, 'eos_token_id': None, 'pad_token_id': 8192 if config.vocab_size > 8192 else None,
  }


# (our path, HF name template, to_ours(w_hf, config), to_hf(w_ours, config)); {i} marks per-layer.
def _mapping(config: DecoderConfig):
  d, h, k, e = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
  return [
      (('embed',), 'model.embed_tokens.weight', lambda w: w, lambda w: w),
      (('lm_head',), 'lm_head.weight', lambda w: w.T, lambda w: w.T),
      (('final_norm', 'scale'), 'model.norm.weight', lambda w: w, lambda w: w),
      (('blocks', 'attention_norm', 'scale'), 'model.layers.{i}.input_layernorm.weight', lambda w: w, lambda w: w),
      (('blocks', 'mlp_norm', 'scale'), 'model.layers.{i}.post_attention_layernorm.weight', lambda w: w, lambda w: w),
      (('blocks', 'attention', 'q_proj'), 'model.layers.{i}.self_attn.q_proj.weight',
       lambda w: w.T.reshape(d, h, e), lambda w: w.reshape(d, h * e).T),
      (('blocks', 'attention', 'k_proj'), 'model.layers.{i}.self_attn.k_proj.weight',
       lambda w: w.T.reshape(d, k, e), lambda w: w.reshape(d, k * e).T),
      (('blocks', 'attention', 'v_proj'), 'model.layers.{i}.self_attn.v_proj.weight',
       lambda w: w.T.reshape(d, k, e), lambda w: w.reshape(d, k * e).T),
      (('blocks', 'attention', 'o_proj'), 'model.layers.{i}.self_attn.o_proj.weight',
       lambda w: w.T.reshape(h, e, d), lambda w: w.reshape(h * e, d).T),
      (('blocks', 'mlp', 'gate_proj'), 'model.layers.{i}.mlp.gate_proj.weight', lambda w: w.T, lambda w: w.T),
      (('blocks', 'mlp', 'up_proj'), 'model.layers.{i}.mlp.up_proj.weight', lambda w: w.T, lambda w: w.T),
      (('blocks', 'mlp', 'down_proj'), 'model.layers.{i}.mlp.down_proj.weight', lambda w: w.T, lambda w: w.T),
  ]


def _open_hf_tensors(hf_dir: Path) -> Callable[[str], np.ndarray]:
  from safetensors import safe_open

  def opened(file_name: str, framework: str):
    try:
      return safe_open(hf_dir / file_name, framework=framework)
    except Exception as e:  # safetensors raises its own error type for a corrupt header
      raise HFImportError(f'{hf_dir / file_name}: not a readable safetensors file ({e})') from None

  index_path = hf_dir / 'model.safetensors.index.json'
  if index_path.is_file():
    try:
      weight_map = json.loads(index_path.read_text())['weight_map']
    except (ValueError, KeyError, TypeError) as e:
      raise HFImportError(f'{index_path}: not a safetensors index with a weight_map ({e!r})') from None
  elif (hf_dir / 'model.safetensors').is_file():
    with opened('model.safetensors', 'numpy') as f:
      weight_map = {name: 'model.safetensors' for name in f.keys()}
  else:
    raise HFImportError(f'{hf_dir}: no model.safetensors or model.safetensors.index.json '
                        '(convert .bin checkpoints with transformers save_pretrained first)')
  for file_name in set(weight_map.values()):
    if not (hf_dir / file_name).is_file():
      raise HFImportError(f'{hf_dir}: index names {file_name}, which is missing')
    with opened(file_name, 'numpy'):  # every header is read before any tensor is converted
      pass

  def get(name: str) -> np.ndarray:
    if name not in weight_map:
      raise HFImportError(f'{hf_dir}: tensor {name!r} is missing from the checkpoint')
    # The 'flax' framework reads bfloat16/float16 as well; we convert on the host.
    with opened(weight_map[name], 'flax') as f:
      return np.asarray(f.get_tensor(name), dtype=np.float32)

  return get


def read_hf_params(hf_dir: str | Path, param_dtype: str = 'float32') -> tuple[DecoderConfig, Iterator]:
  """Returns the config and a generator of (path tuple, np.ndarray) in our layout. A gs:// folder is
  copied once into this host's data cache (safetensors maps local files)."""
  from core.paths import local_data
  hf_dir = Path(local_data(os.fspath(hf_dir)))
  config_path = hf_dir / 'config.json'
  if not config_path.is_file():
    from core.hub_folders import where_the_files_are
    raise HFImportError(f'{hf_dir}: config.json is missing{where_the_files_are(hf_dir)}')
  try:
    hf_config = json.loads(config_path.read_text())
  except (ValueError, UnicodeDecodeError) as e:
    raise HFImportError(f'{config_path}: not valid JSON ({e})') from None
  config = decoder_config_from_hf(hf_config, str(config_path))
  get = _open_hf_tensors(hf_dir)

  def tensors():
    for path, hf_name, to_ours, _ in _mapping(config):
      if '{i}' in hf_name:
        value = np.stack([to_ours(get(hf_name.format(i=i))) for i in range(config.num_layers)])
      else:
        value = to_ours(get(hf_name))
      yield path, value.astype(param_dtype)

  return config, tensors()


def hf_tensors(params: dict, config: DecoderConfig) -> Iterator[tuple[str, np.ndarray]]:
  """(HF name, array) pairs from our (host-fetched) parameter tree."""
  for path, hf_name, _, to_hf in _mapping(config):
    value = params
    for key in path:
      value = value[key]
    value = np.asarray(value)
    if '{i}' in hf_name:
      for i in range(config.num_layers):
        yield hf_name.format(i=i), np.ascontiguousarray(to_hf(value[i]))
    else:
      yield hf_name, np.ascontiguousarray(to_hf(value))


def write_hf_dir(params: dict, config: DecoderConfig, out_dir: str | Path, dtype: str = 'float32',
                 max_shard_bytes: int = 5 * 2**30) -> list:
  """Writes safetensors shards + index + config.json; files appear only when complete."""
  from safetensors.numpy import save_file
  import ml_dtypes

  from core.paths import as_path, is_remote
  from core.workdir import atomic_path, write_bytes_atomic
  out_dir = as_path(out_dir)  # local or gs:// (pathlib made 'gs://b/x' a local folder 'gs:/b/x')
  if not is_remote(out_dir):
    out_dir.mkdir(parents=True, exist_ok=True)
  np_dtype = {'float32': np.float32, 'bfloat16': ml_dtypes.bfloat16, 'float16': np.float16}[dtype]
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for name, value in hf_tensors(params, config):
    value = value.astype(np_dtype)
    if size and size + value.nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = value
    size += value.nbytes
  written, weight_map = [], {}
  for index, tensors in enumerate(shards):
    name = (f'model-{index + 1:05d}-of-{len(shards):05d}.safetensors' if len(shards) > 1
            else 'model.safetensors')
    # Written under a temporary name (or locally, then uploaded): a failed write (a full disk)
    # leaves neither a partial shard nor its temporary file.
    with atomic_path(out_dir / name) as temp:
      save_file(tensors, str(temp), metadata={'format': 'pt'})
      os.chmod(temp, default_file_mode())  # safetensors creates its file 0600; make it like the others
    written.append(out_dir / name)
    weight_map.update({tensor: name for tensor in tensors})
  if len(shards) > 1:
    total = sum(v.nbytes for shard in shards for v in shard.values())
    write_bytes_atomic(out_dir / 'model.safetensors.index.json',
                       json.dumps({'metadata': {'total_size': total}, 'weight_map': weight_map}, indent=1).encode())
  torch_dtype = {'float32': 'float32', 'bfloat16': 'bfloat16', 'float16': 'float16'}[dtype]
  hf_config = hf_config_from_decoder(config, torch_dtype)
  write_bytes_atomic(out_dir / 'config.json', json.dumps(hf_config, indent=1).encode())
  return written
