"""LPIPS perceptual loss: parity with the `lpips` package, and frozen in tokenizer training.

The reference is the `lpips` package itself (installed --no-deps beside MiniLM, README): its
ScalingLayer, channel normalisation, calibrated lin weights (shipped in the package) and spatial
average. Its VGG16 trunk comes from torchvision, whose PyPI build does not load with the CPU torch
here, so `torchvision.models.vgg16` is given to it as a plain torch `features` stack in
torchvision's layout (conv/ReLU/max-pool indices 0-30), randomly initialised: what we compare is the
whole LPIPS computation on the same weights, loaded through our key mapping.
"""
from __future__ import annotations

import sys
import types

import jax
import numpy as np
import pytest

from core.torch_layout import WeightImportError
from lvm.perceptual import read_lpips_weights
from tests.tolerance import assert_network_close, total_fan_in

torch = pytest.importorskip('torch')

VGG16_LAYOUT = (64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M', 512, 512, 512, 'M', 512, 512, 512, 'M')


def _torchvision_vgg16(pretrained=False, weights=None, **unused):
  layers, width = [], 3
  for v in VGG16_LAYOUT:
    if v == 'M':
      layers.append(torch.nn.MaxPool2d(kernel_size=2, stride=2))
    else:
      layers += [torch.nn.Conv2d(width, v, kernel_size=3, padding=1), torch.nn.ReLU(inplace=True)]
      width = v
  return types.SimpleNamespace(features=torch.nn.Sequential(*layers))


@pytest.fixture(scope='module')
def reference():
  """lpips.LPIPS(net='vgg') with a random VGG16 trunk and the package's calibrated lin weights."""
  models = types.ModuleType('torchvision.models')
  models.vgg16 = _torchvision_vgg16
  stub = types.ModuleType('torchvision')
  stub.models = models
  saved = {name: sys.modules.get(name) for name in ('torchvision', 'torchvision.models')}
  sys.modules.update({'torchvision': stub, 'torchvision.models': models})
  try:
    lpips = pytest.importorskip('lpips')
    torch.manual_seed(0)
    net = lpips.LPIPS(net='vgg', pretrained=True, pnet_rand=True, verbose=False).eval()
  finally:
    for name, module in saved.items():
      if module is None:
        sys.modules.pop(name, None)
      else:
        sys.modules[name] = module
  return net


def _distance(graphdef, state, x0, x1):
  from flax import nnx
  return np.asarray(jax.jit(lambda s, a, b: nnx.merge(graphdef, s)(a, b))(state, x0, x1))


def test_lpips_matches_the_lpips_package(reference, tmp_path):
  state_dict = {k: v for k, v in reference.state_dict().items()}
  torch.save(state_dict, tmp_path / 'lpips_vgg.pth')
  graphdef, state, checksum = read_lpips_weights(str(tmp_path / 'lpips_vgg.pth'))
  rng = np.random.default_rng(0)
  # Two sizes: 64 px (relu5_3 at 4x4) and 36 px (odd sizes after pooling: 36 -> 18 -> 9 -> 4 -> 2).
  for size in (64, 36):
    x0 = rng.uniform(-1, 1, (3, size, size, 3)).astype(np.float32)
    x1 = np.clip(x0 + rng.normal(0, 0.3, x0.shape), -1, 1).astype(np.float32)
    with torch.no_grad():
      expected = reference(torch.from_numpy(x0).permute(0, 3, 1, 2), torch.from_numpy(x1).permute(0, 3, 1, 2))
    expected = expected.numpy().reshape(-1)
    ours = _distance(graphdef, state, x0, x1)
    assert ours.shape == (3,) and np.all(expected > 0)
    assert_network_close(ours, expected, reduction_length=total_fan_in(state_dict.values()),
                         what=f'LPIPS at {size} px')
  # The same image is at distance 0; a different one is farther than a slightly perturbed one.
  assert np.allclose(_distance(graphdef, state, x0, x0), 0, atol=1e-6)

  # torchvision's key layout for the trunk and the lin weights in a second file (lpips' vgg.pth), joined by '+'.
  trunk = {k.replace('net.slice1.', 'features.').replace('net.slice2.', 'features.').replace('net.slice3.', 'features.')
           .replace('net.slice4.', 'features.').replace('net.slice5.', 'features.'): v
           for k, v in state_dict.items() if k.startswith('net.')}
  lins = {k: v for k, v in state_dict.items() if k.startswith('lin')}
  torch.save(trunk, tmp_path / 'vgg16.pth')
  torch.save(lins, tmp_path / 'lin.pth')
  graphdef2, state2, checksum2 = read_lpips_weights(f'{tmp_path / "vgg16.pth"}+{tmp_path / "lin.pth"}')
  assert checksum2 == checksum
  np.testing.assert_array_equal(_distance(graphdef2, state2, x0, x1), ours)


def test_lpips_weight_errors_name_the_file_and_key(reference, tmp_path):
  state_dict = dict(reference.state_dict())
  with pytest.raises(WeightImportError, match='loss.perceptual_weights: .*absent.pth not found'):
    read_lpips_weights(str(tmp_path / 'absent.pth'))
  partial = {k: v for k, v in state_dict.items() if k not in ('lin3.model.1.weight', 'lins.3.model.1.weight')}
  torch.save(partial, tmp_path / 'partial.pth')
  with pytest.raises(WeightImportError, match=r'partial.pth.*missing.*lins\.3'):
    read_lpips_weights(str(tmp_path / 'partial.pth'))
  stray = dict(state_dict, **{'classifier.0.weight': torch.zeros(4, 4)})
  torch.save(stray, tmp_path / 'stray.pth')
  with pytest.raises(WeightImportError, match=r"stray.pth.*'classifier.0.weight'"):
    read_lpips_weights(str(tmp_path / 'stray.pth'))
  flipped = -state_dict['lin0.model.1.weight']
  conflicting = dict(state_dict, **{'lin0.model.1.weight': flipped})
  torch.save(conflicting, tmp_path / 'conflicting.pth')
  with pytest.raises(WeightImportError, match=r"conflicting.pth.*'lins.0.model.1.weight'.*second, different value"):
    read_lpips_weights(str(tmp_path / 'conflicting.pth'))
  negative = dict(state_dict, **{'lin0.model.1.weight': flipped, 'lins.0.model.1.weight': flipped})
  torch.save(negative, tmp_path / 'negative.pth')
  with pytest.raises(WeightImportError, match='negative.pth: LPIPS lin weights must be >= 0'):
    read_lpips_weights(str(tmp_path / 'negative.pth'))


def test_perceptual_loss_trains_the_tokenizer_with_the_network_frozen(reference, tmp_path):
  """lvm train-tokenizer with loss.perceptual_weight: the term is logged and moves the tokenizer's
  gradient, the LPIPS weights stay out of the checkpoint, and a resumed run equals an uninterrupted one.
  The images are a folder streamed from disk (data.stream=always): a resumed run reads on from the
  position its checkpoint saved, decoding the same images."""
  from tests.test_streamed_images import _digit_folder
  from core.config import ConfigError
  from core.workdir import read_run_config
  from lvm.tokenizer_commands import MADE_BY, load_tokenizer, train_tokenizer_command
  from lvm.tokenizer_task import TokenizerRunConfig
  torch.save(dict(reference.state_dict()), tmp_path / 'lpips_vgg.pth')
  config = 'lvm/configs/tokenizer_tiny.py'
  tpu = 'tpu_configs/cpu_1.py'
  common = ['train.steps=4', 'train.global_batch=8', 'train.log_every=1', 'train.checkpoint_every=2',
            'train.async_checkpoints=False', 'train.progress_bar=False', 'train.tensorboard=False',
            f'data.source={_digit_folder(tmp_path / "digits")}', 'data.stream=always']
  perceptual = ['loss.perceptual_weight=1.0', f'loss.perceptual_weights={tmp_path / "lpips_vgg.pth"}']

  with pytest.raises(ConfigError, match='perceptual_weights'):
    train_tokenizer_command(config, tpu, str(tmp_path / 'no_file'), common + ['loss.perceptual_weight=1.0'])
  with pytest.raises(WeightImportError, match='elsewhere.pth not found'):
    train_tokenizer_command(config, tpu, str(tmp_path / 'bad_file'),
                            common + ['loss.perceptual_weight=1.0', f'loss.perceptual_weights={tmp_path}/elsewhere.pth'])
  assert not (tmp_path / 'bad_file').exists()  # refused before the workdir was made

  plain = train_tokenizer_command(config, tpu, str(tmp_path / 'plain'), common)
  full = train_tokenizer_command(config, tpu, str(tmp_path / 'full'), common + perceptual)
  assert 'perceptual' not in plain['final_metrics']
  assert full['final_metrics']['perceptual'] > 0
  assert full['perceptual_weights']['checksum'] == read_lpips_weights(str(tmp_path / 'lpips_vgg.pth'))[2]
  # The same data and init: only the perceptual term differs, so the losses differ past step 1.
  assert full['final_metrics']['l2'] != plain['final_metrics']['l2']
  assert full['data'] == f'{tmp_path / "digits"} (40 images, streamed)' and full['reconstruction']['images'] == 40

  # Not in the checkpoint: it holds the tokenizer's parameters only, and encoding never reads the file.
  (tmp_path / 'lpips_vgg_moved.pth').write_bytes((tmp_path / 'lpips_vgg.pth').read_bytes())
  (tmp_path / 'lpips_vgg.pth').unlink()
  assert set(load_tokenizer(tmp_path / 'full').params) == set(load_tokenizer(tmp_path / 'plain').params)
  (tmp_path / 'lpips_vgg.pth').write_bytes((tmp_path / 'lpips_vgg_moved.pth').read_bytes())

  # Resume: 2 steps, then the same command to 4, equals the uninterrupted 4.
  half = train_tokenizer_command(config, tpu, str(tmp_path / 'resumed'),
                                 [c if c != 'train.steps=4' else 'train.steps=2' for c in common] + perceptual)
  assert half['step'] == 2
  # Rerun without the config file and its --set: the run's recorded config (perceptual loss included).
  resumed = train_tokenizer_command(None, tpu, str(tmp_path / 'resumed'), ['train.steps=4'])
  assert resumed['step'] == 4
  for key in ('loss', 'perceptual', 'l1', 'l2'):
    assert resumed['final_metrics'][key] == full['final_metrics'][key], key
  read_run_config(tmp_path / 'resumed', TokenizerRunConfig, MADE_BY)
