"""LVM: VQGAN tokens -> visual sentences -> a LLaMA-style decoder trained on next-token prediction."""

import core  # noqa: F401  (sets the CPU XLA flags before any backend starts; see core/xla_flags.py)


def __getattr__(name):
  # Lazy, as attrib's: `import lvm.config` must not pay for jax/flax imports it does not use.
  if name in ('Prompter', 'Generation'):
    from lvm import prompter
    return getattr(prompter, name)
  if name == 'load_tokenizer':  # a trained or imported VQGAN: .encode(images) -> codes, .decode(codes)
    from lvm.tokenizer_commands import load_tokenizer
    return load_tokenizer
  raise AttributeError(name)
