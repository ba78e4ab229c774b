"""LVM: VQGAN tokens -> visual sentences -> a LLaMA-style decoder trained on next-token prediction."""

import core  # noqa: F401  (sets the CPU XLA flags before any backend starts; see core/xla_flags.py)
