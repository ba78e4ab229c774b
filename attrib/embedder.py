"""FastGDA's student: one MLP g shared by queries and training images, scored by a scaled cosine.

    s(ẑ, z) = a · cos(g(φ(ẑ)), g(φ(z))) + b          (b = 0 and a = `initial_scale` at init)
                [+ c(z), a learned per-training-image term, with `image_prior`]

trained with BCE-with-logits against the teacher's normalised rank position j/K (0 = most
influential). So the most influential training image gets the *lowest* s; with a learned a < 0 that
is the *highest* cosine, which is what a maximum-inner-product index finds. `search_sign` says which
way to search, whatever sign a took (fastgda.md §3, "ranking direction").
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from core.errors import ConfigError
from core.layers import logical_sharding_only


@dataclasses.dataclass(frozen=True)
class EmbedderConfig:
  # Width of the base feature φ (DINO 768 + CLIP-text 512 = 1280 at full scale); set from the data.
  input_dim: int = 1280
  # Hidden layers of the MLP (ReLU + dropout after each); FastGDA: 768, 768, 768.
  hidden: tuple[int, ...] = (768, 768, 768)
  # Width of the embedding (the final linear layer, no activation).
  output_dim: int = 768
  # Dropout after every hidden layer during training.
  dropout: float = 0.1
  # a at init. FastGDA starts at 1; a shared g is symmetric in the sign of a, and from a = 1 training
  # can settle on the mirrored solution (a > 0: influential images anti-aligned), which ranks images
  # outside the training candidates first. Measured on the synthetic release of tests/test_fastgda.py:
  # from -1, BCE 0.51 and the teacher's order; from +1, BCE 0.64 and mAP below the base feature's.
  # The COCO preset keeps the paper's 1.
  initial_scale: float = 1.0
  # Adds a learned term c(z) of the training image alone to the score: s = a·cos + b + c(z), with c a
  # linear head on the last hidden layer (zero at init, so training starts from FastGDA's model).
  # Why: AbU's score is a loss change L(z, θ₋ẑ) − L(z, θ₀), and how much an image's loss moves under
  # any unlearning step is partly a property of the image; a cosine cannot hold a per-image offset.
  # The student's index then carries −c(z) as one more coordinate (`index_rows`).
  image_prior: bool = False

  def __post_init__(self):
    if self.input_dim < 1 or self.output_dim < 1 or any(h < 1 for h in self.hidden):
      raise ConfigError(f'embedder widths must be >= 1, got input {self.input_dim}, hidden {self.hidden}, '
                        f'output {self.output_dim}')
    if not 0 <= self.dropout < 1:
      raise ConfigError(f'embedder.dropout must be in [0, 1), got {self.dropout}')




class _Dense(nnx.Module):

  def __init__(self, kernel: jax.Array, logical_axes: tuple[str, str]):
    self.kernel = nnx.Param(kernel, out_sharding=logical_axes)
    self.bias = nnx.Param(jnp.zeros((kernel.shape[1],)), out_sharding=(logical_axes[1],))

  def __call__(self, x: jax.Array) -> jax.Array:
    return x @ self.kernel[...] + self.bias[...]


class Embedder(nnx.Module):
  """φ [b, input_dim] -> g(φ) [b, output_dim]; plus the score's scalars a and b."""

  @logical_sharding_only
  def __init__(self, config: EmbedderConfig, rngs: nnx.Rngs):
    widths = (config.input_dim,) + tuple(config.hidden) + (config.output_dim,)
    xavier = nnx.initializers.xavier_uniform()
    # Logical names: the wide dims split over `tensor` at scale; φ's dim is the features' `embed`.
    names = [('embed', 'mlp')] + [('mlp', 'mlp')] * (len(widths) - 3) + [('mlp', 'embed')]
    self.layers = nnx.List([_Dense(xavier(rngs.params(), (i, o)), names[k]) for k, (i, o) in
                            enumerate(zip(widths[:-1], widths[1:]))])
    self.dropout_rate = config.dropout
    self.scale = nnx.Param(jnp.full((), config.initial_scale, jnp.float32), out_sharding=())   # a
    self.offset = nnx.Param(jnp.zeros(()), out_sharding=())  # b
    self.has_prior = config.image_prior
    if config.image_prior:  # c(z)
      self.prior_head = _Dense(jnp.zeros((widths[-2], 1)), ('mlp', None))

  def _hidden(self, features_bd: jax.Array, dropout_key: jax.Array | None) -> jax.Array:
    x = features_bd
    for depth, layer in enumerate(self.layers[:-1]):
      x = jax.nn.relu(layer(x))
      if dropout_key is not None and self.dropout_rate > 0:
        keep = jax.random.bernoulli(jax.random.fold_in(dropout_key, depth), 1 - self.dropout_rate, x.shape)
        x = jnp.where(keep, x / (1 - self.dropout_rate), 0.0)
    return x

  def __call__(self, features_bd: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
    """Dropout only with a `dropout_key` (training); the key is data, so the module holds no RNG state."""
    return self.layers[-1](self._hidden(features_bd, dropout_key))

  def embed_and_prior(self, features_bd: jax.Array, dropout_key: jax.Array | None = None):
    """(g(φ) [b, output_dim], c [b]) for training images; c = 0 without `image_prior`."""
    hidden = self._hidden(features_bd, dropout_key)
    prior = self.prior_head(hidden)[:, 0] if self.has_prior else jnp.zeros(hidden.shape[:1], hidden.dtype)
    return self.layers[-1](hidden), prior

  def score(self, query_embedding_bd: jax.Array, train_embedding_bd: jax.Array) -> jax.Array:
    """s = a·cos + b per pair [b] (a logit: sigmoid(s) predicts the rank fraction j/K)."""
    cos = jnp.sum(_unit(query_embedding_bd) * _unit(train_embedding_bd), axis=-1)
    return self.scale[...] * cos + self.offset[...]


def _unit(x: jax.Array) -> jax.Array:
  # torch.nn.functional.cosine_similarity's eps: a zero vector has cosine 0, not NaN.
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-8)


def unit_rows(x: jax.Array) -> jax.Array:
  """Rows scaled to unit length (what the index stores and searches by inner product)."""
  return _unit(x)


def search_sign(scale: float) -> float:
  """+1 if the most influential image has the highest cosine (a < 0), else -1 (search with −q)."""
  return 1.0 if scale < 0 else -1.0


# A maximum-inner-product index finds the most influential training images, lowest logit first:
# without a per-image term the rows are the unit embeddings and the query is ±q (`search_sign`); with
# one, each row carries −c(z) as one more coordinate and the query [−a·q, 1], so that the inner product
# is −(a·cos + c(z)), the logit without its constant b, negated.
def index_rows(unit_embeddings: np.ndarray, prior: np.ndarray | None) -> np.ndarray:
  if prior is None:
    return np.asarray(unit_embeddings, np.float32)
  return np.concatenate([unit_embeddings, -np.asarray(prior, np.float32)[:, None]], axis=1).astype(np.float32)


def index_queries(unit_queries: np.ndarray, scale: float, with_prior: bool) -> np.ndarray:
  unit_queries = np.asarray(unit_queries, np.float32)
  if not with_prior:
    return search_sign(scale) * unit_queries
  return np.concatenate([-scale * unit_queries, np.ones((len(unit_queries), 1), np.float32)], axis=1)


def cosine_from_dots(dots: np.ndarray, scale: float, prior_of_found: np.ndarray | None) -> np.ndarray:
  """The cosines behind `index_queries` · `index_rows` inner products."""
  if prior_of_found is None:
    return search_sign(scale) * dots
  return -(dots + prior_of_found) / scale


class DistillTask:
  """The core train loop's task: BCE between a·cos + b and the teacher's rank fraction."""

  def __init__(self, config: EmbedderConfig):
    self.config = config

  def make_model(self, rngs: nnx.Rngs) -> Embedder:
    return Embedder(self.config, rngs)

  def loss(self, model: Embedder, batch):
    # Dropout masks from the batch's own seed: the same on any device layout and on resume.
    key = jax.random.key(batch['seed'][0])
    train_embedding, prior = model.embed_and_prior(batch['train'], jax.random.fold_in(key, 1))
    logits = model.score(model(batch['query'], jax.random.fold_in(key, 0)), train_embedding) + prior
    loss = jnp.mean(optax.sigmoid_binary_cross_entropy(logits, batch['target']))
    return loss, {'scale_a': model.scale[...], 'offset_b': model.offset[...]}

  def batch_logical_axes(self):
    return {'query': ('batch', None), 'train': ('batch', None), 'target': ('batch',), 'seed': ('batch',)}

  def tokens_per_example(self) -> int:
    return 1  # tokens/s reads as pairs/s

  def flops_per_example(self) -> float:
    widths = (self.config.input_dim,) + tuple(self.config.hidden) + (self.config.output_dim,)
    return 2 * 3 * 2 * sum(i * o for i, o in zip(widths[:-1], widths[1:]))  # 2 sides, fwd + bwd
