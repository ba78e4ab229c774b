"""Fused chunked output projection + cross-entropy equals the textbook one, value and gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from core.losses import linear_cross_entropy


@pytest.mark.parametrize('chunk', [0, 8, 16, 32])
def test_linear_cross_entropy_matches_materialised_logits(chunk):
  keys = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(keys[0], (3, 32, 16))
  w = jax.random.normal(keys[1], (16, 50)) * 0.3
  targets = jax.random.randint(keys[2], (3, 32), 0, 50)
  weights = (jax.random.uniform(keys[3], (3, 32)) > 0.3).astype(jnp.float32)

  def reference(x, w):
    nll = optax.softmax_cross_entropy_with_integer_labels(jnp.einsum('btd,dv->btv', x, w), targets)
    return jnp.sum(nll * weights)

  def fused(x, w):
    return linear_cross_entropy(x, w, targets, weights, chunk)

  np.testing.assert_allclose(fused(x, w), reference(x, w), rtol=1e-6)
  loss, grads = jax.value_and_grad(lambda x, w: 2.5 * fused(x, w), argnums=(0, 1))(x, w)
  ref_loss, ref_grads = jax.value_and_grad(lambda x, w: 2.5 * reference(x, w), argnums=(0, 1))(x, w)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)
