"""U-Net and noise schedule against diffusers on torch CPU (random weights)."""
import numpy as np
import pytest
import torch

import jax
import jax.numpy as jnp
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers import UNet2DConditionModel as TorchUNet
from flax import nnx

from attrib.diffusion import NoiseSchedule, ScheduleConfig
from attrib.unet import UNet2DConditionModel
from attrib.unet_config import MSCOCO, UNetConfig
from core.torch_layout import WeightImportError, params_from_diffusers
from tests.tolerance import assert_network_close, assert_sum_close, total_fan_in

TINY_UNET = UNetConfig(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(32, 64),
                       cross_attention_levels=(True, False), layers_per_block=1, num_attention_heads=4,
                       cross_attention_dim=48, norm_num_groups=8)
SCHEDULER_KW = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                    beta_schedule='scaled_linear', clip_sample=False)


def _torch_unet(config):
  torch.manual_seed(0)
  model = TorchUNet(**config.diffusers_kwargs()).eval()
  with torch.no_grad():  # diffusers zero-inits some convs, which would hide a wrong mapping
    for p in model.parameters():
      p.add_(0.02 * torch.randn_like(p))
  return model


@pytest.mark.parametrize('config', [TINY_UNET, MSCOCO], ids=['tiny', 'mscoco'])
def test_unet_matches_diffusers(config):
  torch_model = _torch_unet(config)
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: UNet2DConditionModel(config, nnx.Rngs(0))))
  params = params_from_diffusers({k: v.numpy() for k, v in torch_model.state_dict().items()},
                                 nnx.to_pure_dict(abstract))
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, config.in_channels, config.sample_size, config.sample_size)).astype(np.float32)
  context = rng.standard_normal((2, 7, config.cross_attention_dim)).astype(np.float32)
  timesteps = np.array([3, 700])
  with torch.no_grad():
    expected = torch_model(torch.tensor(x), torch.tensor(timesteps), torch.tensor(context)).sample.numpy()
  ours = jax.jit(lambda p, x, t, c: nnx.merge(graphdef, p)(x, t, c))(params, x.transpose(0, 2, 3, 1), timesteps, context)
  assert_network_close(np.asarray(ours).transpose(0, 3, 1, 2), expected, what='U-Net output',
                       reduction_length=total_fan_in(torch_model.parameters()))
  assert sum(p.numel() for p in torch_model.parameters()) == sum(v.size for v in jax.tree.leaves(params))


def test_weight_import_names_the_bad_tensor():
  torch_model = _torch_unet(TINY_UNET)
  abstract = nnx.to_pure_dict(nnx.split(nnx.eval_shape(lambda: UNet2DConditionModel(TINY_UNET, nnx.Rngs(0))))[1])
  weights = {k: v.numpy() for k, v in torch_model.state_dict().items()}
  del weights['mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight']
  del weights['mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0.weight']
  # Named as in the user's file (diffusers names, wrappers such as to_out.0 restored), not our tree.
  with pytest.raises(WeightImportError, match=r'missing from the file \(2 of \d+\): '
                     r'mid_block\.attentions\.0\.transformer_blocks\.0\.attn2\.to_k\.weight, '
                     r'mid_block\.attentions\.0\.transformer_blocks\.0\.attn2\.to_out\.0\.weight$'):
    params_from_diffusers(weights, abstract)
  weights['conv_in.weight'] = np.zeros((32, 3, 3, 3), np.float32)
  with pytest.raises(WeightImportError, match='conv_in.weight'):
    params_from_diffusers(weights, abstract)


# Stable Diffusion's schedule, and the released MSCOCO model's `DDPMScheduler(num_train_timesteps=1000)`.
LINEAR_KW = dict(num_train_timesteps=1000, clip_sample=False)


@pytest.mark.parametrize('ours_config,SCHEDULER_KW', [
    (ScheduleConfig(), SCHEDULER_KW),
    (ScheduleConfig(beta_schedule='linear', beta_start=1e-4, beta_end=0.02), LINEAR_KW)], ids=['scaled', 'linear'])
def test_schedule_matches_diffusers(ours_config, SCHEDULER_KW):
  ours = NoiseSchedule(ours_config)
  rng = np.random.default_rng(0)
  x0, eps = (rng.standard_normal((4, 3, 8, 8)).astype(np.float32) for _ in range(2))
  timesteps = np.array([0, 10, 500, 999])
  ddpm = DDPMScheduler(**SCHEDULER_KW)
  expected = ddpm.add_noise(torch.tensor(x0), torch.tensor(eps), torch.tensor(timesteps)).numpy()
  alphas = ddpm.alphas_cumprod.double().numpy()
  a = alphas[timesteps][:, None, None, None]
  # x_t = √ā·x0 + √(1−ā)·ε: two rounded products, their sum and the two rounded coefficients.
  assert_sum_close(ours.add_noise(jnp.asarray(x0), jnp.asarray(eps), jnp.asarray(timesteps)), expected,
                   terms=4, magnitude=np.sqrt(a) * np.abs(x0) + np.sqrt(1 - a) * np.abs(eps), what='add_noise')
  ddpm.set_timesteps(50)
  ddim = DDIMScheduler(**SCHEDULER_KW)
  ddim.set_timesteps(50)
  for t in (980, 500, 20, 0):
    a_t, a_prev = alphas[t], (alphas[t - 20] if t >= 20 else 1.0)
    # x̂0 = (x − √(1−ā)ε)/√ā enters both steps; its terms are scaled by 1/√ā (×14 at t=980).
    x0_size = (np.abs(x0) + np.sqrt(1 - a_t) * np.abs(eps)) / np.sqrt(a_t)
    generator = torch.Generator().manual_seed(t)
    expected = ddpm.step(torch.tensor(eps), t, torch.tensor(x0), generator=generator).prev_sample.numpy()
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(t)).numpy()
    beta_t = 1 - a_t / a_prev
    sigma = np.sqrt(float(ddpm._get_variance(t, t - 20))) if t > 0 else 0.0
    size = (np.sqrt(a_prev) * beta_t / (1 - a_t) * x0_size + np.sqrt(1 - beta_t) * (1 - a_prev) / (1 - a_t)
            * np.abs(x0) + sigma * np.abs(noise))
    assert_sum_close(ours.ddpm_step(eps, t, x0, noise, 20), expected, terms=12, magnitude=size, what=f'ddpm t={t}')
    expected = ddim.step(torch.tensor(eps), t, torch.tensor(x0)).prev_sample.numpy()
    size = np.sqrt(a_prev) * x0_size + np.sqrt(1 - a_prev) * np.abs(eps)
    assert_sum_close(ours.ddim_step(eps, t, x0, 20), expected, terms=12, magnitude=size, what=f'ddim t={t}')


def test_export_to_diffusers_round_trips():
  from core.torch_layout import params_to_diffusers
  torch_model = _torch_unet(TINY_UNET)
  weights = {k: v.numpy() for k, v in torch_model.state_dict().items()}
  abstract = nnx.to_pure_dict(nnx.split(nnx.eval_shape(lambda: UNet2DConditionModel(TINY_UNET, nnx.Rngs(0))))[1])
  exported = params_to_diffusers(params_from_diffusers(weights, abstract))
  assert sorted(exported) == sorted(weights)
  for name, value in weights.items():
    np.testing.assert_array_equal(exported[name], value, err_msg=name)


@pytest.mark.parametrize('method', ['ddim', 'ddpm'])
def test_sampling_with_one_key_per_row_equals_each_row_alone(method):
  """Queries are generated in batches with one seed each (attrib/curation.make_queries): every row
  must be the image its seed gives alone, for the deterministic and the ancestral sampler."""
  from attrib.diffusion import sample
  weights = jax.random.normal(jax.random.key(3), (4, 1))

  def predict(x, t, context):  # a stand-in ε-model: depends on x, t and the text states
    return jnp.tanh(x * (1 + t[:, None, None, None] / 1000) + context.mean(axis=(1, 2))[:, None, None, None]
                    + x @ weights[:1])
  schedule = NoiseSchedule(ScheduleConfig(clip_sample=True))
  context = jax.random.normal(jax.random.key(4), (3, 5, 8))
  run = lambda key, rows: sample(predict, schedule, shape=(len(rows), 6, 6, 1), context=context[rows],
                                 uncond_context=jnp.zeros((len(rows), 5, 8)), guidance=2.0, num_steps=10,
                                 method=method, key=key)
  seeds = [11, 12, 13]
  together = run(jnp.stack([jax.random.key(s) for s in seeds]), np.arange(3))
  alone = jnp.concatenate([run(jax.random.key(s), np.array([i])) for i, s in enumerate(seeds)])
  np.testing.assert_allclose(together, alone, rtol=0, atol=1e-6)
  assert float(jnp.abs(together[0] - together[1]).max()) > 0.1  # the seeds differ
  with pytest.raises(ValueError, match='2 keys for a batch of 3'):
    run(jnp.stack([jax.random.key(s) for s in seeds[:2]]), np.arange(3))
