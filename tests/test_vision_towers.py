"""DINO ViT-B/16 and CLIP ViT-B/32 towers (scaled down, random weights) against transformers on
torch CPU, through the Hugging Face checkpoint import; preprocessing and CLIP tokenisation too."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from attrib.vision_towers import (ClipTokenizer, TowerWeightError, load_tower, preprocess_dino)
from tests.tolerance import assert_network_close, total_fan_in

VIT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=64,
           patch_size=16)
CLIP_TEXT = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96, max_position_embeddings=77)
CLIP_VISION = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=224,
                   patch_size=32)


def _perturb(model):
  torch.manual_seed(1)
  with torch.no_grad():  # LayerNorms init to 1/0 and CLS to 0: perturb so a swapped tensor would show
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  return model.eval()


def test_dino_vit_matches_transformers(tmp_path):
  torch.manual_seed(0)
  model = _perturb(transformers.ViTModel(transformers.ViTConfig(**VIT), add_pooling_layer=False))
  model.save_pretrained(tmp_path, safe_serialization=True)
  apply, params, config = load_tower(tmp_path, 'dino')
  images = np.random.default_rng(0).standard_normal((3, 64, 64, 3)).astype(np.float32)
  with torch.no_grad():
    expected = model(pixel_values=torch.tensor(images.transpose(0, 3, 1, 2))).last_hidden_state[:, 0].numpy()
  ours = np.asarray(apply(params, images))
  assert_network_close(ours, expected, what='DINO CLS',
                       reduction_length=total_fan_in(model.parameters()) + 2 * VIT['num_hidden_layers'] * 17)


@pytest.fixture()
def clip_dir(tmp_path):
  torch.manual_seed(0)
  # eos_token_id 2, as openai/clip-vit-base-patch32's config: pooling at the largest id (EOS).
  config = transformers.CLIPConfig(text_config=dict(CLIP_TEXT, vocab_size=600, eos_token_id=2), vision_config=CLIP_VISION,
                                   projection_dim=32)
  model = _perturb(transformers.CLIPModel(config))
  model.save_pretrained(tmp_path, safe_serialization=True)
  return tmp_path, model


def test_clip_towers_match_transformers(clip_dir):
  path, model = clip_dir
  vision, vision_params, _ = load_tower(path, 'clip_vision')
  text, text_params, text_config = load_tower(path, 'clip_text')
  rng = np.random.default_rng(0)
  images = rng.standard_normal((2, 224, 224, 3)).astype(np.float32)
  # Padded batch of different lengths; each row ends in EOS, the largest id of CLIP's vocabulary.
  ids = rng.integers(1, 590, (3, 77))
  mask = np.zeros((3, 77), np.int64)
  for row, length in enumerate((5, 77, 12)):
    ids[row, length - 1] = 599
    ids[row, length:] = 0
    mask[row, :length] = 1
  with torch.no_grad():
    expected_image = model.get_image_features(pixel_values=torch.tensor(images.transpose(0, 3, 1, 2))).numpy()
    expected_text = model.get_text_features(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).numpy()
  fan_in = total_fan_in(model.parameters())
  assert_network_close(np.asarray(vision(vision_params, images)), expected_image, what='CLIP image',
                       reduction_length=fan_in + 2 * 2 * 50)
  assert_network_close(np.asarray(text(text_params, ids, mask)), expected_text, what='CLIP text',
                       reduction_length=fan_in + 2 * 2 * 77)


def test_a_pytorch_bin_checkpoint_loads_as_its_safetensors_twin(tmp_path):
  """A Hub repository may hold pytorch_model.bin alone (saved before safetensors): the same weights,
  read as tensors only. A corrupt weights file, or the Hub cache's top folder, is named."""
  torch.manual_seed(0)
  model = _perturb(transformers.ViTModel(transformers.ViTConfig(**VIT), add_pooling_layer=False))
  model.save_pretrained(tmp_path / 'safe', safe_serialization=True)
  model.save_pretrained(tmp_path / 'bin', safe_serialization=False)
  assert not list((tmp_path / 'bin').glob('*.safetensors')) and (tmp_path / 'bin' / 'pytorch_model.bin').is_file()
  _, from_bin, _ = load_tower(tmp_path / 'bin', 'dino')
  _, from_safetensors, _ = load_tower(tmp_path / 'safe', 'dino')
  import jax
  for a, b in zip(jax.tree.leaves(from_bin), jax.tree.leaves(from_safetensors), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  (tmp_path / 'safe' / 'model.safetensors').write_bytes(b'\x08\x00\x00\x00\x00\x00\x00\x00{"x": 1}')
  with pytest.raises(TowerWeightError, match='model.safetensors: not a readable safetensors file'):
    load_tower(tmp_path / 'safe', 'dino')
  snapshot = tmp_path / 'models--facebook--dino-vitb16' / 'snapshots' / 'abc123'
  snapshot.parent.mkdir(parents=True)
  (tmp_path / 'bin').rename(snapshot)
  with pytest.raises(TowerWeightError, match=f'is a Hugging Face Hub cache folder: give its snapshot, {snapshot}'):
    load_tower(tmp_path / 'models--facebook--dino-vitb16', 'dino')


def test_wrong_checkpoint_is_named(clip_dir):
  path, _ = clip_dir
  with pytest.raises(TowerWeightError, match="model_type 'clip'"):
    load_tower(path, 'dino')  # a CLIP checkpoint is not a ViTModel
  config = json.loads((path / 'config.json').read_text())
  config['text_config']['intermediate_size'] = 100
  (path / 'config.json').write_text(json.dumps(config))
  with pytest.raises(TowerWeightError, match=r'text_model.encoder.layers.0.mlp.fc1.weight has shape \(96, 48\)'):
    load_tower(path, 'clip_text')
  config['text_config']['num_attention_heads'] = '4'
  (path / 'config.json').write_text(json.dumps(config))
  with pytest.raises(TowerWeightError, match=r"config.json \(text_config\): num_attention_heads='4' is not a positive"):
    load_tower(path, 'clip_text')
  (path / 'config.json').write_text(json.dumps(config)[:40])
  with pytest.raises(TowerWeightError, match=r'config.json: not valid JSON'):
    load_tower(path, 'clip_vision')


def test_dino_preprocessing_matches_the_transformers_processor():
  from PIL import Image
  from sklearn.datasets import load_sample_images
  image = Image.fromarray(load_sample_images().images[0])  # 427 x 640, a real photo
  # The reference: transformers' own image transforms (what its image processors are built from).
  from transformers.image_transforms import center_crop, normalize, resize
  from transformers.image_utils import PILImageResampling
  array = np.asarray(image)
  h, w = array.shape[:2]
  size = (256, int(256 * w / h)) if h < w else (int(256 * h / w), 256)
  expected = resize(array, size, resample=PILImageResampling.BICUBIC)
  expected = center_crop(expected, (224, 224)).astype(np.float32) / 255.0
  expected = normalize(expected, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
  ours = preprocess_dino(image)
  assert ours.shape == (224, 224, 3)
  # Both resize with PIL's bicubic on uint8 and crop the same window: equal to float32 rounding.
  np.testing.assert_array_equal(ours, expected.astype(np.float32))
  # A 16-bit grey scan is scaled to 8 bits by its maximum, not clipped at 255 by PIL's conversion.
  grey = np.asarray(image.convert('L')).copy()
  grey[0, 0] = 255
  sixteen = Image.fromarray(grey.astype(np.uint16) * 257)
  assert sixteen.mode.startswith('I')
  np.testing.assert_array_equal(preprocess_dino(sixteen), preprocess_dino(Image.fromarray(grey)))


def test_clip_tokenisation_matches_transformers(tmp_path):
  from transformers.models.clip.tokenization_clip import bytes_to_unicode
  symbols = list(bytes_to_unicode().values())
  merges = ['h a', 'ha n', 'han d', 'hand w</w>', 'd i', 'di g', 'dig i', 'digi t</w>', 's e', 'se v']
  vocab = symbols + [s + '</w>' for s in symbols] + [m.replace(' ', '') for m in merges]
  vocab += ['<|startoftext|>', '<|endoftext|>']
  (tmp_path / 'vocab.json').write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
  (tmp_path / 'merges.txt').write_text('#version: 0.2\n' + '\n'.join(merges) + '\n')
  slow = transformers.CLIPTokenizer(str(tmp_path / 'vocab.json'), str(tmp_path / 'merges.txt'))
  fast = transformers.CLIPTokenizerFast(vocab_file=str(tmp_path / 'vocab.json'), merges_file=str(tmp_path / 'merges.txt'))
  fast.save_pretrained(tmp_path / 'tok')
  captions = ['a handwritten digit', 'Seven, HANDWRITTEN!', 'x' * 300, '']
  ours_ids, ours_mask = ClipTokenizer(tmp_path / 'tok')(captions)
  expected = fast(captions, padding='max_length', max_length=77, truncation=True)
  np.testing.assert_array_equal(ours_ids, np.array(expected['input_ids']))
  np.testing.assert_array_equal(ours_mask, np.array(expected['attention_mask']))
  assert slow(captions[0])['input_ids'] == expected['input_ids'][0][:len(slow(captions[0])['input_ids'])]


def _full_scale_checkpoints(tmp_path, clip_path):
  """A DINO checkpoint at 224 px in tmp_path/dino, and a byte-level CLIP tokenizer (no merges) saved
  beside the CLIP weights in `clip_path`; returns the DINO model."""
  torch.manual_seed(0)
  dino = _perturb(transformers.ViTModel(transformers.ViTConfig(**dict(VIT, image_size=224)), add_pooling_layer=False))
  dino.save_pretrained(tmp_path / 'dino', safe_serialization=True)
  from transformers.models.clip.tokenization_clip import bytes_to_unicode
  symbols = list(bytes_to_unicode().values())
  vocab = symbols + [s + '</w>' for s in symbols] + ['<|startoftext|>', '<|endoftext|>']
  (tmp_path / 'vocab.json').write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
  (tmp_path / 'merges.txt').write_text('#version: 0.2\n')
  transformers.CLIPTokenizerFast(vocab_file=str(tmp_path / 'vocab.json'),
                                 merges_file=str(tmp_path / 'merges.txt')).save_pretrained(clip_path)
  return dino


def test_full_scale_feature_job_writes_fastgda_layout(clip_dir, tmp_path, capsys):
  """`attrib features --dino --clip` over real bundled photos: dino+clip_text = the towers' outputs
  concatenated raw, one row per listed image, in FastGDA's feats/<ftype> layout; reruns resume."""
  from PIL import Image
  from sklearn.datasets import load_sample_images
  from launch import main as launch_main
  clip_path, _ = clip_dir
  dino = _full_scale_checkpoints(tmp_path, clip_path)
  photos = load_sample_images().images
  for n, photo in enumerate(photos):
    Image.fromarray(photo).save(tmp_path / f'photo{n}.png')
  (tmp_path / 'train.tsv').write_text('photo0.png\ta temple in china\nphoto1.png\ta flower\nphoto0.png\tagain\n')
  (tmp_path / 'test.tsv').write_text('photo1.png\ta yellow flower\n')
  args = ['attrib', 'features', '--workdir', str(tmp_path / 'w'), '--feature', 'dino+clip_text', '--feature', 'clip',
          '--dino', str(tmp_path / 'dino'), '--clip', str(clip_path), '--train-list', str(tmp_path / 'train.tsv'),
          '--test-queries-list', str(tmp_path / 'test.tsv')]
  assert launch_main(args) == 0
  out = tmp_path / 'w' / 'features'
  phi = np.load(out / 'dino+clip_text' / 'data_feats.npy')
  assert phi.shape == (3, 64 + 32) and np.load(out / 'clip' / 'test_query_feats.npy').shape == (1, 32)
  dino_apply, dino_params, _ = load_tower(tmp_path / 'dino', 'dino')
  expected = np.asarray(dino_apply(dino_params, np.stack([preprocess_dino(Image.open(tmp_path / 'photo0.png'))])))
  assert_network_close(phi[0, :64], expected[0], what='DINO part of φ',  # batch of 3 vs 1: kernels may differ
                       reduction_length=total_fan_in(dino.parameters()) + 2 * 2 * 197)
  mtime = (out / 'clip' / 'data_feats.npy').stat().st_mtime_ns
  assert launch_main(args) == 0 and (out / 'clip' / 'data_feats.npy').stat().st_mtime_ns == mtime  # resumed
  # Resume inside a file: parts of --rows-per-part rows are written as they are done. A truncated image
  # (its header reads, its pixels do not) stops the job after part 0; the rerun keeps that part (made
  # recognisable here) and computes the rest; another list starts over.
  whole = (tmp_path / 'photo1.png').read_bytes()
  (tmp_path / 'cut.png').write_bytes(whole[:len(whole) // 2])
  (tmp_path / 'five.tsv').write_text(''.join(f'{f}\t{c}\n' for f, c in [
      ('photo0.png', 'a'), ('photo1.png', 'b'), ('photo0.png', 'c'), ('cut.png', 'd'), ('photo1.png', 'e')]))
  five = ['attrib', 'features', '--workdir', str(tmp_path / 'w5'), '--feature', 'clip', '--clip', str(clip_path),
          '--train-list', str(tmp_path / 'five.tsv'), '--rows-per-part', '2']
  assert launch_main(five) == 2
  parts = tmp_path / 'w5' / 'features' / 'clip' / 'data_feats.npy.parts'
  assert sorted(p.name for p in parts.glob('*.npy')) == ['00000000000.npy']
  np.save(parts / '00000000000.npy', np.load(parts / '00000000000.npy') + 1000)
  (tmp_path / 'cut.png').write_bytes(whole)
  assert launch_main(five) == 0 and not parts.exists()
  resumed = np.load(tmp_path / 'w5' / 'features' / 'clip' / 'data_feats.npy')
  assert resumed.shape == (5, 32) and np.all(resumed[:2] > 500) and np.all(np.abs(resumed[2:]) < 500)
  uninterrupted = tmp_path / 'w5b'
  assert launch_main([*five[:3], str(uninterrupted), *five[4:]]) == 0
  np.testing.assert_array_equal(resumed[2:], np.load(uninterrupted / 'features' / 'clip' / 'data_feats.npy')[2:])
  # Not an image at all: refused by its line before any tower runs.
  (tmp_path / 'page.png').write_text('<html>403 Forbidden</html>')
  (tmp_path / 'bad.tsv').write_text('photo0.png\ta\npage.png\tb\n')
  assert launch_main([*five[:3], str(tmp_path / 'w6'), *five[4:9], str(tmp_path / 'bad.tsv')]) == 2
  assert not (tmp_path / 'w6').exists()
  assert f"{tmp_path / 'bad.tsv'}:2: {tmp_path / 'page.png'} is not a readable image" in capsys.readouterr().err


def test_full_scale_features_on_two_processes_match_one(clip_dir, tmp_path):
  """A multi-host slice: each of two processes featurizes every other part of the list on its own
  devices (process 0 parts 1 and 3 of 3, process 1 part 2), and process 0 joins them into the file
  one process writes."""
  from PIL import Image
  from sklearn.datasets import load_sample_images
  from launch import main as launch_main
  from tests.helpers import CPU2X4, free_port, launch
  clip_path, clip = clip_dir
  dino = _full_scale_checkpoints(tmp_path, clip_path)
  for n, photo in enumerate(load_sample_images().images):
    Image.fromarray(photo).save(tmp_path / f'photo{n}.png')
  (tmp_path / 'train.tsv').write_text(''.join(f'photo{n % 2}.png\tcaption number {n}\n' for n in range(5)))
  args = ['attrib', 'features', '--feature', 'dino+clip_text', '--dino', str(tmp_path / 'dino'), '--clip',
          str(clip_path), '--train-list', str(tmp_path / 'train.tsv'), '--rows-per-part', '2']
  assert launch_main(args + ['--workdir', str(tmp_path / 'one')]) == 0
  port = free_port()
  procs = [launch(args + ['--workdir', str(tmp_path / 'two'), '--tpu', CPU2X4, '--coordinator', f'127.0.0.1:{port}',
                          '--num-processes', '2', '--process-id', str(i)], devices=4) for i in range(2)]
  outputs = [proc.communicate(timeout=600)[0] for proc in procs]
  for proc, out in zip(procs, outputs):
    assert proc.returncode == 0, out[-3000:]
  assert 'part 1/3' in outputs[0] and 'part 3/3' in outputs[0] and 'part 2/3' not in outputs[0]
  folder = [tmp_path / w / 'features' / 'dino+clip_text' for w in ('one', 'two')]
  one, two = (np.load(f / 'data_feats.npy') for f in folder)
  assert two.shape == one.shape == (5, 64 + 32) and not (folder[1] / 'data_feats.npy.parts').exists()
  # Batches of 2 rows on one device against 2 rows padded to 4 devices: kernels may differ.
  assert_network_close(two[:, :64], one[:, :64], what='DINO part',
                       reduction_length=total_fan_in(dino.parameters()) + 2 * 2 * 197)
  text_weights = [*clip.text_model.parameters(), *clip.text_projection.parameters()]
  assert_network_close(two[:, 64:], one[:, 64:], what='CLIP text part',
                       reduction_length=total_fan_in(text_weights) + 2 * 2 * 77)


def test_a_bad_image_on_one_of_two_processes_stops_both(clip_dir, tmp_path):
  """Each process checks the headers of its own share of the list (every other line), and a failure
  on one process (a bad header, an image truncated after its header) stops both in seconds, each
  saying why, instead of the other waiting at the next barrier until JAX's coordination gives up."""
  import io
  from PIL import Image
  from sklearn.datasets import load_sample_images
  from tests.helpers import CPU2X4, free_port, launch, outputs_of
  clip_path, _ = clip_dir
  _full_scale_checkpoints(tmp_path, clip_path)
  Image.fromarray(load_sample_images().images[0]).save(tmp_path / 'photo.png')
  (tmp_path / 'page.html').write_text('<html>rate limited</html>')
  encoded = io.BytesIO()
  Image.fromarray(load_sample_images().images[1]).save(encoded, 'PNG')
  (tmp_path / 'cut.png').write_bytes(encoded.getvalue()[:len(encoded.getvalue()) // 2])  # its header reads

  def run_two(listing):
    args = ['attrib', 'features', '--feature', 'dino', '--dino', str(tmp_path / 'dino'), '--train-list',
            str(tmp_path / listing), '--rows-per-part', '1', '--workdir', str(tmp_path / 'w'), '--tpu', CPU2X4]
    port = free_port()
    procs = [launch(args + ['--coordinator', f'127.0.0.1:{port}', '--num-processes', '2', '--process-id', str(i)],
                    devices=4) for i in range(2)]
    outputs = outputs_of(procs, 240)
    return [proc.returncode for proc in procs], outputs

  # Lines 2 (process 1's share) and 3 (process 0's) are not images: each names the first in its share.
  (tmp_path / 'headers.tsv').write_text('photo.png\ta\npage.html\tb\npage.html\tc\nphoto.png\td\n')
  codes, outputs = run_two('headers.tsv')
  assert codes == [2, 2], outputs
  assert f"error: {tmp_path / 'headers.tsv'}:3: {tmp_path / 'page.html'} is not a readable image" in outputs[0]
  assert f"error: {tmp_path / 'headers.tsv'}:2: {tmp_path / 'page.html'} is not a readable image" in outputs[1]
  # Part 2 of 3 (process 1's) holds an image cut short after its header: process 0 finishes its parts
  # and stops at the barrier with process 1's error; nothing is joined, the parts written are kept.
  (tmp_path / 'cut.tsv').write_text('photo.png\ta\ncut.png\tb\nphoto.png\tc\n')
  codes, outputs = run_two('cut.tsv')
  assert codes == [2, 2], outputs
  assert f"error: {tmp_path / 'cut.png'}: not a readable image" in outputs[1]
  assert 'every part written: process 1 of 2 failed, so this one stops too: ' in outputs[0]
  assert f"{tmp_path / 'cut.png'}: not a readable image" in outputs[0]
  parts = tmp_path / 'w' / 'features' / 'dino' / 'data_feats.npy.parts'
  assert sorted(p.name for p in parts.glob('*.npy')) == ['00000000000.npy', '00000000002.npy']


STUDENT = '''
from attrib.embedder import EmbedderConfig
from attrib.fastgda_config import DistillConfig, FastGDAConfig
from attrib.index import IndexConfig

def get_config():
  return FastGDAConfig(feature='dino+clip_text', map_at=(3,),
                       embedder=EmbedderConfig(hidden=(32,), output_dim=16, initial_scale=-1.0),
                       distill=DistillConfig(batch=32, epochs=2, val_queries=2, log_every=1),
                       index=IndexConfig(recall_probes=10))
'''


def test_attributor_computes_full_scale_features_from_image_and_prompt(clip_dir, tmp_path, capsys, monkeypatch):
  """A student distilled on DINO ⊕ CLIP-text features (random-weight towers, crops of the bundled
  photos): `Attributor.load(dino=, clip=)` computes φ of (image, prompt) itself and answers exactly
  as it does for φ from the feature job; `attrib query` draws the photos."""
  import pickle
  from PIL import Image
  from sklearn.datasets import load_sample_images
  from attrib import AttributionError, Attributor
  from core.errors import ConfigError
  from launch import main as launch_main
  clip_path, _ = clip_dir
  _full_scale_checkpoints(tmp_path, clip_path)
  photos, rng = load_sample_images().images, np.random.default_rng(0)
  for n in range(12):
    y, x = rng.integers(0, 200, 2)
    Image.fromarray(photos[n % 2][y:y + 220, x:x + 260]).save(tmp_path / f'photo{n}.png')
  (tmp_path / 'train.tsv').write_text(''.join(f'photo{n}.png\tphoto number {n}\n' for n in range(12)))
  (tmp_path / 'train_queries.tsv').write_text(''.join(f'photo{n}.png\ta query {n}\n' for n in range(8)))
  (tmp_path / 'test_queries.tsv').write_text('photo3.png\ta temple\nphoto8.png\ta flower in bloom\n')
  features = tmp_path / 'features' / 'dino+clip_text'
  assert launch_main(['attrib', 'features', '--workdir', str(tmp_path), '--feature', 'dino+clip_text',
                      '--dino', str(tmp_path / 'dino'), '--clip', str(clip_path),
                      '--train-list', str(tmp_path / 'train.tsv'),
                      '--train-queries-list', str(tmp_path / 'train_queries.tsv'),
                      '--test-queries-list', str(tmp_path / 'test_queries.tsv')]) == 0
  ranks = np.stack([rng.permutation(12)[:6] for _ in range(8)])  # the teacher's order over 6 candidates
  with open(tmp_path / 'influence_train.pkl', 'wb') as f:
    pickle.dump({'random': {'rank': ranks}}, f)
  (tmp_path / 'student.py').write_text(STUDENT)
  student = tmp_path / 'student'
  assert launch_main(['attrib', 'distill', '--config', str(tmp_path / 'student.py'), '--workdir', str(student),
                      '--features', str(features), '--ranks', str(tmp_path / 'influence_train.pkl')]) == 0

  attributor = Attributor.load(student, dino=str(tmp_path / 'dino'), clip=str(clip_path),
                               train_list=str(tmp_path / 'train.tsv'))
  phi = np.load(features / 'test_query_feats.npy')
  for q, (image, prompt) in enumerate([('photo3.png', 'a temple'), ('photo8.png', 'a flower in bloom')]):
    from_features = attributor.attribute(features=phi[q], k=5)
    for given in (str(tmp_path / image), np.asarray(Image.open(tmp_path / image))):  # a path, or uint8 pixels
      from_image = attributor.attribute(image=given, prompt=prompt, k=5)
      np.testing.assert_array_equal(from_image.ids, from_features.ids)
      np.testing.assert_allclose(from_image.scores, from_features.scores, atol=1e-5)
    assert from_image.captions == [f'photo number {i}' for i in from_image.ids]
    assert from_image.paths == [str(tmp_path / f'photo{i}.png') for i in from_image.ids]
    # uint8 RGBA pixels read as their PNG file does (the towers' .convert('RGB')).
    pixels = np.asarray(Image.open(tmp_path / image))
    rgba = np.dstack([pixels, np.full(pixels.shape[:2], 200, np.uint8)])
    Image.fromarray(rgba, 'RGBA').save(tmp_path / 'rgba.png')
    from_rgba_file = attributor.attribute(image=str(tmp_path / 'rgba.png'), prompt=prompt, k=5)
    from_rgba = attributor.attribute(image=rgba, prompt=prompt, k=5)
    np.testing.assert_array_equal(from_rgba.ids, from_rgba_file.ids)
    np.testing.assert_array_equal(from_rgba.scores, from_rgba_file.scores)
  with pytest.raises(AttributionError, match=r'uint8 \[H, W, 3\] \(or \[H, W, 4\], \[H, W\]\), got array of float32 '
                                             r'\(8, 8, 3\)'):
    attributor.attribute(image=np.zeros((8, 8, 3), np.float32), prompt='x')
  with pytest.raises(AttributionError, match='nowhere.png: not a readable image'):
    attributor.attribute(image=str(tmp_path / 'nowhere.png'), prompt='x')
  # Checkpoints other than the features' (a DINO of another width), or one missing: said at load.
  narrow = transformers.ViTModel(transformers.ViTConfig(**dict(VIT, image_size=224, hidden_size=48)),
                                 add_pooling_layer=False)
  narrow.save_pretrained(tmp_path / 'narrow', safe_serialization=True)
  with pytest.raises(AttributionError, match='the towers give 80-d dino\\+clip_text features, the student in .* '
                                             'takes 96-d'):
    Attributor.load(student, dino=str(tmp_path / 'narrow'), clip=str(clip_path))
  with pytest.raises(ConfigError, match="feature part 'dino' needs the --dino checkpoint"):
    Attributor.load(student, clip=str(clip_path))

  assert launch_main(['attrib', 'query', '--workdir', str(student), '--image', str(tmp_path / 'photo3.png'),
                      '--prompt', 'a temple', '-k', '4', '--out', str(tmp_path / 'grid.png'),
                      '--dino', str(tmp_path / 'dino'), '--clip', str(clip_path),
                      '--train-list', str(tmp_path / 'train.tsv')]) == 0
  result = json.loads((student / 'query_result.json').read_text())
  assert result['ids'] == attributor.attribute(features=phi[0], k=4).ids.tolist()
  assert result['paths'] == [str(tmp_path / f'photo{i}.png') for i in result['ids']]
  grid = Image.open(tmp_path / 'grid.png')
  assert grid.mode == 'RGB' and grid.size[0] > 5 * 112
  assert result['unreadable_train_images'] == []
  # A list of queries (relative and absolute paths): each answered and drawn as that query alone.
  (tmp_path / 'asked.tsv').write_text(f'photo3.png\ta temple\n{tmp_path / "photo8.png"}\ta bridge\n')
  assert launch_main(['attrib', 'query', '--workdir', str(student), '--queries', str(tmp_path / 'asked.tsv'),
                      '-k', '4', '--out', str(tmp_path / 'asked'), '--grids', '--dino', str(tmp_path / 'dino'),
                      '--clip', str(clip_path), '--train-list', str(tmp_path / 'train.tsv')]) == 0
  asked = [json.loads(line) for line in (tmp_path / 'asked' / 'results.jsonl').read_text().splitlines()]
  assert asked[0]['ids'] == result['ids'] and asked[0]['paths'] == result['paths']
  assert asked[1]['ids'] == attributor.attribute(image=str(tmp_path / 'photo8.png'), prompt='a bridge', k=4).ids.tolist()
  np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / 'asked' / 'grids' / '00001_photo3.png')),
                                np.asarray(grid))
  # A training file moved away since: the answer stands, its tile says so, the file is named.
  gone = result['paths'][1]
  Path(gone).unlink()
  capsys.readouterr()
  assert launch_main(['attrib', 'query', '--workdir', str(student), '--image', str(tmp_path / 'photo3.png'),
                      '--prompt', 'a temple', '-k', '4', '--out', str(tmp_path / 'grid2.png'),
                      '--dino', str(tmp_path / 'dino'), '--clip', str(clip_path),
                      '--train-list', str(tmp_path / 'train.tsv')]) == 0
  assert f'warning: {gone}: training image not readable' in capsys.readouterr().err
  again = json.loads((student / 'query_result.json').read_text())
  assert again['ids'] == result['ids'] and again['unreadable_train_images'] == [gone]
  assert Image.open(tmp_path / 'grid2.png').size == grid.size
  # New training photos join the index with `attrib add` (files named in the list): a copy of
  # training photo 5 under its caption is embedded as photo 5 was, and answers carry its file.
  import shutil
  shutil.copy(tmp_path / 'photo5.png', tmp_path / 'new5.png')
  shutil.copy(tmp_path / 'photo9.png', tmp_path / 'new9.png')
  (tmp_path / 'new.tsv').write_text('new5.png\tphoto number 5\nnew9.png\ta new photo\n')
  towers = ['--dino', str(tmp_path / 'dino'), '--clip', str(clip_path), '--train-list', str(tmp_path / 'train.tsv')]
  # The list named from its own folder: the files are recorded resolved, so answers given in any
  # folder later name them (they were kept as 'new5.png').
  with monkeypatch.context() as in_folder:
    in_folder.chdir(tmp_path)
    assert launch_main(['attrib', 'add', '--workdir', str(student), '--images', 'new.tsv', *towers]) == 0
  grown = Attributor.load(student, dino=str(tmp_path / 'dino'), clip=str(clip_path), train_list=str(tmp_path / 'train.tsv'))
  answer = grown.attribute(image=str(tmp_path / 'photo5.png'), prompt='a temple', k=14)
  score = dict(zip(answer.ids.tolist(), answer.scores.tolist()))
  assert sorted(score) == list(range(14)) and abs(score[12] - score[5]) < 1e-5
  assert answer.paths[answer.ids.tolist().index(12)] == str(tmp_path / 'new5.png')
  assert answer.captions[answer.ids.tolist().index(13)] == 'a new photo'
  # Among training photos named by file (as the list names them, a line of the list itself, an absolute
  # path, an added photo): the whole answer restricted to them; a file not in the set is named by line.
  (tmp_path / 'mine').mkdir()
  (tmp_path / 'mine' / 'among.txt').write_text(f'# my photos\n../photo7.png\n{tmp_path / "new9.png"}\n\n'
                                               '../photo2.png\tphoto number 2\n../photo7.png\n')
  assert launch_main(['attrib', 'query', '--workdir', str(student), '--image', str(tmp_path / 'photo5.png'),
                      '--prompt', 'a temple', '--out', str(tmp_path / 'among.png'), '--among-file',
                      str(tmp_path / 'mine' / 'among.txt'), *towers]) == 0
  among = json.loads((student / 'query_result.json').read_text())
  assert among['ids'] == [i for i in answer.ids.tolist() if i in (2, 7, 13)] and among['among'] == 3
  assert among['paths'] == [answer.paths[answer.ids.tolist().index(i)] for i in among['ids']]
  (tmp_path / 'mine' / 'among.txt').write_text('../photo7.png\n../photo99.png\n')
  capsys.readouterr()
  assert launch_main(['attrib', 'query', '--workdir', str(student), '--image', str(tmp_path / 'photo5.png'),
                      '--prompt', 'a temple', '--among-file', str(tmp_path / 'mine' / 'among.txt'), *towers]) == 2
  assert f'among.txt:2: {tmp_path / "photo99.png"} is not one of this student\'s training images' in capsys.readouterr().err
  with pytest.raises(AttributionError, match='image files'):  # full scale: added images are files, to be named
    grown.add_training_images(images=[np.zeros((20, 20, 3), np.uint8)], captions=['x'])
  # Added as φ rows by an Attributor loaded without the towers: no file, so paths say None, and the
  # query grid draws it without a file (it once ran past the end of the paths list).
  plain = Attributor.load(student)
  assert plain.add_training_images(features=phi[1:2]).tolist() == [14]
  plain.save()
  assert launch_main(['attrib', 'query', '--workdir', str(student), '--image', str(tmp_path / 'photo8.png'),
                      '--prompt', 'a flower in bloom', '-k', '15', '--out', str(tmp_path / 'grid3.png'), *towers]) == 0
  answer = json.loads((student / 'query_result.json').read_text())
  assert answer['paths'][answer['ids'].index(14)] is None and answer['captions'][answer['ids'].index(14)] == ''
  assert answer['unreadable_train_images'] == [gone]
