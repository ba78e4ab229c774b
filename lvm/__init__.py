"""LVM: VQGAN tokens -> visual sentences -> a LLaMA-style decoder trained on next-token prediction."""
