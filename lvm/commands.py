"""`launch.py lvm ...` jobs: train, eval, import-hf, export-hf. Each writes WORKDIR/<job>_result.json (train, eval, import, export)."""
from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import jax
import numpy as np

from core.paths import absolute, as_path, is_remote, local_data
from core.config import ConfigError, apply_overrides, load_config_file, to_dict
from core.distributed import all_or_none
from core.mesh import load_preset, make_mesh, preset_to_record
from core.optim import OptimConfig
from core.sharding import activation_sharding
from core.train_loop import check_batch_layout, init_state, restore_latest_params, train
from core.workdir import (RUN_CONFIG_FILE, config_of_run, make_workdir, note_changed_training, prepare_output_dir,
                         read_json, read_run_config, refuse_changed_run, versions, write_imported_run,
                         write_json_atomic, write_result_if_writable)
from data_pipelines.token_loader import token_batches
from data_pipelines.token_records import SHARD_SUFFIX, TokenRecordSource
from data_pipelines.token_sources import open_token_source, record_length
from lvm import evaluate, hf_interop
from lvm.config import LvmConfig
from lvm.task import NextTokenTask
from lvm.validation_data import held_out_batches

DEFAULT_TPU = str(Path(__file__).resolve().parent.parent / 'tpu_configs' / 'cpu_1.py')


def data_location(train_path: str) -> str:
  """Training data as a later job finds it from any folder: built-in names and gs:// as given."""
  return train_path if not train_path or train_path.startswith('builtin:') else absolute(train_path)


def data_record(train_path: str, workdir) -> dict:
  """Where a run's training data is, as `lvm train` records it in the workdir for later jobs
  (lvm/prompting.training_manifest): its absolute path, and (both local) its path relative to the
  workdir, which still holds when the two are moved together (a run folder copied to another
  machine, then opened from any folder)."""
  record = {'train_data': data_location(train_path)}
  if train_path and not train_path.startswith('builtin:') and not is_remote(train_path) and not is_remote(workdir):
    record['train_data_relative'] = os.path.relpath(absolute(train_path), absolute(workdir))
  return record


def load_run_config(workdir: Path) -> tuple[LvmConfig, str]:
  return read_run_config(workdir, LvmConfig, '`lvm train` or `lvm import-hf`')


def _trained_data(workdir) -> str | None:
  """Where a run's training data is now, from the record `data_record` wrote: through the workdir for a
  run folder moved or copied with its data, else the absolute path (or name) recorded."""
  record = read_json(as_path(workdir) / RUN_CONFIG_FILE)
  if record.get('train_data_relative') and not is_remote(workdir):
    moved_with_it = absolute(Path(absolute(workdir)) / record['train_data_relative'])
    if Path(moved_with_it).exists():
      return moved_with_it
  return record.get('train_data')


def run_config(config_path: str | None, workdir, overrides: list[str]) -> LvmConfig:
  """--config with --set; without --config, the config a rerun's workdir recorded, its training data
  found from any folder (the recorded train_path counts from the folder the run started in)."""
  config = config_of_run(config_path, workdir, LvmConfig, '`lvm train` or `lvm import-hf`', 'lvm/configs/tiny.py')
  if not config_path and config.data.train_path and (located := _trained_data(workdir)):
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, train_path=located))
  return apply_overrides(config, overrides)


def _check_same_model(workdir: Path, config: LvmConfig) -> None:
  """Continuing a run with a different model or data layout would silently corrupt it: refuse."""
  if not (workdir / RUN_CONFIG_FILE).is_file():
    return
  previous, _ = load_run_config(workdir)
  # An imported run (no training data yet) may be continued on any data.
  groups = ('model',) if previous.data.train_path == '' else ('model', 'data')
  # The same data named another way ('sent' from its parent, then '/abs/sent' or '../sent' from
  # elsewhere) is the same data: compared by the absolute path recorded when training ran, or, for a
  # run folder moved or copied together with its data (a quickstart folder), by where the recorded
  # path relative to the workdir leads from where the workdir is now.
  record = read_json(workdir / RUN_CONFIG_FILE)
  same_data = {record.get('train_data') or data_location(previous.data.train_path)}
  if record.get('train_data_relative') and not is_remote(workdir):
    same_data.add(absolute(Path(absolute(workdir)) / record['train_data_relative']))
  if data_location(config.data.train_path) in same_data:
    previous = dataclasses.replace(previous, data=dataclasses.replace(previous.data, train_path=config.data.train_path))
  refuse_changed_run(workdir, previous, config, groups, ignore={
      ('data', 'read_threads'), ('model', 'remat_policy'), ('model', 'attention_block'), ('model', 'compute_dtype')})
  note_changed_training(workdir, previous, config)


def fit_check_command(config_path: str | None, tpu_path: str, overrides: list[str], workdir=None) -> dict:
  """`lvm train --check`: compiles the real step for the preset's TPU topology on this machine and
  reports per-device memory against its HBM (core/fit_check.py). Nothing is trained or written.
  Without --config, the run in --workdir is checked (will it fit another slice?)."""
  from core.fit_check import fit_check_result, lvm_fit_report
  config: LvmConfig = run_config(config_path, workdir, overrides)
  report = lvm_fit_report(config, load_preset(tpu_path))
  tokens_per_step = config.train.global_batch * config.data.seq_len
  return fit_check_result('lvm train', report, model_params=config.model.num_params(), tokens_per_step=tokens_per_step,
                          model_flops_per_step=config.model.flops_per_token(config.data.seq_len) * tokens_per_step)


def note_vocabulary_mismatch(config: LvmConfig) -> None:
  """Sentences from `lvm tokenize` name their vocabulary (codes + reserved ids) in manifest.json. A
  model of another size still trains (the records are checked against the model's), but a larger one
  spends its embedding and output rows on ids that never occur (the tiny preset's 8,292 on a 228-id
  tokenizer: 97% of both), and a smaller one cannot hold the reserved ids; say so before training."""
  data = config.data.train_path
  if not data or data.startswith('builtin:'):
    return
  manifest_path = Path(local_data(data)) / 'manifest.json'
  if not manifest_path.is_file():
    return
  data_vocab = read_json(manifest_path).get('vocab_size')
  model_vocab = config.model.vocab_size
  if data_vocab is None or data_vocab == model_vocab:
    return
  from core import progress
  why = (f'the model\'s {model_vocab - data_vocab:,} ids from {data_vocab} up never occur in it' if model_vocab > data_vocab else
         f'ids {model_vocab}-{data_vocab - 1}, reserved for special tokens, cannot be used')
  progress.say(f'note: model.vocab_size is {model_vocab:,} but {data} was tokenized for {data_vocab:,} ids '
               f'({manifest_path.name}): {why}; --set model.vocab_size={data_vocab} to match')


def weighted_inputs(data: str, source):
  """The inputs' sampling weights of a merged folder (`lvm merge-sentences --weights`), said before
  training; None for other data."""
  if not data or data.startswith('builtin:'):
    return None
  manifest_path = Path(local_data(data)) / 'manifest.json'
  if not manifest_path.is_file():
    return None
  from data_pipelines.mixture import training_mixture
  mixture = training_mixture(data, read_json(manifest_path), source)
  if mixture is not None:
    from core import progress
    progress.say(f'{data}, weighted by input: {mixture.describe()}')
  return mixture


def check_record_length(config: LvmConfig) -> None:
  """Records of another length than data.seq_len were refused by their byte count ('record 0: 256
  bytes, expected 256 int32 tokens'); say the lengths and the setting that matches."""
  length = record_length(config.data.train_path)
  if length is None or length == config.data.seq_len:
    return
  fix = f'--set data.seq_len={length}'
  if length > config.model.max_seq_len:
    fix += f' --set model.max_seq_len={length}'
  raise ConfigError(f'{config.data.train_path} holds records of {length} tokens, but data.seq_len is '
                    f'{config.data.seq_len}: {fix} to train on them')


def continued_preset(workdir: str | None) -> str:
  """`lvm train` without --tpu: the preset the workdir's run trained with. A new run names its slice:
  a default would put a TPU VM's job on its CPU without a word."""
  from core.mesh import trained_preset
  preset = trained_preset(workdir)
  if preset is None:
    raise ConfigError(f'--tpu: the slice preset to train {"a new run" if workdir else "on"} with, e.g. '
                      'tpu_configs/cpu_8_data.py on this CPU or tpu_configs/v4_32.py on a pod (a rerun of a '
                      'workdir continues with the preset it trained with)')
  return preset


def train_command(config_path: str | None, tpu_path: str, workdir: str, overrides: list[str]) -> dict:
  config: LvmConfig = run_config(config_path, workdir, overrides)
  workdir = as_path(workdir)
  # Each host checks the job and opens its data (a gs:// path is staged to each host's disk); one that
  # fails stops every host here, before the others wait for it in the training's first collective.
  with all_or_none('lvm train: the config, data and workdir checked'):
    _check_same_model(workdir, config)
    preset = load_preset(tpu_path)
    # Validate the data before any compile or init work starts.
    check_record_length(config)
    source = open_token_source(config.data.train_path, seq_len=config.data.seq_len,
                               vocab_size=config.model.vocab_size)
    mixture = weighted_inputs(config.data.train_path, source)
    note_vocabulary_mismatch(config)
    task = NextTokenTask(config.model, config.data.seq_len)
    check_batch_layout(config.train, config.optim, preset, records=len(source), data=config.data.train_path)
    make_eval_batches = held_out_batches(config, config.train.global_batch // config.optim.grad_accum) \
        if config.data.eval_path else None
    make_workdir(workdir)
    # The data path as given counts from here; its absolute path, and its path from the workdir, let
    # `lvm generate` find the data's tokenizer from any folder, and after the run folder moved.
    write_json_atomic(workdir / RUN_CONFIG_FILE, {'config': to_dict(config), 'tpu': preset_to_record(tpu_path),
                                                  **data_record(config.data.train_path, workdir)})

  def make_iterator(process_index, process_count):
    return token_batches(source, global_batch=config.train.global_batch, seed=config.train.seed,
                         shuffle=config.data.shuffle, process_index=process_index,
                         process_count=process_count, prefetch_threads=config.data.read_threads, mixture=mixture)

  started = time.time()
  summary = train(task, train_config=config.train, optim=config.optim, preset=preset,
                  workdir=workdir, make_data_iterator=make_iterator,
                  meta={'model': to_dict(config.model)}, make_eval_batches=make_eval_batches)
  summary.pop('trained_params')
  result = {'job': 'lvm train', **summary, 'model_params': config.model.num_params(),
            'data': repr(source) + (f' weighted by input: {mixture.describe()}' if mixture else ''),
            'workdir': str(workdir), 'wall_s': time.time() - started,
            'versions': versions()}
  with all_or_none('lvm train: the result written'):  # by process 0; the others wait for it
    write_json_atomic(workdir / 'train_result.json', result)
  return result


def restore_params(workdir: Path, config: LvmConfig, tpu_path: str):
  """Latest parameters of a workdir, sharded for `tpu_path`'s mesh: (graphdef, params, mesh, preset, step)."""
  preset = load_preset(tpu_path)
  graphdef, params, mesh, step = restore_latest_params(NextTokenTask(config.model, config.data.seq_len),
                                                       workdir, preset)
  return graphdef, params, mesh, preset, step


def check_same_kind_of_tokens(workdir: Path, config: LvmConfig, data_path: str, manifest: dict | None) -> None:
  """The built-in digit sentences hold a grey level per token; `lvm tokenize` sentences hold VQGAN
  codes. A model of one scored on the other gave a perplexity (2,339 for a model trained on codes)
  that measures nothing, without a word. Refused where both sides are known; an import (trained on
  nothing here) and data without a manifest (a user's .npy or JSONL) are taken as they are."""
  trained = config.data.train_path
  if not trained:
    return
  if trained.startswith('builtin:') and manifest is not None and manifest.get('tokenizer_checksum'):
    raise ConfigError(f'--data {data_path} holds codes of the tokenizer {manifest.get("tokenizer")}; {workdir} '
                      f'trained on {trained} (one grey level per token): its perplexity there measures nothing. '
                      'Evaluate it on builtin:digits-eval, or train a model on sentences of that tokenizer')
  if data_path.startswith('builtin:') and not trained.startswith('builtin:'):
    from lvm.prompting import training_manifest
    try:
      data, trained_manifest = training_manifest(workdir, config)
    except ConfigError:
      return  # its training data is not reachable from here: nothing to compare
    if trained_manifest.get('tokenizer_checksum'):
      raise ConfigError(f'--data {data_path} holds the built-in grey-level digit tokens; {workdir} trained on {data}, '
                        f'codes of the tokenizer {trained_manifest.get("tokenizer")}: its perplexity there measures '
                        'nothing. Evaluate it on sentences of that tokenizer (`lvm tokenize --split eval`)')


def eval_command(workdir: str, data_path: str, tpu_path: str | None, target_tokens: int | None,
                 batch_size: int, completion: int = 0) -> dict:
  """Perplexity of the trained run on token data (per task kind for `lvm tokenize` sentences); with
  `completion` N, also the greedy last frame of each kind's first N records (lvm/completion.py)."""
  workdir = as_path(workdir)
  if batch_size < 1:
    raise ConfigError(f'--batch-size must be >= 1, got {batch_size}')
  if completion < 0:
    raise ConfigError(f'--completion must be >= 0 (records per kind; 0: none), got {completion}')
  if target_tokens is not None and target_tokens < 1:  # 0 once meant the default, silently
    raise ConfigError(f'--target-tokens must be >= 1 (default: the last image), got {target_tokens}')
  config, trained_tpu = load_run_config(workdir)
  data_path = local_data(data_path)  # gs:// data: staged to this host's disk once
  # Records of any length the model supports can be scored, not only the training length.
  seq_len = record_length(data_path) or config.data.seq_len
  if seq_len > config.model.max_seq_len:
    raise ConfigError(f'{data_path}: records of {seq_len} tokens exceed the model\'s max_seq_len '
                      f'{config.model.max_seq_len} ({workdir})')
  block = config.model.attention_block
  if 0 < block < seq_len and seq_len % block:
    raise ConfigError(f'{data_path}: records of {seq_len} tokens are not a multiple of the model\'s '
                      f'attention_block {block}')
  # Sentences from `lvm tokenize` say how long a frame is and which shards hold which task kind.
  manifest_path = Path(data_path) / 'manifest.json'
  manifest = read_json(manifest_path) if manifest_path.is_file() else None
  check_same_kind_of_tokens(workdir, config, data_path, manifest)
  source = open_token_source(data_path, seq_len=seq_len, vocab_size=config.model.vocab_size)
  target = target_tokens or (manifest['tokens_per_image'] if manifest else max(1, min(256, seq_len // 4)))
  if seq_len < 2:
    raise ConfigError(f'{data_path}: records of {seq_len} token: perplexity needs at least 2 (a token is scored '
                      'given the ones before it)')
  if not 1 <= target < seq_len:  # before the checkpoint is restored
    raise ConfigError(f'{data_path}: records of {seq_len} tokens leave no context for {target} target tokens '
                      f'(scored: 1 to {seq_len - 1}{", --target-tokens" if target_tokens else ""})')
  if manifest:
    from lvm.prompting import check_same_tokenizer
    check_same_tokenizer(workdir, config, data_path, manifest.get('tokenizer_checksum'), what='--data')
  if completion and not manifest:
    raise ConfigError(f'--completion: {data_path} has no manifest.json naming the tokenizer of its frames; complete '
                      'the frames of `lvm tokenize` sentences')
  if completion and jax.process_count() > 1:
    raise ConfigError('--completion generates on one process: run lvm eval --completion on one host (or in '
                      'Python, lvm.Prompter), and perplexity alone over the slice')
  graphdef, params, mesh, preset, step = restore_params(workdir, config, tpu_path or trained_tpu)
  score = lambda records: evaluate.perplexity(graphdef, params, records, mesh=mesh, rules=preset.logical_rules,
                                              target_tokens=target, batch_size=batch_size)
  scores = score(source)
  if manifest:  # LVM's eval: perplexity of the last frame given the frames before it, per task kind
    scores['per_kind'] = {kind: score(TokenRecordSource(sorted(Path(data_path).glob(f'{kind}-*{SHARD_SUFFIX}')),
                                                         seq_len=seq_len, vocab_size=config.model.vocab_size))
                          for kind in manifest['kinds']}
  if completion:
    from lvm.completion import completion_per_kind
    from lvm.sentences import manifest_tokenizer
    from lvm.tokenizer_commands import load_tokenizer
    tokenizer = load_tokenizer(manifest_tokenizer(data_path, manifest), tpu_path or trained_tpu)
    sources = {kind: TokenRecordSource(sorted(Path(data_path).glob(f'{kind}-*{SHARD_SUFFIX}')), seq_len=seq_len,
                                       vocab_size=config.model.vocab_size) for kind in manifest['kinds']}
    scores['completion'] = completion_per_kind(jax.device_get(params), config.model, sources, tokenizer,
                                               manifest['tokens_per_image'], manifest['codebook_size'],
                                               completion, batch_size)
  result = {'job': 'lvm eval', 'step': step, 'data': data_path, 'record_tokens': seq_len, **scores, 'versions': versions()}
  write_result_if_writable(workdir / 'eval_result.json', result)
  return result


def import_hf_command(hf_dir: str, workdir: str, tpu_path: str | None, seq_len: int | None) -> dict:
  """Imported weights in a fresh workdir; records default to the longest the model supports."""
  workdir = as_path(workdir)
  if (workdir / 'checkpoints').exists() and any((workdir / 'checkpoints').iterdir()):
    raise ConfigError(f'{workdir} already holds checkpoints; import into an empty workdir')
  model_config, tensors = hf_interop.read_hf_params(hf_dir)
  tiny = load_config_file(Path(__file__).parent / 'configs' / 'tiny.py')
  seq_len = seq_len or model_config.max_seq_len
  if seq_len > model_config.max_seq_len:
    raise ConfigError(f'--seq-len {seq_len} exceeds what {hf_dir} supports '
                      f'(max_position_embeddings {model_config.max_seq_len})')
  config = dataclasses.replace(tiny, model=model_config,
                               data=dataclasses.replace(tiny.data, train_path='', seq_len=seq_len))
  preset = load_preset(tpu_path or DEFAULT_TPU)
  mesh = make_mesh(preset)
  task = NextTokenTask(config.model, config.data.seq_len)
  with activation_sharding(mesh, preset.logical_rules):
    _, _, _, abstract_params, _ = init_state(task, mesh, preset.logical_rules, OptimConfig(), 0)
  params = jax.tree.map(lambda a: None, abstract_params)
  for path, value in tensors:  # each tensor goes straight to its shards; the host frees it
    target = abstract_params
    for key in path[:-1]:
      target = target[key]
    leaf = target[path[-1]]
    if value.shape != leaf.shape:
      raise hf_interop.HFImportError(f'{hf_dir}: {"/".join(path)} has shape {value.shape}, expected {leaf.shape}')
    holder = params
    for key in path[:-1]:
      holder = holder[key]
    holder[path[-1]] = jax.make_array_from_callback(leaf.shape, leaf.sharding, lambda idx, v=value: v[idx])
  missing = [p for p, v in jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: x is None)[0] if v is None]
  if missing:
    raise hf_interop.HFImportError(f'{hf_dir}: parameters not filled: {missing}')
  write_imported_run(workdir, config, tpu_path or DEFAULT_TPU, params, source=hf_dir)
  result = {'job': 'lvm import-hf', 'hf_dir': str(hf_dir), 'model_params': model_config.num_params(),
            'model': to_dict(model_config), 'versions': versions()}
  write_json_atomic(workdir / 'import_result.json', result)
  return result


def export_hf_command(workdir: str, out_dir: str, dtype: str) -> dict:
  workdir = as_path(workdir)
  config, _ = load_run_config(workdir)
  prepare_output_dir(out_dir)
  _, params, _, _, step = restore_params(workdir, config, DEFAULT_TPU)
  host_params = jax.tree.map(np.asarray, jax.device_get(params))
  files = hf_interop.write_hf_dir(host_params, config.model, out_dir, dtype=dtype)
  result = {'job': 'lvm export-hf', 'step': step, 'out_dir': str(out_dir), 'files': [str(f) for f in files],
            'dtype': dtype, 'versions': versions()}
  write_result_if_writable(workdir / 'export_result.json', result)
  return result
