"""Attribution: a text-to-image diffusion model, the AbU unlearning teacher, and FastGDA's
distilled embedder with its ScaNN index, behind `Attributor`."""

import core  # noqa: F401  (sets the CPU XLA flags before any backend starts; see core/xla_flags.py)


def __getattr__(name):
  # Lazy: `import attrib.curation` must not pay for jax/flax/scann imports it does not use.
  if name in ('Attributor', 'Attribution', 'AttributionError'):
    from attrib import attributor
    return getattr(attributor, name)
  raise AttributeError(name)
