"""LPIPS (Zhang et al. 2018), the perceptual loss of VQGAN training, on a VGG16 trunk.

distance(x0, x1) = Σ_layers mean_hw( w_l · (f̂_l(x0) − f̂_l(x1))² ), with f_l the VGG16 activations
relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 of the input shifted and scaled by LPIPS' ScalingLayer,
f̂ = f / (‖f‖_channels + 1e-10), and w_l ≥ 0 the calibrated 1×1 "lin" weights (no bias). As the
`lpips` package (net='vgg', version 0.1) that taming-transformers' VQGAN loss uses.

The weights are not bundled (VGG16's ImageNet weights are a download): the user passes a file with
them, and training holds them frozen (`frozen_inputs` of the task, core/train_loop.py): they are
neither optimised nor checkpointed. Accepted key layouts, as .safetensors or a torch pickle:
  - the `lpips.LPIPS(net='vgg')` module: `net.slice{1-5}.{i}.weight|bias`, `lin{0-4}.model.{0|1}.weight`
  - torchvision's `vgg16().features.{i}.weight|bias` plus the same `lin{k}` keys (lpips ships those
    in its package as weights/v0.1/vgg.pth; both may sit in one file or in two, joined by '+')
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from core.torch_layout import WeightImportError, params_from_diffusers

# Convs per VGG16 block; a 2x2 max-pool precedes every block after the first.
VGG16_BLOCKS = (2, 2, 3, 3, 3)
VGG16_WIDTHS = (64, 128, 256, 512, 512)
# Indices of the convs in torchvision's vgg16().features (ReLUs and pools fill the gaps).
TORCHVISION_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
# LPIPS' ScalingLayer: (x - shift) / scale on inputs in [-1, 1].
SHIFT = np.array([-.030, -.088, -.188], np.float32)
SCALE = np.array([.458, .448, .450], np.float32)


class LPIPS(nnx.Module):

  def __init__(self, rngs: nnx.Rngs):
    widths_in = [3]
    convs = []
    for block, (count, width) in enumerate(zip(VGG16_BLOCKS, VGG16_WIDTHS)):
      for _ in range(count):
        convs.append(nnx.Conv(widths_in[-1], width, (3, 3), padding=1, rngs=rngs))
        widths_in.append(width)
    self.convs = nnx.List(convs)
    self.lins = nnx.List([nnx.Conv(width, 1, (1, 1), use_bias=False, rngs=rngs) for width in VGG16_WIDTHS])

  def features(self, images_bhwc):
    """The five VGG16 taps of images in [-1, 1] (after the ScalingLayer)."""
    x = (images_bhwc - SHIFT) / SCALE
    taps, index = [], 0
    for block, count in enumerate(VGG16_BLOCKS):
      if block:
        x = nnx.max_pool(x, (2, 2), strides=(2, 2))
      for _ in range(count):
        x = jax.nn.relu(self.convs[index](x))
        index += 1
      taps.append(x)
    return taps

  def __call__(self, x0, x1):
    """Per-image LPIPS distance [b] between two image batches in [-1, 1] (NHWC, 3 channels)."""
    def unit(f):
      return f / (jnp.sqrt(jnp.sum(jnp.square(f), axis=-1, keepdims=True)) + 1e-10)
    total = 0.0
    for lin, f0, f1 in zip(self.lins, self.features(x0), self.features(x1)):
      total = total + jnp.mean(lin(jnp.square(unit(f0) - unit(f1))), axis=(1, 2, 3))
    return total


def _put(out: dict, key: str, value: np.ndarray, what: str) -> None:
  if key in out and not np.array_equal(out[key], value):
    raise WeightImportError(f'{what} gives {key} a second, different value (two layouts of one weight disagree)')
  out[key] = value


def _canonical_names(state: dict[str, np.ndarray], where: str) -> dict[str, np.ndarray]:
  """LPIPS-module or torchvision keys -> `convs.{j}.weight|bias` and `lins.{k}.weight`."""
  conv_slot = {index: j for j, index in enumerate(TORCHVISION_CONV_INDICES)}
  out = {}
  for name, value in state.items():
    if name.startswith('scaling_layer.'):
      continue  # constants (SHIFT, SCALE above)
    match = (re.fullmatch(r'net\.slice\d\.(\d+)\.(weight|bias)', name)
             or re.fullmatch(r'(?:features\.)?(\d+)\.(weight|bias)', name))
    canonical = None
    if match and int(match.group(1)) in conv_slot:
      canonical = f'convs.{conv_slot[int(match.group(1))]}.{match.group(2)}'
    match = re.fullmatch(r'lins?\.?(\d)\.model\.[01]\.weight', name)  # lpips keeps both lin0. and lins.0.
    if match:
      canonical = f'lins.{match.group(1)}.weight'
    if canonical is not None:
      _put(out, canonical, np.asarray(value), f'{where}: {name!r}')
      continue
    raise WeightImportError(f'{where}: weight {name!r} is not part of LPIPS on VGG16 (expected net.sliceN.*, '
                            f'features.N.* or linN.model.*)')
  return out


def read_lpips_weights(spec: str) -> tuple[nnx.GraphDef, nnx.State, str]:
  """`spec`: one weights file, or several joined by '+' (e.g. a VGG16 file + lpips' vgg.pth).
  Returns (graphdef, frozen state, sha256 prefix of the weights) — every LPIPS parameter must be
  present with its shape, or WeightImportError names the file and the key."""
  from attrib.released import read_state_dict
  check_weight_files(spec)
  state = {}
  for part in spec.split('+'):
    for key, value in _canonical_names(read_state_dict(part), part).items():
      _put(state, key, value, part)
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: LPIPS(nnx.Rngs(0))))
  params = params_from_diffusers(state, nnx.to_pure_dict(abstract), model=f'LPIPS ({spec})')
  if any(np.any(np.asarray(p['kernel']) < 0) for p in params['lins'].values()):
    # LPIPS clamps its lin weights to >= 0 in training; a negative one means a wrong or corrupt file.
    raise WeightImportError(f'{spec}: LPIPS lin weights must be >= 0 (a distance); these have negative entries')
  nnx.replace_by_pure_dict(abstract, params)
  digest = hashlib.sha256()
  for leaf in jax.tree.leaves(params):
    digest.update(np.asarray(leaf).tobytes())
  return graphdef, abstract, digest.hexdigest()[:16]


def check_weight_files(spec: str) -> None:
  """Before any model work: each file named in `spec` exists."""
  for part in spec.split('+'):
    if not Path(part).is_file():
      raise WeightImportError(f'loss.perceptual_weights: {part} not found')
