"""FastGDA's full-scale base features in Flax NNX: DINO ViT-B/16 (image, CLS) and CLIP ViT-B/32
(text and image towers), loading Hugging Face checkpoints (`facebook/dino-vitb16` as transformers'
ViTModel, `openai/clip-vit-base-patch32` as CLIPModel; fastgda.md §3).

All three are the same pre-norm transformer encoder with different embeddings and read-outs:
  DINO       patches (conv, bias) + CLS + positions -> layers (gelu) -> LayerNorm -> CLS
  CLIP image patches (conv, no bias) + CLS + positions -> LayerNorm -> layers (quick_gelu) -> CLS -> LayerNorm -> projection
  CLIP text  tokens + positions -> causal layers (quick_gelu) -> LayerNorm -> the EOS token -> projection
Images come in as [b, 224, 224, 3] already preprocessed (`preprocess_dino`, `preprocess_clip`).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from core.errors import UserError
from core.layers import logical_sharding_only


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class TowerWeightError(UserError):
  """A checkpoint that does not hold the tensors (names, shapes) this tower needs."""


@dataclasses.dataclass(frozen=True)
class TowerConfig:
  kind: str                 # 'dino' (ViTModel), 'clip_vision' or 'clip_text'
  hidden: int = 768
  layers: int = 12
  heads: int = 12
  intermediate: int = 3072
  eps: float = 1e-12
  activation: str = 'gelu'  # 'gelu' (exact, erf) or 'quick_gelu'
  image_size: int = 224
  patch_size: int = 16
  vocab_size: int = 49408
  max_positions: int = 77
  projection_dim: int = 0   # CLIP's text/visual projection width (0 = none)
  eos_token_id: int = 2

  @property
  def patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2


def config_from_hf(hf_dir: str | Path, kind: str) -> TowerConfig:
  """The tower's config from a checkpoint's config.json (ViTConfig, or CLIPConfig's sub-configs)."""
  path = Path(hf_dir) / 'config.json'
  if not path.is_file():
    from core.hub_folders import where_the_files_are
    raise TowerWeightError(f'{path} not found (a Hugging Face checkpoint directory has config.json)'
                           f'{where_the_files_are(hf_dir)}')
  try:
    c = json.loads(path.read_text())
  except (ValueError, UnicodeDecodeError) as e:
    raise TowerWeightError(f'{path}: not valid JSON ({e})') from None
  if not isinstance(c, dict):
    raise TowerWeightError(f'{path}: expected a JSON object, got {type(c).__name__}')
  wanted = {'dino': 'vit', 'clip_vision': 'clip', 'clip_text': 'clip'}[kind]
  if c.get('model_type') != wanted:
    raise TowerWeightError(f"{path}: model_type {c.get('model_type')!r}, a {kind} tower needs a {wanted!r} "
                           f"checkpoint (facebook/dino-vitb16 or openai/clip-vit-base-patch32)")
  # A key the file leaves out takes transformers' default, as transformers itself would load it.
  if kind == 'dino':
    c = {**dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072), **c}
    _check_sizes(c, path, ('hidden_size', 'num_hidden_layers', 'num_attention_heads', 'intermediate_size',
                           'image_size', 'patch_size'))
    return TowerConfig('dino', c['hidden_size'], c['num_hidden_layers'], c['num_attention_heads'],
                       c['intermediate_size'], c.get('layer_norm_eps', 1e-12), c.get('hidden_act', 'gelu'),
                       c.get('image_size', 224), c.get('patch_size', 16))
  sub_key = 'vision_config' if kind == 'clip_vision' else 'text_config'
  sub = c.get(sub_key) or {}
  if not isinstance(sub, dict):
    raise TowerWeightError(f'{path}: {sub_key} should be a JSON object, got {sub!r}')
  defaults = {'clip_vision': dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                                  image_size=224, patch_size=32),
              'clip_text': dict(hidden_size=512, num_hidden_layers=12, num_attention_heads=8, intermediate_size=2048,
                                vocab_size=49408, max_position_embeddings=77)}[kind]
  sub = {**defaults, **sub}
  _check_sizes(sub, f'{path} ({sub_key})', tuple(defaults))
  return TowerConfig(kind, sub['hidden_size'], sub['num_hidden_layers'], sub['num_attention_heads'],
                     sub['intermediate_size'], sub.get('layer_norm_eps', 1e-5), sub.get('hidden_act', 'quick_gelu'),
                     sub.get('image_size', 224), sub.get('patch_size', 32), sub.get('vocab_size', 49408),
                     sub.get('max_position_embeddings', 77), c.get('projection_dim', 512),
                     sub.get('eos_token_id') or 49407)  # transformers' CLIPTextConfig default


def _check_sizes(config: dict, where, keys: tuple[str, ...]) -> None:
  for key in keys:
    value = config.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
      raise TowerWeightError(f'{where}: {key}={value!r} is not a positive integer')


def _act(name: str):
  if name == 'quick_gelu':
    return lambda x: x * jax.nn.sigmoid(1.702 * x)
  if name == 'gelu':
    return lambda x: jax.nn.gelu(x, approximate=False)
  raise TowerWeightError(f'activation {name!r} is not supported (gelu, quick_gelu)')


class _Dense(nnx.Module):
  def __init__(self, i: int, o: int, rngs: nnx.Rngs, bias: bool = True):
    self.kernel = nnx.Param(nnx.initializers.lecun_normal()(rngs.params(), (i, o)), out_sharding=('embed', 'mlp'))
    self.bias = nnx.Param(jnp.zeros((o,)), out_sharding=('mlp',)) if bias else None

  def __call__(self, x):
    y = x @ self.kernel[...]
    return y if self.bias is None else y + self.bias[...]


class _LayerNorm(nnx.Module):
  def __init__(self, d: int, eps: float):
    self.scale = nnx.Param(jnp.ones((d,)), out_sharding=('norm',))
    self.bias = nnx.Param(jnp.zeros((d,)), out_sharding=('norm',))
    self.eps = eps

  def __call__(self, x):
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...] + self.bias[...]


class EncoderLayer(nnx.Module):
  """x + attn(LN(x)), then + mlp(LN(x)): both ViTLayer and CLIPEncoderLayer."""

  def __init__(self, c: TowerConfig, rngs: nnx.Rngs):
    d = c.hidden
    self.heads, self.act = c.heads, _act(c.activation)
    self.norm1, self.norm2 = _LayerNorm(d, c.eps), _LayerNorm(d, c.eps)
    self.q, self.k, self.v, self.o = (_Dense(d, d, rngs) for _ in range(4))
    self.fc1, self.fc2 = _Dense(d, c.intermediate, rngs), _Dense(c.intermediate, d, rngs)

  def __call__(self, x_btd, mask_bts=None):
    b, t, d = x_btd.shape
    h = self.norm1(x_btd)
    split = lambda y: y.reshape(b, t, self.heads, d // self.heads).transpose(0, 2, 1, 3)
    q, k, v = split(self.q(h)), split(self.k(h)), split(self.v(h))
    scores = jnp.einsum('bhte,bhse->bhts', q, k) / np.sqrt(d // self.heads)
    if mask_bts is not None:
      scores = jnp.where(mask_bts[:, None], scores, jnp.finfo(scores.dtype).min)
    attended = jnp.einsum('bhts,bhse->bhte', jax.nn.softmax(scores, axis=-1), v)
    x_btd = x_btd + self.o(attended.transpose(0, 2, 1, 3).reshape(b, t, d))
    return x_btd + self.fc2(self.act(self.fc1(self.norm2(x_btd))))


class VisionTower(nnx.Module):
  """[b, H, W, 3] preprocessed images -> DINO CLS [b, hidden] or CLIP image features [b, projection]."""

  @logical_sharding_only
  def __init__(self, c: TowerConfig, rngs: nnx.Rngs):
    self.config = c
    p, d = c.patch_size, c.hidden
    self.patch_kernel = nnx.Param(nnx.initializers.lecun_normal()(rngs.params(), (p, p, 3, d)),
                                  out_sharding=(None, None, None, 'embed'))
    self.patch_bias = nnx.Param(jnp.zeros((d,)), out_sharding=('embed',)) if c.kind == 'dino' else None
    self.cls = nnx.Param(jnp.zeros((d,)), out_sharding=('embed',))
    self.positions = nnx.Param(0.02 * jax.random.normal(rngs.params(), (c.patches + 1, d)), out_sharding=(None, 'embed'))
    self.pre_norm = _LayerNorm(d, c.eps) if c.kind == 'clip_vision' else None
    self.layers = nnx.List([EncoderLayer(c, rngs) for _ in range(c.layers)])
    self.final_norm = _LayerNorm(d, c.eps)
    self.projection = _Dense(d, c.projection_dim, rngs, bias=False) if c.kind == 'clip_vision' else None

  def __call__(self, images_bhwc):
    c = self.config
    patches = jax.lax.conv_general_dilated(images_bhwc, self.patch_kernel[...], (c.patch_size,) * 2, 'VALID',
                                           dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    if self.patch_bias is not None:
      patches = patches + self.patch_bias[...]
    b = patches.shape[0]
    x = jnp.concatenate([jnp.broadcast_to(self.cls[...], (b, 1, c.hidden)), patches.reshape(b, -1, c.hidden)], axis=1)
    x = x + self.positions[...]
    if self.pre_norm is not None:
      x = self.pre_norm(x)
    for layer in self.layers:
      x = layer(x)
    cls = self.final_norm(x[:, 0])  # DINO normalises every token; the CLS row is the same either way
    return cls if self.projection is None else self.projection(cls)


class TextTower(nnx.Module):
  """CLIP text: token ids [b, 77] -> text features [b, projection] (CLIPModel.get_text_features)."""

  @logical_sharding_only
  def __init__(self, c: TowerConfig, rngs: nnx.Rngs):
    self.config = c
    self.tokens = nnx.Param(0.02 * jax.random.normal(rngs.params(), (c.vocab_size, c.hidden)), out_sharding=('vocab', 'embed'))
    self.positions = nnx.Param(0.02 * jax.random.normal(rngs.params(), (c.max_positions, c.hidden)), out_sharding=(None, 'embed'))
    self.layers = nnx.List([EncoderLayer(c, rngs) for _ in range(c.layers)])
    self.final_norm = _LayerNorm(c.hidden, c.eps)
    self.projection = _Dense(c.hidden, c.projection_dim, rngs, bias=False)

  def __call__(self, ids_bt, mask_bt):
    b, t = ids_bt.shape
    x = jnp.take(self.tokens[...], ids_bt, axis=0) + self.positions[...][:t]
    causal = jnp.tril(jnp.ones((t, t), bool))[None] & mask_bt[:, None, :].astype(bool)
    for layer in self.layers:
      x = layer(x, causal)
    x = self.final_norm(x)
    # transformers' pooling: the EOS position (argmax of the ids for the original CLIP vocab, where
    # EOS has the largest id; the first EOS otherwise).
    if self.config.eos_token_id == 2:
      eos = jnp.argmax(ids_bt, axis=-1)
    else:
      eos = jnp.argmax((ids_bt == self.config.eos_token_id).astype(jnp.int32), axis=-1)
    return self.projection(x[jnp.arange(b), eos])


# ---------------------------------------------------------------- Hugging Face weights

def _hf_names(c: TowerConfig) -> dict[tuple, tuple[str, str]]:
  """Our parameter path -> (HF tensor name, how to convert: 'T' transpose, 'conv', '' as is, 'cls')."""
  if c.kind == 'dino':
    root, layer, attn = '', 'encoder.layer.{}.', ('attention.attention.query', 'attention.attention.key',
                                                  'attention.attention.value', 'attention.output.dense')
    norms, mlp = ('layernorm_before', 'layernorm_after'), ('intermediate.dense', 'output.dense')
    names = {('patch_kernel',): ('embeddings.patch_embeddings.projection.weight', 'conv'),
             ('patch_bias',): ('embeddings.patch_embeddings.projection.bias', ''),
             ('cls',): ('embeddings.cls_token', 'cls'), ('positions',): ('embeddings.position_embeddings', 'cls'),
             ('final_norm', 'scale'): ('layernorm.weight', ''), ('final_norm', 'bias'): ('layernorm.bias', '')}
  else:
    root = 'vision_model.' if c.kind == 'clip_vision' else 'text_model.'
    layer, attn = 'encoder.layers.{}.', ('self_attn.q_proj', 'self_attn.k_proj', 'self_attn.v_proj', 'self_attn.out_proj')
    norms, mlp = ('layer_norm1', 'layer_norm2'), ('mlp.fc1', 'mlp.fc2')
    if c.kind == 'clip_vision':
      names = {('patch_kernel',): ('vision_model.embeddings.patch_embedding.weight', 'conv'),
               ('cls',): ('vision_model.embeddings.class_embedding', ''),
               ('positions',): ('vision_model.embeddings.position_embedding.weight', ''),
               ('pre_norm', 'scale'): ('vision_model.pre_layrnorm.weight', ''),
               ('pre_norm', 'bias'): ('vision_model.pre_layrnorm.bias', ''),
               ('final_norm', 'scale'): ('vision_model.post_layernorm.weight', ''),
               ('final_norm', 'bias'): ('vision_model.post_layernorm.bias', ''),
               ('projection', 'kernel'): ('visual_projection.weight', 'T')}
    else:
      names = {('tokens',): ('text_model.embeddings.token_embedding.weight', ''),
               ('positions',): ('text_model.embeddings.position_embedding.weight', ''),
               ('final_norm', 'scale'): ('text_model.final_layer_norm.weight', ''),
               ('final_norm', 'bias'): ('text_model.final_layer_norm.bias', ''),
               ('projection', 'kernel'): ('text_projection.weight', 'T')}
  for i in range(c.layers):
    prefix = root + layer.format(i)
    for ours, theirs in zip(('q', 'k', 'v', 'o', 'fc1', 'fc2'), attn + mlp):
      names[('layers', i, ours, 'kernel')] = (prefix + theirs + '.weight', 'T')
      names[('layers', i, ours, 'bias')] = (prefix + theirs + '.bias', '')
    for ours, theirs in zip(('norm1', 'norm2'), norms):
      names[('layers', i, ours, 'scale')] = (prefix + theirs + '.weight', '')
      names[('layers', i, ours, 'bias')] = (prefix + theirs + '.bias', '')
  return names


def params_from_hf(weights: dict[str, np.ndarray], c: TowerConfig, abstract: dict, source: str = 'checkpoint') -> dict:
  """Our parameter tree from a transformers state dict; every tensor checked by name and shape."""
  convert = {'T': lambda w: w.T, 'conv': lambda w: w.transpose(2, 3, 1, 0), '': lambda w: w,
             'cls': lambda w: w.reshape(w.shape[-2], w.shape[-1]) if w.ndim == 3 and w.shape[1] > 1 else w.reshape(-1)}
  out: dict = {}
  for path, (name, how) in _hf_names(c).items():
    if name not in weights:
      raise TowerWeightError(f'{source}: tensor {name} is missing (is this a {c.kind} checkpoint?)')
    target = abstract
    for key in path:
      target = target[key]
    value = np.asarray(convert[how](np.asarray(weights[name], np.float32)))
    if value.shape != tuple(target.shape):
      raise TowerWeightError(f'{source}: tensor {name} has shape {np.asarray(weights[name]).shape}, '
                             f'the {c.kind} config needs {tuple(target.shape)} (after layout conversion)')
    node = out
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return out


def read_hf_weights(hf_dir: Path) -> dict[str, np.ndarray]:
  """Every tensor of a checkpoint directory: its .safetensors files, else its PyTorch `.bin` files
  (the format of checkpoints saved before safetensors, which some Hub repositories still hold
  alone; read by torch.load(weights_only=True), so only tensors, no code)."""
  from attrib.released import read_state_dict
  from core.torch_layout import WeightImportError
  files = sorted(hf_dir.glob('*.safetensors')) or sorted(hf_dir.glob('pytorch_model*.bin'))
  if not files:
    raise TowerWeightError(f'{hf_dir}: no .safetensors (or pytorch_model.bin) files')
  weights = {}
  for f in files:
    try:
      weights.update(read_state_dict(f))
    except WeightImportError as e:
      raise TowerWeightError(str(e)) from None
  return weights


def load_tower(hf_dir: str | Path, kind: str):
  """(apply, params, config) of a tower from a Hugging Face checkpoint directory."""
  hf_dir = Path(hf_dir)
  c = config_from_hf(hf_dir, kind)
  weights = read_hf_weights(hf_dir)
  module = VisionTower if kind != 'clip_text' else TextTower
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: module(c, nnx.Rngs(0))))
  params = params_from_hf(weights, c, nnx.to_pure_dict(abstract), str(hf_dir))
  apply = jax.jit(lambda p, *x: nnx.merge(graphdef, p)(*x))
  return apply, params, c


# ---------------------------------------------------------------- preprocessing

def _resize_crop(image, shortest: int, crop: int, resample) -> np.ndarray:
  from data_pipelines.image_sources import as_8bit
  image = as_8bit(image).convert('RGB')  # as the paper's `.convert('RGB')`, but 16-bit grey scaled, not clipped
  w, h = image.size
  scale = shortest / min(w, h)
  size = (max(shortest, int(w * scale)) if w >= h else shortest, shortest if w >= h else max(shortest, int(h * scale)))
  image = image.resize(size, resample)
  left, top = (size[0] - crop) // 2, (size[1] - crop) // 2
  return np.asarray(image.crop((left, top, left + crop, top + crop)), np.float32) / 255.0


def preprocess_dino(image) -> np.ndarray:
  """FastGDA's DINO transform: Resize(256, bicubic) of the shorter side, CenterCrop(224), ImageNet
  normalisation -> [224, 224, 3] float32."""
  from PIL import Image
  pixels = _resize_crop(image, 256, 224, Image.BICUBIC)
  return (pixels - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)


def preprocess_clip(image) -> np.ndarray:
  """CLIP's transform: shorter side to 224 (bicubic), center crop 224, CLIP normalisation."""
  from PIL import Image
  pixels = _resize_crop(image, 224, 224, Image.BICUBIC)
  return (pixels - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD, np.float32)


class ClipTokenizer:
  """CLIP's BPE through `tokenizers`, from a checkpoint's tokenizer.json: ids and mask [b, 77]."""

  def __init__(self, hf_dir: str | Path, max_len: int = 77):
    from tokenizers import Tokenizer
    path = Path(hf_dir) / 'tokenizer.json'
    if not path.is_file():
      raise TowerWeightError(f'{path} not found (CLIP checkpoints ship tokenizer.json)')
    self.tokenizer = Tokenizer.from_file(str(path))
    self.tokenizer.enable_truncation(max_len)
    pad_id = self.tokenizer.token_to_id('<|endoftext|>')
    self.tokenizer.enable_padding(length=max_len, pad_id=pad_id, pad_token='<|endoftext|>')

  def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    encodings = self.tokenizer.encode_batch(list(texts))
    return (np.array([e.ids for e in encodings], np.int32), np.array([e.attention_mask for e in encodings], np.int32))
