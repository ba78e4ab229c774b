"""gs:// workdirs for real, against a local Cloud Storage emulator: train -> resume -> eval, and the
teacher, write every file into the bucket and nothing onto the local disk."""
import io
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import numpy as np
import pytest

from tests.helpers import CPU1, CPU8, ROOT, SMALL_MODEL, TINY, free_port

pytest.importorskip('gcsfs')
EMULATOR = shutil.which('gcp-storage-emulator') or str(ROOT / '.venv' / 'bin' / 'gcp-storage-emulator')
pytestmark = pytest.mark.skipif(not os.path.exists(EMULATOR), reason='gcp-storage-emulator not installed')
BUCKET = 'runs'


@pytest.fixture(scope='module')
def gcs():
  """An in-memory emulator with one bucket; the environment every job of this module runs with."""
  port = free_port()
  server = subprocess.Popen([EMULATOR, 'start', '--port', str(port), '--in-memory', '--default-bucket', BUCKET,
                             '--quiet'], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  url = f'http://127.0.0.1:{port}'
  deadline = time.time() + 60
  while True:
    try:
      urllib.request.urlopen(f'{url}/storage/v1/b/{BUCKET}', timeout=2)
      break
    except OSError:
      if time.time() > deadline:
        server.kill()
        raise
      time.sleep(0.2)
  # gcsfs, epath and tensorboardX's uploader read STORAGE_EMULATOR_HOST; orbax's array data goes
  # through tensorstore, which reads TENSORSTORE_GCS_HTTP_URL (without it, it looks for credentials).
  env = dict(os.environ, STORAGE_EMULATOR_HOST=url, TENSORSTORE_GCS_HTTP_URL=url, JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_force_host_platform_device_count=8')
  yield url, env
  server.kill()


def _objects(url: str, prefix: str) -> dict[str, int]:
  """name -> size of every object under `prefix`, from the emulator's JSON API."""
  names, token = {}, ''
  while True:
    page = json.load(urllib.request.urlopen(f'{url}/storage/v1/b/{BUCKET}/o?prefix={prefix}&pageToken={token}'))
    names.update({item['name']: int(item['size']) for item in page.get('items', [])})
    token = page.get('nextPageToken')
    if not token:
      return names


def _read(url: str, name: str) -> bytes:
  return urllib.request.urlopen(f'{url}/download/storage/v1/b/{BUCKET}/o/{urllib.parse.quote(name, safe="")}?alt=media').read()


def _run(env, cwd, *argv, timeout=900):
  done = subprocess.run([sys.executable, str(ROOT / 'launch.py'), *argv], env=env, cwd=cwd, capture_output=True,
                        text=True, timeout=timeout)
  assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
  return done


def _local_files(*folders) -> set:
  return {p for folder in folders for p in folder.rglob('*')}


def _upload(url: str, name: str, data: bytes) -> None:
  request = urllib.request.Request(
      f'{url}/upload/storage/v1/b/{BUCKET}/o?uploadType=media&name={urllib.parse.quote(name, safe="")}',
      data=data, method='POST', headers={'Content-Type': 'application/octet-stream'})
  urllib.request.urlopen(request).read()


def test_lvm_train_resume_eval_on_a_gs_workdir(gcs, tmp_path, tmp_path_factory):
  url, env = gcs
  workdir = f'gs://{BUCKET}/lvm'
  # Token shards in the bucket too: each host stages them once into its data cache.
  from data_pipelines.digit_sentences import digit_sentences
  from data_pipelines.token_records import write_token_shards
  shards = tmp_path_factory.mktemp('shards')
  for shard in write_token_shards(digit_sentences('train', seq_len=128, num_sentences=64), shards, seq_len=128,
                                  vocab_size=8292, records_per_shard=32):
    _upload(url, f'tokens/{shard.name}', shard.read_bytes())
  # Held-out shards too, 3 of 8 records: validating on the first 8 stages the first shard alone.
  held_out = digit_sentences('eval', seq_len=128, num_sentences=24)
  for shard in write_token_shards(held_out, tmp_path_factory.mktemp('held_out'), seq_len=128, vocab_size=8292,
                                  records_per_shard=8):
    _upload(url, f'heldout/{shard.name}', shard.read_bytes())
  cache = tmp_path_factory.mktemp('data_cache')
  env = dict(env, LVM_ATTRIB_DATA_CACHE=str(cache))
  overrides = [a for o in SMALL_MODEL + ['train.log_every=1', 'train.checkpoint_every=2', 'train.tensorboard=true',
                                         f'data.train_path=gs://{BUCKET}/tokens', f'data.eval_path=gs://{BUCKET}/heldout',
                                         'data.eval_examples=8', 'train.eval_every=3', 'train.profile_from=2',
                                         'train.profile_steps=1'] for a in ('--set', o)]
  before = _local_files(tmp_path, ROOT)
  _run(env, tmp_path, 'lvm', 'train', '--config', TINY, '--tpu', CPU8, '--workdir', workdir, '--set', 'train.steps=4',
       *overrides)
  resumed = _run(env, tmp_path, 'lvm', 'train', '--config', TINY, '--tpu', CPU8, '--workdir', workdir,
                 '--set', 'train.steps=6', *overrides)
  assert f'resuming {workdir} from step 4 of 6' in resumed.stderr
  _run(env, tmp_path, 'lvm', 'eval', '--workdir', workdir, '--data', 'builtin:digits-eval', '--target-tokens', '32')
  objects = _objects(url, 'lvm/')
  for name in ('config.json', 'train_result.json', 'eval_result.json', 'metrics.jsonl'):
    assert f'lvm/{name}' in objects, sorted(objects)[:20]
  assert any(n.startswith('lvm/checkpoints/6/params/') for n in objects)
  assert any(n.startswith('lvm/checkpoints/6/data/') for n in objects)  # the data iterator's position
  assert any(n.startswith('lvm/tensorboard/events.out.tfevents') for n in objects)
  assert any(n.startswith('lvm/tensorboard/plugins/profile/updates_2-2/') and n.endswith('-process0.xplane.pb')
             for n in objects)  # the profiler's trace of update 2, copied into the bucket
  assert 'nothing traced' in resumed.stderr  # the resumed run starts past it
  # One consistent history across the resume, and the eval read the step-6 checkpoint.
  history = [json.loads(line) for line in _read(url, 'lvm/metrics.jsonl').decode().splitlines()]
  assert [line['step'] for line in history] == [1, 2, 3, 4, 5, 6]
  assert [line['step'] for line in history if 'eval_loss' in line] == [3, 4, 6]  # every 3 steps and at each end
  assert json.loads(_read(url, 'lvm/eval_result.json'))['step'] == 6
  # A step folder given for the workdir names the workdir in the bucket (not a local 'gs:' folder).
  wrong = subprocess.run([sys.executable, str(ROOT / 'launch.py'), 'lvm', 'eval', '--workdir', f'{workdir}/checkpoints/6',
                          '--data', 'builtin:digits-eval'], env=env, cwd=tmp_path, capture_output=True, text=True)
  assert wrong.returncode == 2 and wrong.stderr.strip().endswith(
      f'{workdir}/checkpoints/6 is a folder inside the workdir {workdir}: it holds an LVM run (`lvm train` / '
      f'`lvm import-hf`); pass {workdir} itself'), wrong.stderr[-2000:]
  staged = sorted(p.name for p in (cache / BUCKET / 'tokens').iterdir())
  assert staged == ['tokens-00000-of-00002.arrayrecord', 'tokens-00001-of-00002.arrayrecord']
  assert (cache / BUCKET / 'tokens' / staged[0]).read_bytes() == (shards / staged[0]).read_bytes()
  # The held-out records validated on are the bucket's first 8, read from its first shard only.
  assert sorted(p.name for p in (cache / BUCKET / 'heldout').iterdir()) == ['tokens-00000-of-00003.arrayrecord']
  out = tmp_path_factory.mktemp('validated') / 'validated.npy'
  script = f"""
import dataclasses, numpy as np
from core.config import load_config_file
from lvm.validation_data import held_out_batches
config = load_config_file('{TINY}')
config = dataclasses.replace(config, data=dataclasses.replace(config.data, seq_len=128, eval_examples=8,
                                                                    eval_path='gs://{BUCKET}/heldout'))
np.save('{out}', np.concatenate([b['tokens'] for b in held_out_batches(config, 4)(0, 1)]))
"""
  done = subprocess.run([sys.executable, '-c', script], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  np.testing.assert_array_equal(np.load(out), held_out[:8])
  # Nothing landed on the local disk: no 'gs:' folder, no stray files in the working or repo dirs.
  assert _local_files(tmp_path, ROOT) - before == set()


def _image_folders(tmp_path, url: str, prefix: str = '') -> None:
  """imgs/ (two class folders, a file at the top, a corrupt one) and clips/ (two videos of frames),
  written in tmp_path and uploaded to the bucket under the same names after `prefix`."""
  from PIL import Image
  rng = np.random.default_rng(0)
  files = {f'imgs/{c}/{i}.png': (20 + 7 * i, 30) for c in ('cats', 'dogs') for i in range(2)}
  files.update({'imgs/top.jpg': (40, 24), **{f'clips/v{v}/{f:02d}.png': (16, 16) for v in range(2) for f in range(3)}})
  for name, (w, h) in files.items():
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / name)
  (tmp_path / 'imgs/dogs/broken.png').write_bytes(b'\x89PNG truncated')
  for path in sorted(p for p in tmp_path.rglob('*') if p.is_file()):
    _upload(url, prefix + str(path.relative_to(tmp_path)), path.read_bytes())


def test_image_folders_and_videos_read_from_a_bucket_as_from_disk(gcs, tmp_path):
  """`lvm tokenize --source gs://...`, `frames:gs://...` and `lvm generate --prompt gs://...` read the
  bucket as a local folder: the same pixels, classes and labels, the corrupt file skipped by name.
  pathlib once made 'gs://runs/imgs' the local 'gs:/runs/imgs': 'no such image folder'."""
  url, env = gcs
  _image_folders(tmp_path / 'local', url)
  from PIL import Image  # and a clip as an animated GIF, read whole in one request
  gif = [Image.fromarray(np.full((16, 16), 40 * t, np.uint8)) for t in range(3)]
  gif[0].save(tmp_path / 'local/clips/w.gif', save_all=True, append_images=gif[1:])
  _upload(url, 'clips/w.gif', (tmp_path / 'local/clips/w.gif').read_bytes())
  script = f'''
import numpy as np
from data_pipelines.image_sources import folder_images, load_image, named_videos
local, remote = folder_images({str(tmp_path / 'local/imgs')!r}, 16), folder_images('gs://{BUCKET}/imgs', 16)
np.testing.assert_array_equal(remote.images, local.images)
assert remote.labels.tolist() == local.labels.tolist() == [0, 0, 1, 1, -1], remote.labels
assert remote.classes == local.classes == ['cats', 'dogs']
assert remote.paths == ['gs://{BUCKET}/imgs/' + p.split('/imgs/')[1] for p in local.paths]
assert remote.skipped == ['gs://{BUCKET}/imgs/dogs/broken.png'], remote.skipped
videos = named_videos('gs://{BUCKET}/clips', 16)
assert [name for name, _ in videos] == ['gs://{BUCKET}/clips/v0', 'gs://{BUCKET}/clips/v1', 'gs://{BUCKET}/clips/w.gif']
for (_, frames), (_, on_disk) in zip(videos, named_videos({str(tmp_path / 'local/clips')!r}, 16), strict=True):
  np.testing.assert_array_equal(frames, on_disk)
assert len(videos[-1][1]) == 3
np.testing.assert_array_equal(load_image('gs://{BUCKET}/imgs/top.jpg', 16), local.images[-1])
from data_pipelines.streamed_images import FolderImageStream  # streamed for the tokenizer: the same images
streamed = FolderImageStream('gs://{BUCKET}/imgs', 16)
assert streamed.skipped == remote.skipped, streamed.skipped
np.testing.assert_array_equal(streamed.images_at(range(len(streamed))), remote.images)
assert streamed.labels.tolist() == remote.labels.tolist()  # and for lvm tokenize --stream: labels, names
assert streamed.record_names(range(5)) == ['cats/0.png', 'cats/1.png', 'dogs/0.png', 'dogs/1.png', 'top.jpg']
from data_pipelines.image_headers import _header_ok  # and sizes, from the open objects, for a resumed job's check
assert streamed.sizes_sha256 == FolderImageStream({str(tmp_path / 'local/imgs')!r}, 16).sizes_sha256
assert _header_ok(streamed.files[4])[1] == _header_ok(FolderImageStream({str(tmp_path / 'local/imgs')!r}, 16).files[4])[1] > 0
'''
  done = subprocess.run([sys.executable, '-c', script], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  assert 'imgs/dogs/broken.png: not a readable image' in done.stderr



def test_label_pictures_pair_with_their_images_in_a_bucket_as_on_disk(gcs, tmp_path):
  """`lvm tokenize --source gs://.../photos --labels gs://.../labels`: the same pairs as from a local copy."""
  from tests.test_annotation_pairs import _folder
  url, env = gcs
  photos, labels = _folder(tmp_path / 'local')
  for path in sorted(p for p in (tmp_path / 'local').rglob('*') if p.is_file()):
    _upload(url, 'pairs/' + str(path.relative_to(tmp_path / 'local')), path.read_bytes())
  script = f'''
import numpy as np
from data_pipelines.annotation_pairs import paired_folder
from data_pipelines.image_sources import folder_images
def pairs(photos, labels):
  found = folder_images(photos, 32)
  return found.images, paired_folder(photos, labels, found.paths, found.images)
local_images, local = pairs({str(photos)!r}, {str(labels)!r})
remote_images, remote = pairs('gs://{BUCKET}/pairs/photos', 'gs://{BUCKET}/pairs/labels')
np.testing.assert_array_equal(remote_images, local_images)
np.testing.assert_array_equal(remote.annotations, local.annotations)
assert remote.paired.tolist() == local.paired.tolist() and remote.paired.sum() == 8
'''
  done = subprocess.run([sys.executable, '-c', script], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  assert 'ghost.png' in done.stderr  # the label without a photo, said for the bucket too


def test_show_reads_sentences_from_a_bucket_one_shard_at_a_time(gcs, tmp_path):
  """`lvm show --data gs://...` draws what it draws from local shards, copying into the data cache only
  the shards that hold the records asked for (the first 3 records: the first shard of 2)."""
  import torch
  from diffusers import VQModel
  from launch import main as launch_main
  from tests.test_tokenizer import DIFFUSERS_CONFIG
  url, env = gcs
  torch.manual_seed(0)
  VQModel(**DIFFUSERS_CONFIG).save_pretrained(tmp_path / 'vq', safe_serialization=True)
  assert launch_main(['lvm', 'import-tokenizer', '--weights', str(tmp_path / 'vq'), '--workdir', str(tmp_path / 'tok')]) == 0
  tokenizer = json.loads((tmp_path / 'tok' / 'import_result.json').read_text())['tokenizer']
  per_image = (tokenizer['image_size'] // 2 ** (len(tokenizer['block_out_channels']) - 1)) ** 2  # f4: 8 x 8
  np.save(tmp_path / 'codes.npy', np.random.default_rng(0).integers(0, 128, (8, 2 * per_image)).astype(np.int32))
  assert launch_main(['data', 'tokens', '--input', str(tmp_path / 'codes.npy'), '--out', str(tmp_path / 'shards'),
                      '--seq-len', str(2 * per_image), '--records-per-shard', '4']) == 0
  shards = sorted((tmp_path / 'shards').glob('*.arrayrecord'))
  assert len(shards) == 2
  for path in shards:
    _upload(url, f'show/{path.name}', path.read_bytes())
  show = ['lvm', 'show', '--tokenizer', str(tmp_path / 'tok'), '--records', '0-2']
  assert launch_main(show + ['--data', str(tmp_path / 'shards'), '--out', str(tmp_path / 'local.png')]) == 0
  done = subprocess.run([sys.executable, 'launch.py', *show, '--data', f'gs://{BUCKET}/show', '--out',
                         str(tmp_path / 'remote.png')], env=dict(env, LVM_ATTRIB_DATA_CACHE=str(tmp_path / 'cache')),
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  assert (tmp_path / 'remote.png').read_bytes() == (tmp_path / 'local.png').read_bytes()
  assert [p.name for p in (tmp_path / 'cache').rglob('*.arrayrecord')] == [shards[0].name]


def test_data_staged_from_a_bucket_onto_a_full_disk_leaves_no_partial_file(gcs, tmp_path):
  """A gs:// data file is copied once into each host's cache; when the disk fills during the copy
  (here the file size limit: writes past 64 KB fail, as on a full disk), the error comes through and
  no partial file is left in the cache to hold the space the rerun needs; the rerun copies it whole."""
  url, env = gcs
  data = np.random.default_rng(0).integers(0, 8192, (64, 512), dtype=np.int32)
  buffer = io.BytesIO()
  np.save(buffer, data)
  _upload(url, 'stage/tokens.npy', buffer.getvalue())
  cache = tmp_path / 'cache'
  script = f"""
import errno, resource, signal, sys
from core.paths import local_data
if sys.argv[1] == 'full':
  signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
  resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))
  try:
    local_data('gs://{BUCKET}/stage/tokens.npy')
  except OSError as e:
    assert e.errno == errno.EFBIG, e
    print('failed as a full disk fails')
else:
  print(local_data('gs://{BUCKET}/stage/tokens.npy'))
"""
  env = dict(env, LVM_ATTRIB_DATA_CACHE=str(cache))
  full = subprocess.run([sys.executable, '-c', script, 'full'], env=env, cwd=ROOT, capture_output=True, text=True,
                        timeout=120)
  assert full.returncode == 0 and 'failed as a full disk fails' in full.stdout, full.stderr[-3000:]
  assert [p.name for p in cache.rglob('*') if p.is_file()] == []
  again = subprocess.run([sys.executable, '-c', script, 'rerun'], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
  assert again.returncode == 0, again.stderr[-3000:]
  np.testing.assert_array_equal(np.load(again.stdout.strip()), data)
  assert [p.name for p in cache.rglob('*') if p.is_file()] == ['tokens.npy']



def test_hf_weights_and_token_shards_in_and_out_of_a_bucket(gcs, tmp_path):
  """`lvm import-hf --hf-dir gs://...`, `lvm export-hf --out gs://...` and `data tokens --out gs://...`
  read and write the bucket: the exported tensors equal the imported ones, the shards equal those
  written to a local folder, and nothing lands on the local disk. Before, pathlib made the gs:// path
  a local folder 'gs:/...': the export and the shards went there silently, and the import said the
  bucket's config.json was missing."""
  import torch
  import transformers
  from safetensors.numpy import load_file
  url, env = gcs
  env = dict(env, LVM_ATTRIB_DATA_CACHE=str(tmp_path / 'cache'))
  torch.manual_seed(0)
  config = transformers.LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                    tie_word_embeddings=False)
  transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / 'hf', safe_serialization=True)
  for path in (tmp_path / 'hf').iterdir():
    _upload(url, f'hf_in/{path.name}', path.read_bytes())
  tokens = np.random.default_rng(0).integers(0, 300, (40, 64), dtype=np.int32)
  np.save(tmp_path / 'tokens.npy', tokens)
  before = _local_files(tmp_path, ROOT) | {tmp_path / 'local_shards'}
  work = tmp_path / 'work'
  _run(env, tmp_path, 'lvm', 'import-hf', '--hf-dir', f'gs://{BUCKET}/hf_in', '--workdir', str(work), '--tpu', CPU1)
  _run(env, tmp_path, 'lvm', 'export-hf', '--workdir', str(work), '--out', f'gs://{BUCKET}/hf_out')
  objects = _objects(url, 'hf_out/')
  assert sorted(objects) == ['hf_out/config.json', 'hf_out/model.safetensors'], objects
  exported = tmp_path / 'exported.safetensors'
  exported.write_bytes(_read(url, 'hf_out/model.safetensors'))
  original, back = load_file(str(tmp_path / 'hf' / 'model.safetensors')), load_file(str(exported))
  assert sorted(back) == sorted(original)
  for name in original:
    np.testing.assert_array_equal(back[name], original[name], err_msg=name)
  assert json.loads(_read(url, 'hf_out/config.json'))['num_key_value_heads'] == 2

  shard_args = ['--input', str(tmp_path / 'tokens.npy'), '--seq-len', '64', '--vocab-size', '300',
                '--records-per-shard', '16']
  _run(env, tmp_path, 'data', 'tokens', *shard_args, '--out', f'gs://{BUCKET}/shards')
  _run(env, tmp_path, 'data', 'tokens', *shard_args, '--out', str(tmp_path / 'local_shards'))
  local = sorted((tmp_path / 'local_shards').iterdir())
  assert [p.name for p in local] == [f'tokens-0000{i}-of-00003.arrayrecord' for i in range(3)]
  assert sorted(_objects(url, 'shards/')) == [f'shards/{p.name}' for p in local]
  for path in local:
    assert _read(url, f'shards/{path.name}') == path.read_bytes(), path.name
  # Nothing but the workdir, the staged copy of the bucket's HF folder and the local shards.
  new = {p for p in _local_files(tmp_path, ROOT) - before
         if not p.is_relative_to(work) and not p.is_relative_to(tmp_path / 'cache')
         and not p.is_relative_to(tmp_path / 'local_shards') and p != exported}
  assert new == set(), sorted(new)



def test_released_weights_read_from_a_bucket_as_from_disk(gcs, tmp_path):
  """The released-weights readers take gs:// as they take a local folder: a VQGAN tokenizer folder or
  its weights file (`lvm import-tokenizer`), a diffusers weights file (`attrib import-diffusers`)
  and a DINO checkpoint (`attrib features --dino`, `Attributor.load(dino=...)`) give the same arrays.
  Each is copied once into the host's data cache (safetensors maps local files); before, pathlib
  made the gs:// path a local 'gs:/...' that was not found."""
  import torch
  import transformers
  from diffusers import VQModel
  from tests.test_tokenizer import DIFFUSERS_CONFIG
  from tests.test_vision_towers import VIT
  url, env = gcs
  torch.manual_seed(0)
  VQModel(**DIFFUSERS_CONFIG).save_pretrained(tmp_path / 'vq', safe_serialization=True)
  transformers.ViTModel(transformers.ViTConfig(**VIT), add_pooling_layer=False).save_pretrained(
      tmp_path / 'dino', safe_serialization=True)
  for folder in ('vq', 'dino'):
    for path in (tmp_path / folder).iterdir():
      _upload(url, f'weights/{folder}/{path.name}', path.read_bytes())
  script = f"""
import numpy as np
from attrib.released import read_state_dict
from attrib.tower_features import TowerFeaturizer
from core.config import load_config_file
from core.mesh import make_mesh
from jax.tree_util import keystr, tree_leaves_with_path
from lvm.tokenizer_weights import read_tokenizer_dir
local, remote = {str(tmp_path)!r}, 'gs://{BUCKET}/weights'
def same(a, b):
  assert sorted(a) == sorted(b)
  for k in a:
    np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)
want_config, want, _ = read_tokenizer_dir(local + '/vq')
for given in (remote + '/vq', remote + '/vq/diffusion_pytorch_model.safetensors'):
  config, state, _ = read_tokenizer_dir(given)
  assert config == want_config
  same(state, want)
same(read_state_dict(remote + '/vq/diffusion_pytorch_model.safetensors', 'vqvae'), want)
preset = load_config_file({CPU1!r})
towers = [TowerFeaturizer(d + '/dino', None, make_mesh(preset), preset.logical_rules) for d in (local, remote)]
leaves = [{{keystr(k): v for k, v in tree_leaves_with_path(t.dino[1])}} for t in towers]
same(*leaves)
print('same arrays')
"""
  env = dict(env, LVM_ATTRIB_DATA_CACHE=str(tmp_path / 'cache'))
  done = subprocess.run([sys.executable, '-c', script], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0 and 'same arrays' in done.stdout, done.stderr[-3000:]


@pytest.mark.slow
def test_diffusion_model_and_teacher_on_a_gs_workdir(gcs, tmp_path):
  url, env = gcs
  workdir = f'gs://{BUCKET}/digits'
  before = _local_files(tmp_path, ROOT)
  _run(env, tmp_path, 'attrib', 'train-model', '--config', str(ROOT / 'attrib/configs/digits.py'), '--tpu', CPU1,
       '--workdir', workdir, '--set', 'train.steps=10', '--set', 'train.progress_bar=false', '--set', 'sample.num_steps=5')
  teacher = ['attrib', 'teacher', '--workdir', workdir, '--queries', '2', '--candidates', '20',
             '--set', 'score_timestep_stride=250', '--set', 'query_grad_samples=16', '--set', 'fisher_images=64',
             '--set', 'fisher_samples_per_image=1']
  _run(env, tmp_path, *teacher)
  objects = _objects(url, 'digits/')
  assert {'digits/teacher/ranks.arrayrecord', 'digits/teacher/queries/query_00000.npz',
          'digits/teacher/queries/query_00001.npz', 'digits/teacher_result.json'} <= set(objects)
  assert json.loads(_read(url, 'digits/teacher_result.json'))['scored_this_run'] == 2
  # A rerun finds both queries ranked in the bucket and scores none again.
  _run(env, tmp_path, *teacher)
  assert json.loads(_read(url, 'digits/teacher_result.json'))['scored_this_run'] == 0
  assert _local_files(tmp_path, ROOT) - before == set()


@pytest.mark.slow  # five jobs, each a process that compiles: ~1 minute on 2 cores
def test_the_lvm_path_in_a_bucket_tokenizer_to_generate(gcs, tmp_path):
  """The TPU slice's LVM path, all of it in gs://: train a tokenizer, tokenize, train the LVM, then
  prompt it from a laptop's folder. `lvm generate` once read a gs:// workdir as the local path
  'gs:/...' ('config.json not found'); it finds the tokenizer through the data's manifest in the
  bucket and writes its picture there, as a JPEG because the name says so."""
  url, env = gcs
  root = f'gs://{BUCKET}/lvm_path'
  before = _local_files(tmp_path, ROOT)
  _run(env, tmp_path, 'lvm', 'train-tokenizer', '--config', str(ROOT / 'lvm/configs/tokenizer_tiny.py'), '--tpu', CPU1,
       '--workdir', f'{root}/tok', '--set', 'train.steps=2', '--set', 'train.checkpoint_every=2',
       '--set', 'train.progress_bar=false')
  _run(env, tmp_path, 'lvm', 'tokenize', '--tokenizer', f'{root}/tok', '--source', 'builtin:digits', '--kind', 'video',
       '--sentences', '16', '--out', f'{root}/sent')
  # Images and videos in the bucket, tokenized from there (a folder of this test's: another test adds a
  # clip to the top one)
  _image_folders(tmp_path / 'up', url, prefix='lvm_path/in/')
  src = f'gs://{BUCKET}/lvm_path/in'
  _run(env, tmp_path, 'lvm', 'tokenize', '--tokenizer', f'{root}/tok', '--source', f'{src}/imgs',
       '--kind', 'groups', '--frames', '2', '--sentences', '4', '--out', f'{root}/sent_imgs')  # classes of 2 images
  _run(env, tmp_path, 'lvm', 'tokenize', '--tokenizer', f'{root}/tok', '--source', f'frames:{src}/clips',
       '--kind', 'video', '--frames', '3', '--sentences', '4', '--out', f'{root}/sent_clips')
  for made, kind, images in (('sent_imgs', 'groups', 5), ('sent_clips', 'video', 6)):
    manifest = json.loads(_read(url, f'lvm_path/{made}/manifest.json'))
    assert manifest['records_per_kind'] == {kind: 4} and manifest['images'] == images, manifest
  _run(env, tmp_path, 'lvm', 'train', '--config', TINY, '--tpu', CPU1, '--workdir', f'{root}/lvm',
       '--set', f'data.train_path={root}/sent', '--set', 'model.vocab_size=228', '--set', 'train.steps=2',
       '--set', 'train.progress_bar=false', '--set', 'train.tensorboard=false')
  from PIL import Image
  prompts = []
  for i in range(2):
    Image.new('RGB', (32, 32), (40 * i, 0, 0)).save(tmp_path / f'p{i}.png')
    prompts.append(str(tmp_path / f'p{i}.png'))
  _run(env, tmp_path, 'lvm', 'generate', '--workdir', f'{root}/lvm', '--prompt', *prompts, f'{src}/imgs/top.jpg',
       '--out', f'{root}/gen.jpg')
  result = json.loads(_read(url, 'lvm_path/lvm/generate_result.json'))
  assert result['tokenizer'] == f'{root}/tok' and len(result['tokens'][0]) == 64
  assert _read(url, 'lvm_path/gen.jpg')[:3] == b'\xff\xd8\xff'  # JPEG
  # Many prompts from a list in the bucket (its paths relative to it, a clip folder among them), answered there.
  _upload(url, 'lvm_path/in/prompts.txt', b'imgs/top.jpg imgs/cats/0.png\nclips/v1\n')
  _run(env, tmp_path, 'lvm', 'generate', '--workdir', f'{root}/lvm', '--prompts', f'{src}/prompts.txt',
       '--out', f'{root}/answers')
  records = [json.loads(line) for line in _read(url, 'lvm_path/answers/results.jsonl').decode().splitlines()]
  assert records[1]['images'] == [f'{src}/clips/v1/{f:02d}.png' for f in range(3)]
  assert records[0]['images'] == [f'{src}/imgs/top.jpg', f'{src}/imgs/cats/0.png']
  assert sorted(_objects(url, 'lvm_path/answers/')) == [
      'lvm_path/answers/00001_frame1.png', 'lvm_path/answers/00002_frame1.png', 'lvm_path/answers/results.jsonl']
  assert _local_files(tmp_path, ROOT) - before - _local_files(tmp_path / 'up') == {
      tmp_path / 'p0.png', tmp_path / 'p1.png', tmp_path / 'up'}


@pytest.mark.slow  # ~45 s on 2 cores (gs:// training, resume and eval stay in the default suite)
def test_student_on_gs_equals_the_local_one(gcs, tmp_path, tmp_path_factory):
  """Released features and rankings in the bucket -> distill, sharded index, eval and the Attributor
  with a gs:// workdir: the same student, bit for bit, as from local files, and nothing local."""
  url, env = gcs
  from tests.test_fastgda import CONFIG, TEST_Q, write_release
  release = write_release(tmp_path_factory.mktemp('release'))
  for path in sorted(p for p in release.rglob('*') if p.is_file()):
    _upload(url, f'release/{path.relative_to(release).as_posix()}', path.read_bytes())
  config = tmp_path_factory.mktemp('config') / 'student.py'
  config.write_text(CONFIG)
  local = tmp_path_factory.mktemp('local') / 'student'
  # With a reranked search, so that the base feature's index goes to the bucket and back too.
  common = ['--config', str(config), '--tpu', CPU1, '--set', 'distill.seed=1', '--set', 'distill.epochs=2',
            '--set', 'rerank_candidates=30']
  from launch import main as launch_main
  assert launch_main(['attrib', 'distill', '--workdir', str(local), '--features', str(release / 'feats' / 'toy'),
                      '--ranks', str(release / 'influence_train.pkl'), *common]) == 0

  workdir = f'gs://{BUCKET}/student'
  before = _local_files(tmp_path, ROOT)
  # One process for the jobs and the Python API (a start-up each would double the test's time).
  script = f'''
import json, sys, numpy as np
sys.path.insert(0, {str(ROOT)!r})
from launch import main
from attrib import Attributor
w = {workdir!r}
assert main(['attrib', 'distill', '--workdir', w, '--features', 'gs://{BUCKET}/release/feats/toy',
             '--ranks', 'gs://{BUCKET}/release/influence_train.pkl', *{common!r}]) == 0
assert main(['attrib', 'index', '--workdir', w, '--shards', '2']) == 0
assert main(['attrib', 'eval', '--workdir', w, '--ranks', 'gs://{BUCKET}/release/influence_test.pkl']) == 0
q = np.load({str(release / 'feats' / 'toy' / 'test_query_feats.npy')!r})
answers = [[a.ids.tolist() for a in Attributor.load(x).attribute_batch(features=q, k=5)] for x in (w, {str(local)!r})]
# `attrib serve` of the gs:// student, watching it (as the command does, looking every 0.2 s), and a
# second Attributor loaded before the change below.
import threading, time, urllib.request
from attrib.serve import AttributionServer, reload_when_changed
server, stale = AttributionServer(Attributor.load(w), '127.0.0.1', 0), Attributor.load(w)
stop = threading.Event()
threads = [threading.Thread(target=server.serve_forever),
           threading.Thread(target=reload_when_changed, args=(server, lambda: Attributor.load(w), 0.2, stop))]
[t.start() for t in threads]
# Training images added to the gs:// student (into its sharded index) and saved there.
grown = Attributor.load(w)
grown.add_training_images(features=q[:2])
grown.save()
deadline = time.time() + 120
while server.reloads == 0 and time.time() < deadline:
  time.sleep(0.1)
time.sleep(1.5)  # looks enough for a spurious second reload
request = urllib.request.Request(server.url + '/attribute', data=json.dumps({{'features': q[0].tolist(), 'k': 5}}).encode(),
                                 headers={{'Content-Type': 'application/json'}})
served = json.loads(urllib.request.urlopen(request, timeout=60).read())['ids']
stop.set(); server.shutdown(); [t.join() for t in threads]; server.server_close()
try:  # its files changed since it loaded: saving its own view would drop the two added
  stale.remove_training_images([0]); stale.save(); refused = ''
except Exception as e:
  refused = type(e).__name__ + ': ' + str(e)
fresh = Attributor.load(w)
print(json.dumps([server.reloads, len(server.attributor.index), served, fresh.attribute(features=q[:1], k=5).ids.tolist(),
                  refused, fresh.removed.tolist()]))
print(json.dumps([len(Attributor.load(w).index), len(grown.index)]))
print(json.dumps(answers))
'''
  done = subprocess.run([sys.executable, '-c', script], env=env, cwd=tmp_path, capture_output=True, text=True,
                        timeout=600)
  assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
  objects = _objects(url, 'student/')
  assert {'student/distill_result.json', 'student/index_result.json', 'student/eval_result.json',
          'student/student/config.json', 'student/student/embeddings.npy', 'student/student/metrics.jsonl',
          'student/student/index/shards.json', 'student/student/index/shard_00001/index.json',
          'student/student/base_index/shards.json'} <= set(objects)  # φ's index rebuilt in 2 shards too
  # The same rows bit for bit, and after them the two training images added in the bucket.
  import io
  import numpy as np
  in_bucket = np.load(io.BytesIO(_read(url, 'student/student/embeddings.npy')))
  assert in_bucket.shape == (602, 32)
  assert in_bucket[:600].tobytes() == np.load(local / 'student' / 'embeddings.npy').tobytes()
  stored = json.loads(_read(url, 'student/student/config.json'))
  assert stored['features'] == f'gs://{BUCKET}/release/feats/toy'  # not resolved into a local path
  # The Python API reads the gs:// workdir (sharded index): its answers are the local student's.
  from_gs, from_local = json.loads(done.stdout.splitlines()[-1])
  assert from_gs == from_local and len(from_gs) == TEST_Q
  assert json.loads(done.stdout.splitlines()[-2]) == [602, 602]
  # The server watching the bucket took the added images up, once, and answers as a fresh load; an
  # Attributor loaded before that save refuses to save over it, and wrote nothing.
  reloads, served_rows, served, fresh_ids, refused, removed = json.loads(done.stdout.splitlines()[-3])
  assert (reloads, served_rows) == (1, 602) and served == fresh_ids
  assert refused.startswith(f'AttributionError: gs://{BUCKET}/student/student changed since this Attributor was loaded')
  assert removed == []
  assert 'student/student/added_images.npz' in _objects(url, 'student/')
  assert _local_files(tmp_path, ROOT) - before == set()
