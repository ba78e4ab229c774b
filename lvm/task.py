"""Next-token prediction on fixed-length visual sentences (the LVM objective)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from lvm.model import Decoder
from lvm.model_config import DecoderConfig


def next_token_nll(logits_btv: jax.Array, tokens_bt: jax.Array) -> jax.Array:
  """NLL [b, t-1] of token t+1 given tokens <= t (logits of the last position are unused)."""
  return optax.softmax_cross_entropy_with_integer_labels(logits_btv[:, :-1].astype(jnp.float32),
                                                         tokens_bt[:, 1:])


class NextTokenTask:
  """LVM training: every position predicts the next token; the loss mask is all ones, as in LVM."""

  def __init__(self, model_config: DecoderConfig, seq_len: int):
    if seq_len > model_config.max_seq_len:
      raise ValueError(f'data.seq_len {seq_len} exceeds model.max_seq_len {model_config.max_seq_len}')
    self.model_config = model_config
    self.seq_len = seq_len

  def make_model(self, rngs: nnx.Rngs) -> Decoder:
    return Decoder(self.model_config, rngs)

  def loss(self, model: Decoder, batch):
    tokens_bt = batch['tokens']
    nll = next_token_nll(model(tokens_bt), tokens_bt)
    loss = jnp.mean(nll)
    return loss, {'perplexity': jnp.exp(loss)}

  def batch_logical_axes(self):
    return {'tokens': ('batch', 'act_seq')}

  def tokens_per_example(self) -> int:
    return self.seq_len

  def flops_per_example(self) -> float:
    return self.model_config.flops_per_token(self.seq_len) * self.seq_len
