"""Released-model path: a diffusers state dict + precomputed latents/text states in FastGDA's layout
are imported, checked, and ranked by the teacher (one process and two)."""
import json

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel as TorchUNet

from attrib.precomputed import PrecomputedDataError
from attrib.unet_config import UNetConfig
from core.torch_layout import WeightImportError
from tests.helpers import CPU1, CPU2X4, CPU8, free_port, launch, outputs_of
from tests.tolerance import assert_network_close, network_bound, total_fan_in

UNET = UNetConfig(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                  cross_attention_levels=(True, True), layers_per_block=1, num_attention_heads=2,
                  cross_attention_dim=24, norm_num_groups=8)
N, CAPTIONS, TOKENS = 12, 3, 5
CONFIG = f'''
from attrib.config import DiffusionConfig, ImageDataConfig
from attrib.diffusion import ScheduleConfig
from attrib.unet_config import UNetConfig

def get_config():
  return DiffusionConfig(unet=UNetConfig(**{UNET.__dict__!r}),
                         schedule=ScheduleConfig(beta_schedule='linear', beta_start=1e-4, beta_end=0.02),
                         data=ImageDataConfig(train_path='latents:TRAINSET', text_len={TOKENS}))
'''
TEACHER_SETTINGS = ['--set', 'query_grad_samples=64', '--set', 'step_size=0.005', '--set', 'fisher_samples_per_image=1']


def _torch_unet():
  torch.manual_seed(0)
  model = TorchUNet(**UNET.diffusers_kwargs()).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.02 * torch.randn_like(p))
  return model


@pytest.fixture(scope='module')
def released(tmp_path_factory):
  """A miniature FastGDA release: model.bin, trainset/ (N + N flipped rows, 3 captions), query_test/."""
  root = tmp_path_factory.mktemp('release')
  model = _torch_unet()
  torch.save(model.state_dict(), root / 'model.bin')
  rng = np.random.default_rng(0)
  latents = rng.standard_normal((N, 4, 8, 8)).astype(np.float32)
  text = rng.standard_normal((N, CAPTIONS, TOKENS, 24)).astype(np.float32)
  (root / 'trainset').mkdir()
  np.save(root / 'trainset' / 'latents.npy', np.concatenate([latents, latents[..., ::-1]]))
  np.save(root / 'trainset' / 'text_embeddings.npy', text)
  # Query 0 is training image 2 with its first caption; query 1 is new.
  # (With random weights the query need not rank its own source first: that is checked on trained models.)
  (root / 'query_test').mkdir()
  np.save(root / 'query_test' / 'latents.npy', np.stack([latents[2], rng.standard_normal((4, 8, 8)).astype(np.float32)]))
  np.save(root / 'query_test' / 'text_embeddings.npy', np.stack([text[2, :1], rng.standard_normal((1, TOKENS, 24)).astype(np.float32)]))
  (root / 'config.py').write_text(CONFIG.replace('TRAINSET', str(root / 'trainset')))
  return root, model


def _run(args, devices=1):
  process = launch(args, devices=devices)
  out = process.communicate(timeout=600)[0]
  return process.returncode, out


def _import(released, workdir, weights='model.bin'):
  root, _ = released
  return _run(['attrib', 'import-diffusers', '--weights', str(root / weights), '--config', str(root / 'config.py'),
               '--tpu', CPU1, '--workdir', str(workdir)])


def test_import_matches_diffusers_and_teacher_ranks_released_data(released, tmp_path):
  root, torch_model = released
  code, out = _import(released, tmp_path / 'coco')
  assert code == 0, out[-3000:]
  result = json.loads((tmp_path / 'coco' / 'import_result.json').read_text())
  assert result['parameters'] == sum(p.numel() for p in torch_model.parameters())
  assert (result['training_images'], result['captions_per_image'], result['flipped_copies']) == (N, CAPTIONS, True)

  import jax
  from flax import nnx
  from attrib.commands import load_run, restore_unet
  config, tpu = load_run(tmp_path / 'coco')
  graphdef, params, _, _, step = restore_unet(tmp_path / 'coco', config, tpu)
  latents = np.load(root / 'trainset' / 'latents.npy')[:2]
  context = np.load(root / 'trainset' / 'text_embeddings.npy')[:2, 0]
  t = np.array([10, 900])
  with torch.no_grad():
    expected = torch_model(torch.tensor(latents), torch.tensor(t), torch.tensor(context)).sample.numpy()
  ours = jax.jit(lambda p, x, t, c: nnx.merge(graphdef, p)(x, t, c))(params, latents.transpose(0, 2, 3, 1), t, context)
  assert step == 0
  assert_network_close(np.asarray(ours).transpose(0, 3, 1, 2), expected, what='U-Net output',
                       reduction_length=total_fan_in(torch_model.parameters()))

  code, out = _run(['attrib', 'teacher', '--workdir', str(tmp_path / 'coco'), '--queries', '2', '--candidates', 'all',
                    '--query-dir', str(root / 'query_test')] + TEACHER_SETTINGS)
  assert code == 0, out[-3000:]
  assert 'teacher: query 2/2 ranked 12 candidates' in out  # one line per query, with the time left
  from attrib.curation import read_rank_records
  records = read_rank_records(tmp_path / 'coco' / 'teacher' / 'ranks.arrayrecord')
  assert [len(r['ranked_ids']) for r in records] == [N, N]
  assert all(np.all(np.diff(r['scores']) <= 0) for r in records)  # most influential first
  assert json.loads((tmp_path / 'coco' / 'teacher_result.json').read_text())['queries_whose_loss_rose'] == 2

  # Each score, recomputed one (row, caption) at a time: max over the two flips of the caption mean.
  from attrib.diffusion import NoiseSchedule
  from attrib.teacher import Teacher, TeacherConfig
  from core.config import load_config_file
  saved = dict(np.load(tmp_path / 'coco' / 'teacher' / 'queries' / 'query_00000.npz'))
  preset = load_config_file(CPU1)
  from core.mesh import make_mesh
  teacher = Teacher(graphdef, params, NoiseSchedule(config.schedule),
                    TeacherConfig(query_grad_samples=64, step_size=0.005, fisher_samples_per_image=1),
                    mesh=make_mesh(preset), rules=preset.logical_rules, num_training_images=N)
  fisher = dict(np.load(tmp_path / 'coco' / 'teacher_cache' / 'fisher_step0_s1_n0.npz'))
  query_latent = np.load(root / 'query_test' / 'latents.npy')[0].transpose(1, 2, 0)
  query_text = np.load(root / 'query_test' / 'text_embeddings.npy')[0, 0]
  kv = teacher.unlearn(fisher, query_latent, query_text, 0)
  all_latents = np.load(root / 'trainset' / 'latents.npy').transpose(0, 2, 3, 1)
  all_text = np.load(root / 'trainset' / 'text_embeddings.npy')
  # A score differs from its recomputation by at most the error of the losses it is made of.
  length = total_fan_in(torch_model.parameters()) + 20 * all_latents[0].size
  for i in (0, 2, 7):
    per_flip, largest_loss = [], 0.0
    for flip in range(2):
      row = flip * N + i
      deltas = []
      for c in range(CAPTIONS):
        args = (all_latents[[row]], all_text[[i], c], np.array([row * CAPTIONS + c]))
        after, before = teacher.losses(kv, *args)[0], teacher.losses(teacher.kv0, *args)[0]
        deltas.append(after - before)
        largest_loss = max(largest_loss, after, before)
      per_flip.append(np.mean(deltas))
    score = saved["scores"][list(saved["candidates"]).index(i)]
    assert abs(score - max(per_flip)) <= 2 * network_bound(length) * largest_loss, (i, score, per_flip)


@pytest.mark.slow  # ~75 s on 2 cores (multi-host training is in the default suite: test_train)
def test_teacher_on_two_processes_matches_one(released, tmp_path):
  root, torch_model = released
  assert _import(released, tmp_path / 'one')[0] == 0
  assert _import(released, tmp_path / 'two')[0] == 0
  args = ['--queries', '2', '--candidates', '6', '--query-dir', str(root / 'query_test')] + TEACHER_SETTINGS
  code, out = _run(['attrib', 'teacher', '--workdir', str(tmp_path / 'one'), '--tpu', CPU8] + args, devices=8)
  assert code == 0, out[-3000:]
  port = free_port()
  procs = [launch(['attrib', 'teacher', '--workdir', str(tmp_path / 'two'), '--tpu', CPU2X4,
                   '--coordinator', f'127.0.0.1:{port}', '--num-processes', '2', '--process-id', str(i)] + args,
                  devices=4) for i in range(2)]
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  result = json.loads((tmp_path / 'two' / 'teacher_result.json').read_text())
  assert result['processes'] == 2 and result['scored_this_run'] == 1  # process 0 scored query 0 only
  from attrib.curation import read_rank_records
  one = read_rank_records(tmp_path / 'one' / 'teacher' / 'ranks.arrayrecord')
  two = read_rank_records(tmp_path / 'two' / 'teacher' / 'ranks.arrayrecord')
  # Scores are loss differences: they agree to the losses' float32 error (the U-Net's and the mean's).
  length = total_fan_in(torch_model.parameters()) + 20 * int(np.prod(np.load(root / 'trainset' / 'latents.npy', mmap_mode='r').shape[1:]))
  largest_loss = float(np.nanmax(np.load(tmp_path / 'one' / 'teacher_cache' / 'base_losses_step0_stride50.npy')))
  tolerance = 2 * network_bound(length) * (largest_loss + max(float(np.abs(a['scores']).max()) for a in one))
  for a, b in zip(one, two):
    by_id = dict(zip(b['ranked_ids'].tolist(), b['scores']))
    assert sorted(by_id) == sorted(a['ranked_ids'].tolist())
    assert max(abs(s - by_id[i]) for i, s in zip(a['ranked_ids'].tolist(), a['scores'])) <= tolerance
    # The same order, except between scores closer than the tolerance.
    reordered = np.array([by_id[i] for i in a['ranked_ids'].tolist()])
    assert np.all(np.diff(reordered) <= 2 * tolerance)


@pytest.mark.slow  # ~60 s on 2 cores; the same stop is in the default suite for features and tokenize
def test_a_teacher_query_failing_on_one_process_stops_both(released, tmp_path):
  """Process 1's disk is full when it saves its query: process 0 ranks its own query, then both stop
  with process 1's error (before, process 0 waited at the barrier); the rerun ranks the missing one."""
  from tests.helpers import launch_with_full_disk
  assert _import(released, tmp_path / 'w')[0] == 0
  root, _ = released
  args = ['attrib', 'teacher', '--workdir', str(tmp_path / 'w'), '--tpu', CPU2X4, '--queries', '2', '--candidates', '6',
          '--query-dir', str(root / 'query_test')] + TEACHER_SETTINGS

  def two_processes(failing):
    port = free_port()
    process_args = [args + ['--coordinator', f'127.0.0.1:{port}', '--num-processes', '2', '--process-id', str(i)]
                    for i in range(2)]
    procs = [launch_with_full_disk('attrib.curation.save_npz_atomic', 1, a, devices=4) if failing
             else launch(a, devices=4) for a in process_args]
    return procs, outputs_of(procs, 400)
  procs, outputs = two_processes(failing=True)
  assert [p.returncode for p in procs] == [2, 2], outputs
  assert ('error: the disk is full (teacher: every query ranked: process 1 of 2 failed, so this one stops too: '
          'OSError: [Errno 28] No space left on device)') in outputs[0]
  queries = tmp_path / 'w' / 'teacher' / 'queries'
  assert sorted(p.name for p in queries.glob('*.npz')) == ['query_00000.npz']
  procs, outputs = two_processes(failing=False)
  assert [p.returncode for p in procs] == [0, 0], outputs
  assert json.loads((tmp_path / 'w' / 'teacher_result.json').read_text())['scored_this_run'] == 0  # on process 0
  assert sorted(p.name for p in queries.glob('*.npz')) == ['query_00000.npz', 'query_00001.npz']



@pytest.mark.slow  # ~30 s on 2 cores
def test_a_fisher_save_failing_on_process_0_stops_both_before_any_query(released, tmp_path):
  """Process 0 saves the Fisher alone; when its disk is full there, process 1 stops at once with that
  error. Before, process 1 ranked its share of the queries (hours at COCO scale), then waited for a
  process 0 that had exited, and JAX's shutdown ended both."""
  from tests.helpers import launch_with_full_disk
  assert _import(released, tmp_path / 'w')[0] == 0
  root, _ = released
  port = free_port()
  args = ['attrib', 'teacher', '--workdir', str(tmp_path / 'w'), '--tpu', CPU2X4, '--queries', '2', '--candidates', '6',
          '--query-dir', str(root / 'query_test'), '--coordinator', f'127.0.0.1:{port}', '--num-processes', '2'
          ] + TEACHER_SETTINGS
  procs = [launch_with_full_disk('attrib.curation.save_npz_atomic', 0, args + ['--process-id', str(i)], devices=4)
           for i in range(2)]
  outputs = outputs_of(procs, 400)
  assert [p.returncode for p in procs] == [2, 2], outputs
  assert 'error: the disk is full ([Errno 28] No space left on device)' in outputs[0]
  assert ('error: the disk is full (teacher: the Fisher and the settings saved: process 0 of 2 failed, so this one '
          'stops too: OSError: [Errno 28] No space left on device)') in outputs[1]
  assert not any('teacher: query' in out for out in outputs)
  assert not list((tmp_path / 'w' / 'teacher' / 'queries').glob('*.npz'))


def test_bad_release_files_are_named_before_any_work(released, tmp_path):
  root, torch_model = released
  from attrib.precomputed import PrecomputedLatents
  bad = tmp_path / 'bad'
  bad.mkdir()
  np.save(bad / 'latents.npy', np.zeros((2 * N - 1, 4, 8, 8), np.float32))
  np.save(bad / 'text_embeddings.npy', np.zeros((N, CAPTIONS, TOKENS, 24), np.float32))
  with pytest.raises(PrecomputedDataError, match=r'latents\.npy: 23 rows for 12 images'):
    PrecomputedLatents(bad, UNET, flipped_copies=True)
  np.save(bad / 'latents.npy', np.zeros((N, 4, 8, 8), np.float32))
  np.save(bad / 'text_embeddings.npy', np.zeros((N, CAPTIONS, TOKENS, 32), np.float32))
  with pytest.raises(PrecomputedDataError, match=r'text_embeddings\.npy: shape .*cross_attention_dim'):
    PrecomputedLatents(bad, UNET, flipped_copies=True)
  (bad / 'text_embeddings.npy').unlink()
  with pytest.raises(PrecomputedDataError, match=r'text_embeddings\.npy not found'):
    PrecomputedLatents(bad, UNET, flipped_copies=True)

  from attrib.released import read_state_dict
  from safetensors.numpy import save_file
  weights = {k: v.numpy() for k, v in torch_model.state_dict().items()}
  save_file(weights, str(tmp_path / 'model.safetensors'))
  loaded = read_state_dict(tmp_path / 'model.safetensors')
  assert all(np.array_equal(loaded[k], weights[k]) for k in weights)
  (tmp_path / 'broken.bin').write_bytes(b'not a pickle')
  with pytest.raises(WeightImportError, match='broken.bin'):
    read_state_dict(tmp_path / 'broken.bin')
  # A state dict of another config: refused, naming the tensor, and the workdir stays empty.
  del weights['conv_in.weight']
  torch.save({k: torch.tensor(v) for k, v in weights.items()}, tmp_path / 'partial.bin')
  code, out = _run(['attrib', 'import-diffusers', '--weights', str(tmp_path / 'partial.bin'),
                    '--config', str(root / 'config.py'), '--tpu', CPU1, '--workdir', str(tmp_path / 'w')])
  assert code != 0 and 'conv_in' in out and not (tmp_path / 'w').exists()


def test_a_diffusers_model_folder_is_read_as_its_weights_file(tmp_path):
  """`attrib import-diffusers --weights unet/` (a diffusers model folder, as save_pretrained writes
  it, fp16 variant too) said 'unet not found'; it reads the folder's weights file, and a pipeline's
  folder names its unet/."""
  from attrib.released import read_state_dict
  model = _torch_unet()
  torch.save(model.state_dict(), tmp_path / 'model.bin')
  model.save_pretrained(tmp_path / 'pipeline' / 'unet')
  model.half().save_pretrained(tmp_path / 'fp16' / 'unet', variant='fp16')
  (tmp_path / 'pipeline' / 'model_index.json').write_text('{}')
  from_file = read_state_dict(tmp_path / 'model.bin')
  for folder, exact in ((tmp_path / 'pipeline' / 'unet', True), (tmp_path / 'fp16' / 'unet', False)):
    from_folder = read_state_dict(folder)
    assert sorted(from_folder) == sorted(from_file)
    for name, value in from_file.items():
      expected = value if exact else value.astype(np.float16)
      np.testing.assert_array_equal(np.asarray(from_folder[name]), expected, err_msg=name)
  with pytest.raises(WeightImportError, match=r'pipeline: no diffusion_pytorch_model.safetensors .*; .*pipeline is a '
                                              r'diffusers pipeline: give its unet/ folder'):
    read_state_dict(tmp_path / 'pipeline')
