"""MFU's denominator on CPU presets is measured on this machine and cached, not a constant."""
import dataclasses
import json

import jax

from core.config import load_config_file
from core.peak_flops import measure_host_flops, peak_flops_per_device
from tests.helpers import CPU8, ROOT, compiles_during


def test_cpu_preset_peak_is_measured_once_and_cached(tmp_path, monkeypatch):
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path))
  preset = load_config_file(CPU8)
  assert preset.peak_flops_per_device == 0
  first = peak_flops_per_device(preset)
  cache = json.loads((tmp_path / 'lvm_attrib' / 'peak_flops.json').read_text())
  assert len(cache) == 1 and abs(list(cache.values())[0] / jax.local_device_count() - first) < 1e-3
  # A fresh measurement lands within a factor of 2 of the cached one (timing noise, not a constant
  # from another machine), and the second lookup reads the cache instead of measuring again.
  assert 0.5 < measure_host_flops() / jax.local_device_count() / first < 2
  (tmp_path / 'lvm_attrib' / 'peak_flops.json').write_text(json.dumps({k: 1e12 for k in cache}))
  assert peak_flops_per_device(preset) == 1e12 / jax.local_device_count()


def test_tpu_presets_keep_their_data_sheet_peak():
  preset = load_config_file(str(ROOT / 'tpu_configs' / 'v5p_128.py'))
  assert peak_flops_per_device(preset) == preset.peak_flops_per_device > 1e14
  assert peak_flops_per_device(dataclasses.replace(preset, peak_flops_per_device=7.0)) == 7.0


def test_a_cpu_mesh_of_one_device_has_the_whole_host(tmp_path, monkeypatch):
  """Every forced CPU device shares the host's cores: a 1-device mesh in an 8-device process has
  the same peak as the 8-device mesh (MFU of the quickstart's diffusion model read 1.57 before)."""
  from core.mesh import make_mesh
  from core.peak_flops import mesh_peak_flops
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path))
  full, one = load_config_file(CPU8), load_config_file(str(ROOT / 'tpu_configs' / 'cpu_1.py'))
  (tmp_path / 'lvm_attrib').mkdir()
  from core.peak_flops import _machine_key
  (tmp_path / 'lvm_attrib' / 'peak_flops.json').write_text(json.dumps({_machine_key(): 4e11}))
  assert mesh_peak_flops(one, make_mesh(one)) == 4e11
  if jax.device_count() == 8:
    assert mesh_peak_flops(full, make_mesh(full)) == 4e11
  tpu = load_config_file(str(ROOT / 'tpu_configs' / 'v5p_128.py'))
  assert mesh_peak_flops(tpu, make_mesh(one)) == tpu.peak_flops_per_device  # data sheet x 1 device


def _compiled_forward_flops(forward, *abstract_args) -> float:
  cost = jax.jit(forward).lower(*abstract_args).compile().cost_analysis()
  return float((cost[0] if isinstance(cost, list) else cost)['flops'])


def test_training_flops_are_counted_without_compiling_and_match_the_compiled_count():
  """MFU's numerator for the U-Net and the VQGAN comes from the lowered forward: no XLA compile at the
  start of a run (2-5 s on 2 cores for the digits U-Net), and within 1% of the compiled program's count."""
  import jax.numpy as jnp
  from flax import nnx

  from attrib.configs.digits import get_config as digits_config
  from attrib.task import DenoisingTask, _forward_flops
  from attrib.unet import UNet2DConditionModel
  from lvm.configs.tokenizer_tiny import get_config as tokenizer_config
  from lvm.tokenizer import VQGAN
  from lvm.tokenizer_task import TokenizerTask

  unet, tokenizer = digits_config().unet, tokenizer_config().tokenizer
  _forward_flops.cache_clear()
  tasks = {'unet': DenoisingTask(unet, digits_config().schedule, 16), 'tokenizer': TokenizerTask(tokenizer)}
  counted = {}
  compiled = compiles_during(lambda: counted.update({name: task.flops_per_example() for name, task in tasks.items()}),
                             backend=True)
  assert compiled == [], compiled

  graphdef, state = nnx.split(nnx.eval_shape(lambda: UNet2DConditionModel(unet, nnx.Rngs(0))))
  unet_forward = _compiled_forward_flops(
      lambda s, x, ctx: nnx.merge(graphdef, s)(x, jnp.zeros((1,), jnp.int32), ctx), nnx.to_pure_dict(state),
      jax.ShapeDtypeStruct((1, 16, 16, 1), jnp.float32), jax.ShapeDtypeStruct((1, 16, 384), jnp.float32))
  graphdef, state = nnx.split(nnx.eval_shape(lambda: VQGAN(tokenizer, nnx.Rngs(0))))
  tokenizer_forward = _compiled_forward_flops(lambda s, x: nnx.merge(graphdef, s).reconstruct(x)[0], state,
                                              jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
  assert abs(counted['unet'] / (3 * unet_forward) - 1) < 0.01, (counted['unet'], unet_forward)
  assert abs(counted['tokenizer'] / (3 * tokenizer_forward) - 1) < 0.01, (counted['tokenizer'], tokenizer_forward)
