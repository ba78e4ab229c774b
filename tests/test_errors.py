"""The error boundary: bad input ends in one `error:` line and exit 2, never a traceback, and
changes nothing on disk; --debug shows the traceback."""
import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest

from core.errors import UserError
from launch import main as launch_main
from tests.helpers import CPU8, ROOT, TINY


def _tree_digest(path):
  digest = hashlib.sha256()
  for f in sorted(p for p in path.rglob('*') if p.is_file()):
    digest.update(str(f.relative_to(path)).encode() + f.read_bytes())
  return digest.hexdigest()


def _bad_inputs(tmp):
  np.save(tmp / 'short.npy', np.zeros((6, 64), np.int32))
  np.save(tmp / 'floats.npy', np.zeros((6, 256), np.float32))
  (tmp / 'truncated.npy').write_bytes((tmp / 'short.npy').read_bytes()[:100])
  from data_pipelines.token_records import write_token_shards
  write_token_shards(np.zeros((6, 64), np.int32), tmp / 'short_shards', seq_len=64, vocab_size=300)
  (tmp / 'bad.jsonl').write_text('{"tokens": "not base64!"}\n')
  (tmp / 'empty.jsonl').write_text('\n')
  (tmp / 'not_a.pem').write_text('-----BEGIN CERTIFICATE-----\nnot base64\n')
  (tmp / 'a_file').write_text('x')
  (tmp / 'shards').mkdir()
  (tmp / 'shards' / 'tokens-00000-of-00002.arrayrecord').write_bytes(b'an earlier data set')
  np.save(tmp / 'out_of_vocab.npy', np.full((2, 256), 9000, np.int32))
  np.save(tmp / 'one_token.npy', np.zeros((2, 1), np.int32))
  (tmp / 'vq_sentences').mkdir()  # as `lvm tokenize` writes them: codes of a tokenizer, named in the manifest
  (tmp / 'vq_sentences' / 'manifest.json').write_text(json.dumps({'tokenizer': 'runs/tokenizer', 'seq_len': 256,
                                                                  'tokenizer_checksum': 'a33e2a876e1c46c0'}))
  (tmp / 'hf').mkdir()
  (tmp / 'hf' / 'config.json').write_text(json.dumps(dict(
      architectures=['LlamaForCausalLM'], model_type='llama', vocab_size=300, hidden_size=64,
      intermediate_size=112, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
      max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False)))
  (tmp / 'hf' / 'model.safetensors').write_bytes(b'\x10\x00\x00\x00\x00\x00\x00\x00{"not": "tensors"}')
  (tmp / 'hf_partial').mkdir()
  (tmp / 'hf_partial' / 'config.json').write_text('{"model_type": "llama", "hidden_size": 64}')
  (tmp / 'hf_mistral').mkdir()
  (tmp / 'hf_mistral' / 'config.json').write_text('{"model_type": "mistral", "hidden_size": 64}')
  (tmp / 'hf_truncated').mkdir()
  (tmp / 'hf_truncated' / 'config.json').write_text('{"model_type": "llama", "hidden_')
  (tmp / 'garbage.bin').write_bytes(b'PK\x03\x04 this is not a torch checkpoint')
  from safetensors.numpy import save_file
  save_file({'foreign.weight': np.zeros((2, 2), np.float32)}, str(tmp / 'foreign.safetensors'))
  np.save(tmp / 'six_records.npy', np.zeros((6, 256), np.int32))
  (tmp / 'two_images').mkdir()
  from PIL import Image
  for i in range(2):
    Image.fromarray(np.full((32, 32, 3), 80 * i, np.uint8)).save(tmp / 'two_images' / f'{i}.png')
  (tmp / 'prompts.txt').write_text('two_images/0.png two_images/1.png two_images/0.png\n'
                                   'two_images/0.png two_images/1.png\n')
  digits = str(ROOT / 'attrib/configs/digits.py')
  from core.config import load_config_file, to_dict
  for kind, config in (('lvm_run', TINY), ('diffusion_run', digits)):
    (tmp / kind).mkdir()
    (tmp / kind / 'config.json').write_text(json.dumps({'config': to_dict(load_config_file(config)), 'tpu': CPU8}))
  (tmp / 'amused-256' / 'vqvae').mkdir(parents=True)  # a diffusers pipeline, given for its VQGAN
  (tmp / 'amused-256' / 'model_index.json').write_text('{"_class_name": "AmusedPipeline"}')
  (tmp / 'amused-256' / 'vqvae' / 'config.json').write_text('{"_class_name": "VQModel"}')
  (tmp / 'models--Emma02--LVM_ckpts' / 'snapshots' / 'abc123').mkdir(parents=True)  # the Hub cache's top folder
  (tmp / 'qs').mkdir()  # as the quickstart leaves its folder: one workdir per job inside
  for job, kind in (('lvm', 'lvm_run'), ('attrib', 'diffusion_run')):
    (tmp / 'qs' / job).mkdir()
    (tmp / 'qs' / job / 'config.json').write_text((tmp / kind / 'config.json').read_text())
  latent_config = to_dict(load_config_file(digits))
  latent_config['data']['train_path'] = 'latents:coco/trainset'  # as `attrib import-diffusers` records it
  (tmp / 'latent_run').mkdir()
  (tmp / 'latent_run' / 'config.json').write_text(json.dumps({'config': latent_config, 'tpu': CPU8}))
  generate = ['attrib', 'generate', '--workdir', str(tmp / 'diffusion_run'), '--prompt', 'a handwritten seven']
  train = ['lvm', 'train', '--config', TINY, '--tpu', CPU8, '--workdir', str(tmp / 'w')]
  tokens = ['data', 'tokens', '--out', str(tmp / 'out'), '--seq-len', '256', '--input']
  lvm_eval = ['lvm', 'eval', '--workdir', str(tmp / 'lvm_run'), '--data']
  train_model = ['attrib', 'train-model', '--config', digits, '--workdir', str(tmp / 'w')]
  return {
      'cpu preset for a TPU': (['tpu', 'create', '--tpu', CPU8, '--name', 'x'], 'CPU preset'),
      'unknown --set key': (train + ['--set', 'train.stepz=3'], "unknown config key 'train.stepz'"),
      'negative steps': (train + ['--set', 'train.steps=-1'], 'train.steps must be >= 1'),
      'processes without a coordinator': (train + ['--num-processes', '2'], '--num-processes 2 --process-id 0 need '
                                          '--coordinator HOST:PORT'),
      'a coordinator without a port': (train + ['--coordinator', 'host-0', '--num-processes', '2'],
                                       "--coordinator 'host-0': expected HOST:PORT of process 0"),
      'a process id past the count': (train + ['--coordinator', 'localhost:1234', '--num-processes', '2',
                                               '--process-id', '2'], '--process-id 2 must be in [0, --num-processes 2)'),
      'wrong type': (train + ['--set', 'train.steps=many'], 'train.steps'),
      'missing config': (['lvm', 'train', '--config', str(tmp / 'nope.py'), '--tpu', CPU8, '--workdir',
                          str(tmp / 'w')], 'nope.py'),
      'short records': (tokens + [str(tmp / 'short.npy')], 'short.npy'),
      'train on records of another length': (train + ['--set', f'data.train_path={tmp / "short_shards"}'],
                                             'short_shards holds records of 64 tokens, but data.seq_len is 256: '
                                             '--set data.seq_len=64 to train on them'),
      'float records': (tokens + [str(tmp / 'floats.npy')], 'floats.npy'),
      'truncated npy': (tokens + [str(tmp / 'truncated.npy')], 'truncated.npy'),
      'corrupt jsonl': (tokens + [str(tmp / 'bad.jsonl')], 'bad.jsonl'),
      'jsonl of no records': (tokens + [str(tmp / 'empty.jsonl')], 'empty.jsonl: no records to write'),
      'eval of no workdir': (['lvm', 'eval', '--workdir', str(tmp / 'none'), '--data', 'builtin:digits-eval'], 'none'),
      'teacher on no workdir': (['attrib', 'teacher', '--workdir', str(tmp / 'none'), '--queries', '1'], 'none'),
      'sampler typo (checked before training)': (['attrib', 'train-model', '--config', str(ROOT / 'attrib/configs/digits.py'),
                                                   '--workdir', str(tmp / 'w'), '--set', 'sample.method=euler'], 'euler'),
      'distill without features': (['attrib', 'distill', '--workdir', str(tmp / 'w')], 'data_feats.npy'),
      'distill of zero epochs': (['attrib', 'distill', '--workdir', str(tmp / 'w'), '--set', 'distill.epochs=0'],
                                 'distill.epochs must be >= 1, got 0'),
      'attribute with no student': (['attrib', 'query', '--workdir', str(tmp / 'w'), '--image', 'x.png', '--prompt', 'p'],
                                    'attrib distill'),
      'shell text in a string': (train[:-1] + [str(tmp / 'w'), '--set', 'data.train_path=$(rm -rf /); x'],
                                 '$(rm -rf /); x'),
      'quotes and a newline in a string': (train + ['--set', 'data.train_path=it\'s "x"\nrm -rf ~'],
                                           'it\'s "x"\\nrm -rf ~'),
      'newline in a workdir': (['lvm', 'eval', '--workdir', str(tmp / 'a\nb'), '--data', 'builtin:digits-eval'],
                               'a\\nb'),
      'out-of-vocab tokens': (tokens + [str(tmp / 'out_of_vocab.npy')], 'out_of_vocab.npy'),
      'data tokens into a folder of shards': (['data', 'tokens', '--out', str(tmp / 'shards'), '--seq-len', '64',
                                               '--input', str(tmp / 'short.npy')], 'already holds 1 token shard'),
      'zero record length': (tokens[:-2] + ['0', '--input', str(tmp / 'short.npy')], '--seq-len'),
      'workdir is a file': (train[:-1] + [str(tmp / 'a_file')], 'a_file'),
      'export-hf under a file': (['lvm', 'export-hf', '--workdir', str(tmp / 'lvm_run'), '--out',
                                  str(tmp / 'a_file' / 'hf')], 'a_file is a file'),
      'data tokens under a file': (['data', 'tokens', '--out', str(tmp / 'a_file' / 'shards'), '--seq-len', '64',
                                    '--input', str(tmp / 'short.npy')], 'a_file is a file'),
      'model config as the preset': (['lvm', 'train', '--config', TINY, '--tpu', digits, '--workdir',
                                      str(tmp / 'w')], 'digits.py'),
      'preset as the model config': (['lvm', 'train', '--config', CPU8, '--tpu', CPU8, '--workdir',
                                      str(tmp / 'w')], 'cpu_8.py'),
      'a new run without a preset': (['lvm', 'train', '--config', TINY, '--workdir', str(tmp / 'w')],
                                     '--tpu: the slice preset to train a new run with'),
      'a fit check without a preset': (['lvm', 'train', '--config', TINY, '--check'],
                                       '--check compiles the step for a slice preset'),
      'a tokenizer fit check without a preset': (['lvm', 'train-tokenizer', '--config',
                                                  str(ROOT / 'lvm/configs/tokenizer_tiny.py'), '--check'],
                                                 '--check compiles the step for a slice preset'),
      'train-model without a workdir': (['attrib', 'train-model', '--config', digits],
                                        'attrib train-model needs --workdir (or --check to only check that the job fits)'),
      'import-hf without config.json': (['lvm', 'import-hf', '--hf-dir', str(tmp), '--workdir', str(tmp / 'w')],
                                        'config.json'),
      'import-hf of corrupt safetensors': (['lvm', 'import-hf', '--hf-dir', str(tmp / 'hf'), '--workdir',
                                            str(tmp / 'w')], 'model.safetensors'),
      'import-hf of a partial config': (['lvm', 'import-hf', '--hf-dir', str(tmp / 'hf_partial'), '--workdir',
                                         str(tmp / 'w')], 'hf_partial/config.json: missing vocab_size, '
                                        'intermediate_size, num_hidden_layers, num_attention_heads'),
      'import-hf of another architecture': (['lvm', 'import-hf', '--hf-dir', str(tmp / 'hf_mistral'), '--workdir',
                                             str(tmp / 'w')], "hf_mistral/config.json: model_type='mistral'"),
      'import-hf of a truncated config': (['lvm', 'import-hf', '--hf-dir', str(tmp / 'hf_truncated'), '--workdir',
                                           str(tmp / 'w')], 'hf_truncated/config.json: not valid JSON'),
      'export-hf of no workdir': (['lvm', 'export-hf', '--workdir', str(tmp / 'none'), '--out', str(tmp / 'x')],
                                  'none'),
      'import-diffusers of a corrupt file': (['attrib', 'import-diffusers', '--weights', str(tmp / 'garbage.bin'),
                                              '--workdir', str(tmp / 'w')], 'garbage.bin'),
      'import-diffusers of foreign weights': (['attrib', 'import-diffusers', '--weights',
                                               str(tmp / 'foreign.safetensors'), '--workdir', str(tmp / 'w')],
                                              'foreign.safetensors'),
      'teacher with no queries': (['attrib', 'teacher', '--workdir', str(tmp / 'w'), '--queries', '0'],
                                  '--queries'),
      'teacher of zero candidates': (['attrib', 'teacher', '--workdir', str(tmp / 'diffusion_run'), '--queries', '1',
                                      '--candidates', '0'], "--candidates must be 'all' or a count >= 1, got '0'"),
      'features on no workdir': (['attrib', 'features', '--workdir', str(tmp / 'none')], 'none'),
      'index with no student': (['attrib', 'index', '--workdir', str(tmp / 'w')], 'attrib distill'),
      'attrib eval with no student': (['attrib', 'eval', '--workdir', str(tmp / 'w')], 'attrib distill'),
      'counterfactual on no workdir': (['attrib', 'counterfactual', '--workdir', str(tmp / 'none'), '--k', '3'],
                                       'none'),
      'counterfactual of zero images': (['attrib', 'counterfactual', '--workdir', str(tmp / 'w'), '--k', '0'],
                                        '--k must be >= 1'),
      'teacher on an LVM workdir': (['attrib', 'teacher', '--workdir', str(tmp / 'lvm_run'), '--queries', '1'],
                                    'not made by `attrib train-model` or `attrib import-diffusers`: it holds an LVM '
                                    'run (`lvm train` / `lvm import-hf`)'),
      'train-model into an LVM workdir': (['attrib', 'train-model', '--config', digits, '--workdir',
                                           str(tmp / 'lvm_run')], 'not made by `attrib train-model`'),
      'train-model of another U-Net into a run': (['attrib', 'train-model', '--config', digits, '--workdir',
                                                   str(tmp / 'diffusion_run'), '--set', 'unet.layers_per_block=2'],
                                                  "different unet settings {'layers_per_block': '1 -> 2'}"),
      'lvm train of another model into a run': (['lvm', 'train', '--config', TINY, '--tpu', CPU8, '--workdir',
                                                 str(tmp / 'lvm_run'), '--set', 'model.hidden_size=64'],
                                                "different model settings {'hidden_size': '128 -> 64'}"),
      'import-tokenizer of a missing path': (['lvm', 'import-tokenizer', '--weights', str(tmp / 'vq'), '--workdir',
                                              str(tmp / 'w')], 'vq not found'),
      'import-tokenizer of a folder without config': (['lvm', 'import-tokenizer', '--weights', str(tmp / 'shards'),
                                                       '--workdir', str(tmp / 'w')], 'shards/config.json not found'),
      'lvm eval on a diffusion workdir': (['lvm', 'eval', '--workdir', str(tmp / 'diffusion_run'), '--data',
                                           'builtin:digits-eval'],
                                          'diffusion_run was not made by `lvm train` or `lvm import-hf`: it holds a diffusion model '
                                          '(`attrib train-model` / `attrib import-diffusers`)'),
      'lvm eval of batch 0': (lvm_eval + ['builtin:digits-eval', '--batch-size', '0'], '--batch-size must be >= 1'),
      'lvm eval of a run before its first checkpoint': (lvm_eval + ['builtin:digits-eval'],
                                                        'lvm_run holds no checkpoint yet'),
      'lvm generate of several frames of an analogy': (['lvm', 'generate', '--workdir', str(tmp / 'lvm_run'), '--prompt',
                                                        'a.png', 'a2.png', 'b.png', '--mode', 'analogy', '--frames', '3'],
                                                       '--mode analogy completes one frame, --frames 3 asks for more'),
      'attrib generate from a latent model': (generate[:3] + [str(tmp / 'latent_run')] + generate[4:],
                                              'this U-Net denoises latents (latents:coco/trainset)'),
      'attrib generate of a negative seed': (generate + ['--seed', '-1'], '--seed must be >= 0, got -1'),
      'attrib generate into an unknown image format': (generate + ['--out', str(tmp / 'q.gif')],
                                                       'q.gif: .gif is not an image format written here'),
      'lvm eval of a negative completion count': (lvm_eval + ['builtin:digits-eval', '--completion', '-1'],
                                                  '--completion must be >= 0 (records per kind; 0: none), got -1'),
      'lvm eval of 0 target tokens': (lvm_eval + ['builtin:digits-eval', '--target-tokens', '0'],
                                      '--target-tokens must be >= 1'),
      'lvm eval of one-token records': (lvm_eval + [str(tmp / 'one_token.npy')],
                                        'one_token.npy: records of 1 token: perplexity needs at least 2'),
      'tokenize into an LVM run': (['lvm', 'tokenize', '--tokenizer', str(tmp / 'w'), '--source', 'builtin:digits',
                                    '--out', str(tmp / 'lvm_run')], 'lvm_run is the workdir of a job: it holds an LVM run'),
      'data tokens into an LVM run': (['data', 'tokens', '--input', str(tmp / 'six_records.npy'), '--out',
                                       str(tmp / 'lvm_run'), '--seq-len', '256'],
                                      'lvm_run is the workdir of a job: it holds an LVM run'),
      'quickstart into the workdir of one job': (['quickstart', '--workdir', str(tmp / 'lvm_run'), '--lvm-only'],
                                                  'is the workdir of a job: it holds an LVM run'),
      'import-tokenizer of a diffusers pipeline': (['lvm', 'import-tokenizer', '--weights', str(tmp / 'amused-256'),
                                                    '--workdir', str(tmp / 'w')],
                                                   f'amused-256 is a diffusers pipeline: give its vqvae/ folder, '
                                                   f'{tmp / "amused-256" / "vqvae"}'),
      'import-hf of the Hub cache folder': (['lvm', 'import-hf', '--hf-dir', str(tmp / 'models--Emma02--LVM_ckpts'),
                                             '--workdir', str(tmp / 'w')],
                                            'is a Hugging Face Hub cache folder: give its snapshot, '
                                            f'{tmp / "models--Emma02--LVM_ckpts" / "snapshots" / "abc123"}'),
      'attrib query of the quickstart\'s folder': (['attrib', 'query', '--workdir', str(tmp / 'qs'), '--image',
                                                   str(tmp / 'two_images' / '0.png'), '--prompt', 'a seven'],
                                                  'qs holds jobs\' workdirs, as the quickstart\'s folder: '
                                                  f'its LVM is {tmp / "qs" / "lvm"}, '
                                                  f'its attribution workdir is {tmp / "qs" / "attrib"}'),
      'lvm train into the quickstart\'s folder': (['lvm', 'train', '--config', TINY, '--tpu', CPU8, '--workdir',
                                                  str(tmp / 'qs')], '--workdir ' + str(tmp / 'qs') + ' is not one '
                                                 'job\'s workdir'),
      'tokenize with the quickstart\'s folder as tokenizer': (['lvm', 'tokenize', '--tokenizer', str(tmp / 'qs'),
                                                              '--source', 'builtin:digits', '--out', str(tmp / 'o')],
                                                             f'its LVM is {tmp / "qs" / "lvm"}'),
      'lvm generate from a grey-level model': (['lvm', 'generate', '--workdir', str(tmp / 'lvm_run'), '--prompt',
                                                str(tmp / 'two_images' / '0.png'), '--tokenizer', str(tmp / 'w'),
                                                '--out', str(tmp / 'g.png')],
                                               'trained on builtin:digits, one grey level per token, which no '
                                               'tokenizer turns into pictures'),
      'lvm eval of tokenizer codes on a grey-level model': (lvm_eval + [str(tmp / 'vq_sentences')],
                                                            'vq_sentences holds codes of the tokenizer runs/tokenizer; '
                                                            f'{tmp / "lvm_run"} trained on builtin:digits'),
      'attrib add with no student': (['attrib', 'add', '--workdir', str(tmp / 'w'), '--features',
                                      str(tmp / 'short.npy')], 'attrib distill'),
      'attrib add of nothing': (['attrib', 'add', '--workdir', str(tmp / 'w')], 'takes --images'),
      'attrib remove with no student': (['attrib', 'remove', '--workdir', str(tmp / 'w'), '--ids', '3'], 'attrib distill'),
      'attrib remove of nothing': (['attrib', 'remove', '--workdir', str(tmp / 'w')], 'takes --ids'),
      'attrib serve with no student': (['attrib', 'serve', '--workdir', str(tmp / 'w'), '--port', '0'],
                                       'attrib distill'),
      'attrib serve on no port': (['attrib', 'serve', '--workdir', str(tmp / 'w'), '--port', '70000'],
                                  '--port 70000: expected a port number in [0, 65535]'),
      'attrib serve with a certificate and no key': (
          ['attrib', 'serve', '--workdir', str(tmp / 'w'), '--tls-cert', str(tmp / 'not_a.pem')],
          '--tls-cert and --tls-key go together'),
      'attrib serve with files that are no certificate': (
          ['attrib', 'serve', '--workdir', str(tmp / 'w'), '--tls-cert', str(tmp / 'not_a.pem'), '--tls-key',
           str(tmp / 'not_a.pem')], 'not_a.pem: not a PEM certificate and its private key'),
      'attrib serve with an empty token file': (
          ['attrib', 'serve', '--workdir', str(tmp / 'w'), '--token-file', str(tmp / 'empty.jsonl')],
          'empty.jsonl: the token is empty'),
      'attrib remove of words': (['attrib', 'remove', '--workdir', str(tmp / 'w'), '--ids', '3,seven'],
                                 "--ids '3,seven': expected comma-separated training ids"),
      'attrib query among words': (['attrib', 'query', '--workdir', str(tmp / 'w'), '--image', 'x.png', '--prompt',
                                    'p', '--among', '3,x'], "--among '3,x': expected comma-separated training ids"),
      'attrib query among ids inline and in a file': (['attrib', 'query', '--workdir', str(tmp / 'w'), '--image',
                                                       'x.png', '--prompt', 'p', '--among', '3', '--among-file',
                                                       str(tmp / 'a_file')], '--among and --among-file exclude'),
      'batch that the mesh cannot split': (train + ['--set', 'train.global_batch=6'],
                                           'a micro-step of 6 rows (train.global_batch / optim.grad_accum) '
                                           "cannot be split 4 ways over mesh axes ('data', 'fsdp')"),
      'lvm train on fewer records than a batch': (train + ['--set', f'data.train_path={tmp / "six_records.npy"}'],
                                                  'six_records.npy: 6 training records are fewer than one batch '
                                                  '(train.global_batch 16)'),
      'train-tokenizer on fewer images than a batch': (['lvm', 'train-tokenizer', '--config',
                                                        str(ROOT / 'lvm/configs/tokenizer_tiny.py'), '--tpu', CPU8,
                                                        '--workdir', str(tmp / 'w'), '--set',
                                                        f'data.source={tmp / "two_images"}'],
                                                       'two_images (2 images): 2 training records are fewer than '
                                                       'one batch (train.global_batch 32)'),
      'lvm generate of a list line for another mode': (['lvm', 'generate', '--workdir', str(tmp / 'lvm_run'),
                                                        '--prompts', str(tmp / 'prompts.txt'),
                                                        '--mode', 'analogy', '--out', str(tmp / 'answers')],
                                                       "prompts.txt:2: --mode analogy takes three prompt images A A' B "
                                                       '(got 2)'),
      'lvm generate of grids for one prompt': (['lvm', 'generate', '--workdir', str(tmp / 'lvm_run'), '--prompt',
                                                'a.png', '--grids'], '--grids and --batch-size are for --prompts LIST'),
      'lvm generate of greedy samples for a list': (['lvm', 'generate', '--workdir', str(tmp / 'lvm_run'),
                                                     '--prompts', str(tmp / 'prompts.txt'), '--samples', '4'],
                                                    '--samples 4 with --temperature 0: greedy decoding gives the same'),
      'lvm generate into an unknown image format': (['lvm', 'generate', '--workdir', str(tmp / 'lvm_run'), '--prompt',
                                                     'a.png', '--out', str(tmp / 'grid.gif')],
                                                    'grid.gif: .gif is not an image format written here'),
      'features of a part named twice': (['attrib', 'features', '--workdir', str(tmp / 'diffusion_run'), '--feature',
                                          'unet+text+unet'], "feature 'unet+text+unet' names ['unet'] more than once"),
      'digit sentences of a partial digit': (train + ['--set', 'data.seq_len=100'],
                                             'data.seq_len 100 must be a multiple of 64'),
      'train-model of a batch the mesh cannot split': (train_model + ['--set', 'train.global_batch=5'],
                                                       'a micro-step of 5 rows'),
      'train-model of caption dropout above 1': (train_model + ['--set', 'data.caption_dropout=1.5'],
                                                 'data.caption_dropout is a probability, in [0, 1]; got 1.5'),
      'train-model of empty captions': (train_model + ['--set', 'data.text_len=0'],
                                        'data.text_len must be in [2, 512]'),
      'train-model of an odd image size': (train_model + ['--set', 'unet.sample_size=10'],
                                           'unet.sample_size 10 must divide by 4'),
      'train-model of zero heads': (train_model + ['--set', 'unet.num_attention_heads=0'],
                                    'unet.num_attention_heads must be >= 1, got 0'),
      'train-model of inverted betas': (train_model + ['--set', 'schedule.beta_start=0.5'],
                                        'beta_start=0.5, beta_end=0.012'),
      'train-model without its exclude file': (train_model + ['--set', f'data.exclude_path={tmp / "gone.txt"}'],
                                               'data.exclude_path ' + str(tmp / 'gone.txt') + ': no such file'),
      'import-hf of a Hub id': (['lvm', 'import-hf', '--hf-dir', 'Emma02/LVM_7b', '--workdir', str(tmp / 'w')],
                                'Emma02/LVM_7b looks like a Hugging Face Hub id, and nothing is downloaded at run time: '
                                'download it first (huggingface-cli download Emma02/LVM_7b --local-dir DIR)'),
      'import-tokenizer of a Hub id': (['lvm', 'import-tokenizer', '--weights', 'amused/amused-256', '--workdir',
                                        str(tmp / 'w')], 'give that folder (its vqvae/ for a diffusers pipeline)'),
      'quickstart of an LVM key typo': (['quickstart', '--workdir', str(tmp / 'qs_new'), '--set', 'train.lr=1e-3'],
                                        "unknown config key 'train.lr' (did you mean 'optim.lr'?)"),
      'quickstart of a tokenizer value': (['quickstart', '--workdir', str(tmp / 'qs_new'), '--set-tokenizer',
                                           'train.steps=ten'], "bad value for 'train.steps'"),
      'train-tokenizer on one image file': (['lvm', 'train-tokenizer', '--config', str(ROOT / 'lvm/configs/tokenizer_tiny.py'),
                                             '--tpu', CPU8, '--workdir', str(tmp / 'w'), '--set',
                                             f'data.source={tmp / "two_images" / "0.png"}'],
                                            '0.png is a file: a source is a folder of images'),
      'train-tokenizer streaming built-in images': (['lvm', 'train-tokenizer', '--config',
                                                     str(ROOT / 'lvm/configs/tokenizer_tiny.py'), '--tpu', CPU8,
                                                     '--workdir', str(tmp / 'w'), '--set', 'data.stream=always'],
                                                    'data.stream=always: builtin:digits+photos is decoded into memory'),
      'train-tokenizer of an unknown stream mode': (['lvm', 'train-tokenizer', '--config',
                                                     str(ROOT / 'lvm/configs/tokenizer_tiny.py'), '--tpu', CPU8,
                                                     '--workdir', str(tmp / 'w'), '--set', 'data.stream=yes'],
                                                    "data.stream must be 'auto', 'always' or 'never', got 'yes'"),
      'lvm eval of a step folder': (['lvm', 'eval', '--workdir', str(tmp / 'lvm_run' / 'checkpoints' / '4'), '--data',
                                     'builtin:digits-eval'],
                                    f'4 is a folder inside the workdir {tmp / "lvm_run"}: it holds an LVM run'),
      'attrib query of a checkpoints folder': (['attrib', 'query', '--workdir', str(tmp / 'diffusion_run' / 'checkpoints'),
                                                '--image', 'x.png', '--prompt', 'p'],
                                               f'checkpoints is a folder inside the attribution workdir '
                                               f'{tmp / "diffusion_run"}: pass that'),
  }


CASES = ['cpu preset for a TPU', 'unknown --set key', 'negative steps', 'wrong type', 'missing config',
         'short records', 'float records', 'truncated npy', 'corrupt jsonl', 'eval of no workdir',
         'teacher on no workdir', 'shell text in a string', 'sampler typo (checked before training)',
         'distill without features', 'distill of zero epochs', 'attribute with no student', 'quotes and a newline in a string',
         'newline in a workdir', 'out-of-vocab tokens', 'data tokens into a folder of shards', 'zero record length',
         'workdir is a file', 'export-hf under a file', 'data tokens under a file',
         'model config as the preset', 'preset as the model config', 'a new run without a preset',
         'a fit check without a preset', 'import-hf without config.json',
         'import-hf of corrupt safetensors', 'import-hf of a partial config', 'import-hf of another architecture',
         'import-hf of a truncated config', 'export-hf of no workdir', 'import-diffusers of a corrupt file',
         'import-diffusers of foreign weights', 'teacher with no queries', 'features on no workdir',
         'index with no student', 'attrib eval with no student', 'counterfactual on no workdir',
         'counterfactual of zero images', 'teacher on an LVM workdir', 'lvm eval on a diffusion workdir',
         'train-model into an LVM workdir', 'train-model of another U-Net into a run',
         'lvm train of another model into a run', 'import-tokenizer of a missing path',
         'import-tokenizer of a folder without config', 'jsonl of no records',
         'teacher of zero candidates', 'lvm eval of batch 0', 'lvm eval of 0 target tokens',
         'lvm eval of one-token records', 'attrib add with no student', 'attrib add of nothing',
         'batch that the mesh cannot split', 'digit sentences of a partial digit',
         'train-model of a batch the mesh cannot split', 'train-model of caption dropout above 1',
         'train-model of empty captions', 'train-model of an odd image size', 'train-model of zero heads',
         'train-model of inverted betas', 'train-model without its exclude file', 'attrib remove with no student',
         'attrib remove of nothing', 'attrib remove of words', 'lvm train on fewer records than a batch',
         'train-tokenizer on fewer images than a batch', 'lvm generate into an unknown image format',
         'features of a part named twice', 'lvm eval of a run before its first checkpoint',
         'attrib generate from a latent model', 'attrib generate of a negative seed',
         'attrib generate into an unknown image format', 'lvm generate of several frames of an analogy',
         'lvm eval of tokenizer codes on a grey-level model', 'lvm generate from a grey-level model',
         'quickstart into the workdir of one job', 'tokenize into an LVM run', 'data tokens into an LVM run',
         "attrib query of the quickstart's folder", "lvm train into the quickstart's folder",
         "tokenize with the quickstart's folder as tokenizer", 'import-tokenizer of a diffusers pipeline',
         'import-hf of the Hub cache folder', 'train on records of another length',
         'processes without a coordinator', 'a coordinator without a port', 'a process id past the count',
         'train-tokenizer on one image file', 'train-tokenizer streaming built-in images',
         'train-tokenizer of an unknown stream mode', 'lvm eval of a step folder', 'attrib query of a checkpoints folder',
         'import-hf of a Hub id', 'import-tokenizer of a Hub id', 'quickstart of an LVM key typo',
         'quickstart of a tokenizer value', 'lvm generate of a list line for another mode',
         'lvm generate of grids for one prompt', 'lvm eval of a negative completion count',
         'attrib query among words', 'attrib query among ids inline and in a file',
         'lvm generate of greedy samples for a list', 'attrib serve with no student', 'attrib serve on no port',
         'attrib serve with a certificate and no key', 'attrib serve with files that are no certificate',
         'attrib serve with an empty token file',
         'a tokenizer fit check without a preset', 'train-model without a workdir']


@pytest.mark.parametrize('case', CASES)
def test_bad_input_is_one_line_and_exit_2(case, tmp_path, capsys):
  cases = _bad_inputs(tmp_path)
  assert sorted(cases) == sorted(CASES)
  argv, named = cases[case]
  before = _tree_digest(tmp_path)
  assert launch_main(argv) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith('error: ') and 'Traceback' not in err[0], err
  assert named in err[0], err
  assert _tree_digest(tmp_path) == before  # nothing written, nothing half-written


def test_the_python_apis_name_the_runs_of_a_quickstarts_folder(tmp_path):
  """`Attributor.load('runs/quickstart')`, the folder the quickstart printed, names the workdirs inside
  it; before, it advised `attrib distill` on that folder (which is no diffusion run)."""
  from attrib import Attributor
  from lvm import Prompter
  _bad_inputs(tmp_path)
  quickstart = tmp_path / 'qs'
  for load in (Attributor.load, Prompter.load):
    with pytest.raises(UserError) as raised:
      load(str(quickstart))
    assert "qs holds jobs' workdirs, as the quickstart's folder: " \
           f"its LVM is {quickstart / 'lvm'}, its attribution workdir is " \
           f"{quickstart / 'attrib'}" in str(raised.value)
    assert 'attrib distill' not in str(raised.value)


def test_debug_shows_the_traceback(tmp_path):
  with pytest.raises(UserError, match='CPU preset'):
    launch_main(['--debug', 'tpu', 'create', '--tpu', CPU8, '--name', 'x'])


def test_a_long_message_stays_one_readable_line(monkeypatch, capsys):
  """A library's error quoted whole (tfds once listed ~250 datasets) is cut, on one line, pointing to --debug."""
  import launch
  def fail(argv):
    raise UserError('data/x.npy: ' + 'every name tfds knows\n' * 500)
  monkeypatch.setattr(launch, '_run', fail)
  assert launch_main(['lvm', 'eval']) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith('error: data/x.npy: every name') and len(err[0]) < 2100
  assert err[0].endswith('more characters: --debug shows all)')


def _wrapped(inner, outer):
  outer.__cause__ = inner  # as `raise outer from inner`
  return outer


@pytest.mark.parametrize('raised', [
    lambda: _wrapped(OSError(28, 'No space left on device', 'runs/x/metrics.jsonl'), ValueError('save failed')),
    lambda: RuntimeError('write() failed: No space left on device; writing runs/x/.groups-00003.tmp1; at byte 61440'),
    lambda: ValueError('RESOURCE_EXHAUSTED: Error writing "lm_head" at local file "runs/x/checkpoints/10": '
                       "No space left on device [os_error_code='28']"),
    lambda: OSError(122, 'Disk quota exceeded', 'runs/x/teacher/q7.npz')])
def test_a_full_disk_is_one_line_saying_where_and_to_rerun(raised, monkeypatch, capsys):
  """ArrayRecord, orbax (TensorStore) and Python each say 'disk full' their own way, in tracebacks
  from the writer; the boundary turns each into one line that names the file and says the same
  command continues (every job writes through temporary names and keeps resumable state)."""
  import launch
  def fail(argv):
    raise raised()
  monkeypatch.setattr(launch, '_run', fail)
  assert launch_main(['lvm', 'tokenize']) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith('error: the disk is full (') and 'runs/x/' in err[0], err
  assert err[0].endswith('rerun the same command to continue from the last saved state')
  with pytest.raises(Exception):
    launch_main(['--debug', 'lvm', 'tokenize'])  # --debug keeps the traceback
  def other(argv):
    raise RuntimeError('a bug')
  monkeypatch.setattr(launch, '_run', other)
  with pytest.raises(RuntimeError, match='a bug'):  # anything else is not dressed up as bad input
    launch_main(['lvm', 'tokenize'])


def test_training_refuses_a_disk_too_small_for_its_first_checkpoint(tmp_path, monkeypatch, capsys):
  """Before init: a run that cannot save its parameters is refused, not trained until its first save."""
  import collections
  import shutil
  real = shutil.disk_usage
  usage = collections.namedtuple('usage', 'total used free')
  free = {'bytes': 3_000_000}
  monkeypatch.setattr(shutil, 'disk_usage', lambda path: usage(10**9, 10**9 - free['bytes'], free['bytes'])
                      if str(tmp_path) in str(path) else real(path))
  argv = ['lvm', 'train', '--config', TINY, '--tpu', CPU8, '--workdir', str(tmp_path / 'run'),
          '--set', 'train.steps=1', '--set', 'train.progress_bar=false']
  assert launch_main(argv) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith(f'error: the disk of {tmp_path / "run"} has 3.0 MB free, and a '
                                             'checkpoint of this run needs at least 10.1 MB (its parameters; '
                                             'up to 30.2 MB with the optimizer state)'), err
  assert not (tmp_path / 'run' / 'checkpoints').exists()
  free['bytes'] = 20_000_000  # room for the parameters, perhaps not for the optimizer state: a note
  from core import checkpoint
  import jax.numpy as jnp
  checkpoint.check_room_for_a_save(tmp_path, {'w': jnp.zeros((2_500_000,))}, {'mu': jnp.zeros((2_500_000,))})
  assert 'may need up to 20.0 MB' not in capsys.readouterr().err
  checkpoint.check_room_for_a_save(tmp_path, {'w': jnp.zeros((2_500_000,))}, {'mu': jnp.zeros((5_000_000,))})
  assert 'has 20.0 MB free; a checkpoint of this run may need up to 30.0 MB' in capsys.readouterr().err


def test_pictures_are_written_in_the_format_their_name_says(tmp_path):
  """`--out grid.jpg` once got PNG bytes under a .jpg name."""
  from PIL import Image
  from core.workdir import prepare_output_file, save_image_atomic
  pixels = np.random.default_rng(0).integers(0, 256, (8, 12, 3), np.uint8)
  for name, format in (('g.png', 'PNG'), ('g.JPG', 'JPEG'), ('g.webp', 'WEBP'), ('grid', 'PNG')):
    save_image_atomic(prepare_output_file(tmp_path / name), pixels)
    with Image.open(tmp_path / name) as written:
      assert written.format == format and written.size == (12, 8)
  np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / 'g.png')), pixels)  # lossless
  # Past a format's largest side PIL raised a bare OSError ('broken data stream'): named, nothing written.
  for name, side in (('wide.jpg', 65_501), ('tall.webp', 16_384)):
    shape = (8, side) if name.startswith('wide') else (side, 8)
    with pytest.raises(UserError, match=f'{name}: a {shape[1]}x{shape[0]} picture is larger than'):
      save_image_atomic(tmp_path / name, np.zeros(shape, np.uint8))
    assert not (tmp_path / name).exists()


def test_a_full_scale_feature_names_each_part_once():
  from attrib.tower_features import TowerFeaturizer
  assert TowerFeaturizer.parts('dino+clip_text') == ['dino', 'clip_text']
  with pytest.raises(UserError, match=r"feature 'dino\+clip_text\+dino' names \['dino'\] more than once; each part "
                                      r"once, e.g. 'dino\+clip_text'"):
    TowerFeaturizer.parts('dino+clip_text+dino')


def test_a_url_is_refused_by_name_not_with_a_keyerror():
  """`--image https://...` (or s3://) ended in etils' KeyError('https://'); only gs:// is a remote
  path here, and nothing is downloaded at run time."""
  from attrib.query_images import read_image
  from attrib.tower_features import _header_problem
  from core.paths import as_path
  from data_pipelines.image_sources import load_image
  url = 'https://example.com/cat.png'
  said = f'{url}: only local paths and gs:// are read (nothing is downloaded at run time'
  for read in (as_path, read_image, lambda path: load_image(path, 32)):
    with pytest.raises(UserError) as raised:
      read(url)
    assert str(raised.value).startswith(said), raised.value
  assert _header_problem('s3://bucket/cat.png').startswith('s3://bucket/cat.png: only local paths and gs://')


def test_a_damaged_checkpoint_is_named_with_the_way_back(tmp_path, capsys):
  """A checkpoint whose files were cut short (a full disk, an interrupted copy) ended in pages of
  TensorStore traceback; now one line names the step folder and the reader's words, and says which
  earlier checkpoint the run falls back on once that folder is moved away."""
  import shutil
  run = tmp_path / 'run'
  train = ['lvm', 'train', '--config', TINY, '--tpu', CPU8, '--workdir', str(run), '--set', 'train.steps=4',
           '--set', 'train.checkpoint_every=2', '--set', 'train.progress_bar=false', '--set', 'model.num_layers=1']
  assert launch_main(train) == 0
  for data in (run / 'checkpoints' / '4' / 'params').rglob('d/*'):
    data.write_bytes(data.read_bytes()[:100])
  capsys.readouterr()
  resume = train[:-8] + ['--set', 'train.steps=6'] + train[-6:]
  for argv in (resume, ['lvm', 'eval', '--workdir', str(run), '--data', 'builtin:digits-eval']):
    assert launch_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f'error: {run / "checkpoints" / "4"}: the checkpoint of step 4 cannot be read (OUT_OF_RANGE: '
                          'Error '), err
    assert 'is not valid for value of size 100); it may be damaged or incomplete' in err, err
    assert err.endswith('move that folder away, and the run is read (and continues) from step 2'), err
  shutil.move(run / 'checkpoints' / '4', tmp_path / 'damaged_4')
  assert launch_main(resume) == 0
  assert json.loads((run / 'train_result.json').read_text())['step'] == 6
  # Whole checkpoints read with other shapes (an edited config.json) are not called damaged: moving
  # them away, as that advice says, would lose the run.
  stored = json.loads((run / 'config.json').read_text())
  stored['config']['model']['num_layers'] = 2
  (run / 'config.json').write_text(json.dumps(stored))
  capsys.readouterr()
  assert launch_main(['lvm', 'eval', '--workdir', str(run), '--data', 'builtin:digits-eval']) == 2
  err = capsys.readouterr().err.strip().splitlines()[-1]
  assert err.startswith(f'error: {run / "checkpoints" / "6"}: the checkpoint of step 6 holds arrays of other shapes '
                        f'than {run / "config.json"} describes (Requested shape: (2, '), err
  assert err.endswith('the checkpoints are not damaged, do not move them'), err


def test_an_npy_cut_short_is_named(tmp_path):
  """Embeddings, features and rankings cut short (a full disk, an interrupted copy) ended in numpy's
  ValueError, which names no file; read mapped or whole, each is named, and a missing one stays a
  FileNotFoundError (callers test for it)."""
  from attrib.student_data import load_features
  from core.workdir import load_npy
  np.save(tmp_path / 'data_feats.npy', np.ones((64, 32), np.float32))
  whole = (tmp_path / 'data_feats.npy').read_bytes()
  (tmp_path / 'data_feats.npy').write_bytes(whole[:len(whole) // 2])
  for read in (lambda: load_npy(tmp_path / 'data_feats.npy'), lambda: load_npy(tmp_path / 'data_feats.npy', mmap=True),
               lambda: load_features(tmp_path, 'train')):
    with pytest.raises(UserError, match=rf'^{tmp_path / "data_feats.npy"}: not a readable .npy \(.*\); it may be '
                                        r'damaged or incomplete \(a full disk, an interrupted copy\): rerun'):
      read()
  with pytest.raises(FileNotFoundError):
    load_npy(tmp_path / 'missing.npy')


def test_a_workdirs_json_cut_short_is_named(tmp_path, capsys):
  """A run's config.json, a manifest or a job state cut short ended in json's 'Expecting value: line 3
  column 16' traceback, from the first command that read it (here: finding the run's preset)."""
  from core.workdir import read_json
  _bad_inputs(tmp_path)
  config = tmp_path / 'lvm_run' / 'config.json'
  config.write_text(config.read_text()[:50])
  for argv in (['lvm', 'eval', '--workdir', str(tmp_path / 'lvm_run'), '--data', 'builtin:digits-eval'],
               ['lvm', 'tokenize', '--tokenizer', str(tmp_path / 'lvm_run'), '--source', 'builtin:digits',
                '--out', str(tmp_path / 'sentences')]):
    assert launch_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f'error: {config}: not valid JSON ('), err
    assert err[0].endswith('it may be damaged or incomplete (a full disk, an interrupted copy): rerun the job that '
                           'wrote it'), err
  with pytest.raises(FileNotFoundError):
    read_json(tmp_path / 'none.json')


def test_another_jobs_workdir_is_named_by_what_it_holds_alone(tmp_path):
  """A tokenizer's workdir given to `lvm eval` said 'config.json does not describe a LvmConfig run
  (TypeError: LvmConfig.__init__() missing 1 required positional argument...)' before what it holds;
  a run of the right kind whose config.json does not load still gets the loader's words."""
  from core.workdir import read_run_config
  from lvm.config import LvmConfig
  (tmp_path / 'config.json').write_text(json.dumps({'config': {'tokenizer': {}}, 'tpu': CPU8}))
  with pytest.raises(UserError) as raised:
    read_run_config(tmp_path, LvmConfig, '`lvm train` or `lvm import-hf`')
  assert str(raised.value) == (f'{tmp_path} was not made by `lvm train` or `lvm import-hf`: it holds a tokenizer run '
                               '(`lvm train-tokenizer` / `lvm import-tokenizer`)')
  (tmp_path / 'config.json').write_text(json.dumps({'config': {'model': 5}, 'tpu': CPU8}))
  with pytest.raises(UserError, match=r'config.json does not describe a LvmConfig run \(TypeError: '):
    read_run_config(tmp_path, LvmConfig, '`lvm train` or `lvm import-hf`')


def test_a_student_command_on_the_wrong_folder_says_which_to_pass(tmp_path):
  """`attrib query --workdir runs/quickstart/attrib/student` (the folder holding the index) and an
  LVM's workdir both said 'student/config.json not found: run attrib distill first'; a diffusion
  workdir not yet distilled still says that."""
  from attrib.distill import load_student_run
  for name, config in (('student', {'embedder': {}}), ('lvm', {'model': {}}), ('diffusion', {'unet': {}})):
    (tmp_path / name).mkdir()
    (tmp_path / name / 'config.json').write_text(json.dumps({'config': config, 'tpu': CPU8}))
  said = {'student': f'{tmp_path / "student"} is the student folder of the attribution workdir {tmp_path}: pass '
                     f'that (--workdir {tmp_path})',
          'lvm': f'{tmp_path / "lvm"} is not an attribution workdir: it holds an LVM run (`lvm train` / '
                 '`lvm import-hf`); pass the workdir `attrib distill` ran in',
          'diffusion': f'{tmp_path / "diffusion" / "student" / "config.json"} not found: run `launch.py attrib '
                       f'distill --workdir {tmp_path / "diffusion"}` first'}
  # Folders inside workdirs: the student's index/, a diffusion run's checkpoints/, an LVM's step folder.
  for inner in ('attrib/student/index', 'attrib/checkpoints', 'lvm/checkpoints/40'):
    (tmp_path / inner).mkdir(parents=True)
  (tmp_path / 'attrib/config.json').write_text(json.dumps({'config': {'unet': {}}, 'tpu': CPU8}))
  (tmp_path / 'attrib/student/config.json').write_text(json.dumps({'config': {'embedder': {}}, 'tpu': CPU8}))
  attrib = tmp_path / 'attrib'
  said |= {'attrib/student/index': f'{attrib / "student/index"} is a folder inside the attribution workdir {attrib}: '
                                   f'pass that (--workdir {attrib})',
           'attrib/checkpoints': f'{attrib / "checkpoints"} is a folder inside the attribution workdir {attrib}: pass '
                                 f'that (--workdir {attrib})',
           'lvm/checkpoints/40': f'{tmp_path / "lvm/checkpoints/40"} is a folder inside the workdir {tmp_path / "lvm"}: '
                                 'it holds an LVM run (`lvm train` / `lvm import-hf`); pass the workdir `attrib distill` '
                                 'ran in'}
  for name, message in said.items():
    with pytest.raises(UserError) as raised:
      load_student_run(tmp_path / name)
    assert str(raised.value) == message
  # The LVM side: a step folder for its workdir; a folder in a Hugging Face model's (whose config.json
  # is not a job's) is asked about as before.
  from core.workdir import read_run_config
  from lvm.config import LvmConfig
  with pytest.raises(UserError) as raised:
    read_run_config(tmp_path / 'lvm/checkpoints/40', LvmConfig, '`lvm train` or `lvm import-hf`')
  assert str(raised.value).endswith(f'{tmp_path / "lvm/checkpoints/40"} is a folder inside the workdir {tmp_path / "lvm"}: '
                                    f'it holds an LVM run (`lvm train` / `lvm import-hf`); pass {tmp_path / "lvm"} itself')
  (tmp_path / 'hf/sub').mkdir(parents=True)
  (tmp_path / 'hf/config.json').write_text(json.dumps({'architectures': ['LlamaForCausalLM']}))
  with pytest.raises(UserError, match=r'hf/sub a workdir made by `lvm train` or `lvm import-hf`\?$'):
    read_run_config(tmp_path / 'hf/sub', LvmConfig, '`lvm train` or `lvm import-hf`')


NOISE_SCRIPT = r'''
import gc, sys
from absl import logging
from core.io_noise import drop_abandoned_io_noise
drop_abandoned_io_noise()

def from_orbax(message):  # logged from a file under orbax/, as orbax's threads log a failed save
  exec(compile(f'logging.error({message!r})', '/site-packages/orbax/checkpoint/future.py', 'exec'))

from_orbax('[thread=MainThread] a save of step 2 failed: something else')  # kept: not a full disk
from_orbax('[thread=array_type_handler] raised: Failed writing: No space left on device')
from_orbax('[process=0] Failed to run 5 Handler Commit operations')  # the same failure, retold
logging.error('our own error after it')  # kept: not orbax's

class Abandoned:  # a write finishing on orbax's closed event loop
  def __init__(self, error):
    self.error = error
  def __del__(self):
    raise self.error
Abandoned(RuntimeError('Event loop is closed'))
Abandoned(RuntimeError('a real problem'))  # kept

async def async_serialize_from_host():
  pass
async def our_coroutine():
  pass
async_serialize_from_host()
our_coroutine()  # kept
gc.collect()
'''


def test_orbax_noise_around_a_full_disk_is_dropped_and_nothing_else(tmp_path):
  """A full disk in a tiny LVM's save (a 20 MB tmpfs) printed 26 'Event loop is closed' tracebacks
  and orbax's ERROR logs from each of its threads, 600-900 lines, before the one-line error; with
  the CLI's filters it prints the note and the error alone. The filters drop exactly orbax's own
  noise: an error that is not about the disk, our own logs, other unraisables and our coroutines stay."""
  done = subprocess.run([sys.executable, '-c', NOISE_SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr
  err = done.stderr
  assert 'a save of step 2 failed: something else' in err and 'our own error after it' in err
  assert 'No space left on device' not in err and 'Handler Commit' not in err
  assert 'Event loop is closed' not in err and 'a real problem' in err
  assert 'async_serialize_from_host' not in err and "coroutine 'our_coroutine' was never awaited" in err
