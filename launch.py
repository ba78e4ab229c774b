"""The one CLI. Parses a command line and dispatches to a job; the only logic it holds is the
quickstart's running order of the two halves (the attribution half's steps are in attrib/quickstart.py).

  python launch.py quickstart                       # both halves on the built-in digits: tiny LVM, then attribution
  python launch.py lvm train --config lvm/configs/tiny.py --tpu tpu_configs/cpu_8.py --workdir DIR [--set k=v ...]
  python launch.py lvm eval --workdir DIR --data PATH
  python launch.py lvm import-hf --hf-dir HF_DIR --workdir DIR
  python launch.py lvm export-hf --workdir DIR --out HF_DIR
  python launch.py lvm train-tokenizer --config lvm/configs/tokenizer_tiny.py --tpu tpu_configs/cpu_1.py --workdir DIR
  python launch.py lvm import-tokenizer --weights VQMODEL_DIR --workdir DIR
  python launch.py lvm generate --workdir DIR --prompt a.png b.png c.png --frames N --out grid.png [--mode analogy]
  python launch.py lvm tokenize --tokenizer DIR --source builtin:digits|FOLDER --kind video|analogy|groups|... --out DIR
  python launch.py attrib train-model --config attrib/configs/digits.py --workdir DIR
  python launch.py attrib import-diffusers --weights model.bin --workdir DIR [--set data.train_path=latents:D]
  python launch.py attrib teacher --workdir DIR --queries N --candidates M|all [--query-dir D] [--neighbours F]
  python launch.py attrib counterfactual --workdir DIR --k K --queries Q --seeds S
  python launch.py attrib features --workdir DIR [--feature pixels+text] [--dino D --clip C --train-list TSV ...]
  python launch.py attrib distill --workdir DIR [--features FEATS_DIR --ranks influence_train.pkl]
  python launch.py attrib index --workdir DIR [--shards S]
  python launch.py attrib add --workdir DIR --images new.tsv | --features new.npy [--dino D --clip C --train-list TSV]
  python launch.py attrib remove --workdir DIR --ids 3,17,250 | --ids-file F   # out of every answer (a takedown)
  python launch.py attrib eval --workdir DIR [--features FEATS_DIR --ranks influence_test.pkl]
  python launch.py attrib generate --workdir DIR --prompt "a handwritten seven" --seed 3 --out q.png
  python launch.py attrib generate --workdir DIR --prompt "a handwritten seven" --seeds 0-99 --out DIR2   # + queries.tsv
  python launch.py attrib query --workdir DIR --image q.png --prompt "..." -k 10 [--out grid.png] [--dino D --clip C]
  python launch.py attrib query --workdir DIR --queries list.tsv [--out DIR] [--grids]   # many: image<TAB>prompt lines
  python launch.py data tokens --input X.jsonl|X.npy --out DIR --seq-len T
  python launch.py lvm train --config lvm/configs/vqlm_7b.py --tpu tpu_configs/v5p_128.py --check   # fits?
  python launch.py tpu create|copy|setup|run|status|logs|stop|delete|ssh --tpu tpu_configs/v4_32.py --name NAME [...]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))


def _trained_preset(workdir: str | None) -> str | None:
  """The slice preset a workdir's run was started with (commands that default to it)."""
  from core.paths import as_path
  stored = as_path(workdir) / 'config.json' if workdir else None
  if stored is None or not stored.exists():
    return None
  from core.mesh import recorded_preset
  from core.workdir import read_json
  preset = recorded_preset(read_json(stored).get('tpu'))
  return preset if preset and Path(preset).exists() else None


def _prepare_runtime(args) -> None:
  """Set up jax before its first import: forced CPU devices for cpu presets, multi-process init."""
  from core.mesh import load_preset
  tpu_path = getattr(args, 'tpu', None) or _trained_preset(getattr(args, 'workdir', None) or getattr(args, 'tokenizer', None))
  preset = load_preset(tpu_path) if tpu_path else None
  if preset is not None:
    if preset.platform == 'cpu':
      # Without this, an installed libtpu (the `tpu` extra) would probe for a TPU first.
      os.environ.setdefault('JAX_PLATFORMS', 'cpu')
      from core.xla_flags import cpu_xla_flags
      os.environ['XLA_FLAGS'] = cpu_xla_flags(os.environ.get('XLA_FLAGS', ''), preset.devices_per_host)
  from core import distributed
  distributed.start(preset, getattr(args, 'coordinator', None),
                    getattr(args, 'num_processes', 1), getattr(args, 'process_id', 0))
  from absl import flags as absl_flags
  absl_flags.FLAGS.mark_as_parsed()  # grain worker processes read absl flags (google/grain#1355)


class _counted:
  """Passes an iterable through and counts what went by."""

  def __init__(self, iterable):
    self.iterable, self.count = iterable, 0

  def __iter__(self):
    for item in self.iterable:
      self.count += 1
      yield item


def _print_result(result: dict) -> None:
  import jax
  if jax.process_index() == 0 and not os.environ.get(_CHILD_ENV):
    print(json.dumps(result, indent=1, default=str))


QUICKSTART_LVM_SETTINGS = ['train.steps=1500', 'optim.decay_steps=1480']  # on lvm/configs/tiny.py, its time budget


def _lvm_quickstart(args, workdir: Path, clock) -> dict:
  """Real images to a trained LVM: tokenizer -> visual sentences (train / held-out images) -> decoder
  -> perplexity of each sentence's last frame against the token-frequency baseline."""
  import numpy as np
  from core import progress
  from data_pipelines.digit_sentences import unigram_perplexity
  from data_pipelines.token_records import TokenRecordSource, find_shards
  from lvm import commands
  from lvm.sentences import tokenize_command
  from core.errors import stop_if_preempted
  progress.say('quickstart LVM 1/4: train the tiny VQGAN tokenizer (32-px images -> 64 tokens, 128 codes)')
  tokenizer = _train_quickstart_tokenizer(args, workdir)
  stop_if_preempted(tokenizer, 'quickstart: the tokenizer')
  progress.say(f'quickstart: tokenizer PSNR {tokenizer["reconstruction"]["psnr_db"]:.1f} dB '
               f'({clock.lap("tokenizer"):.1f} s)\nquickstart LVM 2/4: digit images -> visual sentences')
  manifests = {}
  # Videos weigh most: continuing motion is what the next-frame check below measures.
  for split, count, videos, seed in (('train', 256, 4096, 0), ('eval', 64, 64, 1)):
    manifests[split] = tokenize_command(str(workdir / 'tokenizer'), 'builtin:digits', None,
                                        str(workdir / 'data' / split), frames=4, sentences=count,
                                        kind_sentences={'video': videos}, records_per_shard=1024, seed=seed,
                                        split=split, note_coverage=False)  # sizes chosen for its time budget
  vocab, seq_len = manifests['train']['vocab_size'], manifests['train']['seq_len']
  progress.say(f'quickstart: sentences ready ({clock.lap("sentences"):.1f} s)\nquickstart LVM 3/4: train the tiny LVM')
  train_result = commands.train_command(str(ROOT / 'lvm/configs/tiny.py'), args.tpu, str(workdir / 'lvm'),
                                        [f'data.train_path={workdir / "data" / "train"}', f'model.vocab_size={vocab}',
                                         f'data.seq_len={seq_len}'] + QUICKSTART_LVM_SETTINGS + args.set)
  stop_if_preempted(train_result, 'quickstart: the LVM')
  progress.say(f'quickstart: trained ({clock.lap("lvm train"):.1f} s)\nquickstart LVM 4/4: perplexity of the last frame')
  eval_result = commands.eval_command(str(workdir / 'lvm'), str(workdir / 'data' / 'eval'), args.tpu,
                                      manifests['train']['tokens_per_image'], 32)
  from lvm.prompting import next_frame_report
  next_frame = next_frame_report(workdir / 'lvm', workdir / 'data' / 'eval', kind='video',
                                 png=workdir / 'lvm' / 'next_frame.png', tpu_path=args.tpu)
  clock.lap('lvm eval')
  sources = {split: TokenRecordSource(find_shards(workdir / 'data' / split), seq_len=seq_len, vocab_size=vocab)
             for split in manifests}
  tokens = {split: np.stack([s[i] for i in range(len(s))]) for split, s in sources.items()}
  return {'tokenizer': {'psnr_db': tokenizer['reconstruction']['psnr_db'],
                        'codes_used': tokenizer['reconstruction']['codes_used'],
                        'train_seconds': tokenizer['train_seconds']},
          'sentences': {split: m['records_per_kind'] for split, m in manifests.items()},
          'train': {k: train_result[k] for k in ('step', 'final_metrics', 'mesh')}, 'eval': eval_result,
          'next_frame': next_frame,
          'baseline_unigram_perplexity': unigram_perplexity(tokens['train'], tokens['eval'],
                                                            manifests['train']['tokens_per_image'])}


# Set for the quickstart's child processes: the parent prints the results.
_CHILD_ENV = 'LVM_ATTRIB_QUICKSTART_CHILD'


def _wants_one_device_child() -> bool:
  """The quickstart's one-device jobs (tokenizer, the attribution half) run in a child process when
  this one has several forced CPU devices (the LVM's `cpu_8_data` preset, whose data-parallel step is
  the faster one on 2 cores): with 8 devices present the same one-device jobs ran slower (2-core EPYC:
  teacher 1.44-1.84 instead of 1.26 ms per U-Net forward, 150 diffusion steps 154 instead of 126 s,
  the tokenizer 126 instead of 107 s)."""
  import jax
  return jax.default_backend() == 'cpu' and jax.device_count() > 1 and jax.process_count() == 1


def _run_one_device_child(argv: list[str]) -> None:
  """`launch.py argv` in a child process with one CPU device; its output goes to ours."""
  import signal
  import subprocess
  env = dict(os.environ, **{_CHILD_ENV: '1'})
  env['XLA_FLAGS'] = ' '.join(f for f in env.get('XLA_FLAGS', '').split()
                              if not f.startswith('--xla_force_host_platform_device_count'))
  sys.stdout.flush()
  child = subprocess.Popen([sys.executable, str(ROOT / 'launch.py'), *argv], env=env)
  # A SIGTERM for this process goes on to the child, whose jobs stop at a saved state; Ctrl-C reaches
  # both (one process group), so only wait for the child to finish stopping.
  forward = signal.signal(signal.SIGTERM, lambda signum, frame: child.send_signal(signal.SIGTERM))
  try:
    try:
      code = child.wait()
    except KeyboardInterrupt:
      child.wait()
      raise
  finally:
    signal.signal(signal.SIGTERM, forward)
  if code != 0:
    raise ChildFailed(code if code > 0 else 128 - code)  # killed by signal N: the shell's 128 + N


class ChildFailed(Exception):
  """A child process of this command failed and has said why; exit with its code (2 bad input, 130 Ctrl-C)."""

  def __init__(self, code: int):
    super().__init__(f'child process exited with {code}')
    self.code = code


def _train_quickstart_tokenizer(args, workdir: Path) -> dict:
  config, out = str(ROOT / 'lvm/configs/tokenizer_tiny.py'), workdir / 'tokenizer'
  # One CPU device: on 2 cores the tokenizer's convolutions run 1.8x faster unsplit than over 8
  # forced devices (0.45 vs 0.83 s per step, measured).
  tpu = str(ROOT / 'tpu_configs/cpu_1.py') if 'cpu' in Path(args.tpu).name else args.tpu
  if 'cpu' in Path(args.tpu).name and _wants_one_device_child():
    _run_one_device_child(['lvm', 'train-tokenizer', '--config', config, '--tpu', tpu, '--workdir', str(out),
                           *[a for value in args.set_tokenizer for a in ('--set', value)]])
    return json.loads((out / 'train_result.json').read_text())
  from lvm.tokenizer_commands import train_tokenizer_command
  return train_tokenizer_command(config, tpu, str(out), args.set_tokenizer)


def _attribution_quickstart(args, workdir: Path) -> dict:
  """The attribution half; its jobs (U-Net training, teacher, features, distillation) use one device."""
  if not _wants_one_device_child():
    from attrib import quickstart as attribution_quickstart
    return attribution_quickstart.run(workdir, full=args.full)
  _run_one_device_child(['quickstart', '--attribution-only', '--workdir', str(workdir),
                         '--tpu', str(ROOT / 'tpu_configs/cpu_1.py')] + (['--full'] if args.full else []))
  return json.loads((workdir / 'quickstart_result.json').read_text())['attribution']


def lvm_prompt_command(lvm_workdir: Path, next_frame: dict) -> str:
  """The `lvm generate` command that continues the held-out video whose frames the quickstart wrote."""
  import shlex
  return shlex.join(['python', 'launch.py', 'lvm', 'generate', '--workdir', str(lvm_workdir), '--prompt',
                     *next_frame['prompt_frames'], '--frames', '2', '--out', 'next_frames.png'])


def quickstart_workdir(args) -> Path:
  # --full gets its own workdir: in the quick one it would continue the 400-step model (on another
  # schedule) under rankings made with it, which the teacher refuses to mix.
  return Path(args.workdir or ('runs/quickstart_full' if args.full else 'runs/quickstart'))


def _check_quickstart_overrides(args) -> None:
  """--set and --set-tokenizer checked before the first stage: a typo in an LVM field was found only
  when the LVM's stage began, after the tokenizer's minutes."""
  from core.config import ConfigError, apply_overrides, load_config_file
  if args.attribution_only and (args.set or args.set_tokenizer):
    raise ConfigError('--set and --set-tokenizer configure the LVM half, which --attribution-only skips')
  if not args.attribution_only:
    apply_overrides(load_config_file(ROOT / 'lvm/configs/tiny.py'), QUICKSTART_LVM_SETTINGS + args.set)
    apply_overrides(load_config_file(ROOT / 'lvm/configs/tokenizer_tiny.py'), args.set_tokenizer)


def quickstart(args) -> dict:
  """Both halves end to end on CPU: the LVM (tokenizer -> visual sentences -> train -> eval) and
  attribution (diffusion model -> teacher -> features -> distilled embedder + index -> eval -> PNGs)."""
  from core import progress
  from core.errors import ConfigError
  if args.lvm_only and args.attribution_only:
    raise ConfigError('--lvm-only and --attribution-only exclude each other')
  _check_quickstart_overrides(args)
  workdir = quickstart_workdir(args)
  from core.workdir import RUN_CONFIG_FILE, what_it_holds
  if (workdir / RUN_CONFIG_FILE).is_file():  # it would make its own tokenizer/, lvm/, ... inside that run
    raise ConfigError(f'--workdir {workdir} is the workdir of a job{what_it_holds(workdir / RUN_CONFIG_FILE)}; the '
                      'quickstart\'s is a folder of its own, for its tokenizer/, data/, lvm/ and attrib/: choose '
                      'another (default runs/quickstart)')
  clock = progress.Stopwatch()
  lvm = None if args.attribution_only else _lvm_quickstart(args, workdir, clock)
  attribution = None
  if not args.lvm_only:
    attribution = _attribution_quickstart(args, workdir)
    clock.stages.update({f'attribution {k}': v for k, v in attribution['stage_seconds'].items()})
  summary = {'job': 'quickstart', 'lvm': lvm, 'attribution': attribution, 'stage_seconds': clock.stages,
             'wall_s': clock.elapsed()}
  if os.environ.get(_CHILD_ENV):
    from core.workdir import write_json_atomic
    write_json_atomic(workdir / 'quickstart_result.json', summary)
    return summary
  if lvm is not None:
    print(f"\nquickstart: tokenizer PSNR {lvm['tokenizer']['psnr_db']:.1f} dB on the bundled images; "
          f"LVM perplexity of the last frame {lvm['eval']['perplexity']:.1f} on held-out digits "
          f"(token-frequency baseline {lvm['baseline_unigram_perplexity']:.1f})")
    nf = lvm['next_frame']
    print(f"quickstart: next frame of held-out digit videos: token accuracy {nf['token_accuracy']['lvm']:.2f} "
          f"(copy-last {nf['token_accuracy']['copy_last']:.2f}), PSNR {nf['psnr_db']['lvm']:.1f} dB "
          f"(copy-last {nf['psnr_db']['copy_last']:.1f} dB); {nf['png']}")
    print(f'quickstart: your own prompt: {lvm_prompt_command(workdir / "lvm", nf)}')
  if attribution is not None:
    from attrib import quickstart as attribution_quickstart
    attribution_quickstart.print_summary(attribution)
  print(f"quickstart: {clock.elapsed():.0f} s in all (" + ', '.join(f'{k} {v:.1f} s' for k, v in clock.stages.items()) + ')')
  from core.workdir import write_json_atomic
  write_json_atomic(workdir / 'quickstart_result.json', summary)
  print(f'quickstart: every number above, and more, in {workdir / "quickstart_result.json"}')
  return summary


MAX_ERROR_CHARS = 2000
STOPPED_EXIT_CODE = 128 + 15  # a job of several stages stopped by SIGTERM at a saved state (core.errors.Stopped)


def main(argv=None) -> int:
  """Runs one command. Bad input (any `core.errors.UserError`) prints one line `error: ...` and
  returns 2; `--debug` or LVM_ATTRIB_DEBUG=1 shows its traceback instead. Ctrl-C returns 130: every
  job keeps resumable state (checkpoints, per-query files), so the same command continues."""
  from core.errors import Stopped, UserError
  argv = list(sys.argv[1:] if argv is None else argv)
  job_args = argv.index('--') if '--' in argv else len(argv)
  debug = '--debug' in argv[:job_args] or os.environ.get('LVM_ATTRIB_DEBUG', '') not in ('', '0')
  if '--debug' in argv[:job_args]:
    argv.remove('--debug')
  if not debug:  # orbax's tracebacks around a failed save would bury the one-line error (core/io_noise.py)
    from core.io_noise import drop_abandoned_io_noise
    drop_abandoned_io_noise()
  try:
    return _run(argv)
  except UserError as e:
    if debug:
      raise
    # One line: control characters a user typed (a newline in a path) are shown escaped, so the
    # line says exactly what was given and cannot be mistaken for two messages.
    message = str(e).strip().translate({ord('\n'): '\\n', ord('\r'): '\\r', ord('\t'): '\\t'})
    if len(message) > MAX_ERROR_CHARS:  # a library's message quoted whole can run to pages
      message = f'{message[:MAX_ERROR_CHARS]}... ({len(message) - MAX_ERROR_CHARS} more characters: --debug shows all)'
    print(f'error: {message}', file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print('interrupted: rerun the same command to continue from the last saved state', file=sys.stderr)
    return 130
  except Stopped as e:
    print(f'stopped: {e}', file=sys.stderr)
    return STOPPED_EXIT_CODE
  except ChildFailed as e:
    return e.code
  except Exception as e:  # noqa: BLE001 (only a full disk is answered here; the rest re-raised)
    from core.errors import disk_full_message
    message = disk_full_message(e)
    if message is None or debug:
      raise
    # Every job writes through temporary names and keeps resumable state, so nothing already
    # written is lost: what the user needs is which disk, and that the same command continues.
    message = ' '.join(message.split())[:MAX_ERROR_CHARS]
    print(f'error: the disk is full ({message}); free space there (or give another --workdir/--out) and rerun '
          'the same command to continue from the last saved state', file=sys.stderr)
    return 2


def _run(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(prog='launch.py', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--debug', action='store_true', help='show the traceback of input errors too')
  sub = parser.add_subparsers(dest='group', required=True)

  def add_distributed(p):
    p.add_argument('--coordinator', help='host:port of process 0 (multi-process runs without a TPU)')
    p.add_argument('--num-processes', type=int, default=1)
    p.add_argument('--process-id', type=int, default=0)

  q = sub.add_parser('quickstart', help='both halves on the built-in digits: the tiny LVM, then attribution')
  q.add_argument('--workdir', help='default runs/quickstart (runs/quickstart_full with --full)')
  # The LVM half's preset: data parallel over 8 forced devices, the fastest layout for the tiny LVM on
  # a small CPU (tpu_configs/cpu_8_data.py); the tokenizer and the attribution half use one device.
  q.add_argument('--tpu', default=str(ROOT / 'tpu_configs/cpu_8_data.py'))
  q.add_argument('--set', action='append', default=[], metavar='KEY=VALUE', help='LVM config fields')
  q.add_argument('--set-tokenizer', action='append', default=[], metavar='KEY=VALUE', help='tokenizer config fields')
  q.add_argument('--lvm-only', action='store_true', help='skip the attribution half')
  q.add_argument('--attribution-only', action='store_true', help='skip the LVM half')
  q.add_argument('--full', action='store_true', help='the full 2000-step diffusion model (slower)')

  lvm = sub.add_parser('lvm', help='Large Vision Model jobs').add_subparsers(dest='command', required=True)
  t = lvm.add_parser('train', help='train (or continue training) a decoder')
  t.add_argument('--config', required=True)
  t.add_argument('--tpu', required=True, help='slice preset file in tpu_configs/')
  t.add_argument('--workdir', help='run directory (local or gs://); not needed with --check')
  t.add_argument('--set', action='append', default=[], metavar='KEY=VALUE')
  t.add_argument('--check', action='store_true',
                 help='compile the step for the preset\'s TPU topology here and report per-device memory; no training')
  add_distributed(t)
  e = lvm.add_parser('eval', help='perplexity of a trained workdir on token data')
  e.add_argument('--workdir', required=True)
  e.add_argument('--data', required=True, help='shard dir, .arrayrecord, .jsonl, .npy or builtin:digits-eval')
  e.add_argument('--tpu', help='slice preset (default: the one the run trained with)')
  e.add_argument('--target-tokens', type=int, help='trailing tokens scored (default: last image, 256)')
  e.add_argument('--batch-size', type=int, default=8)
  add_distributed(e)
  i = lvm.add_parser('import-hf', help='LlamaForCausalLM safetensors dir -> workdir checkpoint')
  i.add_argument('--hf-dir', required=True)
  i.add_argument('--workdir', required=True)
  i.add_argument('--tpu', help='slice preset to shard the imported weights for')
  i.add_argument('--seq-len', type=int, default=None,
                 help='record length the workdir will train on (default: the model\'s max_position_embeddings)')
  x = lvm.add_parser('export-hf', help='workdir checkpoint -> LlamaForCausalLM safetensors dir')
  x.add_argument('--workdir', required=True)
  x.add_argument('--out', required=True)
  x.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16', 'float16'])

  tt = lvm.add_parser('train-tokenizer', help='train a VQGAN image tokenizer')
  tt.add_argument('--config', required=True)
  tt.add_argument('--tpu', default=str(ROOT / 'tpu_configs/cpu_1.py'))
  tt.add_argument('--workdir', required=True)
  tt.add_argument('--set', action='append', default=[], metavar='KEY=VALUE')
  add_distributed(tt)
  ti = lvm.add_parser('import-tokenizer', help='released VQGAN (diffusers VQModel dir or open-muse weights) -> workdir')
  ti.add_argument('--weights', required=True, help='VQModel directory, or a weights file with config.json beside it')
  ti.add_argument('--workdir', required=True)
  ti.add_argument('--tpu', help='slice preset to shard the weights for (default: cpu_1)')
  tk = lvm.add_parser('tokenize', help='images -> visual sentences of tokens (ArrayRecord shards + manifest)')
  tk.add_argument('--tokenizer', required=True, help='a tokenizer workdir')
  tk.add_argument('--source', default='builtin:digits',
                  help='builtin:digits|photos|skimage (joined by +), tfds:NAME[:SPLIT], frames:DIR (one subfolder of frames per video) '
                       'or an image folder (class subfolders give categories); folders local or gs://')
  tk.add_argument('--stride', type=int, default=1, help='frame stride of video clips')
  tk.add_argument('--kind', action='append', help='sentence kind(s), repeated or comma-separated; default: '
                  'every kind the source supports')
  tk.add_argument('--out', required=True)
  tk.add_argument('--frames', type=int, default=4, help='images per visual sentence')
  tk.add_argument('--sentences', type=int, default=2048,
                  help='sentences per kind (each draws its images at random: size it to the source)')
  tk.add_argument('--kind-sentences', action='append', default=[], metavar='KIND=N',
                  help='sentences of one kind, overriding --sentences (e.g. video=4096)')
  tk.add_argument('--records-per-shard', type=int, default=512)
  tk.add_argument('--strict', action='store_true', help='fail on an unreadable image instead of skipping it')
  tk.add_argument('--seed', type=int, default=0)
  tk.add_argument('--split', default='all', choices=['all', 'train', 'eval'],
                  help='images used: eval = the last 10%% of each class (for frames:, the last 10%% of the '
                       'videos, whole), train = the rest (no image in both)')
  tk.add_argument('--tpu')
  tk.add_argument('--beam', action='store_true',
                  help="run as an Apache Beam pipeline (the beam extra); shards are written by Beam's workers")
  tk.add_argument('--beam-options', default='', metavar='"--runner=... ..."',
                  help='Beam pipeline options, e.g. "--runner=DataflowRunner --project=P ..." (lvm/beam_tokenize.py)')

  g = lvm.add_parser('generate', help='prompt a trained LVM with images; writes a PNG grid (prompt | generation)')
  g.add_argument('--workdir', required=True)
  g.add_argument('--prompt', nargs='+', required=True,
                 help='prompt images, in order; a folder stands for its images in frame order (frame2 before frame10)')
  g.add_argument('--frames', type=int, default=1, help='frames to generate (sequence mode)')
  g.add_argument('--mode', default='sequence', choices=['sequence', 'analogy', 'in-context'])
  g.add_argument('--out', help='PNG path (default WORKDIR/generation.png)')
  g.add_argument('--tokenizer', help='tokenizer workdir (default: the one that made the training tokens)')
  g.add_argument('--temperature', type=float, default=0.0, help='0 = greedy')
  g.add_argument('--top-k', type=int, default=0)
  g.add_argument('--top-p', type=float, default=1.0)
  g.add_argument('--seed', type=int, default=0)
  g.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'], help='weights and KV cache')
  g.add_argument('--tpu')

  a = sub.add_parser('attrib', help='data attribution jobs').add_subparsers(dest='command', required=True)
  am = a.add_parser('train-model', help='train the text-to-image diffusion model')
  am.add_argument('--config', required=True)
  am.add_argument('--tpu', default=str(ROOT / 'tpu_configs/cpu_8.py'))
  am.add_argument('--workdir', required=True)
  am.add_argument('--set', action='append', default=[], metavar='KEY=VALUE')
  add_distributed(am)

  ai = a.add_parser('import-diffusers', help='a diffusers UNet2DConditionModel state dict -> workdir (MSCOCO model)')
  ai.add_argument('--weights', required=True, help='model.bin (torch pickle), .safetensors, or a diffusers UNet folder (its weights file)')
  ai.add_argument('--config', default=str(ROOT / 'attrib/configs/mscoco.py'))
  ai.add_argument('--tpu', default=str(ROOT / 'tpu_configs/cpu_1.py'))
  ai.add_argument('--workdir', required=True)
  ai.add_argument('--set', action='append', default=[], metavar='KEY=VALUE')

  at = a.add_parser('teacher', help='AbU teacher: rank training images for generated queries')
  at.add_argument('--workdir', required=True, help='a workdir from attrib train-model or import-diffusers')
  at.add_argument('--queries', type=int, required=True)
  at.add_argument('--candidates', default='all', help="top-M candidates by base features, or 'all'")
  at.add_argument('--query-dir', help='precomputed query latents.npy + text_embeddings.npy (imported models)')
  at.add_argument('--neighbours', help='.npy [queries, >=M] training ids: the candidates of each query')
  at.add_argument('--split', default='test', choices=['test', 'train'],
                  help='test: evaluation queries (teacher/); train: the student\'s queries (teacher_train/), '
                       'from prompts kept apart from the test ones')
  at.add_argument('--tpu', help='slice preset (default: the one the model trained with)')
  at.add_argument('--set', action='append', default=[], metavar='KEY=VALUE', help='TeacherConfig fields')
  add_distributed(at)

  af = a.add_parser('features', help='base features of the training set and the queries (FastGDA layout)')
  af.add_argument('--workdir', required=True)
  af.add_argument('--feature', action='append', help="feature name(s), e.g. 'unet+text' (default: the config's)")
  af.add_argument('--config', default=str(ROOT / 'attrib/configs/fastgda_digits.py'))
  af.add_argument('--dino', help='facebook/dino-vitb16 checkpoint dir (full-scale features)')
  af.add_argument('--clip', help='openai/clip-vit-base-patch32 checkpoint dir (full-scale features)')
  af.add_argument('--train-list', help='TSV `image<TAB>caption` of the training images (full scale)')
  af.add_argument('--train-queries-list', help='TSV `image<TAB>prompt` of the training queries')
  af.add_argument('--test-queries-list', help='TSV `image<TAB>prompt` of the test queries')
  af.add_argument('--tpu', default=str(ROOT / 'tpu_configs/cpu_1.py'))
  af.add_argument('--rows-per-part', type=int, default=8192,
                  help='full scale: rows written per resumable part (a failure loses at most one part)')

  ad = a.add_parser('distill', help='train the FastGDA embedder on the teacher rankings; embed and index')
  ad.add_argument('--workdir', required=True)
  ad.add_argument('--config', default=str(ROOT / 'attrib/configs/fastgda_digits.py'))
  ad.add_argument('--tpu', help='slice preset (default: cpu_1)')
  ad.add_argument('--features', help="directory of data_feats.npy / train_query_feats.npy (FastGDA's feats/<ftype>)")
  ad.add_argument('--ranks', help='training-query ranks: influence_train.pkl, .npy [Q, M] or ranks.arrayrecord')
  ad.add_argument('--set', action='append', default=[], metavar='KEY=VALUE')
  add_distributed(ad)

  ax = a.add_parser('index', help='(re)build the ScaNN index of the embedded training set')
  ax.add_argument('--workdir', required=True)
  ax.add_argument('--shards', type=int, default=1)

  aa = a.add_parser('add', help='add training images to a distilled student\'s index, without distilling again')
  aa.add_argument('--workdir', required=True)
  aa.add_argument('--images', help='TSV of image path<TAB>caption lines (relative paths: from the TSV\'s folder)')
  aa.add_argument('--features', help='.npy of φ rows [n, d], for a student distilled on precomputed features')
  aa.add_argument('--dino', help='full scale: the DINO checkpoint the student\'s features came from')
  aa.add_argument('--clip', help='full scale: the CLIP checkpoint the student\'s features came from')
  aa.add_argument('--train-list', help='full scale: the training TSV the student was distilled over')
  aa.add_argument('--allow-repeats', action='store_true',
                  help='add images added before (same image and caption) again, as more training images; '
                       'without it a rerun of the same list adds nothing and a list repeating some is refused')
  # No towers to load: a removal names training ids, it computes no feature.
  ar = a.add_parser('remove', help='take training images out of every answer of a distilled student (a takedown)')
  ar.add_argument('--workdir', required=True)
  ar.add_argument('--ids', help='training ids, comma-separated: 3,17,250')
  ar.add_argument('--ids-file', help='a file of training ids, comma or newline separated')

  ae = a.add_parser('eval', help='mAP of base features and the student against the teacher; latency')
  ae.add_argument('--workdir', required=True)
  ae.add_argument('--features', help='features directory (default: the one the student trained on)')
  ae.add_argument('--ranks', help='test-query ranks: influence_test.pkl, .npy or ranks.arrayrecord')

  aq = a.add_parser('query', help='attribute one image (top-k training images as a PNG grid), or a list of them')
  aq.add_argument('--workdir', required=True)
  aq.add_argument('--image', help='the generated image (with --prompt)')
  aq.add_argument('--prompt', help='the prompt it was generated from')
  aq.add_argument('--queries', help='instead of --image/--prompt: a TSV of image path<TAB>prompt lines, '
                  'answered into OUT/results.jsonl')
  aq.add_argument('-k', type=int, default=10)
  aq.add_argument('--out', help='PNG path (default WORKDIR/query.png); with --queries a folder '
                  '(default WORKDIR/query_results)')
  aq.add_argument('--grids', action='store_true', help='with --queries: a PNG grid per query in OUT/grids/')
  aq.add_argument('--dino', help='full scale: the DINO checkpoint the student\'s features came from')
  aq.add_argument('--clip', help='full scale: the CLIP checkpoint the student\'s features came from')
  aq.add_argument('--train-list', help='full scale: the training TSV (image<TAB>caption) for captions and the grid')

  ag = a.add_parser('generate', help='an image from a trained digits model for a prompt and seed (a query to attribute)')
  ag.add_argument('--workdir', required=True, help='a workdir from attrib train-model')
  ag.add_argument('--prompt', required=True, help='e.g. "a handwritten seven" (the teacher\'s test prompts: '
                  'WORKDIR/teacher/queries.npz)')
  ag.add_argument('--seed', type=int, help='noise seed (default 0); the teacher\'s test query q used seed q')
  ag.add_argument('--seeds', help='many images: seeds such as 0-99 or 0,3,7, written into the --out folder '
                  '(default WORKDIR/generated) with a queries.tsv for attrib query --queries')
  ag.add_argument('--out', help='picture at the model\'s size (default WORKDIR/generated.png; PNG keeps its '
                  'pixels exactly, JPEG does not); with --seeds a folder')
  ag.add_argument('--tpu', help='slice preset (default: the one the model trained with)')

  ac = a.add_parser('counterfactual', help='retrain without the teacher top-K vs random K; compare query loss')
  ac.add_argument('--workdir', required=True)
  ac.add_argument('--k', type=int, required=True)
  ac.add_argument('--queries', type=int, default=3)
  ac.add_argument('--seeds', type=int, default=2)
  ac.add_argument('--steps', type=int, default=400, help='training steps of every retrained model')
  ac.add_argument('--tpu')
  ac.add_argument('--ranking', default='teacher',
                  help="comma-separated rankings whose top K are removed: teacher, student, or a base feature name")

  d = sub.add_parser('data', help='data preparation').add_subparsers(dest='command', required=True)
  dt = d.add_parser('tokens', help='LVM .jsonl or int32 .npy -> ArrayRecord token shards')
  dt.add_argument('--input', required=True)
  dt.add_argument('--out', required=True)
  dt.add_argument('--seq-len', type=int, required=True)
  dt.add_argument('--vocab-size', type=int, default=8292)
  dt.add_argument('--records-per-shard', type=int, default=4096)

  from tpu_configs import gcloud
  gcloud.add_parser(sub)

  job = argv[argv.index('--') + 1:] if '--' in argv else []  # `tpu run ... -- <launch.py args>`
  args = parser.parse_args(argv[:argv.index('--')] if '--' in argv else argv)
  args.job = job
  if args.group == 'tpu':
    args.parse_job = parser.parse_args  # `tpu run` checks its job here before any worker starts
    return gcloud.run(args)
  if getattr(args, 'check', False):
    # Compiles for a TPU that is not here: this machine's CPU runs the compiler, no TPU runtime starts.
    os.environ['JAX_PLATFORMS'] = 'cpu'
    from lvm.commands import fit_check_command
    result = fit_check_command(args.config, args.tpu, args.set)
    _print_result(result)
    return 0 if result['fits'] else 3
  if args.group == 'lvm' and args.command == 'train' and not args.workdir:
    from core.errors import ConfigError
    raise ConfigError('lvm train needs --workdir (or --check to only check that the job fits)')
  _refuse_folder_of_runs(args)
  _prepare_runtime(args)
  from core.workdir import check_writable
  from core.workdir_lock import command_line, writing_into
  written = _written_workdir(args)
  check_writable(written)
  with writing_into(written, command_line(argv)):
    result = _dispatch(args)
  if args.group != 'quickstart':  # the quickstart ends on its table; its JSON is in the file it names
    _print_result(result)
  return 0


def _refuse_folder_of_runs(args) -> None:
  """`attrib query --workdir runs/quickstart` names the folder the quickstart printed, which holds
  its jobs' workdirs (tokenizer/, lvm/, attrib/), not a run: a reader would report a missing file
  and advise the wrong job; a writer would start a run of its own among them. Refused, naming them."""
  if args.group == 'quickstart':
    return
  from core.errors import ConfigError
  from core.paths import as_path
  from core.workdir import RUN_CONFIG_FILE, quickstart_runs
  for flag in ('workdir', 'tokenizer'):
    folder = getattr(args, flag, None)
    if folder and not (as_path(folder) / RUN_CONFIG_FILE).is_file() and (runs := quickstart_runs(folder)):
      raise ConfigError(f'--{flag} {folder} is not one job\'s workdir{runs}; give the one this command '
                        'works on')


# Commands that only read their workdir (eval, generate, query, export-hf) hold no lock: a run can be
# evaluated or prompted while it trains.
_READ_ONLY = {('lvm', 'eval'), ('lvm', 'generate'), ('lvm', 'export-hf'), ('attrib', 'eval'), ('attrib', 'query'),
              ('attrib', 'generate')}


def _written_workdir(args) -> str | Path | None:
  """The folder this command writes into, held for it alone while it runs (core/workdir_lock.py):
  None for read-only commands, for a quickstart child (its parent holds the workdir) and for
  processes other than 0 of a multi-process run (process 0 writes)."""
  import jax
  if os.environ.get(_CHILD_ENV) or jax.process_index() != 0:
    return None
  if args.group == 'quickstart':
    return quickstart_workdir(args)
  if (args.group, getattr(args, 'command', None)) in _READ_ONLY:
    return None
  if args.group == 'data' or getattr(args, 'command', None) == 'tokenize':
    return args.out
  return args.workdir


def _dispatch(args) -> dict:
  if args.group == 'quickstart':
    result = quickstart(args)
  elif args.group == 'data':
    from data_pipelines.token_formats import read_token_file
    from data_pipelines.token_records import write_token_shards
    from core import progress
    from core.config import check_at_least
    check_at_least(1, seq_len=args.seq_len, vocab_size=args.vocab_size, records_per_shard=args.records_per_shard)
    counted = _counted(read_token_file(args.input, seq_len=args.seq_len, vocab_size=args.vocab_size))
    paths = write_token_shards(counted, args.out, seq_len=args.seq_len, vocab_size=args.vocab_size,
                               records_per_shard=args.records_per_shard, source=args.input)
    progress.say(f'data tokens: wrote {counted.count} records of {args.seq_len} tokens into {len(paths)} '
                 f'shard(s) in {args.out}')
    result = {'job': 'data tokens', 'records': counted.count, 'shards': [str(p) for p in paths]}
  elif args.group == 'attrib':
    if args.command == 'train-model':
      from attrib import commands as attrib_commands
      result = attrib_commands.train_model_command(args.config, args.tpu, args.workdir, args.set)
    elif args.command == 'import-diffusers':
      from attrib.released import import_diffusers_command
      result = import_diffusers_command(args.weights, args.config, args.tpu, args.workdir, args.set)
    elif args.command == 'features':
      from attrib.features import features_command
      from core.config import load_config_file
      names = args.feature or [load_config_file(args.config).feature, *load_config_file(args.config).compare_features]
      if args.dino or args.clip:
        from attrib.tower_features import tower_features_command
        lists = {'train': args.train_list, 'train_queries': args.train_queries_list,
                 'test_queries': args.test_queries_list}
        result = tower_features_command(args.workdir, list(dict.fromkeys(names)), args.dino, args.clip, lists, args.tpu,
                                        args.rows_per_part)
      else:
        result = features_command(args.workdir, list(dict.fromkeys(names)))
    elif args.command == 'distill':
      from attrib.distill import distill_command
      result = distill_command(args.workdir, args.config, args.tpu, args.set, args.features, args.ranks)
    elif args.command == 'index':
      from attrib.distill import rebuild_index_command
      result = rebuild_index_command(args.workdir, args.shards)
    elif args.command == 'add':
      from attrib.additions import add_command
      result = add_command(args.workdir, args.images, args.features, args.dino, args.clip, args.train_list,
                           args.allow_repeats)
    elif args.command == 'remove':
      from attrib.removals import remove_command
      result = remove_command(args.workdir, args.ids, args.ids_file)
    elif args.command == 'eval':
      from attrib.evaluation import eval_command
      result = eval_command(args.workdir, args.features, args.ranks)
    elif args.command == 'query' and args.queries:
      from core.errors import ConfigError
      if args.image is not None or args.prompt is not None:
        raise ConfigError('--queries lists the images and their prompts: give it without --image and --prompt')
      from attrib.batch_query import batch_query_command
      result = batch_query_command(args.workdir, args.queries, args.k, args.out, args.grids, args.dino, args.clip,
                                   args.train_list)
    elif args.command == 'query':
      from core.errors import ConfigError
      if args.image is None or args.prompt is None:
        raise ConfigError('attrib query needs --image and --prompt (or --queries LIST.tsv for many)')
      if args.grids:
        raise ConfigError('--grids is for --queries; one query always gets its grid (--out)')
      from attrib.query import query_command
      result = query_command(args.workdir, args.image, args.prompt, args.k, args.out, args.dino, args.clip,
                             args.train_list)
    elif args.command == 'generate':
      if args.seeds is not None:
        if args.seed is not None:
          from core.errors import ConfigError
          raise ConfigError('--seed and --seeds exclude each other (--seeds 3 is one seed)')
        from attrib.generation import generate_seeds_command
        result = generate_seeds_command(args.workdir, args.prompt, args.seeds, args.out, args.tpu)
      else:
        from attrib.generation import generate_command
        result = generate_command(args.workdir, args.prompt, 0 if args.seed is None else args.seed, args.out,
                                  args.tpu)
    elif args.command == 'counterfactual':
      from attrib.counterfactual import counterfactual_command
      result = counterfactual_command(args.workdir, args.k, args.queries, args.seeds, args.steps, args.tpu,
                                      tuple(r.strip() for r in args.ranking.split(',') if r.strip()))
    else:
      from attrib import curation
      result = curation.teacher_command(args.workdir, args.queries, args.candidates, args.tpu, args.set,
                                        query_dir=args.query_dir, neighbours=args.neighbours, split=args.split)
  else:
    from lvm import commands
    if args.command == 'train':
      result = commands.train_command(args.config, args.tpu, args.workdir, args.set)
    elif args.command == 'eval':
      result = commands.eval_command(args.workdir, args.data, args.tpu, args.target_tokens, args.batch_size)
    elif args.command == 'import-hf':
      result = commands.import_hf_command(args.hf_dir, args.workdir, args.tpu, args.seq_len)
    elif args.command == 'train-tokenizer':
      from lvm.tokenizer_commands import train_tokenizer_command
      result = train_tokenizer_command(args.config, args.tpu, args.workdir, args.set)
    elif args.command == 'import-tokenizer':
      from lvm.tokenizer_commands import import_tokenizer_command
      result = import_tokenizer_command(args.weights, args.workdir, args.tpu)
    elif args.command == 'generate':
      from lvm.prompting import generate_command
      result = generate_command(args.workdir, args.prompt, args.frames, args.out, mode=args.mode,
                                tokenizer_dir=args.tokenizer, temperature=args.temperature, top_k=args.top_k,
                                top_p=args.top_p, seed=args.seed, dtype=args.dtype, tpu_path=args.tpu)
      result = {k: v for k, v in result.items() if k != 'tokens'}  # the file has them; the screen does not need them
    elif args.command == 'tokenize':
      from lvm.sentences import tokenize_command
      from core.config import parse_counts
      # --kind a,b as --kind a --kind b; a kind named twice is built once
      kinds = list(dict.fromkeys(k.strip() for item in args.kind for k in item.split(','))) if args.kind else None
      options = dict(frames=args.frames, kind_sentences=parse_counts(args.kind_sentences, '--kind-sentences'),
                     sentences=args.sentences, records_per_shard=args.records_per_shard, strict=args.strict,
                     seed=args.seed, split=args.split, stride=args.stride, tpu_path=args.tpu)
      if args.beam:
        from lvm.beam_tokenize import beam_tokenize_command
        result = beam_tokenize_command(args.tokenizer, args.source, kinds, args.out,
                                       beam_options=args.beam_options, **options)
      elif args.beam_options:
        from core.errors import ConfigError
        raise ConfigError("--beam-options without --beam")
      else:
        result = tokenize_command(args.tokenizer, args.source, kinds, args.out, **options)
    else:
      result = commands.export_hf_command(args.workdir, args.out, args.dtype)
  return result


if __name__ == '__main__':
  # Huge pages for XLA:CPU's per-step buffers (core/host_memory.py): glibc reads them at start-up.
  from core.host_memory import restart_with_huge_pages
  restart_with_huge_pages()
  sys.exit(main())
