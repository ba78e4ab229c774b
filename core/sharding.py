"""Logical axis names -> mesh shardings, for parameters and activations.

Models name every parameter dimension (`embed`, `mlp`, `heads`, `vocab`, `layers`, ...) and their main
activations (`batch`, `act_seq`, `act_embed`, ...). The preset's rules table turns those names into
`PartitionSpec`s; nothing in a model file mentions a mesh axis.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from core.mesh import LogicalRule

_ACTIVE: contextvars.ContextVar[tuple[Mesh, tuple[LogicalRule, ...]] | None] = contextvars.ContextVar(
    'active_sharding', default=None)


def logical_to_spec(logical_axes: Sequence[str | None] | None, rules: Sequence[LogicalRule],
                    shape: Sequence[int] | None = None, mesh: Mesh | None = None) -> P:
  """Maps logical names to mesh axes. Names without a rule, or whose mesh axes are taken by an
  earlier dimension of the same array, stay unsharded (a mesh axis may appear only once). With
  `shape` and `mesh`, a dimension the mesh axes do not divide (a 1-channel conv input) stays
  unsharded too, instead of failing at init."""
  if logical_axes is None:
    return P()
  table = dict(rules)
  used: set[str] = set()
  out = []
  for dim, name in enumerate(logical_axes):
    target = table.get(name) if name is not None else None
    axes = (target,) if isinstance(target, str) else tuple(target or ())
    axes = tuple(a for a in axes if a not in used)
    if shape is not None and mesh is not None:
      ways = 1
      for a in axes:
        ways *= mesh.shape[a]
      if shape[dim] % ways:
        axes = ()
    used.update(axes)
    out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return P(*out)


def tree_shardings(logical_specs: Any, mesh: Mesh, rules: Sequence[LogicalRule], shapes: Any = None) -> Any:
  """A pytree of logical `PartitionSpec`s (from `nnx.get_partition_spec`) -> `NamedSharding`s.
  `shapes` (a matching tree of arrays or ShapeDtypeStructs) keeps indivisible dims unsharded."""
  if shapes is None:
    return jax.tree.map(lambda spec: NamedSharding(mesh, logical_to_spec(tuple(spec), rules)),
                        logical_specs, is_leaf=lambda x: isinstance(x, P))
  return jax.tree.map(lambda spec, a: NamedSharding(mesh, logical_to_spec(tuple(spec), rules, a.shape, mesh)),
                      logical_specs, shapes, is_leaf=lambda x: isinstance(x, P))


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: Sequence[LogicalRule]):
  """While active (during tracing), `constrain` pins activations to the rules' shardings."""
  token = _ACTIVE.set((mesh, tuple(rules)))
  try:
    yield
  finally:
    _ACTIVE.reset(token)


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
  """`with_sharding_constraint` by logical names; a no-op outside `activation_sharding`."""
  active = _ACTIVE.get()
  if active is None:
    return x
  mesh, rules = active
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(logical_axes, rules)))
