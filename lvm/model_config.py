"""Decoder dimensions and numerics; presets with LVM's exact sizes (EasyLM LLAMA_STANDARD_CONFIGS)."""
from __future__ import annotations

from core.errors import ConfigError

import dataclasses
from typing import Literal

RematPolicy = Literal['none', 'full', 'dots_saveable', 'dots_with_no_batch_dims_saveable']


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  # Token vocabulary: LVM uses 8192 VQGAN codes + 100 special ids.
  vocab_size: int = 8292
  # Width of the residual stream (d).
  hidden_size: int = 4096
  # Width of the SwiGLU hidden layer.
  intermediate_size: int = 11008
  # Number of decoder blocks.
  num_layers: int = 32
  # Query heads.
  num_heads: int = 32
  # Key/value heads; equal to num_heads for multi-head attention, fewer for grouped KV.
  num_kv_heads: int = 32
  # Longest sequence the model is used with (16 images x 256 tokens in LVM).
  max_seq_len: int = 4096
  # RMSNorm epsilon.
  rms_eps: float = 1e-6
  # RoPE base frequency.
  rope_theta: float = 1e4
  # Standard deviation of the N(0, std) init of every weight matrix and the embedding.
  init_std: float = 0.02
  # Storage dtype of parameters (and optimizer state).
  param_dtype: Literal['float32', 'bfloat16'] = 'float32'
  # Dtype of matmuls and activations; logits and the loss are always float32.
  compute_dtype: Literal['float32', 'bfloat16'] = 'float32'
  # What a decoder block keeps for the backward pass: 'none' saves everything, 'full' recomputes all.
  remat_policy: RematPolicy = 'none'
  # Decoder blocks per scan iteration: 1 keeps compile time flat in depth; num_layers unrolls fully
  # (no loop: faster on CPU, where the scan's backward pays for slicing the stacked weights).
  scan_unroll: int = 1
  # Query block of the causal blockwise attention (blocks above the diagonal are never computed); 0 = one block.
  attention_block: int = 512

  # Sequence positions per chunk of the fused output projection + cross-entropy in training
  # (the [b, t, vocab] logits are never stored); 0 = materialise all logits at once.
  loss_chunk: int = 256

  def __post_init__(self):
    if self.hidden_size % self.num_heads:
      raise ConfigError(f'model.hidden_size {self.hidden_size} is not divisible by model.num_heads {self.num_heads}')
    if self.num_heads % self.num_kv_heads:
      raise ConfigError(f'model.num_heads {self.num_heads} is not a multiple of model.num_kv_heads {self.num_kv_heads}')
    for name in ('vocab_size', 'hidden_size', 'intermediate_size', 'num_layers', 'max_seq_len'):
      if getattr(self, name) < 1:
        raise ConfigError(f'model.{name} must be >= 1')
    if not 1 <= self.scan_unroll <= self.num_layers:
      raise ConfigError(f'model.scan_unroll must be in [1, num_layers={self.num_layers}]')
    if self.attention_block < 0:
      raise ConfigError('model.attention_block must be >= 0')
    # Each would train to NaN (or divide by zero in the rotary frequencies) rather than fail here.
    for name in ('rms_eps', 'rope_theta', 'init_std'):
      if not getattr(self, name) > 0:
        raise ConfigError(f'model.{name} must be > 0, got {getattr(self, name)}')

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  def num_params(self) -> int:
    d, f, hd = self.hidden_size, self.intermediate_size, self.head_dim
    attention = d * self.num_heads * hd * 2 + d * self.num_kv_heads * hd * 2
    block = attention + 3 * d * f + 2 * d
    return 2 * self.vocab_size * d + d + self.num_layers * block

  def flops_per_token(self, seq_len: int) -> float:
    """Training FLOPs per token: 6 x matmul params + causal attention (PaLM appendix B, halved)."""
    matmul_params = self.num_params() - self.vocab_size * self.hidden_size - self.hidden_size * (
        2 * self.num_layers + 1)
    attention = 6 * self.num_layers * self.hidden_size * seq_len  # 12·L·d·T, causal half
    return 6 * matmul_params + attention


def _lvm(d, f, layers, heads):
  return DecoderConfig(hidden_size=d, intermediate_size=f, num_layers=layers, num_heads=heads,
                       num_kv_heads=heads, remat_policy='full', attention_block=2048,
                       compute_dtype='bfloat16')


# LVM's published sizes (vocab 8292, context 4096, untied embeddings).
PRESETS: dict[str, DecoderConfig] = {
    'vqlm_100m': _lvm(640, 1664, 22, 10),
    'vqlm_300m': _lvm(1024, 2688, 22, 8),
    'vqlm_600m': _lvm(1536, 4096, 22, 16),
    'vqlm_1b': _lvm(2048, 5504, 22, 16),
    'vqlm_3b': _lvm(3200, 8640, 26, 32),
    'vqlm_7b': _lvm(4096, 11008, 32, 32),
    # A CPU-sized model for tests, the quickstart and laptops.
    'tiny': DecoderConfig(hidden_size=128, intermediate_size=344, num_layers=2, num_heads=4,
                          num_kv_heads=4, max_seq_len=1024, attention_block=128),
}
