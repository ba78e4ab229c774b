"""Next-token prediction on fixed-length visual sentences (the LVM objective)."""
from __future__ import annotations

from core.errors import ConfigError

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from core.losses import linear_cross_entropy

from lvm.model import Decoder
from lvm.model_config import DecoderConfig


def next_token_nll(logits_btv: jax.Array, tokens_bt: jax.Array) -> jax.Array:
  """NLL [b, t-1] of token t+1 given tokens <= t (logits of the last position are unused)."""
  return optax.softmax_cross_entropy_with_integer_labels(logits_btv[:, :-1].astype(jnp.float32),
                                                         tokens_bt[:, 1:])


class NextTokenTask:
  """LVM training: every position predicts the next token; the loss mask is all ones, as in LVM."""

  program_kind = 'matmul'  # no convolutions: its step may take other CPU dot fusions (core/xla_flags.py)

  def __init__(self, model_config: DecoderConfig, seq_len: int):
    if seq_len > model_config.max_seq_len:
      raise ConfigError(f'data.seq_len {seq_len} exceeds model.max_seq_len {model_config.max_seq_len}')
    block = model_config.attention_block
    if 0 < block < seq_len and seq_len % block:  # else the attention raises it while tracing the step
      raise ConfigError(f'data.seq_len {seq_len} is not a multiple of model.attention_block {block} '
                        '(0 attends in one block)')
    self.model_config = model_config
    self.seq_len = seq_len

  def make_model(self, rngs: nnx.Rngs) -> Decoder:
    return Decoder(self.model_config, rngs)

  def program_key(self):
    return self.model_config, self.seq_len

  def batch_shapes(self) -> dict:
    """One batch row's arrays, name -> (shape, dtype): what the fit check compiles the step for."""
    return {'tokens': ((self.seq_len,), jnp.int32)}

  def loss(self, model: Decoder, batch):
    tokens_bt = batch['tokens']
    if self.model_config.loss_chunk <= 0:
      loss = jnp.mean(next_token_nll(model(tokens_bt), tokens_bt))
    else:
      # Position i predicts token i+1; the last position has no target (weight 0).
      b, t = tokens_bt.shape
      targets_bt = jnp.concatenate([tokens_bt[:, 1:], tokens_bt[:, :1]], axis=1)
      weights_bt = jnp.broadcast_to(jnp.arange(t) < t - 1, (b, t)).astype(jnp.float32)
      hidden_btd = model.hidden_states(tokens_bt)
      lm_head = model.lm_head[...].astype(hidden_btd.dtype)
      loss = linear_cross_entropy(hidden_btd, lm_head, targets_bt, weights_bt,
                                  self.model_config.loss_chunk) / (b * (t - 1))
    return loss, {'perplexity': jnp.exp(loss)}

  def eval_summary(self, mean_loss: float) -> dict:
    """Held-out perplexity: exp of the mean loss over every held-out token (a mean of the batches'
    perplexities would weigh them unequally)."""
    return {'perplexity': float(np.exp(mean_loss))}

  def batch_logical_axes(self):
    return {'tokens': ('batch', 'act_seq')}

  def tokens_per_example(self) -> int:
    return self.seq_len

  def flops_per_example(self) -> float:
    return self.model_config.flops_per_token(self.seq_len) * self.seq_len
