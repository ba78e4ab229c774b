"""MFU's denominator on CPU presets is measured on this machine and cached, not a constant."""
import dataclasses
import json

import jax

from core.config import load_config_file
from core.peak_flops import measure_host_flops, peak_flops_per_device
from tests.helpers import CPU8, ROOT


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
