"""Tracing in linear time: the upstream fix for quadratic tracing (jax-ml/jax#40041), applied to
the jax this project pins when it still needs it.

flax NNX probes `getattr(value, 'sharding', None)` on every Variable assignment, and every draw
from `nnx.Rngs` assigns its counter. Under a trace `value` is a Tracer, whose `sharding` property
raises AttributeError (so that getattr/hasattr work); in jax 0.10.2 the message of that error is
built eagerly and walks every equation traced so far (`_origin_msg` -> `find_progenitors`), which
is then thrown away. Model construction under `eval_shape`/`jit` was therefore O(n²) in the number
of parameters: the digits U-Net's eval_shape + init trace took 2.1 s, 0.5 s with this fix, and the
cost grows with the model. Upstream removed the walk from the message; we do the same, and only
when the installed jax still has it (checked on the property itself, not on a version string).
"""
from __future__ import annotations

from jax._src import core as _jax_core


def _walks_the_trace(prop) -> bool:
  getter = getattr(prop, 'fget', None)
  return getter is not None and '_origin_msg' in getter.__code__.co_names


def _sharding_unavailable(self):
  raise AttributeError(f"The 'sharding' attribute is not available on {self._error_repr()}.")


def _device_unavailable(self):
  raise AttributeError(f"The 'device' attribute is not available on {self._error_repr()}.")


def install() -> None:
  """Idempotent: replaces Tracer.sharding / Tracer.device only where they still walk the trace."""
  tracer = _jax_core.Tracer
  if _walks_the_trace(tracer.__dict__.get('sharding')):
    tracer.sharding = property(_sharding_unavailable)
  if _walks_the_trace(tracer.__dict__.get('device')):
    tracer.device = property(_device_unavailable)


install()
