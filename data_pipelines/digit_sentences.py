"""Built-in real data: visual sentences of scikit-learn's handwritten digits (ships in the wheel).

Until the VQGAN issue lands, an 8x8 digit is tokenized by the simplest lossless image tokenizer:
one token per pixel, its grey level 0..16. A sentence is `images_per_sentence` digits of one class
(LVM's "category" sentences), so a model can only predict later images well by recognising the
class from earlier ones: the loss measures in-context visual learning, not just pixel statistics.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from core.errors import ConfigError
from data_pipelines import bundled

# Held out for evaluation: the last digits of the set (by index), never seen in training sentences.
EVAL_FRACTION = 0.15


def load_digits() -> tuple[np.ndarray, np.ndarray]:
  """(images [n, 8, 8] uint8 in 0..16, labels [n]) from scikit-learn's bundled copy."""
  images, labels = bundled.load_digits()
  return images.astype(np.uint8), labels


def pixel_tokenizer(image_hw: np.ndarray) -> np.ndarray:
  return image_hw.reshape(-1).astype(np.int32)


def category_sentences(images: np.ndarray, labels: np.ndarray, *, num_sentences: int,
                       images_per_sentence: int, seed: int,
                       tokenize: Callable[[np.ndarray], np.ndarray] = pixel_tokenizer) -> np.ndarray:
  """[num_sentences, images_per_sentence * tokens_per_image] int32, each of one random class."""
  rng = np.random.default_rng(seed)
  by_class = {c: np.flatnonzero(labels == c) for c in np.unique(labels)}
  classes = rng.choice(sorted(by_class), size=num_sentences)
  sentences = []
  for c in classes:
    picks = rng.choice(by_class[c], size=images_per_sentence, replace=len(by_class[c]) < images_per_sentence)
    sentences.append(np.concatenate([tokenize(images[i]) for i in picks]))
  return np.stack(sentences).astype(np.int32)


def digit_sentences(split: str, *, seq_len: int, num_sentences: int, seed: int = 0) -> np.ndarray:
  """Sentences for `split` ('train' or 'eval', from disjoint digits) of exactly `seq_len` tokens."""
  images, labels = load_digits()
  tokens_per_image = images.shape[1] * images.shape[2]
  if split not in ('train', 'eval'):
    raise ValueError(f'unknown digits split {split!r}')
  if seq_len % tokens_per_image:
    raise ConfigError(f'data.seq_len {seq_len} must be a multiple of {tokens_per_image} (one 8x8 digit) '
                      'for the built-in digit sentences')
  cut = int(len(images) * (1 - EVAL_FRACTION))
  part = slice(0, cut) if split == 'train' else slice(cut, None)
  return category_sentences(images[part], labels[part], num_sentences=num_sentences,
                            images_per_sentence=seq_len // tokens_per_image,
                            seed=seed + (0 if split == 'train' else 1))


def unigram_perplexity(train_tokens: np.ndarray, eval_tokens: np.ndarray, target_tokens: int) -> float:
  """Baseline a model must beat: LVM-style perplexity of the eval targets under the training set's
  token frequencies (knows the pixel statistics, nothing about shapes or context)."""
  counts = np.bincount(train_tokens.reshape(-1), minlength=int(eval_tokens.max()) + 1) + 1.0
  log_p = np.log(counts / counts.sum())
  nll = -log_p[eval_tokens[:, -target_tokens:]].mean(axis=1)
  return float(np.mean(np.exp(nll)))
