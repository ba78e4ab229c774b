"""Fused chunked output projection + cross-entropy equals the textbook one, value and gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from core.losses import linear_cross_entropy
from tests.tolerance import assert_sum_close


def _magnitudes(x, w, targets, weights, scale):
  """Σ|terms| behind each output, including the logits' own rounding carried through softmax/lse."""
  x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
  weights = np.asarray(weights, np.float64)[..., None]
  logits = x @ w
  logit_size = np.abs(x) @ np.abs(w)                       # Σ|x_d w_dv| of every logit (d terms)
  lse = np.log(np.exp(logits).sum(-1))
  p = np.exp(logits - lse[..., None])
  onehot = np.eye(w.shape[1])[np.asarray(targets)]
  # A logit error δ ≤ γ·logit_size moves p_v by ≤ 2·p_v·max δ and the lse/nll by ≤ 2·max δ.
  spread = 2 * logit_size.max(-1, keepdims=True)
  grad_logits = weights * (np.abs(p - onehot) + p * spread)
  loss = scale * np.sum(weights[..., 0] * (np.abs(lse) + np.abs(logits).max(-1) + spread[..., 0]))
  grad_x = scale * grad_logits @ np.abs(w).T
  grad_w = scale * np.einsum('btd,btv->dv', np.abs(x), grad_logits)
  return loss, grad_x, grad_w


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

  d, v, n = 16, 50, 3 * 32
  loss_size, grad_x_size, grad_w_size = _magnitudes(x, w, targets, weights, 2.5)
  # Reduction chains: logits (d terms) -> lse (v) -> the token sum (n) or the gradient products.
  assert_sum_close(fused(x, w), reference(x, w), terms=d + v + n, magnitude=loss_size / 2.5, what='loss')
  loss, grads = jax.value_and_grad(lambda x, w: 2.5 * fused(x, w), argnums=(0, 1))(x, w)
  ref_loss, ref_grads = jax.value_and_grad(lambda x, w: 2.5 * reference(x, w), argnums=(0, 1))(x, w)
  assert_sum_close(loss, ref_loss, terms=d + v + n, magnitude=loss_size, what='scaled loss')
  assert_sum_close(grads[0], ref_grads[0], terms=d + 2 * v, magnitude=grad_x_size, what='d/dx')
  assert_sum_close(grads[1], ref_grads[1], terms=d + v + n, magnitude=grad_w_size, what='d/dw')
  # The bound is tight enough to catch a real error: 1e-3 of one gradient element is far outside it.
  with pytest.raises(AssertionError):
    assert_sum_close(grads[1].at[0, 0].add(1e-3), ref_grads[1], terms=d + v + n, magnitude=grad_w_size)
