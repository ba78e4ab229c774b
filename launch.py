"""The one CLI. Parses a command line and dispatches to a job; the only logic it holds is the
quickstart's running order of the two halves (their steps are in lvm/quickstart.py and
attrib/quickstart.py; each group's flags and jobs in lvm/cli.py, attrib/cli.py, data_pipelines/cli.py
and tpu_configs/gcloud.py).

  python launch.py quickstart                       # both halves on the built-in digits: tiny LVM, then attribution
  python launch.py lvm train --config lvm/configs/tiny.py --tpu tpu_configs/cpu_8.py --workdir DIR [--set k=v ...]
  python launch.py lvm train --workdir DIR --set train.steps=N   # a rerun: the run's recorded config and preset
  python launch.py lvm eval --workdir DIR --data PATH [--completion N]   # + the last frame of N records per kind drawn
  python launch.py lvm import-hf --hf-dir HF_DIR --workdir DIR
  python launch.py lvm export-hf --workdir DIR --out HF_DIR
  python launch.py lvm train-tokenizer --config lvm/configs/tokenizer_tiny.py --tpu tpu_configs/cpu_1.py --workdir DIR
  python launch.py lvm import-tokenizer --weights VQMODEL_DIR --workdir DIR
  python launch.py lvm generate --workdir DIR --prompt a.png b.png c.png --frames N --out grid.png [--mode analogy]
  python launch.py lvm generate --workdir DIR --prompts list.txt [--out DIR2] [--grids]   # many: a prompt per line
  python launch.py lvm generate --workdir DIR --prompt a.png b.png --temperature 1 --samples 4   # 4 candidates
  python launch.py lvm tokenize --tokenizer DIR --source builtin:digits|FOLDER --kind video|analogy|groups|... --out DIR
  python launch.py lvm merge-sentences --inputs DIR1 DIR2 ... [--weights 3 1 ...] --out DIR   # several tokenize jobs as one data set
  python launch.py lvm show --data DIR [--kind groups] [--records 0-7] --out grid.png   # sentences decoded: look at the data
  python launch.py attrib train-model --config attrib/configs/digits.py --workdir DIR
  python launch.py attrib import-diffusers --weights model.bin --workdir DIR [--set data.train_path=latents:D]
  python launch.py attrib teacher --workdir DIR --queries N --candidates M|all [--query-dir D] [--neighbours F]
  python launch.py attrib counterfactual --workdir DIR --k K --queries Q --seeds S
  python launch.py attrib features --workdir DIR [--feature pixels+text] [--dino D --clip C --train-list TSV ...]
  python launch.py attrib distill --workdir DIR [--features FEATS_DIR --ranks influence_train.pkl]
  python launch.py attrib index --workdir DIR [--shards S] [--set index.KEY=VALUE ...]   # rebuilt, or tuned
  python launch.py attrib add --workdir DIR --images new.tsv | --features new.npy [--dino D --clip C --train-list TSV]
  python launch.py attrib remove --workdir DIR --ids 3,17,250 | --ids-file F   # out of every answer (a takedown)
  python launch.py attrib eval --workdir DIR [--features FEATS_DIR --ranks influence_test.pkl]
  python launch.py attrib serve --workdir DIR [--port 8000]   # queries over HTTP: POST /attribute, GET /health
  python launch.py attrib generate --workdir DIR --prompt "a handwritten seven" --seed 3 --out q.png
  python launch.py attrib generate --workdir DIR --prompt "a handwritten seven" --seeds 0-99 --out DIR2   # + queries.tsv
  python launch.py attrib query --workdir DIR --image q.png --prompt "..." -k 10 [--out grid.png] [--dino D --clip C]
  python launch.py attrib query --workdir DIR --queries list.tsv [--out DIR] [--grids]   # many: image<TAB>prompt lines
  python launch.py attrib query --workdir DIR --image q.png --prompt "..." -k 3 --among 5,77,900  # among these only
  python launch.py data tokens --input X.jsonl|X.npy --out DIR --seq-len T
  python launch.py lvm train --config lvm/configs/vqlm_7b.py --tpu tpu_configs/v5p_128.py --check   # fits? (train-tokenizer, attrib train-model too)
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


# Training commands whose new runs default to a CPU preset; a rerun continues on the preset it trained
# with (a tokenizer trained on a v4-32 and rerun there without --tpu had been moved onto one device).
_NEW_RUN_PRESETS = {('lvm', 'train-tokenizer'): 'cpu_1.py', ('attrib', 'train-model'): 'cpu_8.py'}


def _prepare_runtime(args) -> None:
  """Set up jax before its first import: forced CPU devices for cpu presets, multi-process init."""
  from core.mesh import load_preset, trained_preset
  job = (args.group, getattr(args, 'command', None))
  if job in _NEW_RUN_PRESETS and not args.tpu:
    args.tpu = trained_preset(args.workdir) or str(ROOT / 'tpu_configs' / _NEW_RUN_PRESETS[job])
  if job == ('attrib', 'distill') and not args.tpu:  # a rerun continues on the student's preset
    args.tpu = trained_preset(args.workdir.rstrip('/') + '/student')
  tpu_path = getattr(args, 'tpu', None) or trained_preset(getattr(args, 'workdir', None) or getattr(args, 'tokenizer', None))
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


def _fit_check(args) -> dict:
  """`--check` of a training command: its step compiled for the preset's TPU topology (core/fit_check.py)."""
  if (args.group, args.command) == ('lvm', 'train'):
    from lvm.commands import fit_check_command
  elif (args.group, args.command) == ('lvm', 'train-tokenizer'):
    from lvm.tokenizer_commands import tokenizer_fit_check_command as fit_check_command
  else:
    from attrib.commands import model_fit_check_command as fit_check_command
  return fit_check_command(args.config, args.tpu, args.set, args.workdir)


def _print_result(result: dict) -> None:
  import jax
  if jax.process_index() == 0 and not os.environ.get(_CHILD_ENV):
    print(json.dumps(result, indent=1, default=str))


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
      if child.wait() == 130:  # the child saw Ctrl-C too and has said what it saved
        raise ChildFailed(130) from None
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
  from lvm.quickstart import TOKENIZER_CONFIG
  config, out = str(TOKENIZER_CONFIG), workdir / 'tokenizer'
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


def quickstart_workdir(args) -> Path:
  # --full gets its own workdir: in the quick one it would continue the 400-step model (on another
  # schedule) under rankings made with it, which the teacher refuses to mix.
  return Path(args.workdir or ('runs/quickstart_full' if args.full else 'runs/quickstart'))


def _check_quickstart_overrides(args) -> None:
  """--set and --set-tokenizer checked before the first stage: a typo in an LVM field was found only
  when the LVM's stage began, after the tokenizer's minutes."""
  from core.config import ConfigError, apply_overrides, load_config_file
  from lvm import quickstart as lvm_quickstart
  if args.attribution_only and (args.set or args.set_tokenizer):
    raise ConfigError('--set and --set-tokenizer configure the LVM half, which --attribution-only skips')
  if not args.attribution_only:
    apply_overrides(load_config_file(lvm_quickstart.LVM_CONFIG), lvm_quickstart.LVM_SETTINGS + args.set)
    apply_overrides(load_config_file(lvm_quickstart.TOKENIZER_CONFIG), args.set_tokenizer)


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
  from lvm import quickstart as lvm_quickstart
  lvm = None if args.attribution_only else lvm_quickstart.run(
      workdir, args.tpu, args.set, lambda: _train_quickstart_tokenizer(args, workdir), clock)
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
    lvm_quickstart.print_summary(lvm, workdir)
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

  from attrib import cli as attrib_cli
  from data_pipelines import cli as data_cli
  from lvm import cli as lvm_cli
  from tpu_configs import gcloud
  for group in (lvm_cli, attrib_cli, data_cli, gcloud):
    group.add_parser(sub)

  job = argv[argv.index('--') + 1:] if '--' in argv else []  # `tpu run ... -- <launch.py args>`
  args = parser.parse_args(argv[:argv.index('--')] if '--' in argv else argv)
  args.job = job
  if args.group == 'tpu':
    args.parse_job = parser.parse_args  # `tpu run` checks its job here before any worker starts
    return gcloud.run(args)
  if getattr(args, 'check', False):
    if not args.tpu:
      from core.errors import ConfigError
      raise ConfigError('--check compiles the step for a slice preset\'s TPU topology: give --tpu, e.g. '
                        'tpu_configs/v5p_128.py')
    # Compiles for a TPU that is not here: this machine's CPU runs the compiler, no TPU runtime starts.
    os.environ['JAX_PLATFORMS'] = 'cpu'
    result = _fit_check(args)
    _print_result(result)
    return 0 if result['fits'] else 3
  if hasattr(args, 'check') and not args.workdir:
    from core.errors import ConfigError
    raise ConfigError(f'{args.group} {args.command} needs --workdir (or --check to only check that the job fits)')
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


# Commands that only read their workdir (eval, generate, query, serve, export-hf, show) hold no lock: a run can
# be evaluated or prompted while it trains, and a served student changed by `attrib add` or `attrib remove`.
_READ_ONLY = {('lvm', 'eval'), ('lvm', 'generate'), ('lvm', 'export-hf'), ('lvm', 'show'), ('attrib', 'eval'),
              ('attrib', 'query'), ('attrib', 'generate'), ('attrib', 'serve')}


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
  if args.group == 'data' or getattr(args, 'command', None) in ('tokenize', 'merge-sentences'):
    return args.out
  return args.workdir


def _dispatch(args) -> dict:
  if args.group == 'quickstart':
    return quickstart(args)
  from attrib import cli as attrib_cli
  from data_pipelines import cli as data_cli
  from lvm import cli as lvm_cli
  return {'lvm': lvm_cli, 'attrib': attrib_cli, 'data': data_cli}[args.group].run(args)



if __name__ == '__main__':
  # Huge pages for XLA:CPU's per-step buffers (core/host_memory.py): glibc reads them at start-up.
  from core.host_memory import restart_with_huge_pages
  restart_with_huge_pages()
  sys.exit(main())
