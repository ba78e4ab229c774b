"""The full config of an LVM training run: model, data, optimizer, loop."""
from __future__ import annotations

from core.errors import ConfigError

import dataclasses

from core.optim import OptimConfig
from core.train_loop import TrainConfig
from lvm.model_config import DecoderConfig


@dataclasses.dataclass(frozen=True)
class DataConfig:
  # Training tokens: a directory of .arrayrecord shards, one shard, an LVM .jsonl or an int32 .npy.
  # The default builds visual sentences from scikit-learn's bundled handwritten digits.
  train_path: str = 'builtin:digits'
  # Tokens per record (visual sentence); LVM uses 16 images x 256 = 4096.
  seq_len: int = 256
  # Shuffle records each epoch (seeded by train.seed).
  shuffle: bool = True
  # grain read threads per host (0 reads in the main thread).
  read_threads: int = 0
  # Held-out tokens to validate on while training (every train.eval_every updates): the same formats
  # as train_path, e.g. `lvm tokenize --split eval` sentences or builtin:digits-eval. '' = none.
  eval_path: str = ''
  # Records of eval_path used, from its start, in whole batches (read and checked once, up front).
  eval_examples: int = 256

  def __post_init__(self):
    if self.seq_len < 2:
      raise ConfigError(f'data.seq_len must be >= 2, got {self.seq_len}')
    if self.read_threads < 0:
      raise ConfigError(f'data.read_threads must be >= 0 (0 reads in the main thread), got {self.read_threads}')
    if self.eval_examples < 1:
      raise ConfigError(f'data.eval_examples must be >= 1, got {self.eval_examples}')


@dataclasses.dataclass(frozen=True)
class LvmConfig:
  # Decoder dimensions and numerics.
  model: DecoderConfig
  # Where the token records come from.
  data: DataConfig = DataConfig()
  # AdamW, schedule, gradient accumulation.
  optim: OptimConfig = OptimConfig()
  # Steps, batch, logging and checkpoint cadence.
  train: TrainConfig = TrainConfig()

  def __post_init__(self):
    if self.train.eval_every and not self.data.eval_path:
      raise ConfigError(f'train.eval_every {self.train.eval_every} needs held-out tokens to validate on: set '
                        'data.eval_path (e.g. `lvm tokenize --split eval` sentences, or builtin:digits-eval)')
