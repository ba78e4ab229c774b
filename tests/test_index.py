"""ScaNN index: algorithm by size, recall measured at build, save/load, upsert, sharded merge."""
import numpy as np
import pytest

from attrib.index import (Index, IndexConfig, IndexInputError, ShardedIndex, choose_kind, exact_top_k,
                          load_any)


def _clustered(n, d=32, seed=0):
  rng = np.random.default_rng(seed)
  centres = rng.standard_normal((40, d)).astype(np.float32)
  x = centres[rng.integers(0, 40, n)] + 0.5 * rng.standard_normal((n, d)).astype(np.float32)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_kind_follows_scann_advice_by_size():
  config = IndexConfig()
  assert [choose_kind(config, n) for n in (5_000, 50_000, 500_000)] == ['brute_force', 'ah', 'tree_ah']


@pytest.mark.parametrize('kind', ['brute_force', 'ah', 'tree_ah'])
def test_search_recall_save_load_and_upsert(kind, tmp_path):
  data = _clustered(4000)
  ids = np.arange(4000) * 3 + 7  # training ids need not be row numbers
  index = Index.build(data, ids, IndexConfig(kind=kind, num_leaves=60, leaves_to_search=20, recall_probes=300))
  assert index.meta['kind'] == kind and index.meta['recall_at_10'] >= (1.0 if kind == 'brute_force' else 0.9)
  queries = _clustered(50, seed=1)
  found, dots = index.search(queries, 10)
  exact = ids[exact_top_k(data, queries, 10)]
  recall = np.mean([len(np.intersect1d(f, e)) / 10 for f, e in zip(found, exact)])
  assert recall >= (1.0 if kind == 'brute_force' else 0.9) and np.all(np.diff(dots, axis=1) <= 1e-6)
  index.save(tmp_path / 'ix')
  loaded = load_any(tmp_path / 'ix')
  np.testing.assert_array_equal(loaded.search(queries, 10)[0], found)
  # New training images join without a rebuild and are found at once.
  new = _clustered(3, seed=2)
  loaded.upsert(new, np.array([10**6, 10**6 + 1, 10**6 + 2]))
  assert len(loaded) == 4003
  # Searched over every leaf: this checks upsert (rows, ids, codes), not the tree's routing, which
  # ranks leaves by dot product with their centres and, over 20 of 60 leaves, missed a new row's own
  # leaf in about 1 of 6 processes (ScaNN's k-means differs from process to process).
  np.testing.assert_array_equal(loaded.search(new, 1, leaves=60)[0][:, 0], [10**6, 10**6 + 1, 10**6 + 2])
  with pytest.raises(IndexInputError, match='query dimension 31'):
    loaded.search(queries[:, :31])
  # The whole ranking (what answers among a subset read): every row once, by its exact inner product,
  # where a default tree search pads k past its leaves with repeats.
  _assert_whole_ranking(loaded, np.concatenate([data, new]), np.concatenate([ids, [10**6, 10**6 + 1, 10**6 + 2]]),
                        queries[:4])


def _assert_whole_ranking(index, rows, ids, queries):
  ranked, dots = index.ranking(queries)
  assert ranked.shape == (len(queries), len(rows))
  true = queries @ rows.T
  position = {int(i): r for r, i in enumerate(ids)}
  for q in range(len(queries)):
    assert sorted(ranked[q].tolist()) == sorted(ids.tolist())
    np.testing.assert_allclose(dots[q], true[q, [position[int(i)] for i in ranked[q]]], atol=1e-5)
    assert np.all(np.diff(dots[q]) <= 1e-6)


def test_sharded_index_equals_exact_search(tmp_path):
  data = _clustered(3000)
  sharded = ShardedIndex.build(data, None, 4, IndexConfig(kind='brute_force', recall_probes=100))
  queries = _clustered(20, seed=3)
  np.testing.assert_array_equal(sharded.search(queries, 10)[0], exact_top_k(data, queries, 10))
  sharded.save(tmp_path / 'sharded')
  np.testing.assert_array_equal(load_any(tmp_path / 'sharded').search(queries, 10)[0], sharded.search(queries, 10)[0])
  _assert_whole_ranking(sharded, data, np.arange(len(data)), queries[:3])


def test_an_interrupted_sharded_save_never_loads_as_a_mix(tmp_path, monkeypatch):
  """A save over a 2-shard index that fails at the third of 4 new shards: once, new shards 0-1 loaded
  beside old shard 1 (shards.json still said 2), so rows 1500-2249 were silently missing."""
  from attrib.index import IndexFileError
  data, queries = _clustered(3000), _clustered(20, seed=3)
  config = IndexConfig(kind='brute_force', recall_probes=50)
  ShardedIndex.build(data, None, 2, config).save(tmp_path / 'sharded')
  four = ShardedIndex.build(data, None, 4, config)
  real_save, saved = Index.save, []
  def failing_save(index, directory):
    if len(saved) == 2:
      raise OSError('disk full')
    real_save(index, directory)
    saved.append(directory)
  monkeypatch.setattr(Index, 'save', failing_save)
  with pytest.raises(OSError, match='disk full'):
    four.save(tmp_path / 'sharded')
  with pytest.raises(IndexFileError, match='not found'):
    load_any(tmp_path / 'sharded')
  assert [p.name for p in tmp_path.iterdir()] == []  # no temporary left behind
  monkeypatch.setattr(Index, 'save', real_save)
  four.save(tmp_path / 'sharded')
  loaded = load_any(tmp_path / 'sharded')
  assert len(loaded.shards) == 4
  np.testing.assert_array_equal(loaded.search(queries, 10)[0], exact_top_k(data, queries, 10))


def test_more_shards_than_rows_is_refused():
  from core.errors import ConfigError
  with pytest.raises(ConfigError, match='5 shards for 4 rows'):
    ShardedIndex.build(_clustered(4), None, 5, IndexConfig(kind='brute_force'))


def test_sharded_upsert_equals_exact_search_over_the_updated_rows(tmp_path):
  data = _clustered(3000)
  sharded = ShardedIndex.build(data, None, 4, IndexConfig(kind='brute_force', recall_probes=100))
  # Three new training images and a replaced one (id 5): new rows go to the smallest shard, the
  # replaced row stays in its own, so no id is held twice.
  new = _clustered(4, seed=4)
  sharded.upsert(new, np.array([3000, 3001, 3002, 5]))
  assert len(sharded) == 3003 and sorted(len(s) for s in sharded.shards) == [750, 751, 751, 751]
  updated = np.concatenate([data, new[:3]])
  updated[5] = new[3]
  queries = np.concatenate([_clustered(20, seed=3), new])
  np.testing.assert_array_equal(sharded.search(queries, 10)[0], exact_top_k(updated, queries, 10))
  sharded.save(tmp_path / 'sharded')
  np.testing.assert_array_equal(load_any(tmp_path / 'sharded').search(queries, 10)[0], sharded.search(queries, 10)[0])
  _assert_whole_ranking(sharded, updated, np.arange(len(updated)), queries[-4:])
  with pytest.raises(IndexInputError, match=r'repeated: \[7\]'):
    sharded.upsert(new[:2], np.array([7, 7]))
  with pytest.raises(IndexInputError, match=r'upsert needs \[2, 32\]'):
    sharded.upsert(new[:2, :16], np.array([8, 9]))


@pytest.mark.parametrize('sharded', [False, True])
def test_bad_vectors_and_k_are_refused_before_scann(sharded):
  """ScaNN built an index over NaN rows without a word, answered NaN queries and empty batches with a
  bare RuntimeError, and k=0 meant the build's k."""
  data = _clustered(400)
  build = (lambda v: ShardedIndex.build(v, None, 2, IndexConfig(kind='brute_force', recall_probes=50))) if sharded \
      else (lambda v: Index.build(v, None, IndexConfig(kind='brute_force', recall_probes=50)))
  broken = data.copy()
  broken[[3, 250], 1] = np.nan
  with pytest.raises(IndexInputError, match=r'index rows \[3, 250\] hold NaN'):
    build(broken)
  index = build(data)
  with pytest.raises(IndexInputError, match=r'query rows \[1\] hold NaN or infinity'):
    index.search(np.stack([data[0], broken[3]]), 5)
  for k in (0, -1, True, 2.5):
    with pytest.raises(IndexInputError, match='k must be an integer >= 1'):
      index.search(data[:2], k)
  ids, dots = index.search(data[:0], 5)
  assert ids.shape == (0, 5) and dots.shape == (0, 5)
  with pytest.raises(IndexInputError, match=r'upsert rows \[0\]'):
    index.upsert(broken[3:4], np.array([10**6]))
  assert len(index) == 400  # nothing was added
  assert isinstance(IndexInputError('x'), ValueError)


@pytest.mark.parametrize('sharded', [False, True])
def test_delete_equals_exact_search_over_the_rows_kept(sharded, tmp_path):
  """ScaNN moves the last row into each freed slot; the row -> id map must follow it, id after id."""
  data = _clustered(600)
  ids = np.arange(600) * 2 + 1
  config = IndexConfig(kind='brute_force', recall_probes=50)
  index = ShardedIndex.build(data, ids, 3, config) if sharded else Index.build(data, ids, config)
  # The last row, a row freed before the last row moved, and rows of every shard.
  gone = np.array([1199, 7, 599, 401, 1, 1001])
  index.delete(gone)
  kept = ~np.isin(ids, gone)
  assert len(index) == 594
  queries = np.concatenate([_clustered(20, seed=5), data[[3, 599, 299]]])
  np.testing.assert_array_equal(index.search(queries, 10)[0], ids[kept][exact_top_k(data[kept], queries, 10)])
  index.save(tmp_path / 'ix')
  np.testing.assert_array_equal(load_any(tmp_path / 'ix').search(queries, 10)[0], index.search(queries, 10)[0])
  with pytest.raises(IndexInputError, match=r'not in the index: \[7\]'):
    index.delete(np.array([7]))
  with pytest.raises(IndexInputError, match=r'delete ids must be unique; repeated: \[3\]'):
    index.delete(np.array([3, 3]))
  assert len(index) == 594  # nothing was removed by the refused calls


def test_answers_among_a_large_subset_through_a_tree_index_equal_exact_scores():
  """A plain student's subset of an eighth of the rows or more is found through its index, asked
  deeper until each query has k of it (attrib/among.py); past the rows of a tree index's searched
  leaves ScaNN pads an answer with repeated ids, so such a search is asked of every leaf instead."""
  from types import SimpleNamespace
  from attrib.among import search_among
  data = _clustered(3000)
  index = Index.build(data, None, IndexConfig(kind='tree_ah', num_leaves=20, leaves_to_search=4, recall_probes=50))
  student = SimpleNamespace(index=index, removed=np.zeros(0, np.int64), rerank=None, prior=None, scale=-2.0,
                            student_embeddings=lambda ids: data[ids])
  queries, among = _clustered(3, seed=5), np.arange(0, 3000, 6)  # 500 rows: asked 4 * 50 * 6 = 1,200 deep
  deep, dots = index.search(queries, 1200)  # 4 of 20 leaves hold ~600 rows
  assert all(len(set(row.tolist())) == 1200 for row in deep) and np.all(np.diff(dots, axis=1) <= 1e-6)
  found, cosine = search_among(student, queries, None, 50, among)
  exact = np.argsort(-(queries @ data[among].T), axis=1, kind='stable')[:, :50]
  np.testing.assert_array_equal(found, among[exact])
  np.testing.assert_allclose(cosine, np.take_along_axis(queries @ data[among].T, exact, axis=1), atol=1e-5)
