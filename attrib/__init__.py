"""Attribution: a text-to-image diffusion model, the AbU unlearning teacher, and (next) the
distilled embedder with its ScaNN index."""
