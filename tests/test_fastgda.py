"""FastGDA student on a miniature release in FastGDA's own layout (features/*.npy, influence_*.pkl):
distill with the core loop, search with ScaNN, rank the teacher's way, evaluate by mAP."""
import json
import pickle
import shutil
import threading

import numpy as np
import pytest

import attrib.among
from attrib.evaluation import average_precision, mean_average_precision, paired_comparison
from attrib.index import IndexFileError
from attrib.student_data import StudentDataError, load_rank_pickle
from core.errors import ConfigError
from launch import main as launch_main
from tests.helpers import CPU1, CPU8, ROOT

N, D, TRAIN_Q, TEST_Q, M = 600, 24, 200, 24, 100


@pytest.fixture(scope='module')
def release(tmp_path_factory):
  return write_release(tmp_path_factory.mktemp('fastgda'))


def write_release(root):
  """A miniature FastGDA release in `root`. Influence = cosine after weighting φ's first 6 dims 4x; a
  query's candidates are its top M by raw cosine (as FastGDA's DINO neighbours). A student that
  learns the weighting beats raw φ."""
  rng = np.random.default_rng(0)
  weights = np.ones(D, np.float32)
  weights[:6] = 4.0
  data = rng.standard_normal((N, D)).astype(np.float32)
  train_q = rng.standard_normal((TRAIN_Q, D)).astype(np.float32)
  test_q = rng.standard_normal((TEST_Q, D)).astype(np.float32)
  feats = root / 'feats' / 'toy'
  feats.mkdir(parents=True)
  for name, array in (('data_feats', data), ('train_query_feats', train_q), ('test_query_feats', test_q)):
    np.save(feats / f'{name}.npy', array)
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  candidates = np.argsort(-(unit(train_q) @ unit(data).T), axis=1)[:, :M]
  influence = unit(train_q * weights) @ unit(data * weights).T
  train_rank = np.stack([c[np.argsort(-influence[q, c], kind='stable')] for q, c in enumerate(candidates)])
  test_rank = np.argsort(-(unit(test_q * weights) @ unit(data * weights).T), axis=1, kind='stable')
  with open(root / 'influence_train.pkl', 'wb') as f:
    pickle.dump({'random': {'rank': train_rank}}, f)
  with open(root / 'influence_test.pkl', 'wb') as f:
    pickle.dump({'rank': test_rank, 'influence': np.sort(influence[:TEST_Q])}, f)
  return root


CONFIG = '''
from attrib.embedder import EmbedderConfig
from attrib.fastgda_config import DistillConfig, FastGDAConfig
from attrib.index import IndexConfig

def get_config():
  return FastGDAConfig(feature='toy', map_at=(10, 30),
                       embedder=EmbedderConfig(hidden=(64, 64), output_dim=32, initial_scale=-1.0),
                       distill=DistillConfig(batch=512, epochs=30, val_queries=10, log_every=10),
                       index=IndexConfig(recall_probes=100))
'''


def _distill(release, workdir, tpu, extra=()):
  (release / 'config.py').write_text(CONFIG)
  return launch_main(['attrib', 'distill', '--config', str(release / 'config.py'), '--workdir', str(workdir),
                      '--tpu', tpu, '--features', str(release / 'feats' / 'toy'),
                      '--ranks', str(release / 'influence_train.pkl'), '--set', 'distill.seed=1', *extra])


def test_distilled_student_beats_its_base_feature_and_ranks_the_teacher_way(release, tmp_path):
  assert _distill(release, tmp_path / 'w', CPU1) == 0
  result = json.loads((tmp_path / 'w' / 'distill_result.json').read_text())
  assert result['step'] == 30 * ((TRAIN_Q - 10) * M // 512)
  # Ranking direction: targets are rank fractions (0 = most influential), so the most influential
  # image must get the lowest a·cos + b: the learned a is negative, and search is by highest cosine.
  assert result['scale_a'] < 0 and result['most_influential_is'] == 'highest cosine'
  assert result['index']['kind'] == 'brute_force' and result['index']['recall_at_10'] == 1.0
  assert launch_main(['attrib', 'eval', '--workdir', str(tmp_path / 'w'),
                      '--ranks', str(release / 'influence_test.pkl')]) == 0
  evaluation = json.loads((tmp_path / 'w' / 'eval_result.json').read_text())
  base, student = evaluation['map']['toy'], evaluation['map']['FastGDA(toy)']
  assert student['mAP(10)']['mean'] > base['mAP(10)']['mean'] + 0.15, evaluation['map']
  paired = evaluation['student_vs_best_base']  # the same difference, query by query
  assert paired['feature'] == 'toy' and 'student_vs_own_base' not in evaluation  # φ is the best (only) base
  assert abs(paired['mAP(10)']['difference'] - (student['mAP(10)']['mean'] - base['mAP(10)']['mean'])) < 1e-9
  assert paired['mAP(10)']['wins'] + paired['mAP(10)']['ties'] + paired['mAP(10)']['losses'] == evaluation['test_queries']
  # The Attributor answers in the teacher's order: its top-1 is the teacher's top-1 far above chance.
  from attrib import Attributor
  attributor = Attributor.load(tmp_path / 'w')
  test_q = np.load(release / 'feats' / 'toy' / 'test_query_feats.npy')
  teacher = load_rank_pickle(release / 'influence_test.pkl')
  answers = attributor.attribute_batch(features=test_q, k=10)
  top10_overlap = np.mean([len(np.intersect1d(a.ids, t[:10])) / 10 for a, t in zip(answers, teacher)])
  assert top10_overlap > 0.3, top10_overlap  # chance: 10 / 600
  assert all(np.all(np.diff(a.scores) >= -1e-6) for a in answers)  # most influential (lowest) first


def test_a_read_only_student_answers_and_writing_jobs_are_refused_first(release, tmp_path, capsys):
  """A student the user may read but not write (a shared model folder): evaluated and queried, with
  a note for the result file it could not write; jobs that write into it refused before any work.
  Both ended in a PermissionError traceback, the readers after their work."""
  from attrib import Attributor
  from tests.helpers import read_only
  work = tmp_path / 'w'
  assert _distill(release, work, CPU1, ['--set', 'distill.epochs=2']) == 0
  before = sorted((p.relative_to(work), p.stat().st_mtime_ns) for p in work.rglob('*'))
  evaluate = ['attrib', 'eval', '--workdir', str(work), '--ranks', str(release / 'influence_test.pkl')]
  with read_only(work):
    capsys.readouterr()
    assert launch_main(evaluate) == 0
    out, err = capsys.readouterr()
    assert f'note: {work}/eval_result.json not written (' in err and '"map"' in out
    query = np.load(release / 'feats' / 'toy' / 'test_query_feats.npy')[0]
    assert len(Attributor.load(work).attribute(features=query, k=5).ids) == 5
    for job in (['attrib', 'remove', '--workdir', str(work), '--ids', '3'],
                ['attrib', 'add', '--workdir', str(work), '--features', str(release / 'feats' / 'toy' / 'data_feats.npy')],
                ['attrib', 'index', '--workdir', str(work)]):
      assert launch_main(job) == 2
      assert capsys.readouterr().err.strip() == (
          f'error: {work} is not writable, and this command writes into it: copy it somewhere writable or choose '
          'another (eval, query, generate and export-hf only read a workdir)')
    assert launch_main(['attrib', 'index', '--workdir', str(work / 'new')]) == 2
    assert f'error: {work / "new"}: its folder {work} is not writable' in capsys.readouterr().err
  assert sorted((p.relative_to(work), p.stat().st_mtime_ns) for p in work.rglob('*')) == before


def test_attributor_is_thread_safe_and_rejects_bad_queries(release, tmp_path):
  assert _distill(release, tmp_path / 'w', CPU1, ['--set', 'distill.epochs=2']) == 0
  from attrib import Attributor, AttributionError
  attributor = Attributor.load(tmp_path / 'w')
  test_q = np.load(release / 'feats' / 'toy' / 'test_query_feats.npy')
  serial = [attributor.attribute(features=q, k=5) for q in test_q]
  results = [None] * 64
  def work(t):
    for n in range(t, 64, 16):
      results[n] = attributor.attribute(features=test_q[n % TEST_Q], k=5)
  threads = [threading.Thread(target=work, args=(t,)) for t in range(16)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  for n, r in enumerate(results):
    np.testing.assert_array_equal(r.ids, serial[n % TEST_Q].ids)
    np.testing.assert_array_equal(r.scores, serial[n % TEST_Q].scores)
  with pytest.raises(AttributionError, match=r'\[b, 24\]'):
    attributor.attribute(features=np.zeros(23, np.float32))
  with pytest.raises(AttributionError, match='loaded without a featurizer; pass features=φ'):
    attributor.attribute(image=np.zeros((16, 16), np.float32), prompt='x')
  with pytest.raises(AttributionError, match='k must be'):
    attributor.attribute(features=test_q[0], k=0)
  with pytest.raises(AttributionError, match='k must be an integer .* got True'):  # bool is an int to Python
    attributor.attribute(features=test_q[0], k=True)
  assert attributor.attribute_batch(features=np.zeros((0, 24), np.float32), k=5) == []  # was a ScaNN error
  bad = test_q[:3].copy()
  bad[1, 4] = np.nan
  with pytest.raises(AttributionError, match=r'rows \[1\] hold NaN'):
    attributor.attribute_batch(features=bad, k=5)
  with pytest.raises(AttributionError, match=r'attribute takes one query; features of shape \(3, 24\) hold 3: '
                                             'use attribute_batch'):
    attributor.attribute(features=test_q[:3])
  assert attributor.attribute(features=test_q[:1], k=5).ids.tolist() == serial[0].ids.tolist()
  with pytest.raises(AttributionError, match='not both'):
    attributor.attribute(image=np.zeros((16, 16), np.float32), prompt='x', features=test_q[0])


def test_a_workdir_moved_to_another_machine_serves_evaluates_and_resumes(release, tmp_path, capsys):
  """A student's workdir copied elsewhere (another machine: neither the old folder nor the checkout's
  path is there) finds the inputs it holds, serves on one device whatever slice distilled it, and
  distills on (before: its preset 'not found', and distill refused the same features at a new path)."""
  trained = tmp_path / 'trained'
  shutil.copytree(release / 'feats', trained / 'feats')  # the inputs inside the workdir
  shutil.copy(release / 'influence_train.pkl', trained)
  (release / 'config.py').write_text(CONFIG)
  def distill(workdir, epochs):
    return launch_main(['attrib', 'distill', '--config', str(release / 'config.py'), '--workdir', str(workdir),
                        '--tpu', CPU8, '--features', str(workdir / 'feats' / 'toy'), '--ranks',
                        str(workdir / 'influence_train.pkl'), '--set', 'distill.seed=1', '--set', f'distill.epochs={epochs}'])
  assert distill(trained, 2) == 0
  stored = json.loads((trained / 'student' / 'config.json').read_text())
  assert (stored['features'], stored['ranks']) == ('feats/toy', 'influence_train.pkl')
  from attrib import Attributor
  test_q = np.load(release / 'feats' / 'toy' / 'test_query_feats.npy')
  before = [a.ids.tolist() for a in Attributor.load(trained).attribute_batch(features=test_q, k=5)]
  moved = tmp_path / 'elsewhere' / 'run'
  shutil.copytree(trained, moved)
  shutil.rmtree(trained)
  for preset in ('/home/someone/checkout/tpu_configs/cpu_8.py', str(ROOT / 'tpu_configs' / 'v4_32.py')):
    (moved / 'student' / 'config.json').write_text(json.dumps({**stored, 'tpu': preset}))
    # v4-32 (32 chips) cannot be built here: the Attributor restores onto one device anyway.
    assert [a.ids.tolist() for a in Attributor.load(moved).attribute_batch(features=test_q, k=5)] == before
  (moved / 'student' / 'config.json').write_text(json.dumps({**stored, 'tpu': '/home/someone/checkout/tpu_configs/cpu_8.py'}))
  assert launch_main(['attrib', 'eval', '--workdir', str(moved), '--ranks', str(release / 'influence_test.pkl')]) == 0
  capsys.readouterr()
  assert distill(moved, 3) == 0
  per_epoch = (TRAIN_Q - 10) * M // 512
  assert f'resuming {moved / "student"} from step {2 * per_epoch} of {3 * per_epoch}' in capsys.readouterr().err
  assert json.loads((moved / 'distill_result.json').read_text())['step'] == 3 * per_epoch


def test_a_full_scale_student_beside_its_model_loads_without_towers(release, tmp_path):
  """A student of non-digits features in a workdir that also holds a diffusion run and features/ (the
  full-scale flow: import-diffusers, teacher, features, distill in one workdir) loads without its
  towers and answers features=; it was taken for a digits student and its U-Net restored."""
  assert _distill(release, tmp_path / 'w', CPU1, ['--set', 'distill.epochs=1']) == 0
  (tmp_path / 'w' / 'config.json').write_text('{"config": {}, "tpu": "cpu_1.py"}')  # not a digits run
  (tmp_path / 'w' / 'features' / 'toy').mkdir(parents=True)
  from attrib import Attributor, AttributionError
  attributor = Attributor.load(tmp_path / 'w')
  test_q = np.load(release / 'feats' / 'toy' / 'test_query_feats.npy')
  assert len(attributor.attribute(features=test_q[0], k=5).ids) == 5
  with pytest.raises(AttributionError, match='for a full-scale student, load it with dino= and clip='):
    attributor.attribute(image=np.zeros((16, 16), np.float32), prompt='x')


def test_removed_training_images_leave_every_answer_and_stay_removed(release, tmp_path, capsys, monkeypatch):
  """A takedown: removed ids never appear again, every answer is the index's top k of the rest (as an
  index that never held them), the list is saved and read back, and ids stay stable around it."""
  assert _distill(release, tmp_path / 'w', CPU1, ['--set', 'distill.epochs=2']) == 0
  evaluate = ['attrib', 'eval', '--workdir', str(tmp_path / 'w'), '--ranks', str(release / 'influence_test.pkl')]
  assert launch_main(evaluate) == 0
  table = json.loads((tmp_path / 'w' / 'eval_result.json').read_text())['map']
  from attrib import Attributor, AttributionError
  attributor = Attributor.load(tmp_path / 'w')
  test_q = np.load(release / 'feats' / 'toy' / 'test_query_feats.npy')
  before = attributor.attribute_batch(features=test_q, k=40)
  removed = sorted({int(b.ids[0]) for b in before[:5]} | {int(before[0].ids[3])})
  assert attributor.remove_training_images(removed).tolist() == removed
  assert attributor.remove_training_images(removed[:2]).tolist() == []  # removed before: left as they are
  after = attributor.attribute_batch(features=test_q, k=10)
  for b, a in zip(before, after):
    kept = ~np.isin(b.ids, removed)
    np.testing.assert_array_equal(a.ids, b.ids[kept][:10])
    np.testing.assert_array_equal(a.scores, b.scores[kept][:10])
  never_held = Attributor.load(tmp_path / 'w')
  never_held.index.delete(np.asarray(removed))
  for a, r in zip(after, never_held.attribute_batch(features=test_q, k=10)):
    np.testing.assert_array_equal(a.ids, r.ids)
  rest = N - len(removed)
  with pytest.raises(AttributionError, match=rf'k must be an integer in \[1, {rest}\], got {N} '
                                             rf'\({len(removed)} training images removed\)'):
    attributor.attribute(features=test_q[0], k=N)
  everything = attributor.attribute(features=test_q[0], k=rest).ids
  assert len(set(everything.tolist())) == rest and not np.isin(everything, removed).any()
  with pytest.raises(AttributionError, match=r'training ids \[600\] are not in \[0, 600\)'):
    attributor.remove_training_images([3, 600])
  with pytest.raises(AttributionError, match='must be integers'):
    attributor.remove_training_images([1.5])
  with pytest.raises(AttributionError, match='each id once'):
    attributor.remove_training_images([7, 7])
  with pytest.raises(AttributionError, match='no training ids to remove given'):
    attributor.remove_training_images([])
  with pytest.raises(AttributionError, match='would leave none'):
    attributor.remove_training_images(np.arange(N))
  attributor.save()
  stored = tmp_path / 'w' / 'student' / 'removed_images.json'
  assert json.loads(stored.read_text()) == {'removed_ids': removed}
  reloaded = Attributor.load(tmp_path / 'w')
  for a, r in zip(after, reloaded.attribute_batch(features=test_q, k=10)):
    np.testing.assert_array_equal(a.ids, r.ids)
  # An image added after a removal takes the id after the training set's, and can be removed in turn.
  assert reloaded.add_training_images(features=test_q[:1]).tolist() == [N]
  assert repr(reloaded) == (f"Attributor('{tmp_path / 'w'}': {N:,} training images (+1 added, {len(removed)} removed), "
                            f"no featurizer: pass features= ({test_q.shape[1]}-d), brute_force index)")
  assert N in reloaded.attribute(features=test_q[0], k=rest + 1).ids
  # Answers among a subset (removed ids in it left out, the added one in): the whole answer's order
  # restricted to it, with its scores, exact from the embeddings (here the index is exact too).
  among = np.concatenate([removed[:3], [N], np.random.default_rng(0).choice(N, 40, replace=False)])
  among = np.unique(among)
  kept = np.setdiff1d(among, removed)
  whole = reloaded.attribute_batch(features=test_q[:6], k=rest + 1)
  monkeypatch.setattr(attrib.among, 'EMBEDDED_AT_ONCE', 16)  # the subset's embeddings read in parts
  for _ in range(2):  # the added image unsaved, then saved (its row then read from embeddings.npy)
    for w, a in zip(whole, reloaded.attribute_batch(features=test_q[:6], k=len(kept), among=among.tolist())):
      in_among = np.isin(w.ids, among)
      np.testing.assert_array_equal(a.ids, w.ids[in_among])
      np.testing.assert_allclose(a.scores, w.scores[in_among], rtol=1e-5)
    reloaded.save()
  np.testing.assert_array_equal(reloaded.attribute(features=test_q[0], k=3, among=among).ids,
                                whole[0].ids[np.isin(whole[0].ids, among)][:3])
  # A large subset (an eighth of the images or more) is found through the index, asked deeper while a
  # query has fewer than k of it: here none of query 0's first 150, so 80 neighbours and then 160.
  large = np.setdiff1d(np.arange(N + 1), whole[0].ids[:150])
  for k in (10, len(np.setdiff1d(large, removed))):  # the second reads the whole ranking
    for w, a in zip(whole, reloaded.attribute_batch(features=test_q[:6], k=k, among=large)):
      in_large = np.isin(w.ids, large)
      np.testing.assert_array_equal(a.ids, w.ids[in_large][:k])
      np.testing.assert_allclose(a.scores, w.scores[in_large][:k], rtol=1e-5)
  np.testing.assert_array_equal(reloaded.attribute(features=test_q[0], among=kept[:4]).ids,  # k: all 4, not 10
                                whole[0].ids[np.isin(whole[0].ids, kept[:4])])
  assert len(reloaded.attribute(features=test_q[0]).ids) == 10
  with pytest.raises(AttributionError, match=rf'k must be an integer in \[1, {len(kept)}\], got {len(kept) + 1} '
                                             r'\(the ids to answer among, less any removed\)'):
    reloaded.attribute(features=test_q[0], k=len(kept) + 1, among=among)
  with pytest.raises(AttributionError, match=rf'training ids \[{N + 1}\] are not in \[0, {N + 1}\)'):
    reloaded.attribute(features=test_q[0], among=[0, N + 1])
  with pytest.raises(AttributionError, match='all 2 training ids to answer among are removed'):
    reloaded.attribute(features=test_q[0], k=1, among=removed[:2])
  assert reloaded.remove_training_images([N]).tolist() == [N]
  reloaded.save()
  assert json.loads(stored.read_text()) == {'removed_ids': removed + [N]}
  assert N not in Attributor.load(tmp_path / 'w').attribute(features=test_q[0], k=rest).ids
  # The command: inline or from a file; what it did in remove_result.json.
  (tmp_path / 'ids.txt').write_text('5\n17\n')
  assert launch_main(['attrib', 'remove', '--workdir', str(tmp_path / 'w'), '--ids-file', str(tmp_path / 'ids.txt')]) == 0
  assert launch_main(['attrib', 'remove', '--workdir', str(tmp_path / 'w'), '--ids', f'17,{removed[0]},40']) == 0
  result = json.loads((tmp_path / 'w' / 'remove_result.json').read_text())
  assert (result['removed'], result['already_removed'], result['removed_training_images']) == (1, 2, len(removed) + 4)
  assert json.loads(stored.read_text())['removed_ids'] == sorted(removed + [N, 5, 17, 40])
  # The student is still measured against the teacher's rankings of the whole training set.
  assert launch_main(evaluate) == 0
  assert json.loads((tmp_path / 'w' / 'eval_result.json').read_text())['map'] == table
  capsys.readouterr()
  assert launch_main(['attrib', 'remove', '--workdir', str(tmp_path / 'w'), '--ids', '3,9999']) == 2
  assert 'training ids [9999] are not in [0, 601)' in capsys.readouterr().err
  # A list that is not this student's (hand-edited, or from another training set) is named on load.
  stored.write_text(json.dumps({'removed_ids': [3, 5000]}))
  with pytest.raises(IndexFileError, match='removed_images.json: ids must be distinct and in \\[0, 601\\)'):
    Attributor.load(tmp_path / 'w')


def test_training_images_added_by_features_while_queries_run(release, tmp_path, capsys):
  """A student of precomputed features takes new training images as φ rows; queries from 8 threads
  run while they are added (one at a time) and never see half an addition."""
  assert _distill(release, tmp_path / 'w', CPU1, ['--set', 'distill.epochs=2']) == 0
  from attrib import Attributor, AttributionError
  attributor = Attributor.load(tmp_path / 'w')
  data = np.load(release / 'feats' / 'toy' / 'data_feats.npy')
  test_q = np.load(release / 'feats' / 'toy' / 'test_query_feats.npy')
  copies = data[np.arange(20) * 7]  # copies of training rows 0, 7, ..., 133: ids 600..619
  failures, stop = [], threading.Event()
  def query(t):
    while not stop.is_set():
      try:
        for answer in attributor.attribute_batch(features=test_q[t::8], k=N):
          # Every id answered is held whole: rows, prior and scores of the same addition.
          assert len(answer.ids) == N and answer.ids.max() < len(attributor.index) and np.all(np.isfinite(answer.scores))
        # Among every image there is so far: unsaved rows read beside the saved file's as they arrive.
        for answer in attributor.attribute_batch(features=test_q[t::8], among=np.arange(len(attributor.index))):
          assert len(answer.ids) == 10 and np.all(np.isfinite(answer.scores))
      except Exception as e:  # noqa: BLE001 (reported below, with the thread's query)
        failures.append(repr(e))
  threads = [threading.Thread(target=query, args=(t,)) for t in range(8)]
  [t.start() for t in threads]
  added = [attributor.add_training_images(features=row) for row in copies]
  stop.set()
  [t.join() for t in threads]
  assert not failures, failures[:3]
  assert np.concatenate(added).tolist() == list(range(600, 620))
  # A copy scores as its original in every answer over all rows, and among all rows as well.
  for answer, among in zip(attributor.attribute_batch(features=test_q, k=620),
                           attributor.attribute_batch(features=test_q, k=620, among=range(620))):
    score = dict(zip(answer.ids.tolist(), answer.scores.tolist()))
    for n in range(20):
      assert abs(score[600 + n] - score[7 * n]) < 1e-5
    assert sorted(among.ids.tolist()) == list(range(620))
    np.testing.assert_allclose(among.scores, [score[i] for i in among.ids.tolist()], rtol=1e-5)
  attributor.save()
  # The training set's rows again: 20 of them were just added (ids 600..619), so refused unless meant.
  again = ['attrib', 'add', '--workdir', str(tmp_path / 'w'), '--features', str(release / 'feats' / 'toy' / 'data_feats.npy')]
  capsys.readouterr()
  assert launch_main(again) == 2
  assert '20 of its 600 images repeat an image with the same caption: row 0 (added before as id 600), row 7 ' \
      '(added before as id 601)' in capsys.readouterr().err
  assert launch_main(again + ['--allow-repeats']) == 0
  assert json.loads((tmp_path / 'w' / 'add_result.json').read_text())['index_rows'] == 1220
  reloaded = Attributor.load(tmp_path / 'w')
  assert len(reloaded.index) == 1220 and reloaded.captions is None
  assert len(np.load(tmp_path / 'w' / 'student' / 'embeddings.npy')) == 1220
  with pytest.raises(AttributionError, match='loaded without a featurizer; add training images as features=φ rows'):
    reloaded.add_training_images(images=[np.zeros((16, 16), np.float32)], captions=['x'])
  with pytest.raises(AttributionError, match=r'\[n >= 1, 24\]'):
    reloaded.add_training_images(features=np.zeros((2, 23), np.float32))
  bad = data[:2].copy()
  bad[1, 0] = np.inf
  with pytest.raises(AttributionError, match=r'rows \[1\] hold NaN'):
    reloaded.add_training_images(features=bad)
  with pytest.raises(AttributionError, match='no new training images'):
    reloaded.add_training_images(features=np.zeros((0, 24), np.float32))
  assert len(reloaded.index) == 1220  # nothing was added by the refused calls


def test_sharded_training_matches_one_device(release, tmp_path):
  assert _distill(release, tmp_path / 'one', CPU1, ['--set', 'distill.epochs=2']) == 0
  assert _distill(release, tmp_path / 'eight', CPU8, ['--set', 'distill.epochs=2']) == 0
  from core.metrics import read_metrics
  from tests.tolerance import assert_network_close
  one = np.array([m['loss'] for m in read_metrics(tmp_path / 'one' / 'student')])
  eight = np.array([m['loss'] for m in read_metrics(tmp_path / 'eight' / 'student')])
  # Sums: the MLP's fan-ins (24 + 64 + 64), the cosine (32) and the batch mean (512), per update.
  assert_network_close(eight, one, reduction_length=(24 + 64 + 64 + 32 + 512) * 30, what='distill losses')


def test_distilling_on_two_processes_matches_one(release, tmp_path):
  """A multi-host slice: two processes of four devices train, embed and index as one of eight. Before,
  the embedding step fetched arrays other hosts held (a crash after training), and each host drew
  the batch's outliers from its own generator (another model than one host trains)."""
  from tests.helpers import CPU2X4, free_port, launch
  assert _distill(release, tmp_path / 'one', CPU8, ['--set', 'distill.epochs=2']) == 0
  port, args = free_port(), ['attrib', 'distill', '--config', str(release / 'config.py'), '--workdir', str(tmp_path / 'two'),
                             '--tpu', CPU2X4, '--features', str(release / 'feats' / 'toy'), '--ranks',
                             str(release / 'influence_train.pkl'), '--set', 'distill.seed=1', '--set', 'distill.epochs=2']
  procs = [launch(args + ['--coordinator', f'127.0.0.1:{port}', '--num-processes', '2', '--process-id', str(i)],
                  devices=4) for i in range(2)]
  for proc in procs:
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, out[-3000:]
  from core.metrics import read_metrics
  from tests.tolerance import assert_network_close
  one, two = (np.array([m['loss'] for m in read_metrics(tmp_path / w / 'student')]) for w in ('one', 'two'))
  assert len(two) == len(one) > 1
  reduction = (24 + 64 + 64 + 32 + 512) * 30  # as test_sharded_training_matches_one_device
  assert_network_close(two, one, reduction_length=reduction, what='distill losses')
  embeddings = [np.load(tmp_path / w / 'student' / 'embeddings.npy') for w in ('one', 'two')]
  assert_network_close(embeddings[1], embeddings[0], reduction_length=reduction, what='embedded training set')
  results = [json.loads((tmp_path / w / 'distill_result.json').read_text()) for w in ('one', 'two')]
  assert results[1]['index']['rows'] == results[0]['index']['rows'] == N


def test_resumed_distillation_equals_uninterrupted(release, tmp_path, capsys):
  assert _distill(release, tmp_path / 'straight', CPU1, ['--set', 'distill.epochs=2']) == 0
  assert _distill(release, tmp_path / 'resumed', CPU1, ['--set', 'distill.epochs=1']) == 0
  # Same workdir and features: a longer run continues from the checkpoint, pairs and outliers included.
  assert _distill(release, tmp_path / 'resumed', CPU1, ['--set', 'distill.epochs=2']) == 0
  from core.metrics import read_metrics
  a = {m['step']: m['loss'] for m in read_metrics(tmp_path / 'straight' / 'student')}
  b = {m['step']: m['loss'] for m in read_metrics(tmp_path / 'resumed' / 'student')}
  common = sorted(set(a) & set(b))
  assert len(common) >= 7 and common[-1] == 74 and [a[s] for s in common] == [b[s] for s in common]
  np.testing.assert_array_equal(np.load(tmp_path / 'straight' / 'student' / 'embeddings.npy'),
                                np.load(tmp_path / 'resumed' / 'student' / 'embeddings.npy'))

  # Other rankings or settings must not resume this student (it would mix two trainings): refused,
  # naming what changed, before anything is written.
  student = tmp_path / 'resumed' / 'student'
  stored = (student / 'config.json').read_text()
  assert _distill(release, tmp_path / 'resumed', CPU1, ['--set', 'distill.epochs=2', '--set', 'distill.seed=2']) == 2
  err = capsys.readouterr().err
  assert str(student) in err and 'distill.seed' in err and 'ranks_sha256' not in err
  ranks = load_rank_pickle(release / 'influence_train.pkl').copy()
  ranks[0, [0, 1]] = ranks[0, [1, 0]]  # one query's top two swapped
  other = tmp_path / 'other'
  other.mkdir()
  with open(other / 'influence_train.pkl', 'wb') as f:
    pickle.dump({'random': {'rank': ranks}}, f)
  code = launch_main(['attrib', 'distill', '--config', str(release / 'config.py'), '--workdir', str(tmp_path / 'resumed'),
                      '--tpu', CPU1, '--features', str(release / 'feats' / 'toy'), '--ranks', str(other / 'influence_train.pkl'),
                      '--set', 'distill.seed=1', '--set', 'distill.epochs=2'])
  assert code == 2 and 'ranks_sha256' in capsys.readouterr().err
  assert (student / 'config.json').read_text() == stored
  np.testing.assert_array_equal(np.load(tmp_path / 'straight' / 'student' / 'embeddings.npy'),
                                np.load(student / 'embeddings.npy'))
  # A student from before the inputs were recorded is held to its stored settings and rankings' path.
  legacy = json.loads(stored)
  legacy.pop('trained_on')
  (student / 'config.json').write_text(json.dumps(legacy))
  assert _distill(release, tmp_path / 'resumed', CPU1, ['--set', 'distill.epochs=2', '--set', 'distill.seed=2']) == 2
  assert 'distill.seed' in capsys.readouterr().err
  assert _distill(release, tmp_path / 'resumed', CPU1, ['--set', 'distill.epochs=2']) == 0  # the same: resumes
  assert 'trained_on' in json.loads((student / 'config.json').read_text())
  # A rerun of the finished student keeps its embeddings and index, so an index sharded since by `attrib
  # index --shards 2` stays as it is (it had been embedded and indexed again, unsharded); more epochs
  # train on and index again.
  assert 'embedded and indexed already: kept as it is' in capsys.readouterr().err
  assert launch_main(['attrib', 'index', '--workdir', str(tmp_path / 'resumed'), '--shards', '2']) == 0
  sharded = {p: p.read_bytes() for p in (student / 'index').rglob('*') if p.is_file()}
  assert (student / 'index' / 'shards.json').is_file()
  # Without --config, --features, --ranks and --tpu: the student's recorded ones (its config is not the
  # default fastgda_digits.py, its features and rankings not in the workdir).
  assert launch_main(['attrib', 'distill', '--workdir', str(tmp_path / 'resumed')]) == 0
  assert 'embedded and indexed already: kept as it is' in capsys.readouterr().err
  assert {p: p.read_bytes() for p in (student / 'index').rglob('*') if p.is_file()} == sharded
  assert json.loads((tmp_path / 'resumed' / 'distill_result.json').read_text())['index']['rows'] == N
  assert launch_main(['attrib', 'distill', '--workdir', str(tmp_path / 'resumed'), '--set', 'distill.epochs=3']) == 0
  err = capsys.readouterr().err
  assert 'building the ScaNN index' in err and 'embedded and indexed already' not in err


def test_map_equals_scikit_learn():
  from sklearn.metrics import average_precision_score
  rng = np.random.default_rng(0)
  for _ in range(20):
    predicted = rng.permutation(200)
    teacher = rng.permutation(200)
    for top_l in (1, 5, 40):
      expected = average_precision_score(np.isin(predicted, teacher[:top_l]).astype(int),
                                         1.0 / (np.arange(200) + 1))
      assert abs(average_precision(predicted, teacher[:top_l]) - expected) < 1e-12
  perfect = rng.permutation(50)
  assert mean_average_precision(perfect[None], perfect[None], 10) == (1.0, 0.0)


def test_paired_comparison_by_hand():
  # Teacher order 0, 1, 2, 3; L = 2. The teacher's own order has AP 1, the reversed order 3, 2, 1, 0
  # finds the two positives at ranks 3 and 4: AP = (1/3 + 2/4) / 2 = 5/12.
  teacher = np.tile(np.arange(4), (3, 1))
  ahead, behind = np.arange(4), np.arange(4)[::-1]
  predicted = np.stack([ahead, ahead, behind])
  reference = np.stack([behind, behind, ahead])
  result = paired_comparison(predicted, reference, teacher, (2, 9))
  assert set(result) == {'mAP(2)'}  # L beyond the teacher's ranking is left out
  diffs = np.array([7 / 12, 7 / 12, -7 / 12])
  got = result['mAP(2)']
  assert abs(got['difference'] - 7 / 36) < 1e-12
  assert abs(got['stderr'] - diffs.std(ddof=1) / np.sqrt(3)) < 1e-12
  assert abs(got['stderr'] - np.sqrt(((14 / 36) ** 2 * 2 + (28 / 36) ** 2) / 2 / 3)) < 1e-12
  assert (got['wins'], got['ties'], got['losses'], got['queries']) == (2, 0, 1, 3)


def test_rerank_by_student_by_hand():
  from attrib.attributor import rerank_by_student
  from attrib.fastgda_config import FastGDAConfig
  ids = np.array([[10, 11, 12, 13, 14], [20, 21, 22, 23, 24]])
  key = np.array([[0.1, 0.9, 0.5, 5.0, 6.0], [0.3, 0.3, 0.7, -1.0, 9.0]])
  order = rerank_by_student(ids, key, 3)
  # Row 0: the first three by descending key (11, 12, 10), then 13, 14 untouched whatever their key.
  # Row 1: 22 first, then the tie 20 / 21 kept in φ's order.
  np.testing.assert_array_equal(np.take_along_axis(ids, order, axis=1), [[11, 12, 10, 13, 14], [22, 20, 21, 23, 24]])
  np.testing.assert_array_equal(rerank_by_student(ids, key, 9)[0], [4, 3, 1, 2, 0])  # m past the row: all sorted
  with pytest.raises(ConfigError, match='rerank_candidates'):
    FastGDAConfig(rerank_candidates=-1)


def test_code_in_a_rank_pickle_is_refused(tmp_path):
  class Evil:
    def __reduce__(self):
      import os
      return (os.system, ('echo pwned > ' + str(tmp_path / 'pwned'),))
  with open(tmp_path / 'influence_train.pkl', 'wb') as f:
    pickle.dump({'random': {'rank': np.zeros((2, 3), np.int64)}, 'x': Evil()}, f)
  with pytest.raises(StudentDataError, match='influence_train.pkl.*posix.system|influence_train.pkl.*os.system'):
    load_rank_pickle(tmp_path / 'influence_train.pkl')
  assert not (tmp_path / 'pwned').exists()
  (tmp_path / 'cut.pkl').write_bytes(pickle.dumps({'rank': np.zeros((2, 3), np.int64)})[:40])
  with pytest.raises(StudentDataError, match='cut.pkl'):
    load_rank_pickle(tmp_path / 'cut.pkl')


def test_bad_student_inputs_are_named_before_work(release, tmp_path, capsys):
  bad = tmp_path / 'bad'
  bad.mkdir()
  with open(bad / 'ranks.pkl', 'wb') as f:
    pickle.dump({'random': {'rank': np.full((TRAIN_Q, M), N + 5)}}, f)
  (release / 'config.py').write_text(CONFIG)
  code = launch_main(['attrib', 'distill', '--config', str(release / 'config.py'), '--workdir', str(tmp_path / 'w'),
                      '--features', str(release / 'feats' / 'toy'), '--ranks', str(bad / 'ranks.pkl')])
  assert code == 2 and 'ranks.pkl' in capsys.readouterr().err
  code = launch_main(['attrib', 'distill', '--config', str(release / 'config.py'), '--workdir', str(tmp_path / 'w'),
                      '--features', str(bad), '--ranks', str(release / 'influence_train.pkl')])
  assert code == 2 and 'data_feats.npy' in capsys.readouterr().err
  nan = tmp_path / 'nan'
  shutil.copytree(release / 'feats' / 'toy', nan)
  feats = np.load(nan / 'data_feats.npy')
  feats[[7, 70001 % len(feats)], 3] = [np.nan, np.inf]
  np.save(nan / 'data_feats.npy', feats)
  code = launch_main(['attrib', 'distill', '--config', str(release / 'config.py'), '--workdir', str(tmp_path / 'w'),
                      '--features', str(nan), '--ranks', str(release / 'influence_train.pkl')])
  assert code == 2 and f'data_feats.npy: rows {sorted({7, 70001 % len(feats)})} hold NaN or infinity' in \
      capsys.readouterr().err
  assert not (tmp_path / 'w').exists()


PRIOR_CONFIG = '''
from attrib.embedder import EmbedderConfig
from attrib.fastgda_config import DistillConfig, FastGDAConfig
from attrib.index import IndexConfig

def get_config():
  return FastGDAConfig(feature='toy', map_at=(10, 30), rerank_candidates=100,
                       embedder=EmbedderConfig(hidden=(64, 64), output_dim=32, initial_scale=-1.0, image_prior=True),
                       distill=DistillConfig(batch=512, epochs=30, val_queries=10, log_every=10),
                       index=IndexConfig(recall_probes=100))
'''


def test_image_prior_learns_a_per_image_term_the_cosine_cannot_hold(tmp_path):
  """Influence = cosine + a term of the training image alone (its 7th feature), as an image whose loss
  moves more under any unlearning step ranks higher for every query. The student with `image_prior`
  learns that term (its c(z) tracks it), ranks better than without it, and the Attributor orders and
  scores by the same full logit as the evaluation, reranking φ's top M or searching the whole index."""
  rng = np.random.default_rng(1)
  data = rng.standard_normal((N, D)).astype(np.float32)
  train_q, test_q = (rng.standard_normal((n, D)).astype(np.float32) for n in (TRAIN_Q, TEST_Q))
  feats = tmp_path / 'feats' / 'toy'
  feats.mkdir(parents=True)
  for name, array in (('data_feats', data), ('train_query_feats', train_q), ('test_query_feats', test_q)):
    np.save(feats / f'{name}.npy', array)
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  image_term = 0.15 * data[:, 6]
  influence = lambda q: unit(q) @ unit(data).T + image_term
  candidates = np.argsort(-(unit(train_q) @ unit(data).T), axis=1)[:, :M]
  train_rank = np.stack([c[np.argsort(-influence(train_q)[q, c], kind='stable')] for q, c in enumerate(candidates)])
  with open(tmp_path / 'influence_train.pkl', 'wb') as f:
    pickle.dump({'random': {'rank': train_rank}}, f)
  with open(tmp_path / 'influence_test.pkl', 'wb') as f:
    pickle.dump({'rank': np.argsort(-influence(test_q), axis=1, kind='stable')}, f)
  (tmp_path / 'config.py').write_text(PRIOR_CONFIG)
  results = {}
  for name, prior, rerank in (('with', 'true', 100), ('without', 'false', 100), ('whole_index', 'true', 0)):
    work = tmp_path / name
    assert launch_main(['attrib', 'distill', '--config', str(tmp_path / 'config.py'), '--workdir', str(work),
                        '--tpu', CPU1, '--features', str(feats), '--ranks', str(tmp_path / 'influence_train.pkl'),
                        '--set', f'embedder.image_prior={prior}', '--set', f'rerank_candidates={rerank}']) == 0
    assert launch_main(['attrib', 'eval', '--workdir', str(work), '--ranks', str(tmp_path / 'influence_test.pkl')]) == 0
    table = json.loads((work / 'eval_result.json').read_text())['map']
    results[name] = table['FastGDA(toy)']
    results[f'{name} no rerank'] = table.get('FastGDA(toy) no rerank')
  learned = np.load(tmp_path / 'with' / 'student' / 'image_prior.npy')
  summary = json.loads((tmp_path / 'with' / 'distill_result.json').read_text())['image_prior']
  assert abs(summary['std'] - learned.std()) < 1e-6 and summary['std'] > 0
  assert learned.shape == (N,) and not (tmp_path / 'without' / 'student' / 'image_prior.npy').exists()
  # Influential = low logit, so c(z) falls as the planted term rises.
  # Measured: correlation -0.99; mAP(10) 0.61 with the prior, 0.27 without.
  assert np.corrcoef(learned, image_term)[0, 1] < -0.95, np.corrcoef(learned, image_term)[0, 1]
  assert results['with']['mAP(10)']['mean'] > results['without']['mAP(10)']['mean'] + 0.25, results
  from attrib import Attributor
  answers = Attributor.load(tmp_path / 'with').attribute_batch(features=test_q, k=M)
  assert all(np.all(np.diff(a.scores) >= -1e-6) for a in answers)  # ordered by the logit that scores them
  (tmp_path / 'with' / 'student' / 'image_prior.npy').unlink()
  from attrib.index import IndexFileError
  with pytest.raises(IndexFileError, match=r'with/student/image_prior.npy not found'):
    Attributor.load(tmp_path / 'with')
  # Searching the whole index: each row carries −c(z) as one more coordinate, so ScaNN's maximum inner
  # product is the exact ranking by the full logit a·cos + c(z), lowest first, here and after a rebuild
  # as merged shards.
  work = tmp_path / 'whole_index'
  # Measured: 0.375 against 0.148 for the student without the term, both over the whole index; the
  # same student as `with` (reranking changes no training), so the same as its own no-rerank row.
  assert results['whole_index']['mAP(10)'] == results['with no rerank']['mAP(10)']
  assert results['whole_index']['mAP(10)']['mean'] > results['without no rerank']['mAP(10)']['mean'] + 0.15, results
  attributor = Attributor.load(work)
  assert attributor.index.dim == 32 + 1
  cosine = np.asarray(attributor._embed(test_q)) @ np.load(work / 'student' / 'embeddings.npy').T
  logit = attributor.scale * cosine + np.load(work / 'student' / 'image_prior.npy')[None, :]
  expected = np.argsort(logit, axis=1, kind='stable')[:, :20]
  for sharded in (False, True):
    if sharded:
      assert launch_main(['attrib', 'index', '--workdir', str(work), '--shards', '2']) == 0
      attributor = Attributor.load(work)
    answers = attributor.attribute_batch(features=test_q, k=20)
    np.testing.assert_array_equal(np.stack([a.ids for a in answers]), expected)
    np.testing.assert_allclose(np.stack([a.cosine for a in answers]), np.take_along_axis(cosine, expected, axis=1),
                               atol=1e-5)
    assert all(np.all(np.diff(a.scores) >= -1e-6) for a in answers)


def test_non_finite_features_are_found_past_the_first_chunk(tmp_path):
  from attrib.student_data import load_features
  feats = np.zeros((70_000, 2), np.float32)  # checked 65,536 rows at a time
  np.save(tmp_path / 'data_feats.npy', feats)
  assert load_features(tmp_path, 'train').shape == (70_000, 2)
  feats[[69_998, 69_999], 1] = [np.nan, -np.inf]
  np.save(tmp_path / 'data_feats.npy', feats)
  with pytest.raises(StudentDataError, match=r'data_feats.npy: rows \[69998, 69999\] hold NaN'):
    load_features(tmp_path, 'train')
