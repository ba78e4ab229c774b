"""Records and images: sources, visual-sentence builders, ArrayRecord I/O, grain loaders.

Knows nothing of models; a tokenizer is passed in as a function.
"""
