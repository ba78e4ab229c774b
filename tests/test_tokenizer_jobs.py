"""Tokenizer training, dead-code restarts, image folders with odd files, and the resumable tokenize
job whose shards the LVM trains on."""
import dataclasses
import json
import re
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from core.config import load_config_file
from launch import main as launch_main
from lvm.tokenizer import TokenizerConfig, VQGAN
from lvm.tokenizer_task import TokenizerLoss, TokenizerTask
from tests.helpers import CPU1, ROOT
from tests.tolerance import assert_network_close, total_fan_in

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
  assert report['codes_used'] > 96 and report['codebook_perplexity'] > 32  # restarts keep codes alive (of 128)


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


def test_os_metadata_beside_the_images_is_left_out_not_read(tmp_path, capsys):
  """A folder copied from a Mac holds '._name.png' beside each photo and a zip's '__MACOSX/' folder;
  Jupyter leaves '.ipynb_checkpoints/'. They were read as images (one warning each, a failure under
  --strict) and '__MACOSX' became a class of no images."""
  from PIL import Image
  from data_pipelines.image_sources import folder_images
  for folder in ('cats', 'dogs', '__MACOSX/cats', 'cats/.ipynb_checkpoints'):
    (tmp_path / folder).mkdir(parents=True, exist_ok=True)
  for i, cls in enumerate(('cats', 'dogs')):
    Image.fromarray(np.full((20, 20, 3), 90 * i, np.uint8)).save(tmp_path / cls / 'a.png')
    (tmp_path / cls / '._a.png').write_bytes(b'\x00\x05\x16\x07 AppleDouble')
  (tmp_path / '__MACOSX' / 'cats' / '._a.png').write_bytes(b'\x00\x05\x16\x07 AppleDouble')
  Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / 'cats' / '.ipynb_checkpoints' / 'a-checkpoint.png')
  found = folder_images(tmp_path, 16, strict=True)
  assert found.classes == ['cats', 'dogs'] and found.labels.tolist() == [0, 1] and found.skipped == []
  assert found.paths == [str(tmp_path / 'cats' / 'a.png'), str(tmp_path / 'dogs' / 'a.png')]
  assert 'left out 4 hidden or OS metadata files' in capsys.readouterr().err
  from data_pipelines.image_sources import named_videos
  (tmp_path / 'cats' / 'v0').mkdir()  # a video beside the .ipynb_checkpoints folder, which is none
  Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / 'cats' / 'v0' / '0.png')
  assert [name for name, _ in named_videos(tmp_path / 'cats', 16)] == [str(tmp_path / 'cats' / 'v0')]


def test_an_image_over_pils_pixel_limit_is_skipped_by_name(tmp_path, monkeypatch, capsys):
  # PIL refuses images over twice Image.MAX_IMAGE_PIXELS (a decompression bomb) with an error that is
  # not an OSError; a real one is 180 M pixels, so the limit is lowered instead of writing one.
  from PIL import Image
  from data_pipelines.image_sources import ImageDataError, folder_images
  Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / 'small.png')
  Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / 'huge.png')
  monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 1000)
  found = folder_images(tmp_path, 16)
  assert found.images.shape == (1, 16, 16, 3) and found.skipped == [str(tmp_path / 'huge.png')]
  assert 'huge.png: not a readable image (DecompressionBombError' in capsys.readouterr().err
  with pytest.raises(ImageDataError, match='huge.png'):
    folder_images(tmp_path, 16, strict=True)


def test_a_phone_photo_is_read_upright_by_its_exif_orientation(tmp_path):
  """A portrait photo from a phone: landscape pixels plus EXIF Orientation 6 (turn 90 degrees clockwise
  to show). The folder source and the Prompter read it as a viewer shows it, the same as the upright
  pixels saved without a tag; without the turn the tokenizer would see the photo on its side."""
  from PIL import Image
  from data_pipelines.image_sources import folder_images, load_image, to_rgb_square
  stored = np.zeros((32, 64, 3), np.uint8)
  stored[:, :32] = (255, 0, 0)  # left half red, right half blue as stored: shown upright, red on top
  stored[:, 32:] = (0, 0, 255)
  exif = Image.Exif()
  exif[0x0112] = 6  # Orientation: rotate 90 CW
  Image.fromarray(stored).save(tmp_path / 'portrait.png', exif=exif)
  Image.fromarray(np.rot90(stored, k=-1).copy()).save(tmp_path / 'upright.png')
  found = folder_images(tmp_path, 16)
  upright = load_image(tmp_path / 'upright.png', 16)
  np.testing.assert_array_equal(found.images[0], upright)
  assert upright[0, 8].tolist() == [1, 0, 0] and upright[-1, 8].tolist() == [0, 0, 1]  # red top, blue bottom
  with Image.open(tmp_path / 'portrait.png') as opened:  # a PIL image given to lvm.Prompter
    np.testing.assert_array_equal(to_rgb_square(opened, 16), upright)


def test_scikit_image_bundled_images_are_a_source(tokenizer_dir, tmp_path, capsys):
  """builtin:skimage: crops of the images inside scikit-image's package (grey, RGB and RGBA files
  converted; the unreadable multi-page TIFF and the tiny files skipped by name), tokenized end to end."""
  from data_pipelines.image_sources import ImageDataError, builtin_images, skimage_crops
  crops, used = skimage_crops(16, 64)
  assert crops.shape == (64, 16, 16, 3) and crops.dtype == np.float32 and 0 <= crops.min() and crops.max() <= 1
  assert {'astronaut.png', 'camera.png', 'horse.png', 'hubble_deep_field.jpg'} <= set(used)
  assert 'multipage_rgb.tif' not in used and 'multipage_rgb.tif (UnidentifiedImageError)' in capsys.readouterr().err
  grey = crops[used.index('camera.png')]  # crop i comes from image i (mod the count)
  np.testing.assert_array_equal(grey[..., 0], grey[..., 2])
  assert np.ptp(crops[used.index('astronaut.png')], axis=-1).max() > 0.1  # colour stays colour
  np.testing.assert_array_equal(skimage_crops(16, 64)[0], crops)  # the same crops every time
  assert len(builtin_images('builtin:digits+skimage', 16)) == 1797 + 1024
  with pytest.raises(ImageDataError, match='builtin:skimage'):
    builtin_images('builtin:nope', 16)
  out = tmp_path / 'skimage_sentences'
  assert launch_main(['lvm', 'tokenize', '--tokenizer', str(tokenizer_dir), '--source', 'builtin:skimage',
                      '--out', str(out), '--sentences', '8', '--kind', 'colorization', '--kind', 'inpainting']) == 0
  manifest = json.loads((out / 'manifest.json').read_text())
  assert manifest['records_per_kind'] == {'colorization': 8, 'inpainting': 8}
  # 8 sentences of 2 drawn images each leave most of the 1,024 crops unseen: the job says so.
  said = capsys.readouterr()
  assert 'note: 8 inpainting sentences draw 16 images from a source of 1,024: about 2% of them appear' in \
      said.out + said.err
  # The same kinds comma-separated (one named twice) write the same shards; a negative seed is refused.
  again = tmp_path / 'comma_separated'
  assert launch_main(['lvm', 'tokenize', '--tokenizer', str(tokenizer_dir), '--source', 'builtin:skimage',
                      '--out', str(again), '--sentences', '8', '--kind', 'colorization,inpainting',
                      '--kind', 'inpainting']) == 0
  assert {p.name: p.read_bytes() for p in again.glob('*.arrayrecord')} == \
         {p.name: p.read_bytes() for p in out.glob('*.arrayrecord')}
  assert launch_main(['lvm', 'tokenize', '--tokenizer', str(tokenizer_dir), '--source', 'builtin:skimage',
                      '--out', str(tmp_path / 'negative_seed'), '--seed', '-1']) == 2
  assert '--seed must be >= 0, got -1' in capsys.readouterr().err and not (tmp_path / 'negative_seed').exists()


def test_tokenize_resumes_shard_by_shard_and_the_lvm_trains_on_it(tokenizer_dir, tmp_path, capsys, monkeypatch):
  from data_pipelines.token_records import TokenRecordSource, find_shards
  from lvm.sentences import sentence_frames
  from lvm.tokenizer_commands import load_tokenizer
  out = tmp_path / 'sentences'
  args = ['lvm', 'tokenize', '--tokenizer', str(tokenizer_dir), '--out', str(out), '--sentences', '40',
          '--records-per-shard', '16', '--kind', 'video', '--kind', 'analogy', '--kind', 'groups']
  assert launch_main(args) == 0
  manifest = json.loads((out / 'manifest.json').read_text())
  assert manifest['records_per_kind'] == {'video': 40, 'analogy': 40, 'groups': 40}
  assert manifest['seq_len'] == 4 * 64 and manifest['vocab_size'] == 228 and len(manifest['shards']) == 9
  original = {p.name: p.read_bytes() for p in out.glob('*.arrayrecord')}

  # A job killed while writing shard 1 of 'analogy': that shard and the manifest are missing and a
  # temporary file is left. The rerun writes exactly that shard, byte for byte the same.
  (out / 'analogy-00001-of-00003.arrayrecord').rename(out / '.analogy-00001-of-00003.arrayrecord.tmp999')
  (out / 'manifest.json').unlink()
  assert launch_main(args) == 0
  assert json.loads((out / 'tokenize_result.json').read_text())['shards_written_this_run'] == 1
  assert {p.name: p.read_bytes() for p in out.glob('*.arrayrecord')} == original

  # A real kill: SIGKILL the same job in another process once it has written some shards, rerun
  # it, and get exactly the uninterrupted job's shards (no record lost, none written twice).
  import signal
  import time
  from tests.helpers import launch
  killed = tmp_path / 'killed'
  killed_args = [a if a != str(out) else str(killed) for a in args]
  for attempt in range(3):
    proc = launch(killed_args, devices=1)
    while proc.poll() is None and len(list(killed.glob('*.arrayrecord'))) < 2:
      time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = len(list(killed.glob('*.arrayrecord')))  # complete shards only (temporaries are dot-files)
    if written < len(original) and not (killed / 'manifest.json').exists():
      break
    import shutil
    shutil.rmtree(killed)  # it finished before the kill: try again
  else:
    pytest.fail('the tokenize job finished before it could be killed, 3 times')
  assert launch_main(killed_args) == 0
  assert json.loads((killed / 'tokenize_result.json').read_text())['shards_written_this_run'] == len(original) - written
  assert {p.name: p.read_bytes() for p in killed.glob('*.arrayrecord')} == original
  assert not list(killed.glob('.*.tmp*'))  # the rerun removed the killed writer's temporary file

  # Records hold the tokens of their frames, in order, all below the codebook size.
  source = TokenRecordSource(find_shards(out), seq_len=256, vocab_size=128)
  assert len(source) == 120
  tokenizer = load_tokenizer(tokenizer_dir)
  from data_pipelines.image_sources import digit_images
  images, labels = digit_images(32)
  frames = sentence_frames('video', 0, images, labels, 4, seed=0)
  np.testing.assert_array_equal(source[0 + 40 * 2], tokenizer.encode(frames).reshape(-1))  # kinds sorted by name: video last
  assert launch_main(args[:-6] + ['--kind', 'video', '--seed', '1']) == 2  # another job into the same --out

  lvm = tmp_path / 'lvm'
  assert launch_main(['lvm', 'train', '--config', str(ROOT / 'lvm/configs/tiny.py'), '--tpu', CPU1, '--workdir', str(lvm),
                      '--set', f'data.train_path={out}', '--set', 'model.vocab_size=228', '--set', 'train.steps=3',
                      '--set', 'train.progress_bar=false', '--set', 'train.tensorboard=false']) == 0
  assert np.isfinite(json.loads((lvm / 'train_result.json').read_text())['final_metrics']['loss'])
  assert 'note: model.vocab_size' not in capsys.readouterr().err  # the manifest's 228: nothing to say

  # Per-kind perplexity of the last frame (64 tokens), from the manifest.
  assert launch_main(['lvm', 'eval', '--workdir', str(lvm), '--data', str(out)]) == 0
  evaluation = json.loads((lvm / 'eval_result.json').read_text())
  assert evaluation['target_tokens'] == 64 and sorted(evaluation['per_kind']) == ['analogy', 'groups', 'video']
  # The built-in grey-level digits are not this tokenizer's codes: refused, where a perplexity that
  # measured nothing came back.
  capsys.readouterr()
  assert launch_main(['lvm', 'eval', '--workdir', str(lvm), '--data', 'builtin:digits-eval']) == 2
  assert (f'--data builtin:digits-eval holds the built-in grey-level digit tokens; {lvm} trained on {out}, codes of '
          f'the tokenizer') in capsys.readouterr().err
  assert all(v['examples'] == 40 for v in evaluation['per_kind'].values())

  # Prompting with image files: an analogy A A' B -> B', through the tokenizer of the training data.
  from PIL import Image
  for i, frame in enumerate(frames[:3]):
    Image.fromarray((frame * 255).round().astype(np.uint8)).save(tmp_path / f'p{i}.png')
  prompt = [str(tmp_path / f'p{i}.png') for i in range(3)]
  assert launch_main(['lvm', 'generate', '--workdir', str(lvm), '--prompt', *prompt, '--mode', 'analogy',
                      '--out', str(tmp_path / 'grid.png'), '--temperature', '1.0', '--seed', '3']) == 0
  generated = json.loads((lvm / 'generate_result.json').read_text())
  tokens = np.asarray(generated['tokens'])
  assert tokens.shape == (1, 64) and tokens.max() < 128  # image codes only, never a special id
  assert Image.open(tmp_path / 'grid.png').size[0] > 4 * 32 * 4
  # Candidates of one prompt (LVM's n_candidates): sample i as --seed 3 + i alone, a row each.
  assert launch_main(['lvm', 'generate', '--workdir', str(lvm), '--prompt', *prompt, '--mode', 'analogy',
                      '--out', str(tmp_path / 'samples.png'), '--temperature', '1.0', '--seed', '3',
                      '--samples', '3']) == 0
  samples = np.asarray(json.loads((lvm / 'generate_result.json').read_text())['tokens'])
  assert samples.shape == (3, 64) and (samples[0] == tokens[0]).all() and len({s.tobytes() for s in samples}) == 3
  assert Image.open(tmp_path / 'samples.png').size[1] == 3 * Image.open(tmp_path / 'grid.png').size[1]
  for bad in (['--samples', '0'], ['--samples', '2', '--temperature', '0']):
    assert launch_main(['lvm', 'generate', '--workdir', str(lvm), '--prompt', *prompt, '--mode', 'analogy', *bad]) == 2
  assert launch_main(['lvm', 'generate', '--workdir', str(lvm), '--prompt', *prompt[:2], '--mode', 'analogy']) == 2
  # Bad sampling settings and an --out that cannot be written are refused before any decoding.
  (tmp_path / 'a_file').write_text('x')
  for bad in (['--temperature', '-1'], ['--top-p', '1.5'], ['--out', str(tmp_path / 'a_file' / 'g.png')],
              ['--out', str(tmp_path)]):
    assert launch_main(['lvm', 'generate', '--workdir', str(lvm), '--prompt', *prompt, '--mode', 'analogy', *bad]) == 2

  # The Python API: the command's generation exactly (same prompts, seed and sampling), from files,
  # uint8 arrays of them or PIL images alike; its frames go back in as prompts.
  from core.config import ConfigError
  from data_pipelines.image_sources import ImageDataError
  from lvm import Prompter
  prompter = Prompter.load(lvm)
  assert prompter.step == 3 and prompter.image_size == 32 and 'step 3' in repr(prompter)
  import lvm as lvm_package
  assert prompter.tokenizer.checksum == lvm_package.load_tokenizer(tokenizer_dir).checksum  # the data's tokenizer
  sampling = dict(temperature=1.0, seed=3)
  from_files = prompter.generate(prompt, 1, 'analogy', **sampling)
  np.testing.assert_array_equal(from_files.tokens.reshape(1, -1), tokens)
  np.testing.assert_array_equal(from_files.frames, tokenizer.decode(tokens.reshape(1, 64)))
  for same in ([np.asarray(Image.open(p)) for p in prompt], [Image.open(p) for p in prompt]):
    np.testing.assert_array_equal(prompter.generate(same, 1, 'analogy', **sampling).tokens, from_files.tokens)
  np.testing.assert_array_equal(prompter.complete_analogy(*prompt, **sampling), from_files.frames[0])
  np.testing.assert_array_equal(prompter.generate(prompt, 1, 'analogy', temperature=1.0, seed=5).tokens.reshape(-1),
                                samples[2])  # the command's third sample: seed 3 + 2
  # A folder of frames stands for its images in frame order (frame10 after frame2, not after frame1).
  import shutil
  (tmp_path / 'frames').mkdir()
  for path, name in zip(prompt, ('frame1.png', 'frame2.png', 'frame10.png')):
    shutil.copy(path, tmp_path / 'frames' / name)
  (tmp_path / 'frames' / '._frame3.png').write_bytes(b'macOS metadata')
  np.testing.assert_array_equal(prompter.generate(tmp_path / 'frames', 1, 'analogy', **sampling).tokens,
                                from_files.tokens)
  (tmp_path / 'two').mkdir()
  shutil.copy(prompt[0], tmp_path / 'two' / 'a.png')
  shutil.copy(prompt[1], tmp_path / 'two' / 'b.png')
  np.testing.assert_array_equal(prompter.generate([str(tmp_path / 'two'), Image.open(prompt[2])], 1, 'analogy',
                                                  **sampling).tokens, from_files.tokens)
  assert launch_main(['lvm', 'generate', '--workdir', str(lvm), '--prompt', str(tmp_path / 'frames'), '--mode',
                      'analogy', '--out', str(tmp_path / 'grid2.png'), '--temperature', '1.0', '--seed', '3']) == 0
  assert json.loads((lvm / 'generate_result.json').read_text())['tokens'] == generated['tokens']
  # So does an animated GIF (grey frames: exact in a GIF's palette), in the API and the command.
  grey = [Image.open(path).convert('L') for path in prompt]
  grey[0].save(tmp_path / 'clip.gif', save_all=True, append_images=grey[1:], duration=100)
  np.testing.assert_array_equal(prompter.generate(tmp_path / 'clip.gif', 1, 'analogy', **sampling).tokens,
                                from_files.tokens)
  assert launch_main(['lvm', 'generate', '--workdir', str(lvm), '--prompt', str(tmp_path / 'clip.gif'), '--mode',
                      'analogy', '--out', str(tmp_path / 'grid3.png'), '--temperature', '1.0', '--seed', '3']) == 0
  from_gif = json.loads((lvm / 'generate_result.json').read_text())
  assert from_gif['tokens'] == generated['tokens']
  assert from_gif['prompts'] == [f'{tmp_path / "clip.gif"}[frame {i}]' for i in range(3)]
  (tmp_path / 'empty').mkdir()
  with pytest.raises(ImageDataError, match='empty: a folder with no image files'):
    prompter.generate(tmp_path / 'empty')
  # One example pair and a query is the analogy's arrangement: the same frame.
  np.testing.assert_array_equal(prompter.solve_in_context([(prompt[0], prompt[1])], prompt[2], **sampling),
                                from_files.frames[0])
  two = prompter.continue_sequence(prompt, frames=2)
  assert two.shape == (2, 32, 32, 3) and two.dtype == np.float32
  chained = prompter.generate([*from_files.prompt[1:], *two], 1)
  np.testing.assert_array_equal(chained.prompt[2:], two)  # float frames at the tokenizer's size go in as they are
  with pytest.raises(ImageDataError, match=r'prompt image 1: a float array must be .*\(8, 8, 3\)'):
    prompter.generate([prompt[0], np.zeros((8, 8, 3), np.float32)])
  with pytest.raises(ImageDataError, match='not one image'):
    prompter.generate(prompt[0])
  with pytest.raises(ConfigError, match='three prompt images'):
    prompter.generate(prompt[:2], 1, 'analogy')
  with pytest.raises(ConfigError, match='frames must be an int >= 1'):
    prompter.continue_sequence(prompt, frames=0)
  capsys.readouterr()  # a prompt longer than the context: its first images drop out, said
  prompter.continue_sequence([prompt[0]] * 16)
  assert "context (1024 tokens) holds 15 images of 64 tokens and the one being made: the first 1 of the 16 prompt " \
      'images are not seen' in capsys.readouterr().err
  with pytest.raises(ConfigError, match='no prompt images: give at least one'):  # was numpy's 'need at least one array'
    prompter.continue_sequence([])
  with pytest.raises(ConfigError, match="seed must be an int >= 0, got '3'"):  # was JAX's 'not a valid JAX array type'
    prompter.continue_sequence(prompt, seed='3')

  _check_batched_prompts(lvm, prompter, prompt, from_files, tmp_path)
  _check_completion(lvm, out, prompter, tokenizer, source, capsys)

  from lvm.prompting import next_frame_report
  report = next_frame_report(lvm, out, kind='video', limit=8, png=tmp_path / 'next.png')
  videos = np.stack([source[80 + i] for i in range(8)])
  copy_accuracy = np.mean(videos[:, 128:192] == videos[:, 192:])
  assert report['sentences'] == 8 and report['token_accuracy']['copy_last'] == pytest.approx(copy_accuracy)
  assert 0 <= report['token_accuracy']['lvm'] <= 1 and np.isfinite(report['psnr_db']['lvm'])
  # The quickstart prints a command that continues the first held-out video from its frames written
  # as files; run as printed (from the user's folder), it must work and see those frames.
  import shlex
  from lvm.quickstart import prompt_command
  argv = shlex.split(prompt_command(lvm, report))
  assert argv[:2] == ['python', 'launch.py'] and len(report['prompt_frames']) == 3
  first_video = tokenizer.decode(videos[0, :192].reshape(3, 64))
  for path, frame in zip(report['prompt_frames'], first_video):
    np.testing.assert_array_equal(np.asarray(Image.open(path)), (np.clip(frame, 0, 1) * 255).round().astype(np.uint8))
  monkeypatch.chdir(tmp_path)
  assert launch_main(argv[2:]) == 0
  assert Image.open(tmp_path / 'next_frames.png').size == (4 * (5 * 32 + 8), 4 * 32)


def _check_completion(lvm, data, prompter, tokenizer, source, capsys):
  """`lvm eval --completion N`: each kind's first N records' last frame, generated in batches (here 3,
  then 1 filled up to 3), scores as each record's frame generated alone from its context."""
  from lvm.prompting import generate_frames
  assert launch_main(['lvm', 'eval', '--workdir', str(lvm), '--data', str(data), '--completion', '4',
                      '--batch-size', '3']) == 0
  completion = json.loads((lvm / 'eval_result.json').read_text())['completion']
  assert sorted(completion) == ['analogy', 'groups', 'video']
  videos = np.stack([source[80 + i] for i in range(4)])  # kinds sorted by name: video last
  alone = np.concatenate([generate_frames(prompter.params, prompter.config.model, r[None, :-64], frames=1,
                                          tokens_per_image=64, codebook_size=128) for r in videos])
  truth, last = videos[:, -64:], videos[:, -128:-64]
  assert completion['video']['sentences'] == 4
  assert completion['video']['token_accuracy'] == {'lvm': np.mean(alone == truth), 'copy_last': np.mean(last == truth)}
  true_frames = tokenizer.decode(truth)
  psnr = lambda frames: np.mean(10 * np.log10(1 / np.maximum(np.mean((frames - true_frames) ** 2, (1, 2, 3)), 1e-10)))
  assert completion['video']['psnr_db']['lvm'] == pytest.approx(psnr(tokenizer.decode(alone)), abs=1e-6)
  assert completion['video']['psnr_db']['copy_last'] == pytest.approx(psnr(tokenizer.decode(last)), abs=1e-6)
  np.save(lvm.parent / 'records.npy', videos)  # tokens without a manifest: no tokenizer to draw their frames
  capsys.readouterr()
  assert launch_main(['lvm', 'eval', '--workdir', str(lvm), '--data', str(lvm.parent / 'records.npy'),
                      '--completion', '4']) == 2
  assert 'records.npy has no manifest.json naming the tokenizer of its frames' in capsys.readouterr().err


def _check_batched_prompts(lvm, prompter, prompt, analogy, tmp_path):
  """Many prompts at once (`Prompter.generate_batch`, `lvm generate --prompts LIST`): each answer is
  the one its prompt gets alone, sampled with its own seed, whatever the batch beside it."""
  from core.config import ConfigError
  from data_pipelines.image_sources import ImageDataError
  from PIL import Image
  rng = np.random.default_rng(8)
  prompts = [rng.random((n, 32, 32, 3)).astype(np.float32) for n in (3, 2, 3, 3, 2)]  # two lengths, batched apart
  seeds = [4, 0, 9, 4, 2]
  for sampling in (dict(), dict(temperature=1.0, top_p=0.9)):
    together = prompter.generate_batch(prompts, 2, seed=seeds, batch_size=2, **sampling)  # 3-image ones: 2 + filled 1
    for images, seed, answer in zip(prompts, seeds, together):
      alone = prompter.generate(images, 2, seed=seed, **sampling)
      np.testing.assert_array_equal(answer.tokens, alone.tokens)
      np.testing.assert_array_equal(answer.frames, alone.frames)
  sampled = [g.tokens for g in prompter.generate_batch(prompts[:1] * 2, temperature=1.0, seed=[1, 2])]
  assert (sampled[0] != sampled[1]).any()  # rows draw their own numbers, not one draw each
  with pytest.raises(ImageDataError, match=r'prompt 1: prompt images must be a list'):
    prompter.generate_batch([prompt, prompt[0]])
  with pytest.raises(ConfigError, match=r"prompt 0: --mode analogy takes three"):
    prompter.generate_batch([prompt[:2]], mode='analogy')
  with pytest.raises(ConfigError, match=r'seed must be an int >= 0 or one per prompt \(2\), got \[1\]'):
    prompter.generate_batch([prompt, prompt], seed=[1])
  assert prompter.generate_batch([]) == []

  # The command: a list of lines (paths relative to it, quoted, a comment), answered into OUT.
  (tmp_path / 'my prompts').mkdir()
  for i, path in enumerate(prompt):
    Image.open(path).save(tmp_path / 'my prompts' / f'p {i}.png')
  listing = tmp_path / 'my prompts' / 'list.txt'
  listing.write_text("# A : A' :: B\n'p 0.png' 'p 1.png' 'p 2.png'\n\n" + ' '.join(prompt) + '  # absolute\n')
  out = tmp_path / 'answers'
  assert launch_main(['lvm', 'generate', '--workdir', str(lvm), '--prompts', str(listing), '--mode', 'analogy',
                      '--out', str(out), '--grids', '--temperature', '1.0', '--seed', '3']) == 0
  records = [json.loads(line) for line in (out / 'results.jsonl').read_text().splitlines()]
  assert [r['line'] for r in records] == [2, 4] and records[0]['images'][0] == str(tmp_path / 'my prompts/p 0.png')
  for record in records:  # what `lvm generate --prompt ...` writes for each line alone, frames as PNGs
    np.testing.assert_array_equal(np.asarray(record['tokens']), analogy.tokens)
    np.testing.assert_array_equal(np.asarray(Image.open(record['frames'][0])),
                                  (np.clip(analogy.frames[0], 0, 1) * 255).round().astype(np.uint8))
    assert Image.open(record['grid']).size == (4 * (4 * 32 + 8), 4 * 32)
  assert json.loads((lvm / 'generate_result.json').read_text())['prompts'] == 2
  # Two candidates of every line: candidate s as the line alone with --seed 3 + s - 1, a grid row each.
  assert launch_main(['lvm', 'generate', '--workdir', str(lvm), '--prompts', str(listing), '--mode', 'analogy',
                      '--out', str(tmp_path / 'candidates'), '--grids', '--temperature', '1.0', '--seed', '3',
                      '--samples', '2']) == 0
  records = [json.loads(line) for line in (tmp_path / 'candidates' / 'results.jsonl').read_text().splitlines()]
  assert [(r['line'], r['sample'], r['seed']) for r in records] == [(2, 1, 3), (2, 2, 4), (4, 1, 3), (4, 2, 4)]
  second = prompter.generate(prompt, 1, 'analogy', temperature=1.0, seed=4).tokens
  for record in records:
    np.testing.assert_array_equal(np.asarray(record['tokens']), analogy.tokens if record['sample'] == 1 else second)
    assert record['frames'][0].rsplit('/', 1)[1] == f'0000{record["prompt"]}_s{record["sample"]}_frame1.png'
  assert Image.open(records[0]['grid']).size == (4 * (4 * 32 + 8), 2 * 4 * 32)
  listing.write_text("'p 0.png' 'p 1.png'\n'p 0.png' gone.png 'p 2.png'\n")  # each named by its line, before loading
  for mode, named in (('analogy', r'list.txt:1: --mode analogy takes three'), ('sequence', 'list.txt:2: .*gone.png')):
    with pytest.raises(ImageDataError if mode == 'sequence' else ConfigError, match=named):
      from lvm.batch_prompting import batch_generate_command
      batch_generate_command(str(lvm), str(listing), 1, str(tmp_path / 'nothing'), mode=mode)
  assert not (tmp_path / 'nothing').exists()


def test_generate_says_when_the_training_data_path_is_not_there(tmp_path, monkeypatch):
  """`lvm generate` finds the tokenizer through the training data's manifest; a relative data path
  from another directory once read as 'has no manifest.json', which sent users to the wrong fix."""
  from types import SimpleNamespace
  from core.config import ConfigError
  from lvm.prompting import tokenizer_of
  config = SimpleNamespace(data=SimpleNamespace(train_path='runs/quickstart/data/train'))
  monkeypatch.chdir(tmp_path)
  with pytest.raises(ConfigError, match=r"'runs/quickstart/data/train', which is not there from .*relative path"):
    tokenizer_of(tmp_path / 'lvm', config)
  (tmp_path / 'runs/quickstart/data/train').mkdir(parents=True)
  with pytest.raises(ConfigError, match='no manifest.json naming a tokenizer'):
    tokenizer_of(tmp_path / 'lvm', config)
  # A manifest from before tokenizer_relative: the tokenizer's path as given (from the same folder).
  (tmp_path / 'runs/quickstart/data/train/manifest.json').write_text(json.dumps({'tokenizer': 'runs/tok'}))
  with pytest.raises(ConfigError, match="names the tokenizer 'runs/tok', which is not there"):
    tokenizer_of(tmp_path / 'lvm', config)
  (tmp_path / 'runs/tok').mkdir()
  assert tokenizer_of(tmp_path / 'lvm', config) == 'runs/tok'


def test_generate_finds_the_tokenizer_from_any_folder_and_after_a_move(tmp_path, monkeypatch):
  """`lvm train` records its data's absolute path and a manifest names its tokenizer both absolutely
  and relative to the shards: `lvm generate` from another folder, or on a run folder copied
  elsewhere (data and tokenizer together), finds the tokenizer without --tokenizer."""
  import shutil
  from pathlib import Path
  from types import SimpleNamespace
  from core.config import ConfigError
  from lvm.commands import data_record
  from lvm.prompting import tokenizer_of
  from lvm.sentences import tokenizer_location
  run = tmp_path / 'first'
  (run / 'tok').mkdir(parents=True)
  (run / 'data/train').mkdir(parents=True)
  (run / 'lvm').mkdir()
  monkeypatch.chdir(run)  # where tokenize and training ran, with relative paths
  manifest = tokenizer_location('tok', 'data/train')
  assert manifest == {'tokenizer': str(run / 'tok'), 'tokenizer_relative': '../../tok'}
  (run / 'data/train/manifest.json').write_text(json.dumps(manifest))
  record = data_record('data/train', 'lvm')
  assert record == {'train_data': str(run / 'data/train'), 'train_data_relative': '../data/train'}
  (run / 'lvm/config.json').write_text(json.dumps(record))
  config = SimpleNamespace(data=SimpleNamespace(train_path='data/train'))
  assert tokenizer_of(run / 'lvm', config) == 'tok'  # data/train/../../tok, normalised
  monkeypatch.chdir(tmp_path)
  assert tokenizer_of(run / 'lvm', config) == str(run / 'tok')  # through the recorded absolute data path
  moved = tmp_path / 'moved'
  shutil.copytree(run, moved)
  shutil.rmtree(run)
  monkeypatch.chdir(moved)  # the absolute paths recorded are gone; the relative ones hold
  assert tokenizer_of(moved / 'lvm', config) == 'tok'
  monkeypatch.chdir(tmp_path)  # from elsewhere: the data's path from the workdir, then the tokenizer's from it
  assert tokenizer_of(moved / 'lvm', config) == str(moved / 'tok')
  assert tokenizer_of(Path('moved/lvm'), config) == 'moved/tok'
  shutil.copytree(moved / 'lvm', tmp_path / 'alone/lvm')  # the workdir without its data
  with pytest.raises(ConfigError, match="'data/train', which is not there from .*looked at .*alone/data/train"):
    tokenizer_of(tmp_path / 'alone/lvm', config)
  assert data_record('builtin:digits', 'lvm') == {'train_data': 'builtin:digits'}
  assert data_record('gs://b/d', 'lvm') == {'train_data': 'gs://b/d'}  # a bucket is where it is


def test_generate_refuses_a_tokenizer_other_than_the_datas(tmp_path, monkeypatch):
  """--tokenizer of other parameters than the manifest's decodes the model's codes into other
  pictures with no error: refused where the manifest is found; unchecked where it is not."""
  from types import SimpleNamespace
  from core.config import ConfigError
  from lvm.prompting import check_same_tokenizer
  (tmp_path / 'data').mkdir()
  (tmp_path / 'data/manifest.json').write_text(json.dumps({'tokenizer': '/runs/tok', 'tokenizer_checksum': 'abc'}))
  monkeypatch.chdir(tmp_path)
  config = SimpleNamespace(data=SimpleNamespace(train_path='data'))
  check_same_tokenizer(tmp_path / 'lvm', config, 'copy_of_tok', 'abc')
  with pytest.raises(ConfigError, match=r"--tokenizer other_tok \(parameters def\) is not the tokenizer data was "
                                        r"made with \(/runs/tok, parameters abc\)"):
    check_same_tokenizer(tmp_path / 'lvm', config, 'other_tok', 'def')
  with pytest.raises(ConfigError, match=r'--data eval_sentences was tokenized with other tokenizer parameters '
                                        r'\(def\) than the training data data \(abc\)'):  # lvm eval's check
    check_same_tokenizer(tmp_path / 'lvm', config, 'eval_sentences', 'def', what='--data')
  with pytest.raises(ConfigError, match=r'the tokenizer at /runs/tok \(parameters def\) is not .* '
                                        r'\(retrained or replaced since\?\); pass --tokenizer'):
    check_same_tokenizer(tmp_path / 'lvm', config, '/runs/tok', 'def', what='the tokenizer at')
  (tmp_path / 'manifest.json').write_text((tmp_path / 'data/manifest.json').read_text())  # '.' holds one
  for unreachable in ('gone', '', 'builtin:digits'):  # ('' is an imported run: not the folder it runs from)
    check_same_tokenizer(tmp_path / 'lvm', SimpleNamespace(data=SimpleNamespace(train_path=unreachable)), 'x', 'def')


def test_training_notes_a_model_vocabulary_other_than_the_sentences(tmp_path, capsys):
  # The tiny preset's 8,292 ids on a 228-id tokenizer's sentences: 8,064 embedding and output rows
  # that no record ever uses, trained without a word before.
  from lvm.commands import note_vocabulary_mismatch
  from lvm.configs.tiny import get_config
  (tmp_path / 'manifest.json').write_text(json.dumps({'vocab_size': 228}))
  config = get_config()
  with_data = lambda vocab, path=str(tmp_path): dataclasses.replace(
      config, data=dataclasses.replace(config.data, train_path=path),
      model=dataclasses.replace(config.model, vocab_size=vocab))
  note_vocabulary_mismatch(with_data(8292))
  assert capsys.readouterr().err.strip() == (
      f"note: model.vocab_size is 8,292 but {tmp_path} was tokenized for 228 ids (manifest.json): the model's "
      '8,064 ids from 228 up never occur in it; --set model.vocab_size=228 to match')
  note_vocabulary_mismatch(with_data(150))
  assert 'ids 150-227, reserved for special tokens, cannot be used; --set model.vocab_size=228' in capsys.readouterr().err
  for quiet in (with_data(228), with_data(8292, 'builtin:digits'), with_data(8292, str(tmp_path / 'no_manifest'))):
    note_vocabulary_mismatch(quiet)
    assert capsys.readouterr().err == ''


def test_held_out_images_are_the_last_tenth_of_every_class():
  # A folder of class subfolders lists its images class by class: the last 10% of all of them was
  # the last class alone (eval sentences of zebras only, training sentences without zebras).
  from lvm.sentences import split_images
  labels = np.repeat([0, 1, 2], [30, 50, 20])  # as folder_images reads cats/, dogs/, zebras/
  labels = np.concatenate([labels, [-1] * 10])   # and images outside any class folder
  images = np.arange(len(labels))
  train, train_labels = split_images(images, labels, 'train')
  held, held_labels = split_images(images, labels, 'eval')
  assert held.tolist() == [27, 28, 29, 75, 76, 77, 78, 79, 98, 99, 109]
  assert sorted(train.tolist() + held.tolist()) == images.tolist()
  assert set(train_labels.tolist()) == set(held_labels.tolist()) == {-1, 0, 1, 2}
  assert split_images(images[:3], labels[:3], 'eval')[0].tolist() == [2]  # at least one image held out
  assert split_images(images, labels, 'all')[0].tolist() == images.tolist()


def test_a_split_that_would_leave_a_side_empty_or_shared_is_refused(tokenizer_dir, tmp_path, capsys):
  """One image, --split train: eval holds it out and nothing was left (a numpy traceback). One video,
  --split eval or train: whole videos go to one side, and both sides had been the same clip."""
  from PIL import Image
  (tmp_path / 'one').mkdir()
  Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / 'one' / 'a.png')
  (tmp_path / 'clips' / 'v0').mkdir(parents=True)
  for f in range(4):
    Image.fromarray(np.full((32, 32, 3), 60 * f, np.uint8)).save(tmp_path / 'clips' / 'v0' / f'{f}.png')
  tokenize = ['lvm', 'tokenize', '--tokenizer', str(tokenizer_dir), '--out', str(tmp_path / 'out'), '--source']
  for source, split, named in ((str(tmp_path / 'one'), 'train', 'has 1 image, which eval holds out'),
                               (f'frames:{tmp_path / "clips"}', 'eval', 'holds 1 video, and whole videos go to one side'),
                               (f'frames:{tmp_path / "clips"}', 'train', 'holds 1 video')):
    assert launch_main(tokenize + [source, '--split', split]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f'error: --split {split}: ') and named in err[0], err
    assert not (tmp_path / 'out').exists()


def test_a_resumed_job_refuses_a_source_folder_that_changed(tokenizer_dir, tmp_path, capsys):
  """Images added to a folder between a killed tokenize job and its rerun built the remaining shards
  from another image set than the first ones, silently; now refused, naming both counts. The same
  images again resume as before."""
  from PIL import Image
  (tmp_path / 'imgs').mkdir()
  for i in range(3):
    Image.fromarray(np.full((32, 32, 3), 70 * i, np.uint8)).save(tmp_path / 'imgs' / f'{i}.png')
  out = tmp_path / 'out'
  tokenize = ['lvm', 'tokenize', '--tokenizer', str(tokenizer_dir), '--source', str(tmp_path / 'imgs'), '--kind',
              'inpainting', '--sentences', '4', '--records-per-shard', '2', '--out', str(out)]
  assert launch_main(tokenize) == 0
  second = (out / 'inpainting-00001-of-00002.arrayrecord').read_bytes()
  (out / 'inpainting-00001-of-00002.arrayrecord').unlink()  # as if killed before its last shard
  Image.fromarray(np.full((32, 32, 3), 250, np.uint8)).save(tmp_path / 'imgs' / '3.png')
  capsys.readouterr()
  assert launch_main(tokenize) == 2
  assert 'as it was when they were written (3 images' in capsys.readouterr().err
  assert not (out / 'inpainting-00001-of-00002.arrayrecord').exists()
  (tmp_path / 'imgs' / '3.png').unlink()
  assert launch_main(tokenize) == 0
  assert (out / 'inpainting-00001-of-00002.arrayrecord').read_bytes() == second


def test_a_streamed_source_gives_the_shards_it_gives_in_memory(tokenizer_dir, tmp_path, capsys, monkeypatch):
  """`lvm tokenize --stream`: a folder (class subfolders, a file that is no image, a held-out split)
  and a tfds split, each image decoded when a sentence draws it, give byte for byte the shards
  they give decoded into memory; 'auto' streams what would take over a quarter of the free memory,
  and a resumed job keeps the way it was started. --strict fails on a file cut after its header
  (without it, the next file takes its place, as in training)."""
  import lvm.tokenizer_images
  from tests.test_streamed_images import _digit_folder
  root = _digit_folder(tmp_path / 'digits', count=24)
  tokenize = ['lvm', 'tokenize', '--tokenizer', str(tokenizer_dir), '--sentences', '6', '--records-per-shard', '4',
              '--kind', 'groups,analogy,video', '--split', 'train']

  def shards(out):
    return {p.name: p.read_bytes() for p in out.glob('*.arrayrecord')}
  held = tmp_path / 'held'
  assert launch_main(tokenize + ['--source', str(root), '--out', str(held), '--stream', 'never']) == 0
  monkeypatch.setattr(lvm.tokenizer_images, 'available_memory_gib', lambda: 0.0004)
  capsys.readouterr()
  streamed = tmp_path / 'streamed'
  assert launch_main(tokenize + ['--source', str(root), '--out', str(streamed), '--read-threads', '3']) == 0
  assert (f"{root}: 25 image files decode to 0.3 MiB, more than a quarter of this host's 0.4 MiB of free memory: they "
          'are streamed, each decoded when a sentence draws it (--stream never holds them in memory)'
          in capsys.readouterr().err)
  assert len(shards(held)) == 6 and shards(streamed) == shards(held)
  manifests = [json.loads((out / 'manifest.json').read_text()) for out in (held, streamed)]
  fingerprints = [manifest.pop('source_images') for manifest in manifests]  # 24 less 1 held out of each class
  assert fingerprints[0]['count'] == fingerprints[1]['count'] == 22 and fingerprints[1]['streamed']
  assert manifests[0] == manifests[1]

  # A rerun keeps the way the job started, whatever 'auto' finds now; naming the other way is refused.
  monkeypatch.setattr(lvm.tokenizer_images, 'available_memory_gib', lambda: 64.0)
  (streamed / 'video-00001-of-00002.arrayrecord').unlink()
  assert launch_main(tokenize + ['--source', str(root), '--out', str(streamed)]) == 0
  assert shards(streamed) == shards(held)
  assert json.loads((streamed / 'tokenize_result.json').read_text())['shards_written_this_run'] == 1
  capsys.readouterr()
  assert launch_main(tokenize + ['--source', str(root), '--out', str(streamed), '--stream', 'never']) == 2
  assert (f'{streamed} holds shards of a job that streamed its source: rerun it with --stream always (or auto), or '
          'use a new --out') in capsys.readouterr().err
  (root / 'even' / '100.png').write_bytes((root / 'even' / '000.png').read_bytes())  # a file added: refused
  assert launch_main(tokenize + ['--source', str(root), '--out', str(streamed)]) == 2
  assert 'as it was when they were written (22 images' in capsys.readouterr().err
  (root / 'even' / '100.png').unlink()
  # A file rewritten in place under its name (another image, another size): refused, said so. A
  # job started by a version that recorded names only resumes as before.
  original = (root / 'even' / '002.png').read_bytes()
  (root / 'even' / '002.png').write_bytes((root / 'odd' / '001.png').read_bytes())
  assert len(original) != (root / 'even' / '002.png').stat().st_size
  assert launch_main(tokenize + ['--source', str(root), '--out', str(streamed)]) == 2
  assert 'it now reads the same files, some of them now of other sizes' in capsys.readouterr().err
  (root / 'even' / '002.png').write_bytes(original)
  state = json.loads((streamed / 'tokenize_state.json').read_text())
  assert state['source_images'].pop('sizes_sha256')
  (streamed / 'tokenize_state.json').write_text(json.dumps(state))
  (streamed / 'video-00001-of-00002.arrayrecord').unlink()
  assert launch_main(tokenize + ['--source', str(root), '--out', str(streamed)]) == 0
  assert shards(streamed) == shards(held)

  # --strict names a file that is no image (found by its header before any sentence) and one cut
  # short after its header (found when a sentence draws it); without, the job goes on past both.
  good = (root / 'odd' / '003.png').read_bytes()
  (root / 'odd' / '003.png').write_bytes(good[:len(good) // 2])
  strict = tokenize + ['--source', str(root), '--out', str(tmp_path / 'strict'), '--stream', 'always', '--strict',
                       '--kind', 'groups', '--sentences', '24']
  assert launch_main(strict) == 2
  assert f'{root}/odd/saved_error_page.jpg: not a readable image' in capsys.readouterr().err
  (root / 'odd' / 'saved_error_page.jpg').rename(tmp_path / 'saved_error_page.jpg')
  assert launch_main(strict) == 2
  assert f'{root}/odd/003.png: not a readable image' in capsys.readouterr().err
  (tmp_path / 'saved_error_page.jpg').rename(root / 'odd' / 'saved_error_page.jpg')
  assert launch_main(tokenize + ['--source', str(root), '--out', str(tmp_path / 'lenient'), '--stream', 'always',
                                 '--kind', 'groups', '--sentences', '24']) == 0
  assert 'odd/003.png: not a readable image' in capsys.readouterr().err

  # A tfds split, its labels read without decoding the images: the same shards either way.
  from data_pipelines.tfds_images import build_bundled_digits
  monkeypatch.setenv('TFDS_DATA_DIR', str(tmp_path / 'tfds'))
  source = build_bundled_digits(str(tmp_path / 'tfds')) + '[:120]'
  for stream in ('never', 'always'):
    assert launch_main(tokenize + ['--source', source, '--out', str(tmp_path / f'tfds_{stream}'), '--stream', stream]) == 0
  assert len(shards(tmp_path / 'tfds_never')) == 6 and shards(tmp_path / 'tfds_always') == shards(tmp_path / 'tfds_never')
  assert launch_main(tokenize + ['--out', str(tmp_path / 'digits_out'), '--stream', 'always']) == 2
  assert ('--stream always: builtin:digits built-in images and video frames are decoded into memory (image folders '
          'and tfds:NAME:SPLIT stream)') in capsys.readouterr().err


def test_coverage_notes_name_kinds_that_leave_most_of_the_source_unseen():
  from lvm.sentences import coverage_notes
  # 2048 groups of 4 from 100k images: 1 - exp(-8192 / 100000) = 7.9% seen.
  notes = coverage_notes({'groups': 2048, 'video': 2048, 'analogy': 60_000}, 100_000, 4, from_videos=False)
  assert notes == ['note: 2048 groups sentences draw 8,192 images from a source of 100,000: about 8% of them '
                   'appear; --sentences (or --kind-sentences groups=N) to use more of it',
                   'note: 2048 video sentences draw 2,048 images from a source of 100,000: about 2% of them '
                   'appear; --sentences (or --kind-sentences video=N) to use more of it']
  assert coverage_notes({'groups': 2048, 'video': 2048}, 1797, 4, from_videos=False) == []  # the digits: covered
  assert len(coverage_notes({'video': 2048}, 100_000, 4, from_videos=True)) == 1  # clips: 4 frames per sentence


def test_tfds_source_reads_a_locally_built_dataset(tmp_path):
  """The tfds path for real: `bundled_digits` is prepared here from the bundled digits (no download)
  and read back through tfds.data_source: the same images and labels, in tfds' own order."""
  from data_pipelines.image_sources import digit_images, open_images
  from data_pipelines.tfds_images import build_bundled_digits
  import os
  source = build_bundled_digits(str(tmp_path))
  os.environ['TFDS_DATA_DIR'] = str(tmp_path)
  try:
    images, labels = open_images(source, 32)
  finally:
    del os.environ['TFDS_DATA_DIR']
  expected, expected_labels = digit_images(32)
  assert images.shape == expected.shape
  by_bytes = {}
  for image, label in zip(expected, expected_labels):
    by_bytes.setdefault(image.tobytes(), set()).add(int(label))
  assert all(int(label) in by_bytes.get(image.tobytes(), ()) for image, label in zip(images, labels))
  from data_pipelines.image_sources import ImageDataError
  with pytest.raises(ImageDataError, match='tfds:no_such_set') as refused:
    open_images('tfds:no_such_set:train', 32)
  assert '\n' not in str(refused.value) and len(str(refused.value)) < 400  # not tfds' list of every dataset
  os.environ['TFDS_DATA_DIR'] = str(tmp_path)
  try:  # a prepared dataset, a split it lacks
    with pytest.raises(ImageDataError, match="tfds:bundled_digits:test: .*Unknown split 'test'"):
      open_images('tfds:bundled_digits:test', 32)
    with pytest.raises(ImageDataError, match=f"{source}:test: .*Error parsing split 'train:test'"):
      open_images(f'{source}:test', 32)  # read as train once: the extra part was dropped
    for malformed in ('tfds:', 'tfds:bundled_digits:'):
      with pytest.raises(ImageDataError, match='expected tfds:NAME or tfds:NAME:SPLIT'):
        open_images(malformed, 32)
    sliced, _ = open_images('tfds:bundled_digits:train[:10]', 32)  # tfds' split syntax, ':' and all
    np.testing.assert_array_equal(sliced, images[:10])
    from data_pipelines.streamed_images import TfdsImageStream  # streamed for the tokenizer: the same images
    streamed = TfdsImageStream('tfds:bundled_digits:train[:10]', 32)
    np.testing.assert_array_equal(streamed.images_at(range(10)), sliced)
    np.testing.assert_array_equal(streamed[13]['images'], sliced[3])  # records past the end wrap, as in memory
    # Prepared as TFRecord (tfds' default; its dataset_info says so): named, with the one-time conversion.
    import shutil
    shutil.copytree(tmp_path / 'bundled_digits', tmp_path / 'tfrecord' / 'bundled_digits')
    info = next((tmp_path / 'tfrecord' / 'bundled_digits').glob('*/dataset_info.json'))
    info.write_text(info.read_text().replace('"array_record"', '"tfrecord"'))
    os.environ['TFDS_DATA_DIR'] = str(tmp_path / 'tfrecord')
    with pytest.raises(ImageDataError, match=re.escape(
        f'{source}: prepared as TFRecord files, which are not read by index; convert it once (`tfds convert_format '
        f'--dataset_dir={tmp_path}/tfrecord/bundled_digits --out_file_format=array_record`)')):
      open_images(source, 32)
  finally:
    del os.environ['TFDS_DATA_DIR']


def test_merged_sentence_folders_read_as_one_data_set(tokenizer_dir, tmp_path, capsys):
  """`lvm merge-sentences`: digit videos and analogies from one tokenize job, annotated pairs from a
  labelled folder in another, as one folder of sentences: every input record once, each kind's
  shards under its name (lvm show --kind), the inputs' shards hard-linked; inputs whose records
  mean other things are refused before anything is written; an interrupted merge finishes."""
  from data_pipelines.token_records import TokenRecordSource, find_shards
  from tests.test_annotation_pairs import _folder
  photos, labels = _folder(tmp_path)
  common = ['lvm', 'tokenize', '--tokenizer', str(tokenizer_dir), '--sentences', '8', '--records-per-shard', '4']
  digits, pairs, mix = tmp_path / 'digits', tmp_path / 'pairs', tmp_path / 'mix'
  assert launch_main(common + ['--kind', 'video,analogy', '--out', str(digits)]) == 0
  assert launch_main(common + ['--source', str(photos), '--labels', str(labels), '--kind', 'pairs', '--out',
                               str(pairs)]) == 0
  merge = ['lvm', 'merge-sentences', '--inputs', str(digits), str(pairs), '--out', str(mix)]
  assert launch_main(merge) == 0
  manifest = json.loads((mix / 'manifest.json').read_text())
  assert manifest['records_per_kind'] == {'analogy': 8, 'video': 8, 'pairs': 8}
  assert manifest['tokenizer'] == str(tokenizer_dir) and manifest['seq_len'] == 256

  def records(folder):
    source = TokenRecordSource(find_shards(folder), seq_len=256, vocab_size=228)
    return sorted(source[i].tobytes() for i in range(len(source)))
  merged = records(mix)
  assert merged == sorted(records(digits) + records(pairs))
  assert (mix / 'pairs-input2-00001-of-00002.arrayrecord').stat().st_ino == \
      (pairs / 'pairs-00001-of-00002.arrayrecord').stat().st_ino  # linked, not copied
  assert launch_main(['lvm', 'show', '--data', str(mix), '--kind', 'pairs', '--records', '0-1', '--out',
                      str(tmp_path / 'pairs.png')]) == 0  # its tokenizer found through the manifest, by kind

  # Cut short before its manifest (and one shard): the same command finishes the same data set.
  (mix / 'manifest.json').unlink()
  (mix / 'video-input1-00001-of-00002.arrayrecord').unlink()
  assert launch_main(merge) == 0
  assert json.loads((mix / 'manifest.json').read_text()) == manifest and records(mix) == merged
  assert launch_main(merge) == 2  # finished: a second merge into it is refused

  _check_weighted_merge(digits, pairs, tmp_path, capsys)
  # Held out for validation while training, several kinds give records in turn (their shards are
  # sorted by kind: the first 6 records alone would all be videos).
  from lvm.config import DataConfig
  from lvm.validation_data import held_out_batches
  config = load_config_file(ROOT / 'lvm/configs/tiny.py')
  config = dataclasses.replace(config, model=dataclasses.replace(config.model, vocab_size=228),
                               data=DataConfig(train_path=str(mix), eval_path=str(mix), eval_examples=7))
  validated = np.concatenate([b['tokens'] for b in held_out_batches(config, 2)(0, 1)])
  by_kind = {kind: TokenRecordSource(sorted(mix.glob(f'{kind}-*')), seq_len=256, vocab_size=228)
             for kind in manifest['kinds']}
  assert manifest['kinds'] == ['video', 'analogy', 'pairs']
  expected = [by_kind[kind][i] for i in range(2) for kind in manifest['kinds']]  # 6: whole batches of 2
  np.testing.assert_array_equal(validated, np.stack(expected))

  assert launch_main(common + ['--kind', 'video', '--frames', '3', '--out', str(tmp_path / 'short')]) == 0
  capsys.readouterr()
  for inputs, weights, named in (
      ([digits, tmp_path / 'short'], [], 'differ in seq_len (seq_len 192 against 256)'),
      ([digits, digits], [], 'names a folder twice'),
      ([digits, photos], [], 'no manifest.json of `lvm tokenize`'),
      ([digits], [], 'two or more'),
      ([digits, pairs], ['1'], '--weights: 1 given for 2 --inputs'),
      ([digits, pairs], ['1', '0'], '--weights 0.0: each must be a number > 0'),
      ([tmp_path / 'weighted', digits], [], 'a weighted merge (--weights); merge the folders it was made of')):
    out = tmp_path / 'refused'
    weighs = ['--weights', *weights] if weights else []
    assert launch_main(['lvm', 'merge-sentences', '--inputs', *map(str, inputs), *weighs, '--out', str(out)]) == 2
    assert named in capsys.readouterr().err and not out.exists()
  (tmp_path / 'a_file').write_text('x')
  assert launch_main(['lvm', 'merge-sentences', '--inputs', str(digits), str(pairs), '--out',
                      str(tmp_path / 'a_file')]) == 2
  assert 'a_file is a file, not a directory' in capsys.readouterr().err


def _check_weighted_merge(digits, pairs, tmp_path, capsys):
  """`merge-sentences --weights 1 3`: of every epoch's 24 records, 6 from the 16 digit sentences and 18
  from the 8 pairs (each 2 or 3 times), the digits going on through all theirs across epochs; resumed
  and 2-host reads the same; `lvm train` draws its batches so."""
  from data_pipelines.mixture import training_mixture
  from data_pipelines.token_loader import token_batches
  from data_pipelines.token_records import TokenRecordSource, find_shards
  weighted = tmp_path / 'weighted'
  assert launch_main(['lvm', 'merge-sentences', '--inputs', str(digits), str(pairs), '--weights', '1', '3',
                      '--out', str(weighted)]) == 0
  manifest = json.loads((weighted / 'manifest.json').read_text())
  assert [entry['weight'] for entry in manifest['inputs']] == [1.0, 3.0]
  source = TokenRecordSource(find_shards(weighted), seq_len=256, vocab_size=228)
  mixture = training_mixture(weighted, manifest, source)
  assert (mixture.total, mixture.slots) == (24, [6, 18])
  # Records by their bytes, with how often each occurs in its input (sentences drawn at random may repeat).
  pair_records = Counter(r.tobytes() for r in TokenRecordSource(find_shards(pairs), seq_len=256, vocab_size=228))
  digit_records = Counter(r.tobytes() for r in TokenRecordSource(find_shards(digits), seq_len=256, vocab_size=228))
  batches = lambda **kw: token_batches(source, global_batch=4, seed=3, mixture=mixture, **kw)
  read = [next(it)['tokens'] for it in [batches()] for _ in range(48)]  # 8 epochs of 6 batches
  epochs = [[row.tobytes() for batch in read[e * 6:(e + 1) * 6] for row in batch] for e in range(8)]
  for epoch in epochs:
    assert sum(row in pair_records for row in epoch) == 18
    assert all(2 * n <= epoch.count(row) <= 3 * n for row, n in pair_records.items())  # 18 slots, 8 records
  videos = {r.tobytes() for r in TokenRecordSource(sorted(digits.glob('video-*')), seq_len=256, vocab_size=228)}
  first = [row for row in epochs[0] if row not in pair_records]  # an epoch's share is no run of one kind's shards
  assert any(row in videos for row in first) and not all(row in videos for row in first)
  seen = Counter(row for epoch in epochs for row in epoch if row not in pair_records)
  assert seen == Counter({row: 3 * n for row, n in digit_records.items()})  # 48 slots through 16 records: 3 each
  iterator = batches()
  for _ in range(7):
    next(iterator)
  resumed = batches()
  resumed.set_state(iterator.get_state())
  hosts = [batches(process_index=h, process_count=2) for h in range(2)]
  for state_holder in hosts:
    state_holder.set_state(iterator.get_state())
  for step in range(7, 12):
    np.testing.assert_array_equal(next(resumed)['tokens'], read[step])
    np.testing.assert_array_equal(np.concatenate([next(h)['tokens'] for h in hosts]), read[step])
  # Training on the weighted folder takes those batches: its losses are those of training on the
  # loader's first two batches, saved as an .npy read in order.
  capsys.readouterr()
  np.save(tmp_path / 'first_batches.npy', np.concatenate(read[:2]))
  settings = ['model.hidden_size=32', 'model.intermediate_size=64', 'model.num_heads=2', 'model.num_kv_heads=1',
              'model.num_layers=1', 'model.vocab_size=228', 'train.global_batch=4', 'train.steps=2',
              'train.progress_bar=false', 'train.tensorboard=false', 'train.seed=3', 'train.log_every=1']
  losses = {}
  for data, extra in ((weighted, []), (tmp_path / 'first_batches.npy', ['data.shuffle=false'])):
    workdir = tmp_path / f'lvm_{data.stem}'
    assert launch_main(['lvm', 'train', '--config', str(ROOT / 'lvm/configs/tiny.py'), '--tpu', CPU1, '--workdir',
                        str(workdir), *[a for s in settings + extra + [f'data.train_path={data}'] for a in ('--set', s)]]) == 0
    losses[data.stem] = [json.loads(line)['loss'] for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert 'weighted by input: input 1 (' in capsys.readouterr().err
  assert 'from its 16 (0.38x an epoch)' in json.loads((tmp_path / 'lvm_weighted' / 'train_result.json').read_text())['data']
  assert len(losses['weighted']) == 2 and losses['weighted'] == losses['first_batches']


def test_a_tfds_dataset_of_videos_gives_the_clips_a_folder_of_them_does(tokenizer_dir, tmp_path, monkeypatch):
  """`frames:tfds:NAME:SPLIT`: each example's clip is one video (moving_mnist's image_sequence, ucf101's
  video, ...), read as the same clips saved as folders of frames are: the same pixels, and the
  same sentence shards byte for byte. Built here as a tfds dataset, offline."""
  import tensorflow_datasets as tfds
  from PIL import Image
  from data_pipelines.image_sources import ImageDataError, named_videos, open_images
  rng = np.random.default_rng(5)
  clips = rng.integers(0, 256, (4, 5, 12, 10, 1), dtype=np.uint8)  # grey 12x10 frames, cropped square

  class DigitClips(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          'image_sequence': tfds.features.Tensor(shape=(5, 12, 10, 1), dtype=np.uint8)}))

    def _split_generators(self, dl_manager):
      return {'train': self._generate_examples()}

    def _generate_examples(self):
      for i, clip in enumerate(clips):
        yield i, {'image_sequence': clip}

  DigitClips(data_dir=str(tmp_path / 'tfds'), file_format='array_record').download_and_prepare()
  monkeypatch.setenv('TFDS_DATA_DIR', str(tmp_path / 'tfds'))
  stored = tfds.data_source('digit_clips', split='train')  # in tfds' own order (it shuffles by key)
  assert sorted(stored[i]['image_sequence'].tobytes() for i in range(4)) == sorted(c.tobytes() for c in clips)
  for v, clip in enumerate(stored[i]['image_sequence'] for i in range(4)):  # the folders in that order
    (tmp_path / 'clips' / f'v{v}').mkdir(parents=True)
    for f, frame in enumerate(clip, 1):
      Image.fromarray(frame[..., 0]).save(tmp_path / 'clips' / f'v{v}' / f'frame{f}.png')
  from_tfds = named_videos('tfds:digit_clips:train', 32)
  assert [name for name, _ in from_tfds] == [f'digit_clips:train[{i}]' for i in range(4)]
  for (_, frames), (_, expected) in zip(from_tfds, named_videos(tmp_path / 'clips', 32)):
    np.testing.assert_array_equal(frames, expected)
  args = ['lvm', 'tokenize', '--tokenizer', str(tokenizer_dir), '--kind', 'video', '--frames', '3',
          '--sentences', '8']
  assert launch_main(args + ['--source', 'frames:tfds:digit_clips:train', '--out', str(tmp_path / 'a')]) == 0
  assert launch_main(args + ['--source', f'frames:{tmp_path / "clips"}', '--out', str(tmp_path / 'b')]) == 0
  shard = 'video-00000-of-00001.arrayrecord'
  assert (tmp_path / 'a' / shard).read_bytes() == (tmp_path / 'b' / shard).read_bytes()
  with pytest.raises(ImageDataError, match=r"no image field .* a dataset of videos: give frames:tfds:digit_clips"):
    open_images('tfds:digit_clips', 32)
  # tfds' Video feature (ucf101's, moving_mnist's) needs TensorFlow to read, not only to build: its
  # ModuleNotFoundError, raised as tfds opens such a dataset, said as what to install.
  def needs_tensorflow(*args, **kwargs):
    raise ModuleNotFoundError("No module named 'tensorflow'", name='tensorflow')
  monkeypatch.setattr(tfds, 'data_source', needs_tensorflow)
  with pytest.raises(ImageDataError, match=r"tfds:ucf101:train: tfds reads .* with TensorFlow .*pip install "
                                           r"tensorflow-cpu"):
    named_videos('tfds:ucf101:train', 32)


def test_video_folders_give_real_clips_at_a_stride(tokenizer_dir, tmp_path, capsys):
  from PIL import Image
  from lvm.sentences import sentence_frames
  from data_pipelines.image_sources import video_frames
  for video in range(2):
    (tmp_path / 'videos' / f'clip{video}').mkdir(parents=True)
    for t in range(9):  # a bright bar sliding right, one column per frame
      frame = np.zeros((32, 32, 3), np.uint8)
      frame[:, t * 3:t * 3 + 3] = 255 if video == 0 else 128
      Image.fromarray(frame).save(tmp_path / 'videos' / f'clip{video}' / f'{t:03d}.png')
  videos = video_frames(tmp_path / 'videos', 32)
  assert [len(v) for v in videos] == [9, 9]
  clip = sentence_frames('video', 0, np.concatenate(videos), np.full(18, -1), 4, seed=0, videos=videos, stride=2)
  source = next(v for v in videos if np.any([np.array_equal(clip[0], f) for f in v]))
  start = next(i for i, f in enumerate(source) if np.array_equal(clip[0], f))
  for k in range(4):  # consecutive frames of one clip, two apart
    np.testing.assert_array_equal(clip[k], source[start + 2 * k])
  out = tmp_path / 'clips'
  (tmp_path / 'videos' / 'short').mkdir()  # 3 frames: too few for 4 frames at stride 2
  for t in range(3):
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / 'videos' / 'short' / f'{t:03d}.png')
  capsys.readouterr()
  assert launch_main(['lvm', 'tokenize', '--tokenizer', str(tokenizer_dir), '--source', f'frames:{tmp_path / "videos"}',
                      '--kind', 'video', '--stride', '2', '--out', str(out), '--sentences', '30']) == 0
  assert json.loads((out / 'manifest.json').read_text())['records_per_kind'] == {'video': 30}
  # Said, where both went by silently: the short video is left out, and 30 sentences from the 2 x 3
  # windows of 7 frames repeat them.
  notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith('note:')]
  assert notes == [f'note: 1 of the 3 videos has fewer than 7 frames (--frames 4 at --stride 2) and gives no video '
                   f'sentence: {tmp_path / "videos" / "short"}',
                   'note: 30 video sentences from 6 distinct clips (4 frames at stride 2): each appears about 5 times '
                   '(more videos, or fewer sentences: --kind-sentences video=N)']
  from lvm.sentences import video_notes  # no video sentences asked for (--kind groups of their frames): no note
  assert video_notes([('short', np.zeros((3, 32, 32, 3))), ('long', np.zeros((9, 32, 32, 3)))], 0, 4, 2) == []
  assert launch_main(['lvm', 'tokenize', '--tokenizer', str(tokenizer_dir), '--source', f'frames:{tmp_path / "videos"}',
                      '--kind', 'video', '--stride', '4', '--out', str(tmp_path / 'x'), '--sentences', '8']) == 2
  # The same source string trains a tokenizer on every frame ('no such image folder' before).
  from data_pipelines.image_sources import open_images
  frames, labels = open_images(f'frames:{tmp_path / "videos"}', 32)
  np.testing.assert_array_equal(frames, np.concatenate(video_frames(tmp_path / 'videos', 32)))
  assert frames.shape == (21, 32, 32, 3) and (labels == -1).all()


def test_groups_come_from_classes_that_can_fill_them_without_repeats():
  """A class with fewer images than a sentence's frames gave groups that repeated an image; it is left
  out of groups (said), and a source where no class can fill one is refused when groups are asked for."""
  from core.config import ConfigError
  from lvm.sentences import KINDS, group_notes, kinds_for, sentence_frames
  images = np.arange(11, dtype=np.float32)[:, None, None, None] * np.ones((1, 4, 4, 3), np.float32)
  labels = np.array([0] * 6 + [1] * 2 + [2] * 3)
  for n in range(40):
    drawn = sentence_frames('groups', n, images, labels, 4, seed=0)[:, 0, 0, 0].astype(int)
    assert len(set(drawn)) == 4 and set(drawn) <= set(range(6)), drawn  # class 0 only, no image twice
  assert group_notes(labels, 4, 40) == ['note: 2 of 3 classes have fewer than 4 images (--frames 4) and give no '
                                        'groups sentence (one would repeat an image)']
  assert group_notes(labels, 4, 0) == [] and group_notes(labels, 2, 40) == []
  with pytest.raises(ConfigError, match=r'--kind groups: no class has 8 images \(--frames 8\)'):
    kinds_for(images, labels, ['groups'], 8)
  assert 'groups' not in kinds_for(images, labels, None, 8) and 'groups' in kinds_for(images, labels, None, 4)
  # Classes that can fill a group draw exactly as before (a resumed job's sentences stay the same).
  digits_like = np.repeat(np.arange(3), 20)
  for n in range(10):
    rng = np.random.default_rng([5, KINDS.index('groups'), n])
    classes = np.unique(digits_like)
    before = rng.choice(np.flatnonzero(digits_like == classes[rng.integers(len(classes))]), 4, replace=False)
    pixels = np.arange(60, dtype=np.float32)[:, None, None, None] * np.ones((1, 4, 4, 3), np.float32)
    np.testing.assert_array_equal(sentence_frames('groups', n, pixels, digits_like, 4, seed=5), pixels[before])


def test_video_files_are_named_with_how_to_give_their_frames(tmp_path):
  """An .mp4 given as a source, inside a folder of videos, or as a prompt image said 'no such image
  folder', 'no image files' or 'not a readable image'; nothing here decodes video, so say how to
  give its frames (as `frames:`)."""
  from data_pipelines.image_sources import ImageDataError, folder_images, load_image, named_videos, open_images
  (tmp_path / 'clips').mkdir()
  for name in ('walk.mp4', 'run.MOV'):
    (tmp_path / 'clips' / name).write_bytes(b'\x00\x00\x00\x18ftypmp42')
  hint = ('video files are not decoded here ({}): extract their frames first, one folder per video '
          '(mkdir -p frames/{stem} && ffmpeg -i {name} frames/{stem}/frame%d.png), then ')
  for read in (lambda: folder_images(tmp_path / 'clips', 32), lambda: named_videos(tmp_path / 'clips', 32),
               lambda: open_images(f'frames:{tmp_path / "clips"}', 32)):
    with pytest.raises(ImageDataError) as raised:
      read()
    assert str(raised.value) == (f'{tmp_path / "clips"}: ' + hint.format('run.MOV and 1 more', stem='run', name='run.MOV')
                                 + 'give --source frames:frames/')
  video = tmp_path / 'clips' / 'walk.mp4'
  for read in (lambda: folder_images(video, 32), lambda: open_images(str(video), 32)):
    with pytest.raises(ImageDataError, match=r'walk.mp4: video files are not decoded here \(walk.mp4\)'):
      read()
  with pytest.raises(ImageDataError) as raised:
    load_image(video, 32)  # a prompt image
  assert str(raised.value).endswith('then give frames of it as the images')


def test_frames_numbered_without_zero_padding_keep_their_order(tmp_path):
  """ffmpeg's `frame%d.png` names frame1 ... frame12: in name order frame10-12 came between frame1 and
  frame2, and every clip crossing them jumped back and forth in time."""
  from PIL import Image
  from data_pipelines.image_sources import named_videos
  (tmp_path / 'clips' / 'v').mkdir(parents=True)
  for t in range(1, 13):  # the brightness is the frame number
    Image.fromarray(np.full((8, 8, 3), 20 * t, np.uint8)).save(tmp_path / 'clips' / 'v' / f'frame{t}.png')
  [(_, frames)] = named_videos(tmp_path / 'clips', 8)
  np.testing.assert_allclose(frames[:, 0, 0, 0] * 255, 20 * np.arange(1, 13), atol=1e-3)


def _grey_clip(seed: int, frames: int = 9) -> list:
  """Grey PIL frames (exact in GIF, lossless WebP and PNG): a bright bar sliding right over noise."""
  from PIL import Image
  rng = np.random.default_rng(seed)
  clip = []
  for t in range(frames):
    frame = rng.integers(0, 256, (32, 32)).astype(np.uint8)
    frame[:, t * 3:t * 3 + 3] = 255
    clip.append(Image.fromarray(frame))
  return clip


def test_animated_gif_webp_and_png_files_are_videos(tokenizer_dir, tmp_path, capsys):
  """A folder of GIF clips (as GIF video data sets come) said 'no video folders': only subfolders of
  frame images were videos. An animated GIF, WebP or PNG, which PIL decodes itself, is now one video,
  its frames exactly those of the same clip as a folder of PNGs, down to the tokenized sentences."""
  from data_pipelines.image_sources import ImageDataError, named_videos
  from data_pipelines.token_records import TokenRecordSource, find_shards
  from PIL import Image
  (tmp_path / 'animated').mkdir()
  for seed, name in enumerate(('a.gif', 'b.webp', 'c.png')):
    clip = _grey_clip(seed)
    clip[0].save(tmp_path / 'animated' / name, save_all=True, append_images=clip[1:], duration=80,
                 **({'lossless': True} if name.endswith('.webp') else {}))
    (tmp_path / 'folders' / name[0]).mkdir(parents=True)
    for t, frame in enumerate(clip):
      frame.save(tmp_path / 'folders' / name[0] / f'frame{t}.png')
  _grey_clip(3, 1)[0].save(tmp_path / 'animated' / 'd_still.png')  # one frame: an image, not a video
  (tmp_path / 'animated' / '._a.gif').write_bytes(b'macOS metadata')
  capsys.readouterr()
  animated = named_videos(tmp_path / 'animated', 32)
  assert 'left out 1 still images at its top level, e.g. d_still.png' in capsys.readouterr().err
  folders = named_videos(tmp_path / 'folders', 32)
  assert [name for name, _ in animated] == [str(tmp_path / 'animated' / n) for n in ('a.gif', 'b.webp', 'c.png')]
  for (_, frames), (_, expected) in zip(animated, folders, strict=True):
    assert frames.shape == (9, 32, 32, 3)
    np.testing.assert_array_equal(frames, expected)
  out = {}
  for source in ('animated', 'folders'):
    out[source] = tmp_path / f'{source}_sentences'
    assert launch_main(['lvm', 'tokenize', '--tokenizer', str(tokenizer_dir), '--source', f'frames:{tmp_path / source}',
                        '--kind', 'video', '--stride', '2', '--sentences', '12', '--out', str(out[source])]) == 0
  sentences = [TokenRecordSource(find_shards(out[source]), seq_len=256, vocab_size=128) for source in out]
  assert len(sentences[0]) == len(sentences[1]) == 12
  for n in range(12):
    np.testing.assert_array_equal(sentences[0][n], sentences[1][n])
  # A damaged clip is skipped, named; --strict fails on it instead.
  (tmp_path / 'animated' / 'e.gif').write_bytes((tmp_path / 'animated' / 'a.gif').read_bytes()[:60])
  assert len(named_videos(tmp_path / 'animated', 32)) == 3
  assert f'warning: skipped {tmp_path / "animated" / "e.gif"}: not a readable image' in capsys.readouterr().err
  with pytest.raises(ImageDataError, match='e.gif: not a readable image'):
    named_videos(tmp_path / 'animated', 32, strict=True)
  # Only still images: no video, said as such.
  (tmp_path / 'stills').mkdir()
  Image.new('L', (8, 8)).save(tmp_path / 'stills' / 'one.gif')
  with pytest.raises(ImageDataError, match=r'stills: no videos \(a subfolder of frame images, or an animated GIF'):
    named_videos(tmp_path / 'stills', 32)


def test_pairs_sentences_are_tokenized_images_with_their_labels(tokenizer_dir, tmp_path, capsys):
  from PIL import Image as PILImage
  from tests.test_annotation_pairs import _folder as pairs_folder
  from data_pipelines.token_records import TokenRecordSource, find_shards
  from lvm.sentences import plan_tokenize_job, sentence_frames
  photos, labels = pairs_folder(tmp_path)
  out = tmp_path / 'sentences'
  args = ['lvm', 'tokenize', '--tokenizer', str(tokenizer_dir), '--source', str(photos), '--labels', str(labels),
          '--out', str(out), '--sentences', '6', '--frames', '4']
  assert launch_main(args + ['--kind', 'pairs']) == 0
  manifest = json.loads((out / 'manifest.json').read_text())
  assert manifest['records_per_kind'] == {'pairs': 6} and manifest['labels'] == str(labels)
  job = plan_tokenize_job(str(tokenizer_dir), str(photos), ['pairs'], str(tmp_path / 'unused'), frames=4,
                          sentences=6, labels=str(labels), claim=False)
  annotations, labelled = job.pairs
  for n in range(6):
    frames = sentence_frames('pairs', n, job.images, job.labels, 4, 0, pairs=job.pairs)
    firsts = [next(i for i in labelled if np.array_equal(job.images[i], frames[k])) for k in (0, 2)]
    assert firsts[0] != firsts[1]  # two different labelled images, each followed by its own label
    for k, i in zip((1, 3), firsts):
      np.testing.assert_array_equal(frames[k], annotations[i])
    if n == 0:
      records = TokenRecordSource(find_shards(out), seq_len=4 * 64, vocab_size=228)
      np.testing.assert_array_equal(records[0], job.tokenizer.encode(frames).reshape(-1))
  # With --labels, the folder's other kinds too, unless --kind says otherwise.
  assert launch_main(args[:-6] + ['--out', str(tmp_path / 'all'), '--sentences', '4']) == 0
  assert 'pairs' in json.loads((tmp_path / 'all' / 'manifest.json').read_text())['kinds']
  # Interrupted after its first shard; a label changed before the rerun: the rest would pair other pictures.
  resumed = tmp_path / 'resumed'
  assert launch_main(args[:-6] + ['--kind', 'pairs', '--out', str(resumed), '--sentences', '6',
                                  '--frames', '4', '--records-per-shard', '3']) == 0
  (resumed / 'manifest.json').unlink()
  sorted(resumed.glob('*.arrayrecord'))[-1].unlink()
  PILImage.open(labels / 'a' / '2.png').transpose(PILImage.FLIP_LEFT_RIGHT).save(labels / 'a' / '0.png')
  capsys.readouterr()
  assert launch_main(args[:-6] + ['--kind', 'pairs', '--out', str(resumed), '--sentences', '6',
                                  '--frames', '4', '--records-per-shard', '3']) == 2
  assert f'{resumed} holds shards of {photos} as it was when they were written' in capsys.readouterr().err


def test_pairs_settings_that_cannot_work_are_refused_before_anything_is_written(tokenizer_dir, tmp_path, capsys):
  from tests.test_annotation_pairs import _folder as pairs_folder
  photos, labels = pairs_folder(tmp_path)
  base = ['lvm', 'tokenize', '--tokenizer', str(tokenizer_dir), '--sentences', '4']
  cases = {
      'pairs without labels': (['--source', str(photos), '--kind', 'pairs'], '--kind pairs needs --labels DIR'),
      'labels for built-in images': (['--source', 'builtin:digits', '--labels', str(labels)],
                                     '--labels pairs label pictures with the images of a folder source'),
      'label ids without labels': (['--source', str(photos), '--label-ids'], '--label-ids without --labels'),
      'no labels folder': (['--source', str(photos), '--labels', str(tmp_path / 'nope')], 'no such folder of label'),
      'an odd frame count': (['--source', str(photos), '--labels', str(labels), '--kind', 'pairs', '--frames', '3'],
                             'pairs sentences are pairs; use an even count'),
      'too few labelled images': (['--source', str(photos), '--labels', str(labels), '--kind', 'pairs',
                                   '--frames', '20'], '8 labelled images are too few for pairs sentences of 10'),
  }
  for name, (settings, message) in cases.items():
    out = tmp_path / name.replace(' ', '_')
    assert launch_main(base + settings + ['--out', str(out)]) == 2, name
    error = capsys.readouterr().err
    assert message in error, (name, error)
    assert not out.exists(), name


def test_show_decodes_sentences_into_a_grid_of_their_frames(tokenizer_dir, tmp_path, capsys):
  """`lvm show` draws records as the tokenizer decodes them, one row each, chosen by kind and position;
  it refuses what it cannot decode (special tokens, another tokenizer's codes) by name."""
  import shutil
  from PIL import Image
  from data_pipelines.token_records import TokenRecordSource, find_shards
  from lvm.tokenizer_commands import load_tokenizer
  out = tmp_path / 'sentences'
  assert launch_main(['lvm', 'tokenize', '--tokenizer', str(tokenizer_dir), '--source', 'builtin:digits',
                      '--kind', 'analogy,groups', '--sentences', '6', '--out', str(out)]) == 0
  assert launch_main(['lvm', 'show', '--data', str(out), '--kind', 'groups', '--records', '1-2,5',
                      '--out', str(tmp_path / 'groups.png')]) == 0
  tokenizer = load_tokenizer(tokenizer_dir)
  groups = TokenRecordSource([p for p in find_shards(out) if 'groups-' in str(p)], seq_len=256, vocab_size=228)
  grid = np.asarray(Image.open(tmp_path / 'groups.png'), np.float32) / 255
  assert grid.shape == (4 * (3 * 33 - 1), 4 * (4 * 33 - 1), 3)  # 3 rows of 4 frames, scaled by 4
  for row, record in enumerate((1, 2, 5)):
    expected = tokenizer.decode(groups[record].reshape(4, 64))
    for frame in range(4):
      cell = grid[4 * row * 33:4 * row * 33 + 128:4, 4 * frame * 33:4 * frame * 33 + 128:4]
      np.testing.assert_allclose(cell, np.clip(expected[frame], 0, 1), atol=0.5 / 255 + 1e-6)
  # By default: the first 8 records, into the data folder.
  assert launch_main(['lvm', 'show', '--data', str(out)]) == 0
  assert Image.open(out / 'sentences.png').size[1] == 4 * (8 * 33 - 1)
  capsys.readouterr()
  special = tmp_path / 'special'
  special.mkdir()
  tokens = np.zeros((4, 256), np.int32)
  tokens[2, 70] = 130  # a special id (codes are below 128)
  np.save(tmp_path / 'special.npy', tokens)
  assert launch_main(['data', 'tokens', '--input', str(tmp_path / 'special.npy'), '--out', str(special),
                      '--seq-len', '256']) == 0
  forged = tmp_path / 'forged'  # a manifest naming other tokenizer parameters than those at its path
  shutil.copytree(out, forged)
  manifest = json.loads((forged / 'manifest.json').read_text())
  (forged / 'manifest.json').write_text(json.dumps({**manifest, 'tokenizer_checksum': 'abc123'}))
  capsys.readouterr()
  cases = {
      'an unknown kind': (['--data', str(out), '--kind', 'video'], "--kind 'video': "),
      'a record past the end': (['--data', str(out), '--kind', 'groups', '--records', '4-6'],
                                "--records '4-6': [6] outside the 6 records there"),
      'a bad record list': (['--data', str(out), '--records', 'first'], "--records 'first': give positions"),
      'another tokenizer': (['--data', str(forged)], 'parameters abc123): its codes would decode into other pictures'),
      'no manifest': (['--data', str(special)], 'has no manifest.json naming the tokenizer'),
      'a special token': (['--data', str(special), '--tokenizer', str(tokenizer_dir)],
                          'record 2 holds the special token 130 at 70'),
  }
  for name, (args, message) in cases.items():
    assert launch_main(['lvm', 'show', *args, '--out', str(tmp_path / 'x.png')]) == 2, name
    error = capsys.readouterr().err
    assert message in error, (name, error)
  assert not (tmp_path / 'x.png').exists()


def test_each_adversarial_term_moves_only_its_own_player():
  """One loss, one optimizer, two players: the tokenizer's gradient equals that of reconstruction +
  w x generator term with the discriminator held fixed, and the discriminator's gradient equals that
  of its hinge loss alone (the reconstruction a constant)."""
  config = TokenizerConfig(block_out_channels=(8, 8), layers_per_block=1, latent_channels=4, codebook_size=16,
                           norm_num_groups=4, image_size=16)
  weight = 0.3
  task = TokenizerTask(config, TokenizerLoss(discriminator_weight=weight, discriminator_channels=8,
                                             discriminator_layers=2))
  graphdef, state = nnx.split(task.make_model(nnx.Rngs(0)))
  params = nnx.to_pure_dict(state)
  batch = {'images': jnp.asarray(np.random.default_rng(0).uniform(0, 1, (2, 16, 16, 3)), jnp.float32)}
  grads = jax.grad(lambda p: task.loss(nnx.merge(graphdef, p), batch)[0])(params)
  plain = TokenizerTask(config, TokenizerLoss())
  tokenizer_params = {k: v for k, v in params.items() if k != 'discriminator'}
  plain_graphdef = nnx.split(plain.make_model(nnx.Rngs(0)))[0]
  disc_graphdef = nnx.split(task.make_model(nnx.Rngs(0)).discriminator)[0]
  disc = lambda d, x: nnx.merge(disc_graphdef, d)(x)

  def tokenizer_reference(tp):
    model = nnx.merge(plain_graphdef, tp)
    reconstruction = model.reconstruct(batch['images'])[0]
    return plain.loss(model, batch)[0] - weight * jnp.mean(disc(params['discriminator'], reconstruction))

  def discriminator_reference(dp):
    reconstruction = nnx.merge(plain_graphdef, tokenizer_params).reconstruct(batch['images'])[0]
    real, fake = disc(dp, batch['images'] * 2 - 1), disc(dp, reconstruction)
    return 0.5 * (jnp.mean(jax.nn.relu(1 - real)) + jnp.mean(jax.nn.relu(1 + fake)))

  expected = {**jax.grad(tokenizer_reference)(tokenizer_params),
              'discriminator': jax.grad(discriminator_reference)(params['discriminator'])}
  # Same gradients up to float32 rounding of a different evaluation order: norm-wise within
  # λ√N·u, N = the networks' fan-in plus the positions a weight gradient sums over. A term that
  # leaked into the other player would be off by the size of that term's gradient, far above it.
  flat = lambda tree: np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])
  length = total_fan_in(params, 'jax') + 2 * 16 * 16
  for player in ('tokenizer', 'discriminator'):
    pick = (lambda t: t['discriminator']) if player == 'discriminator' else (
        lambda t: {k: v for k, v in t.items() if k != 'discriminator'})
    assert_network_close(flat(pick(grads)), flat(pick(expected)), reduction_length=length, what=player)
  assert float(jnp.abs(grads['discriminator']['last']['kernel']).max()) > 0
  # The generator term really reaches the tokenizer (it differs from reconstruction alone).
  alone = jax.grad(lambda tp: plain.loss(nnx.merge(plain_graphdef, tp), batch)[0])(tokenizer_params)
  assert not np.allclose(grads['decoder']['conv_out']['kernel'], alone['decoder']['conv_out']['kernel'])


def test_training_with_the_discriminator_logs_both_players_and_loads_for_encoding(tmp_path):
  work = tmp_path / 'gan'
  assert launch_main(['lvm', 'train-tokenizer', '--config', TINY_TOKENIZER, '--tpu', CPU1, '--workdir', str(work),
                      '--set', 'train.steps=8', '--set', 'train.global_batch=8', '--set', 'train.log_every=4',
                      '--set', 'train.progress_bar=false', '--set', 'train.tensorboard=false',
                      '--set', 'loss.discriminator_weight=0.1', '--set', 'loss.discriminator_channels=16']) == 0
  logged = [json.loads(line) for line in (work / 'metrics.jsonl').read_text().splitlines()]
  assert all(np.isfinite(m['discriminator_loss']) and np.isfinite(m['generator_adversarial']) for m in logged)
  # The discriminator learns to tell real from reconstructed patches.
  assert logged[-1]['discriminator_real_logit'] > logged[-1]['discriminator_fake_logit']
  from lvm.tokenizer_commands import load_tokenizer
  tokenizer = load_tokenizer(work)
  assert 'discriminator' in tokenizer.params
  tokens = tokenizer.encode(np.random.default_rng(0).uniform(0, 1, (4, 32, 32, 3)).astype(np.float32))
  assert tokens.shape == (4, 64) and tokens.max() < 128


@pytest.mark.slow  # ~80 s on 2 cores; the default suite's distill test runs the same gathering code on two processes
@pytest.mark.parametrize('streamed', [False, True])
def test_tokenizer_trains_on_two_processes_as_on_one(tmp_path, streamed):
  """Two processes of four devices train the tokenizer as one process of eight, and its closing
  reconstruction report (encode and decode over every image) runs across both: before, it fetched
  rows the other host held and crashed after training. `streamed`: a folder of images that the two
  processes stream (each decoding its own rows, each having read half of its headers) and the one
  process holds in memory."""
  from tests.helpers import CPU2X4, CPU8, free_port, launch
  from tests.tolerance import assert_network_close
  common = ['lvm', 'train-tokenizer', '--config', TINY_TOKENIZER, '--set', 'train.steps=4', '--set', 'train.log_every=1',
            '--set', 'train.checkpoint_every=4', '--set', 'optim.warmup_steps=1', '--set', 'optim.decay_steps=3',
            '--set', 'train.progress_bar=false', '--set', 'train.tensorboard=false']
  images, stream = 2821, {'one': [], 'two': []}
  if streamed:
    from tests.test_streamed_images import _digit_folder
    images, folder = 40, _digit_folder(tmp_path / 'digits')
    common += ['--set', f'data.source={folder}']
    stream = {'one': ['--set', 'data.stream=never'], 'two': ['--set', 'data.stream=always']}
  assert launch_main(common + stream['one'] + ['--tpu', CPU8, '--workdir', str(tmp_path / 'one')]) == 0
  port = free_port()
  procs = [launch(common + stream['two'] + ['--tpu', CPU2X4, '--workdir', str(tmp_path / 'two'),
                                            '--coordinator', f'127.0.0.1:{port}', '--num-processes', '2',
                                            '--process-id', str(i)], devices=4) for i in range(2)]
  for i, proc in enumerate(procs):
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, out[-3000:]
    if streamed and i == 0:  # (process 0 speaks) each read half of the headers; process 1 left out what 0 found
      assert f'{folder}: the headers of its 41 image files read, 21 of them on this host' in out, out[-3000:]
      assert f'warning: skipped {folder}/odd/saved_error_page.jpg: not a readable image' in out
  logged = [[json.loads(line)['loss'] for line in (tmp_path / w / 'metrics.jsonl').read_text().splitlines()]
            for w in ('one', 'two')]
  assert len(logged[0]) == len(logged[1]) == 4
  config = TokenizerConfig(block_out_channels=(16, 32, 64), layers_per_block=1, latent_channels=16, codebook_size=128,
                           norm_num_groups=8, image_size=32)  # tokenizer_tiny's, for its reduction length
  params = nnx.to_pure_dict(nnx.split(VQGAN(config, nnx.Rngs(0)))[1])
  # Four updates, each through the network and a mean over the batch's 32 images of 32x32x3 pixels.
  length = 4 * (total_fan_in(params, 'jax') + 32 * 32 * 3 * 32)
  assert_network_close(np.array(logged[1]), np.array(logged[0]), what='tokenizer losses', reduction_length=length)
  reports = [json.loads((tmp_path / w / 'train_result.json').read_text())['reconstruction'] for w in ('one', 'two')]
  assert reports[1]['images'] == reports[0]['images'] == images
  assert_network_close(*(np.array([r['psnr_db'], r['codebook_perplexity']]) for r in reports[::-1]),
                       what='reconstruction report', reduction_length=length + images)


def test_tokenize_on_two_processes_writes_one_process_shards(tokenizer_dir, tmp_path):
  """A slice of several hosts: each process encodes every other shard on its own devices and process 0
  writes the manifest; the shards and manifest are one process's. A rerun after a lost shard writes
  that shard alone. (Before, every host encoded and wrote every shard, all of them into one folder.)
  The two processes stream the folder (each image decoded when a sentence draws it), the one process
  holds it in memory; the rerun keeps streaming, as it began. Each process reads half of the files'
  headers, and every process leaves out (or, --strict, fails on) a file the other one found."""
  from tests.helpers import CPU2X4, free_port, launch
  from tests.test_streamed_images import _digit_folder
  folder = _digit_folder(tmp_path / 'digits', 24)
  (folder / 'even' / '0000_broken.png').write_bytes(b'\x89PNG not really')  # listed 2nd: process 1's share
  common = ['lvm', 'tokenize', '--tokenizer', str(tokenizer_dir), '--sentences', '24', '--records-per-shard', '8',
            '--kind', 'video', '--kind', 'colorization', '--source', str(folder)]
  assert launch_main(common + ['--out', str(tmp_path / 'one'), '--stream', 'never']) == 0

  def on_two_processes(*stream):
    port = free_port()
    procs = [launch(common + ['--out', str(tmp_path / 'two'), '--tpu', CPU2X4, '--coordinator', f'127.0.0.1:{port}',
                              '--num-processes', '2', '--process-id', str(i), *stream], devices=4) for i in range(2)]
    outputs = [proc.communicate(timeout=600)[0] for proc in procs]
    for proc, out in zip(procs, outputs):
      assert proc.returncode == 0, out[-3000:]
    return outputs[0]
  printed = on_two_processes('--stream', 'always')
  # Process 0 wrote shards 1, 3, 5 of the 6 (video 0 and 2, colorization 1) and said so; process 1 the rest.
  assert 'tokenize: video-00000-of-00003' in printed and 'tokenize: video-00001-of-00003' not in printed
  assert f'{folder}: the headers of its 26 image files read, 13 of them on this host, the rest on the 1 other' in printed
  assert f'warning: skipped {folder}/even/0000_broken.png: not a readable image' in printed  # found by process 1
  assert f'warning: skipped {folder}/odd/saved_error_page.jpg: not a readable image' in printed
  one = {p.name: p.read_bytes() for p in (tmp_path / 'one').glob('*.arrayrecord')}
  assert len(one) == 6 and {p.name: p.read_bytes() for p in (tmp_path / 'two').glob('*.arrayrecord')} == one
  manifest = json.loads((tmp_path / 'two' / 'manifest.json').read_text())
  assert manifest.pop('source_images')['streamed']  # the files' names, not the pixels: the rest is the same
  assert manifest == {k: v for k, v in json.loads((tmp_path / 'one' / 'manifest.json').read_text()).items()
                      if k != 'source_images'}
  assert json.loads((tmp_path / 'two' / 'tokenize_result.json').read_text())['shards_written_this_run'] == 6
  (tmp_path / 'two' / 'video-00001-of-00003.arrayrecord').unlink()
  on_two_processes()
  assert json.loads((tmp_path / 'two' / 'tokenize_result.json').read_text())['shards_written_this_run'] == 1
  assert {p.name: p.read_bytes() for p in (tmp_path / 'two').glob('*.arrayrecord')} == one
  # The fingerprint (names, labels, sizes) does not depend on how many hosts read the headers: one
  # process resumes the two processes' job.
  (tmp_path / 'two' / 'colorization-00002-of-00003.arrayrecord').unlink()
  assert launch_main(common + ['--out', str(tmp_path / 'two')]) == 0
  assert json.loads((tmp_path / 'two' / 'tokenize_result.json').read_text())['shards_written_this_run'] == 1
  assert {p.name: p.read_bytes() for p in (tmp_path / 'two').glob('*.arrayrecord')} == one
  # --strict: both processes fail on the file that process 1 read, naming it.
  port = free_port()
  procs = [launch(common + ['--out', str(tmp_path / 'strict'), '--tpu', CPU2X4, '--coordinator', f'127.0.0.1:{port}',
                            '--num-processes', '2', '--process-id', str(i), '--stream', 'always', '--strict'],
                  devices=4) for i in range(2)]
  for proc in procs:
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 2 and f'{folder}/even/0000_broken.png: not a readable image' in out, out[-3000:]


def test_tokenize_stops_every_process_when_one_fails(tokenizer_dir, tmp_path):
  """A shard that fails on one host (here its disk is full) stops the other host once that one has
  written its own shards, with the failing host's message, instead of leaving it at the barrier. The
  rerun writes the missing shard; when process 0 then cannot write the manifest, process 1 fails too
  (before, it reported success for a job without a manifest)."""
  from tests.helpers import CPU2X4, free_port, launch_with_full_disk, outputs_of

  def two_processes(writer, failing):
    port = free_port()
    procs = [launch_with_full_disk(writer, failing, [
        'lvm', 'tokenize', '--tokenizer', str(tokenizer_dir), '--sentences', '16', '--records-per-shard', '8',
        '--kind', 'video', '--out', str(tmp_path / 'out'), '--tpu', CPU2X4, '--coordinator', f'127.0.0.1:{port}',
        '--num-processes', '2', '--process-id', str(i)], devices=4) for i in range(2)]
    return procs, outputs_of(procs, 240)
  procs, outputs = two_processes('lvm.sentences.write_sentence_shard', 1)
  assert [proc.returncode for proc in procs] == [2, 2], outputs
  assert 'error: the disk is full ([Errno 28] No space left on device)' in outputs[1]
  assert ('error: the disk is full (tokenize: every shard written: process 1 of 2 failed, so this one stops too: '
          'OSError: [Errno 28] No space left on device)') in outputs[0]
  # Process 0's shard is kept for the rerun; no manifest, since the job is not whole.
  assert sorted(p.name for p in (tmp_path / 'out').glob('*.arrayrecord')) == ['video-00000-of-00002.arrayrecord']
  assert not (tmp_path / 'out' / 'manifest.json').exists()

  procs, outputs = two_processes('lvm.sentences.finish_tokenize_job', 0)
  assert [proc.returncode for proc in procs] == [2, 2], outputs
  assert ('error: the disk is full (tokenize: the manifest written: process 0 of 2 failed, so this one stops too: '
          'OSError: [Errno 28] No space left on device)') in outputs[1]
  # The rerun wrote the missing shard (on process 1); the manifest is still to be written.
  assert len(list((tmp_path / 'out').glob('*.arrayrecord'))) == 2 and not (tmp_path / 'out' / 'manifest.json').exists()


def test_beam_pipeline_writes_the_same_shards_and_resumes(tokenizer_dir, tmp_path, capsys):
  """`lvm tokenize --beam` on Beam's DirectRunner: byte-identical shards to `lvm tokenize`, the same
  manifest and notes (said once: a worker's own planning of the job repeated them); a rerun after a
  lost shard, on two worker processes, writes only that shard."""
  pytest.importorskip('apache_beam', reason="the beam extra (pip install -e '.[beam]')")
  common = ['lvm', 'tokenize', '--tokenizer', str(tokenizer_dir), '--sentences', '24', '--records-per-shard', '8',
            '--kind', 'video', '--kind', 'colorization']
  assert launch_main(common + ['--out', str(tmp_path / 'plain')]) == 0
  beam_out = tmp_path / 'beam'
  assert launch_main(common + ['--out', str(beam_out), '--beam']) == 0
  plain = {p.name: p.read_bytes() for p in (tmp_path / 'plain').glob('*.arrayrecord')}
  assert len(plain) == 6 and {p.name: p.read_bytes() for p in beam_out.glob('*.arrayrecord')} == plain
  manifest = json.loads((beam_out / 'manifest.json').read_text())
  assert manifest == json.loads((tmp_path / 'plain' / 'manifest.json').read_text())
  result = json.loads((beam_out / 'tokenize_result.json').read_text())
  assert result['runner'] == 'beam: DirectRunner' and result['shards_written_this_run'] == 6

  (beam_out / 'video-00001-of-00003.arrayrecord').unlink()
  (beam_out / 'manifest.json').unlink()
  workers = '--direct_num_workers=2 --direct_running_mode=multi_processing'
  assert launch_main(common + ['--out', str(beam_out), '--beam', '--beam-options', workers]) == 0
  assert json.loads((beam_out / 'tokenize_result.json').read_text())['shards_written_this_run'] == 1
  assert {p.name: p.read_bytes() for p in beam_out.glob('*.arrayrecord')} == plain
  assert (beam_out / 'manifest.json').is_file()

  # Annotated pairs from the user's labels: the same shards, and the notes on unpaired files said once.
  from tests.test_annotation_pairs import _folder
  photos, labels = _folder(tmp_path)
  pairs = ['lvm', 'tokenize', '--tokenizer', str(tokenizer_dir), '--source', str(photos), '--labels', str(labels),
           '--kind', 'pairs', '--sentences', '4']
  capsys.readouterr()
  assert launch_main(pairs + ['--out', str(tmp_path / 'pairs_plain')]) == 0
  notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith('note:')]
  assert launch_main(pairs + ['--out', str(tmp_path / 'pairs_beam'), '--beam']) == 0
  beam_notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith('note:')]
  assert len(notes) == 2 and beam_notes == notes
  assert (tmp_path / 'pairs_beam/pairs-00000-of-00001.arrayrecord').read_bytes() == \
      (tmp_path / 'pairs_plain/pairs-00000-of-00001.arrayrecord').read_bytes()

  # A folder streamed on the workers (the driver's choice, passed on): the shards of the folder in memory.
  from tests.test_streamed_images import _digit_folder
  folder = ['lvm', 'tokenize', '--tokenizer', str(tokenizer_dir), '--source', str(_digit_folder(tmp_path / 'digits')),
            '--kind', 'groups', '--sentences', '8', '--records-per-shard', '4']
  assert launch_main(folder + ['--out', str(tmp_path / 'folder_plain'), '--stream', 'never']) == 0
  assert launch_main(folder + ['--out', str(tmp_path / 'folder_beam'), '--stream', 'always', '--beam']) == 0
  assert json.loads((tmp_path / 'folder_beam/manifest.json').read_text())['source_images']['streamed']
  assert {p.name: p.read_bytes() for p in (tmp_path / 'folder_beam').glob('*.arrayrecord')} == \
      {p.name: p.read_bytes() for p in (tmp_path / 'folder_plain').glob('*.arrayrecord')}


def test_beam_workers_find_the_tokenizer_preset_without_the_training_machine(tokenizer_dir, tmp_path):
  """A Dataflow worker lacks the absolute preset path a tokenizer's run config names: it takes the
  installed preset of the same name (cpu_1 when there is none); a path that exists is kept."""
  import shutil
  from lvm.beam_tokenize import worker_preset
  from tests.helpers import CPU8
  assert worker_preset(str(tokenizer_dir), CPU8) == CPU8  # --tpu given: used as is
  trained = json.loads((tokenizer_dir / 'config.json').read_text())['tpu']
  assert worker_preset(str(tokenizer_dir), None) == trained  # the trained preset exists here
  moved = tmp_path / 'moved'
  shutil.copytree(tokenizer_dir, moved)
  run = json.loads((moved / 'config.json').read_text())
  for name, expected in (('cpu_8.py', 'cpu_8.py'), ('my_own_slice.py', 'cpu_1.py')):
    run['tpu'] = f'/training/machine/tpu_configs/{name}'
    (moved / 'config.json').write_text(json.dumps(run))
    found = worker_preset(str(moved), None)
    assert found == str(ROOT / 'tpu_configs' / expected)


def test_a_run_trained_over_8_devices_loads_in_a_one_device_process(tokenizer_dir, tmp_path):
  """A notebook has one CPU device: a tokenizer (or LVM) trained with cpu_8 once failed to load there
  ('needs 8 devices, 1 are available'); it loads onto one device and encodes as it does anywhere."""
  import os
  import shutil
  import subprocess
  import sys
  from data_pipelines.image_sources import digit_images
  from lvm.tokenizer_commands import load_tokenizer
  from tests.helpers import CPU8
  shutil.copytree(tokenizer_dir, tmp_path / 'tok')
  stored = json.loads((tmp_path / 'tok' / 'config.json').read_text())
  (tmp_path / 'tok' / 'config.json').write_text(json.dumps({**stored, 'tpu': CPU8}))  # as if trained over 8
  np.save(tmp_path / 'images.npy', digit_images(32)[0][:6])
  script = (f'import sys; sys.path.insert(0, {str(ROOT)!r}); import jax, numpy as np\n'
            'from lvm.tokenizer_commands import load_tokenizer\n'
            'assert jax.device_count() == 1\n'
            f'np.save({str(tmp_path / "tokens.npy")!r}, load_tokenizer({str(tmp_path / "tok")!r})'
            f'.encode(np.load({str(tmp_path / "images.npy")!r})))\n')
  flags = [f for f in os.environ.get('XLA_FLAGS', '').split() if 'xla_force_host_platform_device_count' not in f]
  done = subprocess.run([sys.executable, '-c', script], env=dict(os.environ, XLA_FLAGS=' '.join(flags)), cwd=tmp_path,
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  np.testing.assert_array_equal(np.load(tmp_path / 'tokens.npy'),
                                load_tokenizer(tokenizer_dir).encode(np.load(tmp_path / 'images.npy')))


def test_the_serving_preset_is_the_trained_one_where_its_devices_are(monkeypatch):
  from core.mesh import serving_preset
  from tests.helpers import CPU8
  one_cpu, v4_8 = str(ROOT / 'tpu_configs/cpu_1.py'), str(ROOT / 'tpu_configs/v4_8.py')
  for backend, devices, trained, expected in (('cpu', 8, CPU8, CPU8), ('cpu', 1, CPU8, one_cpu),
                                              ('cpu', 8, v4_8, one_cpu), ('tpu', 4, v4_8, v4_8),
                                              ('cpu', 8, None, one_cpu), ('cpu', 1, one_cpu, one_cpu)):
    monkeypatch.setattr(jax, 'default_backend', lambda: backend)
    monkeypatch.setattr(jax, 'device_count', lambda: devices)
    assert serving_preset(trained) == expected, (backend, devices, trained)
