"""Tokenizer training, dead-code restarts, image folders with odd files, and the resumable tokenize
job whose shards the LVM trains on."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from launch import main as launch_main
from lvm.tokenizer import TokenizerConfig, VQGAN
from lvm.tokenizer_task import TokenizerLoss, TokenizerTask
from tests.helpers import CPU1, ROOT

TINY_TOKENIZER = str(ROOT / 'lvm/configs/tokenizer_tiny.py')


@pytest.fixture(scope='module')
def tokenizer_dir(tmp_path_factory):
  work = tmp_path_factory.mktemp('tokenizer')
  assert launch_main(['lvm', 'train-tokenizer', '--config', TINY_TOKENIZER, '--tpu', CPU1, '--workdir', str(work),
                      '--set', 'train.steps=40', '--set', 'train.global_batch=32', '--set', 'train.log_every=5',
                      '--set', 'train.progress_bar=false', '--set', 'train.tensorboard=false',
                      '--set', 'optim.warmup_steps=5', '--set', 'optim.decay_steps=35']) == 0
  return work


def test_training_raises_psnr_and_uses_the_codebook(tokenizer_dir):
  logged = [json.loads(line) for line in (tokenizer_dir / 'metrics.jsonl').read_text().splitlines()]
  result = json.loads((tokenizer_dir / 'train_result.json').read_text())
  assert logged[-1]['psnr'] > logged[0]['psnr'] + 3  # dB: it learns to reconstruct
  report = result['reconstruction']
  assert report['images'] == 2821 and report['psnr_db'] > 15
  assert report['codes_used'] > 256 and report['codebook_perplexity'] > 64  # restarts keep codes alive


def test_dead_codes_move_onto_encoder_outputs_only_on_restart_steps():
  config = TokenizerConfig(block_out_channels=(8, 8), layers_per_block=1, latent_channels=4, codebook_size=16,
                           norm_num_groups=4, image_size=8)
  task = TokenizerTask(config, TokenizerLoss(restart_every=10))
  graphdef, state = nnx.split(VQGAN(config, nnx.Rngs(0)))
  params = nnx.to_pure_dict(state)
  rows = np.full((16, 4), 100.0, np.float32)
  rows[3] = 0.0  # the only row near the encoder outputs: every position picks it
  params['quantize']['embedding']['embedding'] = jnp.asarray(rows)
  batch = {'images': jnp.asarray(np.random.default_rng(0).uniform(0, 1, (2, 8, 8, 3)), jnp.float32)}
  step = jax.jit(task.after_update, static_argnums=0)
  same, metrics = step(graphdef, params, batch, jnp.int32(3))
  np.testing.assert_array_equal(same['quantize']['embedding']['embedding'], rows)
  assert float(metrics['codes_restarted']) == 0
  moved, metrics = step(graphdef, params, batch, jnp.int32(9))
  new_rows = np.asarray(moved['quantize']['embedding']['embedding'])
  assert float(metrics['codes_restarted']) == 15
  np.testing.assert_array_equal(new_rows[3], rows[3])  # the live row is kept
  z = np.asarray(nnx.merge(graphdef, params).encode_latents(batch['images'])).reshape(-1, 4)
  for r in [i for i in range(16) if i != 3]:  # each dead row is now one of the batch's encoder outputs
    assert np.min(np.abs(z - new_rows[r]).max(axis=1)) < 1e-6


def test_folder_images_convert_odd_files_and_skip_corrupt_ones(tmp_path, capsys):
  from PIL import Image
  from data_pipelines.image_sources import ImageDataError, folder_images
  (tmp_path / 'cats').mkdir()
  (tmp_path / 'dogs').mkdir()
  Image.fromarray(np.full((40, 60), 200, np.uint8), 'L').save(tmp_path / 'cats' / 'grey.png')
  Image.fromarray(np.zeros((17, 33, 4), np.uint8), 'RGBA').save(tmp_path / 'cats' / 'transparent.png')
  Image.fromarray(np.full((20, 20), 65535, np.uint16)).save(tmp_path / 'dogs' / 'sixteen_bit.png')
  (tmp_path / 'dogs' / 'broken.jpg').write_bytes(b'\xff\xd8\xff\xe0 truncated')
  found = folder_images(tmp_path, 16)
  assert found.images.shape == (3, 16, 16, 3) and found.classes == ['cats', 'dogs']
  assert found.labels.tolist() == [0, 0, 1] and found.skipped == [str(tmp_path / 'dogs' / 'broken.jpg')]
  np.testing.assert_allclose(found.images[0], 200 / 255, atol=1e-6)  # grey -> RGB
  np.testing.assert_allclose(found.images[1], 1.0)  # fully transparent -> white background
  np.testing.assert_allclose(found.images[2], 1.0)  # 16-bit white stays white
  assert 'broken.jpg' in capsys.readouterr().err
  with pytest.raises(ImageDataError, match='broken.jpg'):
    folder_images(tmp_path, 16, strict=True)


def test_tokenize_resumes_shard_by_shard_and_the_lvm_trains_on_it(tokenizer_dir, tmp_path):
  from data_pipelines.token_records import TokenRecordSource, find_shards
  from lvm.sentences import sentence_frames
  from lvm.tokenizer_commands import load_tokenizer
  out = tmp_path / 'sentences'
  args = ['lvm', 'tokenize', '--tokenizer', str(tokenizer_dir), '--out', str(out), '--sentences', '40',
          '--records-per-shard', '16', '--kind', 'video', '--kind', 'analogy', '--kind', 'groups']
  assert launch_main(args) == 0
  manifest = json.loads((out / 'manifest.json').read_text())
  assert manifest['records_per_kind'] == {'video': 40, 'analogy': 40, 'groups': 40}
  assert manifest['seq_len'] == 4 * 64 and manifest['vocab_size'] == 612 and len(manifest['shards']) == 9
  original = {p.name: p.read_bytes() for p in out.glob('*.arrayrecord')}

  # A job killed while writing shard 1 of 'analogy': that shard and the manifest are missing and a
  # temporary file is left. The rerun writes exactly that shard, byte for byte the same.
  (out / 'analogy-00001-of-00003.arrayrecord').rename(out / '.analogy-00001-of-00003.arrayrecord.tmp999')
  (out / 'manifest.json').unlink()
  assert launch_main(args) == 0
  assert json.loads((out / 'tokenize_result.json').read_text())['shards_written_this_run'] == 1
  assert {p.name: p.read_bytes() for p in out.glob('*.arrayrecord')} == original

  # Records hold the tokens of their frames, in order, all below the codebook size.
  source = TokenRecordSource(find_shards(out), seq_len=256, vocab_size=512)
  assert len(source) == 120
  tokenizer = load_tokenizer(tokenizer_dir)
  from data_pipelines.image_sources import digit_images
  images, labels = digit_images(32)
  frames = sentence_frames('video', 0, images, labels, 4, seed=0)
  np.testing.assert_array_equal(source[0 + 40 * 2], tokenizer.encode(frames).reshape(-1))  # kinds sorted by name: video last
  assert launch_main(args[:-6] + ['--kind', 'video', '--seed', '1']) == 2  # another job into the same --out

  lvm = tmp_path / 'lvm'
  assert launch_main(['lvm', 'train', '--config', str(ROOT / 'lvm/configs/tiny.py'), '--tpu', CPU1, '--workdir', str(lvm),
                      '--set', f'data.train_path={out}', '--set', 'model.vocab_size=612', '--set', 'train.steps=3',
                      '--set', 'train.progress_bar=false', '--set', 'train.tensorboard=false']) == 0
  assert np.isfinite(json.loads((lvm / 'train_result.json').read_text())['final_metrics']['loss'])
