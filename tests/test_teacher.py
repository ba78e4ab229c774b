"""AbU teacher: unlearning raises the query's loss; scores repeat exactly and agree across layouts;
the curation job resumes per query and writes its rankings as records."""
import json

import jax
import numpy as np
import pytest
from flax import nnx

from attrib.diffusion import NoiseSchedule, ScheduleConfig
from attrib.teacher import Teacher, TeacherConfig, is_unlearned, padded_size, split_params
from attrib.unet import UNet2DConditionModel
from attrib.unet_config import UNetConfig
from core.config import load_config_file
from core.mesh import make_mesh
from tests.helpers import CPU1, CPU8, ROOT
from tests.tolerance import assert_network_close, network_bound, total_fan_in

UNET = UNetConfig(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32),
                  cross_attention_levels=(True, True), layers_per_block=1, num_attention_heads=2,
                  cross_attention_dim=24, norm_num_groups=8)


def _teacher(preset_path, params, graphdef, n):
  preset = load_config_file(preset_path)
  return Teacher(graphdef, params, NoiseSchedule(ScheduleConfig()), TeacherConfig(query_grad_samples=128, step_size=0.005),
                 mesh=make_mesh(preset), rules=preset.logical_rules, num_training_images=n)


@pytest.fixture(scope='module')
def setup():
  model = UNet2DConditionModel(UNET, nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  params = nnx.to_pure_dict(state)
  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, (24, 8, 8, 1)).astype(np.float32)
  context = rng.standard_normal((24, 5, 24)).astype(np.float32)
  return graphdef, params, images, context


def test_only_cross_attention_kv_is_unlearned(setup):
  graphdef, params, _, _ = setup
  kv, _ = split_params(params)
  # Cross-attentions: 2 down levels x 1 + mid 1 + 2 up levels x 2 = 7, each with to_k and to_v.
  assert len(kv) == 14 and all('attn2' in k and ('to_k' in k or 'to_v' in k) for k in kv)
  assert not is_unlearned(('down_blocks', 0, 'attentions', 0, 'transformer_blocks', 0, 'attn1', 'to_k', 'kernel'))


def test_unlearning_raises_query_loss_and_scores_are_reproducible(setup):
  graphdef, params, images, context = setup
  ids = np.arange(len(images), dtype=np.int32)
  teacher = _teacher(CPU1, params, graphdef, len(images))
  fisher = teacher.fisher(images, context)
  assert all(np.all(np.asarray(f) >= 0) and np.asarray(f).max() > 0 for f in fisher.values())
  query = 3
  kv = teacher.unlearn(fisher, images[query], context[query], query_seed=query)
  base = teacher.losses(teacher.kv0, images, context, ids)
  after = teacher.losses(kv, images, context, ids)
  assert after[query] > base[query] * 1.05  # the query itself got harder to denoise
  scores = teacher.scores(kv, base, images, context, ids)
  assert np.argmax(scores) == query  # the (training) query is its own most influenced image
  # Identical across runs ...
  again = _teacher(CPU1, params, graphdef, len(images))
  kv2 = again.unlearn(again.fisher(images, context), images[query], context[query], query_seed=query)
  np.testing.assert_array_equal(again.scores(kv2, base, images, context, ids), scores)
  # query_seed_offset draws the query gradient's noise from another seed: another ranking of the same
  # query, what benchmarks/teacher_agreement.py compares.
  redraw = Teacher(graphdef, params, NoiseSchedule(ScheduleConfig()),
                   TeacherConfig(query_grad_samples=128, step_size=0.005, query_seed_offset=5),
                   mesh=again.mesh, rules=again.rules, num_training_images=len(images))
  kv3 = redraw.unlearn(fisher, images[query], context[query], query_seed=query)
  kv4 = teacher.unlearn(fisher, images[query], context[query], query_seed=query + 5)
  leaves = lambda tree: [np.asarray(x) for x in jax.tree.leaves(tree)]
  assert all(np.array_equal(a, b) for a, b in zip(leaves(kv3), leaves(kv4)))
  assert not all(np.array_equal(a, b) for a, b in zip(leaves(kv3), leaves(kv)))
  # ... and across device layouts (candidates sharded over a (2, 2, 2) mesh).
  sharded = _teacher(CPU8, params, graphdef, len(images))
  fisher8 = sharded.fisher(images, context)
  kv8 = sharded.unlearn(fisher8, images[query], context[query], query_seed=query)
  # The Fisher's and the query gradient's samples are split over the devices, not computed whole on
  # each: their sums meet in an all-reduce, and they equal the one-device values to float rounding
  # (a mean of squared gradients, each through the network and a mean over 64 pixels).
  grad_length = total_fan_in(params, layout='jax') + images[0].size
  for name in fisher:
    assert_network_close(np.asarray(fisher8[name]), np.asarray(fisher[name]), reduction_length=grad_length,
                         what=f'Fisher {name}')
  for t in (teacher, sharded):
    hlo = t._query_grad.lower(t.params, t.kv0, images[query], context[query], query).compile().as_text()
    assert ('all-reduce' in hlo) == (t is sharded)
  base8 = sharded.losses(sharded.kv0, images, context, ids)
  after8 = sharded.losses(kv8, images, context, ids)
  # A loss is the U-Net's output through a mean over 20 timesteps x 64 pixels.
  length = total_fan_in(params, layout='jax') + 20 * images[0].size
  assert_network_close(base8, base, reduction_length=length, what='losses before')
  assert_network_close(after8, after, reduction_length=length, what='losses after')
  # A score is a difference of two such losses: its error is that of the losses, whatever its own size.
  scores8 = after8 - base8
  tolerance = 2 * network_bound(length) * float(after.max())
  assert np.max(np.abs(scores8 - scores)) <= tolerance
  # The same top 5, up to scores within that tolerance of each other.
  top5 = np.argsort(-scores8)[:5]
  assert np.all(scores[top5] >= np.sort(scores)[-5] - 2 * tolerance)


def test_scoring_calls_pad_to_few_shapes_and_padding_changes_no_loss(setup):
  # One query row stays one row; 96 candidates are one call of 96, 100 one of 128; never over `step`.
  assert [padded_size(n, 128, 1) for n in (1, 3, 17, 20, 33, 40, 96, 100, 128)] == [1, 4, 32, 32, 64, 64, 96, 128, 128]
  assert padded_size(200, 128, 1) == 128
  assert padded_size(1, 128, 8) == 8 and padded_size(20, 128, 8) == 32 and padded_size(33, 64, 3) == 33
  # Any subset, padded to its bucket, gives the losses of the same rows scored in the full set.
  graphdef, params, images, context = setup
  ids = np.arange(len(images), dtype=np.int32)
  teacher = _teacher(CPU1, params, graphdef, len(images))
  full = teacher.losses(teacher.kv0, images, context, ids)
  for rows in (np.array([5]), np.arange(3, 20), np.arange(24)[::-2]):
    length = total_fan_in(params, layout='jax') + 20 * images[0].size
    assert_network_close(teacher.losses(teacher.kv0, images[rows], context[rows], ids[rows]), full[rows],
                         reduction_length=length, what=f'{len(rows)} rows')
  # `shaped_like`: a few rows run in the program of the larger call they stand in for (one compiled
  # shape for any count of a query's uncached candidates), with the same losses.
  shapes = []
  real_call = teacher._per_example_loss
  teacher._per_example_loss = lambda params, kv, images_b, *rest: (shapes.append(len(images_b)),
                                                                  real_call(params, kv, images_b, *rest))[1]
  for rows in (np.array([5]), np.arange(3, 6), np.arange(3, 20)):
    assert_network_close(teacher.losses(teacher.kv0, images[rows], context[rows], ids[rows], shaped_like=20),
                         full[rows], reduction_length=length, what=f'{len(rows)} rows shaped like 20')
  assert shapes == [32, 32, 32]  # padded_size(20): without shaped_like 1, 4 and 32


def test_teachers_of_one_model_structure_share_compiled_programs(setup):
  # The quickstart ranks the train split, then the test split, in one process: the second Teacher
  # (a model restored again, same structure) must run what the first compiled, with its own θ₀.
  from attrib import teacher as teacher_module
  graphdef, params, images, context = setup
  ids = np.arange(8, dtype=np.int32)
  first = _teacher(CPU1, params, graphdef, len(images))
  first_losses = first.losses(first.kv0, images[:8], context[:8], ids)
  compiled = first._per_example_loss._cache_size()
  other_graphdef, other_state = nnx.split(UNet2DConditionModel(UNET, nnx.Rngs(1)))
  other_params = nnx.to_pure_dict(other_state)
  second = _teacher(CPU1, other_params, other_graphdef, len(images))
  second_losses = second.losses(second.kv0, images[:8], context[:8], ids)
  assert second._per_example_loss is first._per_example_loss
  assert first._per_example_loss._cache_size() == compiled  # nothing compiled again
  assert not np.allclose(second_losses, first_losses)  # θ₀ is an argument, not a baked-in constant
  teacher_module._programs.cache_clear()
  fresh = _teacher(CPU1, other_params, other_graphdef, len(images))
  assert fresh._per_example_loss is not first._per_example_loss
  np.testing.assert_array_equal(fresh.losses(fresh.kv0, images[:8], context[:8], ids), second_losses)
  # Another scoring setting is another program.
  preset = load_config_file(CPU1)
  strided = Teacher(graphdef, params, NoiseSchedule(ScheduleConfig()), TeacherConfig(score_timestep_stride=100),
                    mesh=make_mesh(preset), rules=preset.logical_rules, num_training_images=len(images))
  assert strided._per_example_loss is not fresh._per_example_loss and len(strided.score_timesteps) == 10


@pytest.mark.slow
def test_curation_job_resumes_per_query(tmp_path):
  from launch import main
  work = tmp_path / 'model'
  # 40 steps (loss ~0.3): unlearning needs a model that has learned something; at 3 steps (loss 1.1)
  # the Newton step is mostly noise and a query's loss can fall.
  assert main(['attrib', 'train-model', '--config', str(ROOT / 'attrib/configs/digits.py'), '--tpu', CPU1,
               '--workdir', str(work), '--set', 'train.steps=40', '--set', 'train.progress_bar=false',
               '--set', 'data.held_out=1697', '--set', 'sample.num_steps=5']) == 0
  args = ['attrib', 'teacher', '--workdir', str(work), '--queries', '2', '--candidates', '20',
          '--set', 'fisher_samples_per_image=1', '--set', 'query_grad_samples=8']
  assert main(args) == 0
  first = json.loads((work / 'teacher_result.json').read_text())
  assert first['scored_this_run'] == 2 and first['queries_whose_loss_rose'] == 2
  kept = dict(np.load(work / 'teacher' / 'queries' / 'query_00000.npz'))
  (work / 'teacher' / 'queries' / 'query_00001.npz').unlink()  # as if the job died on query 1
  assert main(args) == 0
  second = json.loads((work / 'teacher_result.json').read_text())
  assert second['scored_this_run'] == 1
  from attrib.curation import read_rank_records
  records = read_rank_records(work / 'teacher' / 'ranks.arrayrecord')
  assert [r['query'] for r in records] == [0, 1] and all(len(r['ranked_ids']) == 20 for r in records)
  np.testing.assert_array_equal(records[0]['ranked_ids'], kept['ranked_ids'])

  # More queries under other settings would mix two kinds of rankings in one split: refused, before
  # anything is computed or written, naming what changed (`--debug` raises instead of printing).
  from core.errors import ConfigError
  written = {p.name: p.stat().st_mtime_ns for p in (work / 'teacher').rglob('*')}
  with pytest.raises(ConfigError, match=r'teacher: its stored queries were ranked with other settings '
                                        r'\(query_grad_samples: 8 then, 16 now;.*settings.json'):
    main(['--debug', *args, '--queries', '3', '--set', 'query_grad_samples=16'])
  with pytest.raises(ConfigError, match=r"candidates: '20' then, '30' now"):
    main(['--debug', *args, '--queries', '3', '--candidates', '30'])
  # A split ranked before settings.json existed is held to its last result file.
  (work / 'teacher' / 'settings.json').unlink()
  with pytest.raises(ConfigError, match=r'step_size: 0.01 then, 0.02 now;.*teacher_result.json'):
    main(['--debug', *args, '--queries', '3', '--set', 'step_size=0.02'])
  assert {p.name: p.stat().st_mtime_ns for p in (work / 'teacher').rglob('*')} == \
      {name: t for name, t in written.items() if name != 'settings.json'}
  # The scoring calls' batch size may change: it changes no score.
  assert main([*args, '--queries', '3', '--set', 'candidate_batch=64']) == 0
  assert json.loads((work / 'teacher_result.json').read_text())['scored_this_run'] == 1


def test_more_queries_keep_the_stored_ones_bit_for_bit(tmp_path, monkeypatch):
  """Extending a split (`attrib teacher --queries 50` after 10) generates only the new queries: the
  stored images, which earlier rankings were computed on, must not be regenerated in other batches."""
  import types

  from attrib import curation
  calls = []

  def fake_generate(graphdef, params, config, context, uncond, seed, desc):
    calls.append(list(seed))
    # Depends on the batch size, as a real batched sampler's rounding may: regenerating would show.
    return np.stack([np.full((2, 2, 1), s + 0.001 * len(seed), np.float32) for s in seed])

  monkeypatch.setattr(curation, 'generate', fake_generate)
  captions = [f'a handwritten {d}' for d in ('zero', 'one', 'two', 'three', 'four', 'five')] * 8
  data = types.SimpleNamespace(held_out_captions=captions, uncond=None,
                               text_encoder=lambda prompts: (np.zeros((len(prompts), 3, 4), np.float32),))
  out = tmp_path / 'queries.npz'
  first, prompts3 = curation.make_queries(None, None, None, data, 3, out, 'test')
  assert calls == [[0, 1, 2]]
  images, prompts = curation.make_queries(None, None, None, data, 20, out, 'test')
  assert calls[1:] == [list(range(3, 19)), [19]]  # only the new ones, in batches of 16
  np.testing.assert_array_equal(images[:3], first)
  np.testing.assert_array_equal(images[3:, 0, 0, 0], np.r_[np.arange(3, 19) + 0.016, 19.001].astype(np.float32))
  assert prompts[:3] == prompts3 and len(prompts) == 20
  again, _ = curation.make_queries(None, None, None, data, 5, out, 'test')  # fewer: read back
  np.testing.assert_array_equal(again, images[:5])
  assert len(calls) == 3

  data.held_out_captions = ['a thick handwritten nine'] * 48  # another model's prompts: refused
  with pytest.raises(curation.ConfigError, match=r"queries.npz: query 0 was made from the prompt 'a handwritten zero'"):
    curation.make_queries(None, None, None, data, 25, out, 'test')


def test_a_split_only_grows_under_the_settings_its_queries_were_ranked_with(tmp_path):
  """The fast half of the check the slow job test above runs end to end."""
  from attrib.curation import check_same_ranking_settings
  from core.errors import ConfigError
  settings = {'teacher': {'query_grad_samples': 64, 'score_timestep_stride': 100}, 'candidates': '96',
              'model_step': 400, 'neighbours': None, 'query_dir': None}
  check_same_ranking_settings(tmp_path, 'train', settings)  # nothing stored yet
  queries = tmp_path / 'teacher_train' / 'queries'
  queries.mkdir(parents=True)
  (queries / 'query_00000.npz').write_bytes(b'')
  check_same_ranking_settings(tmp_path, 'train', settings)  # stored, but nothing says how: accepted
  (tmp_path / 'teacher_train_result.json').write_text(json.dumps(
      {'teacher': {'query_grad_samples': 64, 'score_timestep_stride': 50, 'candidate_batch': 128},
       'candidates': '96', 'model_step': 400}))
  with pytest.raises(ConfigError, match=r'score_timestep_stride: 50 then, 100 now;.*teacher_train_result.json'):
    check_same_ranking_settings(tmp_path, 'train', settings)
  (tmp_path / 'teacher_train' / 'settings.json').write_text(json.dumps(settings))  # the file wins
  check_same_ranking_settings(tmp_path, 'train', settings)
  check_same_ranking_settings(tmp_path, 'test', dict(settings, model_step=2000))  # another split
  with pytest.raises(ConfigError, match=r"candidates: '96' then, 'all' now; model_step: 400 then, 2000 now"):
    check_same_ranking_settings(tmp_path, 'train', dict(settings, model_step=2000, candidates='all'))


@pytest.mark.slow  # two training runs, one on two processes: ~2.5 minutes on 2 cores
def test_diffusion_model_trains_on_two_processes_as_on_one(tmp_path):
  """`attrib train-model` on two processes of four devices trains as one process of eight, and its
  closing samples (drawn across both hosts) are scored the same."""
  from launch import main
  from tests.helpers import CPU2X4, free_port, launch
  config = str(ROOT / 'attrib/configs/digits.py')
  common = ['attrib', 'train-model', '--config', config, '--set', 'train.steps=4', '--set', 'train.log_every=1',
            '--set', 'train.checkpoint_every=4', '--set', 'train.progress_bar=false', '--set', 'sample.num_steps=5']
  assert main(common + ['--tpu', CPU8, '--workdir', str(tmp_path / 'one')]) == 0
  port = free_port()
  procs = [launch(common + ['--tpu', CPU2X4, '--workdir', str(tmp_path / 'two'), '--coordinator', f'127.0.0.1:{port}',
                            '--num-processes', '2', '--process-id', str(i)], devices=4) for i in range(2)]
  for proc in procs:
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, out[-3000:]
  logged = [np.array([json.loads(line)['loss'] for line in (tmp_path / w / 'metrics.jsonl').read_text().splitlines()])
            for w in ('one', 'two')]
  assert len(logged[0]) == len(logged[1]) == 4
  run = load_config_file(config)
  params = nnx.to_pure_dict(nnx.split(UNet2DConditionModel(run.unet, nnx.Rngs(0)))[1])
  # Four updates, each through the U-Net and a mean over the batch's 64 images of 16x16 pixels.
  length = 4 * (total_fan_in(params, layout='jax') + run.train.global_batch * 16 * 16)
  assert_network_close(logged[1], logged[0], reduction_length=length, what='diffusion losses')
  samples = [json.loads((tmp_path / w / 'train_result.json').read_text())['samples'] for w in ('one', 'two')]
  assert samples[1]['nearest_neighbour_class_agreement'] == samples[0]['nearest_neighbour_class_agreement']
