"""Decoder structure: parameter counts of LVM's presets, logical names, blockwise attention."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from core.config import load_config_file
from core.mesh import make_mesh
from core.sharding import tree_shardings
from lvm.model import Decoder, causal_attention, constant_rope_tables, rope_tables
from lvm.model_config import PRESETS
from tests.helpers import CPU8
from tests.tolerance import assert_network_close

# LVM's sizes (EasyLM LLAMA_STANDARD_CONFIGS; reference/lvm.md §4 rounds these to 291M ... 6.54B).
EXPECTED_PARAMS = {
    'vqlm_100m': 116_974_720,
    'vqlm_300m': 290_968_576,
    'vqlm_600m': 648_396_288,
    'vqlm_1b': 1_147_119_616,
    'vqlm_3b': 3_274_742_400,
    'vqlm_7b': 6_544_199_680,
    'tiny': 2_518_656,
}


@pytest.mark.parametrize('name', sorted(EXPECTED_PARAMS))
def test_preset_parameter_count(name):
  config = PRESETS[name]
  abstract = nnx.eval_shape(lambda: Decoder(config, nnx.Rngs(0)))  # shapes only, nothing allocated
  counted = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
  assert counted == EXPECTED_PARAMS[name] == config.num_params()
  assert config.vocab_size == 8292


def test_every_parameter_has_logical_names_and_shards_on_the_mesh():
  abstract = nnx.eval_shape(lambda: Decoder(PRESETS['vqlm_7b'], nnx.Rngs(0)))
  specs = nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(abstract, nnx.Param)))
  flat = jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))[0]
  for path, spec in flat:
    assert len(spec) >= 1 and all(isinstance(n, str) for n in spec), path
  preset = load_config_file(CPU8)
  shardings = tree_shardings(specs, make_mesh(preset), preset.logical_rules)
  q = shardings['blocks']['attention']['q_proj'].spec
  assert tuple(q) == (None, 'fsdp', 'tensor', None)  # layers, embed, heads, head_dim
  assert tuple(shardings['embed'].spec) == ('tensor', 'fsdp')
  assert tuple(shardings['blocks']['mlp']['down_proj'].spec) == (None, 'tensor', 'fsdp')


def _naive_attention(q, k, v):
  b, h, t, e = q.shape
  groups = h // k.shape[1]
  k = jnp.repeat(k, groups, axis=1)
  v = jnp.repeat(v, groups, axis=1)
  scores = jnp.einsum('bhte,bhse->bhts', q, k) / np.sqrt(e)
  scores = jnp.where(jnp.tril(jnp.ones((t, t), bool)), scores, -jnp.inf)
  return jnp.einsum('bhts,bhse->bhte', jax.nn.softmax(scores, -1), v)


@pytest.mark.parametrize('block', [0, 16, 32, 64])
@pytest.mark.parametrize('kv_heads', [4, 2, 1])
def test_blockwise_attention_equals_textbook(block, kv_heads):
  keys = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(keys[0], (2, 4, 64, 8))
  k = jax.random.normal(keys[1], (2, kv_heads, 64, 8))
  v = jax.random.normal(keys[2], (2, kv_heads, 64, 8))
  # Sums: q·k over e, softmax over t keys, PV over t keys (and twice that in the backward).
  length = q.shape[-1] + 2 * q.shape[2]
  assert_network_close(causal_attention(q, k, v, block), _naive_attention(q, k, v), reduction_length=length,
                       what='attention')
  # Gradients too: the stop_gradient on the row max must not change them.
  loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v) * jnp.cos(q))
  ours = jax.grad(loss(lambda q, k, v: causal_attention(q, k, v, block)), argnums=(0, 1, 2))(q, k, v)
  reference = jax.grad(loss(_naive_attention), argnums=(0, 1, 2))(q, k, v)
  for a, b, name in zip(ours, reference, 'qkv'):
    assert_network_close(a, b, reduction_length=2 * length, what=f'd/d{name}')


def test_constant_rope_tables_are_the_traced_ones():
  # The training forward (no positions given) reads numpy-computed tables as constants; prompting and
  # decoding pass positions and compute them traced. Both must give the same model.
  positions = jnp.broadcast_to(jnp.arange(512), (3, 512))
  for head_dim, theta in ((8, 10_000.0), (64, 10_000.0), (128, 500_000.0)):
    constant = constant_rope_tables(3, 512, head_dim, theta)
    traced = jax.jit(rope_tables, static_argnums=(1, 2))(positions, head_dim, theta)
    for c, t, name in zip(constant, traced, ('cos', 'sin')):
      assert c.shape == t.shape == (3, 1, 512, head_dim)
      # Angles reach 511 rad: one float32 ulp of the angle (3e-5) bounds the difference.
      np.testing.assert_allclose(np.asarray(c), np.asarray(t), rtol=0, atol=1e-4, err_msg=f'{name} e={head_dim}')
  config = dataclasses.replace(PRESETS['tiny'], num_layers=2)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 8292, (2, 128)))
  model = Decoder(config, nnx.Rngs(0))
  explicit = model(tokens, jnp.broadcast_to(jnp.arange(128), tokens.shape))
  # Sums along the depth: per layer the q/k/v and output projections, attention over 128 keys, the MLP.
  depth = config.num_layers * (3 * config.hidden_size + 128 + config.intermediate_size) + config.hidden_size
  assert_network_close(model(tokens), explicit, reduction_length=depth, what='logits')


def test_remat_and_bf16_compute_keep_the_function():
  config = dataclasses.replace(PRESETS['tiny'], num_layers=2)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 8292, (2, 128)))
  model = Decoder(config, nnx.Rngs(0))
  reference = model(tokens)
  state = nnx.state(model)
  remat = nnx.merge(nnx.graphdef(nnx.eval_shape(lambda: Decoder(dataclasses.replace(config, remat_policy='full'), nnx.Rngs(0)))), state)
  np.testing.assert_array_equal(remat(tokens), reference)
  bf16 = nnx.merge(nnx.graphdef(nnx.eval_shape(lambda: Decoder(dataclasses.replace(config, compute_dtype='bfloat16'), nnx.Rngs(0)))), state)
  out = bf16(tokens)
  assert out.dtype == jnp.float32  # logits stay float32 for the loss
  # bf16 has 8 mantissa bits: logits of size ~0.3 agree to a few 1e-2, not to float32 precision.
  assert float(jnp.max(jnp.abs(out - reference))) < 5e-2
  assert float(jnp.max(jnp.abs(out - reference))) > 0  # it really computed in bf16


def test_building_a_model_under_a_trace_never_walks_the_trace(monkeypatch):
  """NNX probes `.sharding` of every value it assigns (each rng draw); with jax 0.10.2's eager error
  text each probe walked all equations traced so far, so model init was quadratic (core/tracing_fix)."""
  from jax._src.interpreters import partial_eval
  import core.layers  # noqa: F401  (installs the fix, as every model module does)
  walks = []
  original = partial_eval.JaxprStackFrame.find_progenitors
  monkeypatch.setattr(partial_eval.JaxprStackFrame, 'find_progenitors',
                      lambda self, tracer: walks.append(1) or original(self, tracer))
  config = PRESETS['tiny']
  shapes = nnx.eval_shape(lambda: Decoder(config, nnx.Rngs(params=0)))
  assert walks == []
  assert shapes.embed.shape == (config.vocab_size, config.hidden_size)
  # The probe still fails the way getattr/hasattr expect.
  probed = []
  jax.make_jaxpr(lambda x: probed.append((hasattr(x, 'sharding'), hasattr(x, 'device'))) or x)(jnp.ones(2))
  assert probed == [(False, False)]
