"""A tokenize shard's frames built batch by batch (lvm/shard_frames.py): the same pixels as the whole
array, each sentence built once, and never the whole shard in memory."""
import threading

import numpy as np
import pytest

from core.batching import map_batches
from core.mesh import host_mesh
from lvm.shard_frames import ShardFrames
from tpu_configs.rules import FSDP_TENSOR_RULES

FRAMES, SIDE = 4, 3


def sentence(n):
  """Sentence n: FRAMES frames whose pixels say (n, frame)."""
  return np.stack([np.full((SIDE, SIDE, 3), n * 10 + f, np.float32) for f in range(FRAMES)])


class CountingBuild:
  def __init__(self):
    self.built, self.lock = [], threading.Lock()

  def __call__(self, n):
    with self.lock:
      self.built.append(n)
    return sentence(n)


@pytest.mark.parametrize('threads', [1, 3])
@pytest.mark.parametrize('batch', [1, 3, 4, 6, 8, 13, 200])
def test_slices_are_the_whole_arrays_and_each_sentence_is_built_once(batch, threads):
  start, count = 7, 11
  whole = np.concatenate([sentence(n) for n in range(start, start + count)])
  build = CountingBuild()
  with ShardFrames(build, start, count, FRAMES, threads) as frames:
    assert len(frames) == count * FRAMES
    got = [frames[a:a + batch] for a in range(0, len(frames), batch)]
  np.testing.assert_array_equal(np.concatenate(got), whole)
  assert [len(g) for g in got] == [len(whole[a:a + batch]) for a in range(0, len(whole), batch)]
  # Ascending batches of one size: the one built ahead is the one asked for next, and a sentence that
  # two batches share is kept, not built (its images decoded) again.
  assert sorted(build.built) == list(range(start, start + count))


def test_slices_in_any_order_and_refused_indexes():
  frames = ShardFrames(sentence, 0, 5, FRAMES)
  whole = np.concatenate([sentence(n) for n in range(5)])
  for a, b in [(9, 17), (0, 3), (18, 20), (2, 19), (3, 3), (15, 99), (-6, -1)]:
    np.testing.assert_array_equal(frames[a:b], whole[a:b])
  with pytest.raises(TypeError, match='slice of frames'):
    frames[3]
  with pytest.raises(ValueError, match='unit-step'):
    frames[0:8:2]
  frames.close()


def test_the_encoder_gets_the_same_rows_without_the_shard_built_at_once():
  count, batch = 64, 8  # the shard: 256 frames; the encoder's batch: 8 frames (2 sentences)
  build = CountingBuild()
  seen_when_encoding = []

  def encode(x):
    seen_when_encoding.append(len(build.built))
    return x.sum(axis=(1, 2, 3))

  mesh = host_mesh()
  with ShardFrames(build, 0, count, FRAMES) as frames:
    sums = map_batches(encode, frames, mesh, FSDP_TENSOR_RULES, batch)
  whole = np.concatenate([sentence(n) for n in range(count)])
  np.testing.assert_array_equal(sums, whole.sum(axis=(1, 2, 3)))
  # When the encoder has batch k, sentences of batches k and k+1 at most have been built.
  per_batch = batch // FRAMES
  assert all(seen <= (k + 2) * per_batch for k, seen in enumerate(seen_when_encoding)), seen_when_encoding
  assert len(seen_when_encoding) == count * FRAMES // batch
