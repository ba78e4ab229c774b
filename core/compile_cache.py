"""Reuse XLA executables across the models of one job that compiles the same programs many times.

`attrib counterfactual` trains one model per (query, ranking, seed) with the same recipe: the same
init, training step and loss programs every time, each a fresh closure, so JAX's in-memory cache
misses and every model paid the full compile again (on the digits U-Net about 14 s for the init,
12 s for the step, of ~25 s per 3-step model). JAX's persistent compilation cache is keyed on the
program itself, so with it every model after the first loads them instead.
"""
from __future__ import annotations

import contextlib

import jax
from jax.experimental.compilation_cache import compilation_cache


@contextlib.contextmanager
def reuse_compilations(directory):
  """Within the block, compiled programs are kept in and read from `directory` (local or gs://),
  unless the process already has a compilation cache (JAX_COMPILATION_CACHE_DIR or
  jax_compilation_cache_dir): that one is left in charge and used as it is."""
  if jax.config.jax_compilation_cache_dir:
    yield
    return
  jax.config.update('jax_compilation_cache_dir', str(directory))
  try:
    yield
  finally:
    jax.config.update('jax_compilation_cache_dir', None)
    compilation_cache.reset_cache()  # later compiles in this process neither read nor write it
