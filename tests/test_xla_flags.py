"""A script that imports the package (not launch.py) gets the same CPU XLA flags, and they take effect.

Each case runs in a fresh interpreter: XLA reads XLA_FLAGS once, when its first backend starts.
"""
import importlib.metadata
import json
import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT

# What the child prints: XLA_FLAGS after the imports, and whether a 3x3 convolution was compiled into
# a YNNPACK fusion (XLA's default) or left to XLA's own convolution (what the flag asks for).
_PROBE = '''
import json, os, sys
if 'jax-first' in sys.argv:
  import jax; jax.numpy.zeros(1).block_until_ready()  # a backend has started before the package import
import attrib
import jax, jax.numpy as jnp
conv = jax.jit(lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME',
                                                         dimension_numbers=('NHWC', 'HWIO', 'NHWC')))
hlo = conv.lower(jnp.ones((8, 16, 16, 32)), jnp.ones((3, 3, 32, 32))).compile().as_text()  # big enough for YNN
print(json.dumps({'xla_flags': os.environ.get('XLA_FLAGS'), 'conv_in_ynn_fusion': '__ynn_fusion' in hlo}))
'''

pytestmark = pytest.mark.skipif(not importlib.metadata.version('jaxlib').startswith('0.10.'),
                                reason='the YNN flag is only set for the jaxlib series it was measured on')


def _probe(*args, extra_path=None, **env_overrides):
  env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'JAX_PLATFORMS')}
  env.update(env_overrides)
  env['PYTHONPATH'] = os.pathsep.join(p for p in (extra_path, str(ROOT)) if p)
  out = subprocess.run([sys.executable, '-c', _PROBE, *args], env=env, cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_package_import_sets_the_cpu_flags_and_they_take_effect():
  result = _probe()
  assert result['xla_flags'] == '--xla_cpu_experimental_ynn_fusion_type=INDIVIDUAL_DOT,REDUCE'
  assert not result['conv_in_ynn_fusion']


def test_too_late_once_a_backend_has_started_so_flags_are_left_alone():
  # Also shows the probe can tell: without the flag XLA puts the convolution into YNNPACK.
  result = _probe('jax-first')
  assert result['xla_flags'] is None
  assert result['conv_in_ynn_fusion']


def test_the_users_own_flags_are_kept():
  result = _probe(XLA_FLAGS='--xla_cpu_experimental_ynn_fusion_type=INDIVIDUAL_CONVOLUTION --xla_cpu_enable_fast_math=false')
  assert result['xla_flags'] == '--xla_cpu_experimental_ynn_fusion_type=INDIVIDUAL_CONVOLUTION --xla_cpu_enable_fast_math=false'
  assert result['conv_in_ynn_fusion']  # the user's choice, not ours


def test_not_set_where_an_accelerator_runtime_is_installed_unless_jax_is_held_to_cpu(tmp_path):
  # libtpu's own XLA parses XLA_FLAGS and aborts on a flag it does not know.
  (tmp_path / 'libtpu').mkdir()
  (tmp_path / 'libtpu' / '__init__.py').write_text('')
  assert _probe(extra_path=str(tmp_path))['xla_flags'] is None
  held = _probe(extra_path=str(tmp_path), JAX_PLATFORMS='cpu')
  assert held['xla_flags'] == '--xla_cpu_experimental_ynn_fusion_type=INDIVIDUAL_DOT,REDUCE'


def test_matmul_programs_take_dot_fusion_on_avx2_only():
  """The LVM step (no convolutions) compiles with YNNPACK's DOT fusion on a CPU without AVX-512
  (+12% there); convolutional programs, AVX-512 CPUs, accelerators and a user's own flag are left alone."""
  from core.xla_flags import program_options
  ours = '--xla_cpu_experimental_ynn_fusion_type=INDIVIDUAL_DOT,REDUCE'
  dot = {'xla_cpu_experimental_ynn_fusion_type': 'LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE'}
  assert program_options('matmul', has_avx512=False, xla_flags=ours, backend='cpu') == dot
  assert program_options('matmul', has_avx512=True, xla_flags=ours, backend='cpu') == {}
  assert program_options('convolutional', has_avx512=False, xla_flags=ours, backend='cpu') == {}
  assert program_options('matmul', has_avx512=False, xla_flags=ours, backend='tpu') == {}  # the fit check
  assert program_options('matmul', has_avx512=False, backend='cpu',
                         xla_flags='--xla_cpu_experimental_ynn_fusion_type=REDUCE') == {}


def test_the_dot_fusion_option_takes_effect_per_program():
  # The per-program option compiles the same program as the process-wide flag would: fewer fusions.
  import jax
  import jax.numpy as jnp
  f = jax.jit(lambda x, w, b: jax.nn.gelu(x @ w + b) @ w.T)
  lowered = f.lower(jnp.ones((256, 128)), jnp.ones((128, 128)), jnp.ones(128))
  option = 'xla_cpu_experimental_ynn_fusion_type'
  fused = lowered.compile({option: 'LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE'}).as_text()
  individual = lowered.compile({option: 'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE'}).as_text()
  assert fused.count(' fusion(') < individual.count(' fusion(')
