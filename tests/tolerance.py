"""Comparison tolerances derived from float32 rounding-error analysis, never a hand-picked atol.

One sum. A float32 evaluation of Σ tᵢ over n terms, in any order, is within γₙ·Σ|tᵢ| of the exact
sum, γₙ = n·u/(1 − n·u), u = 2⁻²⁴ (Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed.,
§3.1; for dot products with products rounded too, γₙ with n = length + 1). Two evaluations of the same sum,
however their kernels order it (another CPU's ISA, a fused vs a materialised reduction, a sharded
vs a single-device run), are therefore within 2·γₙ·Σ|tᵢ| of each other: `assert_sum_close`. The bound holds
for every order, so no machine can break it; a test that can name its terms uses it.

A whole network (a U-Net or a decoder against torch) passes each value through many such sums and
nonlinearities, so there the check is norm-wise: ‖a − b‖ / ‖b‖ ≤ λ·√N·u (`assert_network_close`), with
N the total reduction length of the network (`total_fan_in`: Σ over all its layers of their fan-in,
which bounds the reduction length along any path) and λ = 8. Rounding errors of independent
operations add like a random walk (Higham & Mary, SIAM J. Sci. Comput. 2019: |error| ≤ λ√n·u·Σ|tᵢ|
with probability ≥ 1 − 2·exp(−λ²/2) ≈ 3e−14 per sum at λ = 8); summing over every layer rather than
one path leaves room for the O(1) amplification by normalisations and softmax that random weights
give. Measured: the U-Net against diffusers sits 60–150× below this bound; a wrong weight mapping
or formula is off by 10⁻² and more.
"""
from __future__ import annotations

import numpy as np

U = 2.0 ** -24  # float32 unit roundoff


def gamma(n: int) -> float:
  return n * U / (1 - n * U)


def assert_sum_close(actual, desired, *, terms: int, magnitude, what: str = '') -> None:
  """|actual − desired| ≤ 2·γ_terms·magnitude elementwise; `magnitude` = Σ|tᵢ| per element (an array
  broadcastable to the values, or a scalar upper bound of it)."""
  actual, desired = np.asarray(actual, np.float64), np.asarray(desired, np.float64)
  assert actual.shape == desired.shape, (what, actual.shape, desired.shape)
  bound = 2 * gamma(terms) * np.broadcast_to(np.asarray(magnitude, np.float64), desired.shape)
  excess = np.abs(actual - desired) / np.maximum(bound, np.finfo(np.float64).tiny)
  worst = np.unravel_index(np.argmax(excess), excess.shape) if excess.ndim else ()
  assert np.all(np.abs(actual - desired) <= bound), (
      f'{what}: |Δ| {abs(actual[worst] - desired[worst]):.3g} at {worst} exceeds the float32 bound '
      f'{bound[worst]:.3g} (2·γ_{terms}·Σ|terms|); {int(np.sum(excess > 1))} elements over')


def network_bound(reduction_length: int, lam: float = 8.0) -> float:
  return lam * np.sqrt(reduction_length) * U


def relative_error(actual, desired) -> float:
  actual, desired = np.asarray(actual, np.float64), np.asarray(desired, np.float64)
  return float(np.linalg.norm(actual - desired) / np.linalg.norm(desired))


def assert_network_close(actual, desired, *, reduction_length: int, what: str = '') -> None:
  """‖a − b‖/‖b‖ ≤ λ·√N·u for a network whose outputs come through N summed terms along its depth."""
  error, bound = relative_error(actual, desired), network_bound(reduction_length)
  print(f'{what}: relative error {error:.3g}, bound {bound:.3g} (N = {reduction_length})')  # shown by -s
  assert error <= bound, f'{what}: relative error {error:.3g} exceeds λ√N·u = {bound:.3g} (N = {reduction_length})'


def total_fan_in(weights, layout: str = 'torch') -> int:
  """Σ over a model's weight matrices/kernels of their reduction length (fan-in): an upper bound on
  the summed reduction length along any path through it (biases and norm scales add no sums).
  `layout` 'torch': [out, in, (kh, kw)]; 'jax': [(kh, kw,) in, out] (a pytree of arrays)."""
  if layout == 'jax':
    import jax
    weights = jax.tree.leaves(weights)
  total = 0
  for w in weights:
    shape = tuple(w.shape)
    if len(shape) >= 2:
      total += int(np.prod(shape)) // (shape[0] if layout == 'torch' else shape[-1])
  return total
