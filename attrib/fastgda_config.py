"""Config of the FastGDA student: which base feature, the teacher's training data, the embedder,
distillation, the index, and evaluation."""
from __future__ import annotations

import dataclasses

from attrib.embedder import EmbedderConfig
from attrib.index import IndexConfig
from core.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class TeacherDataConfig:
  # Student training queries (held-out prompts x seeds) the teacher ranks; FastGDA COCO: 5000.
  train_queries: int = 5000
  # Test queries ranked over `test_candidates` for evaluation; FastGDA COCO: 110.
  test_queries: int = 110
  # M: candidates per training query (top M by the base feature); FastGDA COCO: 10,000 DINO neighbours.
  candidates: int = 10_000
  # Candidates per test query (0 = the whole training set, as FastGDA's COCO test set).
  test_candidates: int = 0
  # Timestep stride of the teacher's scoring loss (50 = 20 timesteps, the paper's).
  timestep_stride: int = 50

  def __post_init__(self):
    if min(self.train_queries, self.test_queries, self.candidates, self.timestep_stride) < 1 or self.test_candidates < 0:
      raise ConfigError('teacher_data: queries, candidates and timestep_stride must be >= 1 (test_candidates >= 0)')


@dataclasses.dataclass(frozen=True)
class DistillConfig:
  # Pairs per optimizer update; FastGDA: 4096.
  batch: int = 4096
  # Passes over every (query, candidate) pair; FastGDA: 10.
  epochs: int = 10
  # AdamW (betas .9/.999, constant rate); FastGDA: 1e-3, weight decay 0.01.
  lr: float = 1e-3
  weight_decay: float = 0.01
  # Probability p that a pair's image is swapped for one outside the query's candidates; FastGDA: 0.1.
  outlier_probability: float = 0.1
  # The last this-many training queries are held out for the validation loss (FastGDA: 100 of 5000).
  val_queries: int = 100
  # Seed of init, pair order, outliers and dropout.
  seed: int = 0
  # Metrics every this many updates.
  log_every: int = 50

  def __post_init__(self):
    for name, ok, rule in (('batch', self.batch >= 1, '>= 1'), ('epochs', self.epochs >= 1, '>= 1'),
                           ('log_every', self.log_every >= 1, '>= 1'), ('lr', self.lr > 0, '> 0'),
                           ('val_queries', self.val_queries >= 0, '>= 0')):
      if not ok:
        raise ConfigError(f'distill.{name} must be {rule}, got {getattr(self, name)!r}')
    if not 0 <= self.outlier_probability < 1:
      raise ConfigError(f'distill.outlier_probability must be in [0, 1), got {self.outlier_probability}')


@dataclasses.dataclass(frozen=True)
class FastGDAConfig:
  # The base feature φ the student embeds (a directory name under features/, e.g. 'dino+clip_text').
  feature: str = 'dino+clip_text'
  # Further base features whose own rankings `attrib eval` reports beside the student's.
  compare_features: tuple[str, ...] = ()
  # L of mAP(L): positives are the teacher's top L (FastGDA COCO: 500, 1000, 4000 of 118,287).
  map_at: tuple[int, ...] = (500, 1000, 4000)
  teacher_data: TeacherDataConfig = TeacherDataConfig()
  embedder: EmbedderConfig = EmbedderConfig()
  distill: DistillConfig = DistillConfig()
  index: IndexConfig = IndexConfig()
  # 0 (FastGDA): search the index of student embeddings over the whole training set. M > 0: take the
  # base feature's top M (an index over unit φ), order them by the student, and let the rest follow in
  # φ's order. Meant for teacher data whose candidates were φ's own top M (the digits): the student
  # then orders exactly the kind of set it was trained on, and φ keeps the tail it was not taught.
  rerank_candidates: int = 0

  def __post_init__(self):
    if not self.map_at or min(self.map_at) < 1:
      raise ConfigError(f'map_at needs one or more L >= 1 (mAP against the teacher\'s top L), got {self.map_at}')
    if self.rerank_candidates < 0:
      raise ConfigError(f'rerank_candidates must be >= 0 (0 = no reranking), got {self.rerank_candidates}')
