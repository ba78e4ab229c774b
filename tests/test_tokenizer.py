"""The VQGAN tokenizer against diffusers' VQModel (torch CPU, random weights, same config): identical
token ids, decoded pixels within 1e-4; the open-muse key layout loads to the same parameters."""
import re

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from core.torch_layout import WeightImportError
from lvm.tokenizer import VQGAN
from lvm.tokenizer_weights import config_from_diffusers, muse_to_diffusers_names, tokenizer_params
from tests.tolerance import assert_network_close, total_fan_in

DIFFUSERS_CONFIG = dict(in_channels=3, out_channels=3, block_out_channels=[32, 64, 64], layers_per_block=2,
                        down_block_types=['DownEncoderBlock2D'] * 3, up_block_types=['UpDecoderBlock2D'] * 3,
                        latent_channels=16, num_vq_embeddings=128, norm_num_groups=8, sample_size=8,
                        mid_block_add_attention=False, lookup_from_codebook=True, act_fn='silu')


def _diffusers_vq():
  from diffusers import VQModel
  torch.manual_seed(0)
  model = VQModel(**DIFFUSERS_CONFIG).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'norm' in name:  # diffusers inits norms to 1 / 0; perturb so a swapped norm would show
        p.add_(0.1 * torch.randn_like(p))
    # A codebook whose rows lie among encoder outputs, as trained rows do (diffusers' ±1/K init
    # puts every row near zero, so one or two codes would win everywhere).
    latents = model.encode(torch.rand(2, 3, 32, 32) * 2 - 1).latents.permute(0, 2, 3, 1).reshape(-1, 16)
    rows = latents[torch.randperm(len(latents))[:128]]
    model.quantize.embedding.weight.copy_(rows + 0.05 * rows.std() * torch.randn_like(rows))
  return model


def _ours(state):
  config = config_from_diffusers(DIFFUSERS_CONFIG, 'test config')
  abstract = nnx.eval_shape(lambda: VQGAN(config, nnx.Rngs(0)))
  graphdef, abstract_state = nnx.split(abstract)
  params = tokenizer_params(state, nnx.to_pure_dict(abstract_state), config, 'test weights')
  return config, graphdef, params


def test_tokens_and_pixels_match_diffusers_vqmodel():
  reference = _diffusers_vq()
  state = {k: v.numpy() for k, v in reference.state_dict().items()}
  config, graphdef, params = _ours(state)
  assert config.image_size == 32 and config.tokens_per_image == 64 and config.codebook_size == 128
  images = np.random.default_rng(0).uniform(0, 1, (4, 32, 32, 3)).astype(np.float32)

  with torch.no_grad():
    latents = reference.encode(torch.tensor(images.transpose(0, 3, 1, 2) * 2 - 1)).latents
    quantised, _, (_, _, expected_ids) = reference.quantize(latents)
    expected_pixels = reference.decode(latents).sample.numpy().transpose(0, 2, 3, 1)
  expected_ids = expected_ids.numpy().reshape(4, 64)

  model = nnx.merge(graphdef, params)
  ids = np.asarray(jax.jit(lambda m, x: m.encode(x))(model, images))
  np.testing.assert_array_equal(ids, expected_ids)
  assert len(np.unique(ids)) > 10  # a test of many codes, not of one

  vectors = jax.jit(lambda m, t: m.quantize.lookup(t).reshape(4, 8, 8, -1))(model, ids)
  pixels = np.asarray(jax.jit(lambda m, v: m.decode_vectors(v))(model, vectors))
  assert np.max(np.abs(pixels - expected_pixels)) <= 1e-4
  assert_network_close(pixels, expected_pixels, what='decoded pixels',
                       reduction_length=total_fan_in(reference.decoder.parameters()))
  # decode() is the same pixels mapped to [0, 1].
  decoded = np.asarray(jax.jit(lambda m, t: m.decode(t))(model, ids))
  np.testing.assert_allclose(decoded, np.clip((pixels + 1) / 2, 0, 1), atol=1e-6)


def _to_muse_names(state, levels):
  """The inverse of the loader's map, written out independently: diffusers names -> taming names."""
  out = {}
  for name, value in state.items():
    new = name
    m = re.match(r'^decoder\.up_blocks\.(\d+)\.(resnets\.(\d+)|upsamplers\.0\.conv)\.', new)
    if m:
      inner = f'block.{m[3]}.' if m[3] is not None else 'upsample.conv.'
      new = f'decoder.up.{levels - 1 - int(m[1])}.{inner}' + new[m.end():]
    new = re.sub(r'^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.', r'encoder.down.\1.block.\2.', new)
    new = re.sub(r'^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.', r'encoder.down.\1.downsample.conv.', new)
    new = re.sub(r'^(encoder|decoder)\.mid_block\.resnets\.(\d)\.', lambda m: f'{m[1]}.mid.block_{int(m[2]) + 1}.', new)
    new = re.sub(r'^(encoder|decoder)\.conv_norm_out\.', r'\1.norm_out.', new)
    new = new.replace('.conv_shortcut.', '.nin_shortcut.')
    out[new] = value
  return out


def test_open_muse_layout_loads_the_same_parameters():
  state = {k: v.numpy() for k, v in _diffusers_vq().state_dict().items()}
  muse = _to_muse_names(state, levels=3)
  assert 'decoder.up.0.block.2.conv2.weight' in muse and 'encoder.mid.block_1.norm1.weight' in muse
  assert muse_to_diffusers_names(muse, 3).keys() == state.keys()
  _, _, from_diffusers = _ours(state)
  _, _, from_muse = _ours(muse)
  jax.tree.map(np.testing.assert_array_equal, from_diffusers, from_muse)


def test_foreign_or_incomplete_weights_are_named():
  state = {k: v.numpy() for k, v in _diffusers_vq().state_dict().items()}
  without_last_up_block = {k: v for k, v in state.items() if not k.startswith('decoder.up_blocks.2')}
  missing = len(state) - len(without_last_up_block)
  with pytest.raises(WeightImportError, match=rf'test weights: VQGAN weights missing from the file \({missing} of {len(state)}\): '
                     rf'decoder\.up_blocks\.2\.resnets\.0\.conv1\.bias, .* and {missing - 5} more$'):
    _ours(without_last_up_block)
  muse = _to_muse_names(state, levels=3)
  del muse['encoder.mid.block_1.norm1.weight']
  with pytest.raises(WeightImportError, match=r"\(1 of 181\): encoder\.mid_block\.resnets\.0\.norm1\.weight "
                     r"\(diffusers' VQModel names; the file is in open-muse's VQGANModel layout\)$"):
    _ours(muse)
  with pytest.raises(WeightImportError, match="mid_block_add_attention=True is not supported"):
    config_from_diffusers(dict(DIFFUSERS_CONFIG, mid_block_add_attention=True), 'x')


def test_import_tokenizer_command_from_a_diffusers_directory(tmp_path):
  from launch import main as launch_main
  from lvm.tokenizer_commands import load_tokenizer
  reference = _diffusers_vq()
  reference.save_pretrained(tmp_path / 'vqmodel')
  assert launch_main(['lvm', 'import-tokenizer', '--weights', str(tmp_path / 'vqmodel'), '--workdir',
                      str(tmp_path / 'work')]) == 0
  images = np.random.default_rng(1).uniform(0, 1, (2, 32, 32, 3)).astype(np.float32)
  with torch.no_grad():
    latents = reference.encode(torch.tensor(images.transpose(0, 3, 1, 2) * 2 - 1)).latents
    expected = reference.quantize(latents)[2][2].numpy().reshape(2, 64)
  np.testing.assert_array_equal(load_tokenizer(tmp_path / 'work').encode(images), expected)
  assert launch_main(['lvm', 'import-tokenizer', '--weights', str(tmp_path), '--workdir', str(tmp_path / 'w2')]) == 2


def test_import_tokenizer_reads_the_fp16_variant(tmp_path):
  """`VQModel.from_pretrained(..., variant='fp16')` downloads diffusion_pytorch_model.fp16.safetensors
  alone (aMUSEd publishes it beside the full one); it was 'no diffusion_pytorch_model.safetensors'.
  Read into float32, it tokenizes as diffusers does with those fp16 weights in float32."""
  from launch import main as launch_main
  from lvm.tokenizer_commands import load_tokenizer
  reference = _diffusers_vq().half()
  reference.save_pretrained(tmp_path / 'vqmodel', variant='fp16')
  assert [p.name for p in (tmp_path / 'vqmodel').glob('*.safetensors')] == ['diffusion_pytorch_model.fp16.safetensors']
  assert launch_main(['lvm', 'import-tokenizer', '--weights', str(tmp_path / 'vqmodel'), '--workdir',
                      str(tmp_path / 'work')]) == 0
  reference = reference.float()
  images = np.random.default_rng(1).uniform(0, 1, (2, 32, 32, 3)).astype(np.float32)
  with torch.no_grad():
    latents = reference.encode(torch.tensor(images.transpose(0, 3, 1, 2) * 2 - 1)).latents
    expected = reference.quantize(latents)[2][2].numpy().reshape(2, 64)
  np.testing.assert_array_equal(load_tokenizer(tmp_path / 'work').encode(images), expected)
