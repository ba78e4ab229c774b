"""Prompting the LVM with images (LVM §5): continue a sequence, complete an analogy, solve an
in-context task. All three are "given frames, generate the next ones"; they differ in how the
prompt is arranged and how many frames are asked for:

  sequence    a b c ...          -> the next `frames` frames
  analogy     A A' B             -> B'          (one frame)
  in-context  x1 y1 x2 y2 ... xq  -> yq          (one frame)

Frames are generated one at a time: only image codes (ids below the codebook size) are allowed
inside a frame, and when context plus a new frame would pass the model's length, the oldest frames
are dropped (LVM's sliding window keeps the last frames that fit).
"""
from __future__ import annotations

import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from core.config import ConfigError, check_at_least
from core.paths import as_path, joined
from core.workdir import prepare_output_file, read_json, save_image_atomic, versions, write_result_if_writable
from lvm.sampling import check_sampling, generate

MODES = ('sequence', 'analogy', 'in-context')


def generate_frames(params, config, context_bt: np.ndarray, *, frames: int, tokens_per_image: int,
                    codebook_size: int, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                    seed=0, dtype: str = 'float32') -> np.ndarray:
  """Continues whole-frame contexts [b, n·tokens_per_image] by `frames` frames: int32 [b, frames·tpi].
  `seed`: an int for every row, or one per row ([b]: each row samples as it would alone with its seed)."""
  keep_frames = (config.max_seq_len - tokens_per_image) // tokens_per_image
  if keep_frames < 1:
    raise ConfigError(f'model.max_seq_len {config.max_seq_len} cannot hold a context frame plus a new one '
                      f'of {tokens_per_image} tokens')
  seed = np.asarray(seed)
  key = jax.random.key(seed) if seed.ndim == 0 else jax.vmap(jax.random.key)(jnp.asarray(seed))
  fold = jax.random.fold_in if seed.ndim == 0 else jax.vmap(jax.random.fold_in, in_axes=(0, None))
  allowed = jnp.arange(codebook_size)
  tokens = np.asarray(context_bt, np.int32)
  for frame in range(frames):
    context = tokens[:, -keep_frames * tokens_per_image:]
    new = generate(params, config, jnp.asarray(context), jnp.full(len(context), context.shape[1], jnp.int32),
                   new_tokens=tokens_per_image, key=fold(key, frame), temperature=temperature,
                   top_k=top_k, top_p=top_p, allowed_ids=allowed, dtype=dtype)
    tokens = np.concatenate([tokens, np.asarray(new)], axis=1)
  return tokens[:, context_bt.shape[1]:]


def check_prompt(mode: str, count: int, frames: int) -> int:
  """The frames to generate for `mode` with `count` prompt images (analogy / in-context: one)."""
  if mode not in MODES:
    raise ConfigError(f'--mode {mode!r}: choose from {list(MODES)}')
  if count < 1:  # numpy's 'need at least one array to concatenate' said nothing of the prompt
    raise ConfigError('no prompt images: give at least one (for a sequence, the frames so far)')
  if mode == 'analogy' and count != 3:
    raise ConfigError(f'--mode analogy takes three prompt images A A\' B (got {count})')
  if mode == 'in-context' and (count < 3 or count % 2 == 0):
    raise ConfigError(f'--mode in-context takes pairs and a query: x1 y1 ... xq, an odd count >= 3 (got {count})')
  if mode != 'sequence' and frames != 1:  # was ignored: one frame came back for --frames 3
    raise ConfigError(f'--mode {mode} completes one frame, --frames {frames} asks for more; continue its answer '
                      'with --mode sequence for the frames after it')
  return frames


def grid_png(rows: list[np.ndarray], split_at: int, path: Path, scale: int = 4) -> None:
  """One row per prompt: its frames, a gap, the generated frames (images [n, s, s, 3] in [0, 1])."""
  side = rows[0].shape[1]
  gap = np.ones((side, side // 4, 3), np.float32)
  lines = []
  for frames in rows:
    cells = list(frames[:split_at]) + [gap] + list(frames[split_at:])
    lines.append(np.concatenate(cells, axis=1))
  picture = np.concatenate(lines, axis=0)
  picture = np.repeat(np.repeat(picture, scale, axis=0), scale, axis=1)
  save_image_atomic(path, (np.clip(picture, 0, 1) * 255).round().astype(np.uint8))


def training_manifest(workdir: Path, config) -> tuple[Path, dict]:
  """(folder, manifest) of an LVM workdir's training data. The data path as configured counts from
  where training ran; from elsewhere, the absolute path that `lvm train` recorded beside it, or its
  path from the workdir (recorded too) after the run folder moved."""
  from core.workdir import RUN_CONFIG_FILE
  if config.data.train_path.startswith('builtin:'):
    raise ConfigError(f'{workdir} trained on {config.data.train_path}, one grey level per token, which no tokenizer '
                      'turns into pictures: prompt an LVM trained on `lvm tokenize` sentences')
  if not config.data.train_path:
    raise ConfigError(f'{workdir} trained on {config.data.train_path or "no data (an import)"!r}, which has no '
                      'manifest.json naming a tokenizer (data from `lvm tokenize` has one); pass --tokenizer '
                      '(Prompter.load(..., tokenizer=) in Python)')
  run_file = as_path(workdir) / RUN_CONFIG_FILE
  run = read_json(run_file) if run_file.is_file() else {}
  # As configured (from where training ran), at the absolute path recorded, else where it was beside
  # the workdir (the two moved together).
  candidates = [as_path(config.data.train_path)]  # local or gs://, as the workdir
  candidates += [as_path(run['train_data'])] if run.get('train_data') else []
  candidates += [as_path(joined(workdir, run['train_data_relative']))] if run.get('train_data_relative') else []
  data = next((candidate for candidate in candidates if candidate.is_dir()), None)
  if data is None:
    raise ConfigError(f'{workdir} trained on {config.data.train_path!r}, which is not there from {Path.cwd()} '
                      f'(looked at {", ".join(map(str, candidates))}; a relative path counts from where training '
                      'ran: run from there, or pass --tokenizer; tokenizer= in Python)')
  manifest = data / 'manifest.json'
  if not manifest.is_file():
    raise ConfigError(f'{workdir} trained on {config.data.train_path!r}, which has no manifest.json naming a '
                      'tokenizer (data from `lvm tokenize` has one); pass --tokenizer '
                      '(Prompter.load(..., tokenizer=) in Python)')
  return data, read_json(manifest)


def tokenizer_of(workdir: Path, config) -> str:
  """The tokenizer an LVM workdir's tokens came from (the manifest of its training data)."""
  from lvm.sentences import manifest_tokenizer
  return manifest_tokenizer(*training_manifest(workdir, config))


def check_same_tokenizer(workdir: Path, config, given, checksum: str | None, what: str = '--tokenizer') -> None:
  """A tokenizer other than the one the training data was made with gives the model's codes other
  meanings, without any error: a --tokenizer that decodes them into other pictures, or --data whose
  perplexity measures nothing. Refused where the training data's manifest can be found to compare."""
  try:
    data, manifest = training_manifest(workdir, config)
  except ConfigError:
    return  # data not reachable from here: what is given is all there is to go by
  made_with = manifest.get('tokenizer_checksum')
  if not made_with or not checksum or made_with == checksum:
    return
  if what in ('--tokenizer', 'the tokenizer at'):  # given, or found where the manifest says
    raise ConfigError(f'{what} {given} (parameters {checksum}) is not the tokenizer {data} was made '
                      f'with ({manifest.get("tokenizer")}, parameters {made_with}): the model\'s codes mean other '
                      'pictures to it' + ('' if what == '--tokenizer' else ' (retrained or replaced since?); '
                                          'pass --tokenizer (Prompter.load(..., tokenizer=) in Python)'))
  raise ConfigError(f'{what} {given} was tokenized with other tokenizer parameters ({checksum}) than the training '
                    f'data {data} ({made_with}): its codes mean other pictures to this model')


def check_samples(samples: int, temperature: float) -> None:
  check_at_least(1, samples=samples)
  if samples > 1 and temperature == 0:
    raise ConfigError(f'--samples {samples} with --temperature 0: greedy decoding gives the same frames every time; '
                      'sample with a temperature > 0 (e.g. 1.0)')


def generate_command(workdir: str, prompts: list[str], frames: int, out: str | None, *, mode: str = 'sequence',
                     tokenizer_dir: str | None = None, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                     seed: int = 0, dtype: str = 'float32', tpu_path: str | None = None, samples: int = 1) -> dict:
  """`launch.py lvm generate`: `lvm.Prompter` plus a PNG grid (prompt | generation) and a result file.
  `samples` > 1: that many candidates of the prompt, sample i with seed + i (as `--seed seed+i` alone
  gives it), generated together and drawn one per row (LVM's batch_generation n_candidates)."""
  from data_pipelines.image_sources import load_image, prompt_files
  from lvm import commands
  from lvm.prompter import Prompter
  check_samples(samples, temperature)
  check_at_least(1, frames=frames)
  prompts = prompt_files(prompts)
  frames = check_prompt(mode, len(prompts), frames)
  started = time.time()
  workdir = as_path(workdir)  # local or gs:// (a run trained on a TPU slice, prompted from a laptop)
  config, _ = commands.load_run_config(workdir)
  check_sampling(temperature, top_k, top_p, config.model.vocab_size)
  out = prepare_output_file(out) if out else prepare_output_file(workdir / 'generation.png', 'the default --out')
  for path in prompts:  # every file read once before any weights load (a typo costs nothing)
    load_image(path, 8)
  prompter = Prompter.load(workdir, tokenizer_dir, tpu_path, dtype)
  sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p)
  if samples == 1:
    generations = [prompter.generate(prompts, frames, mode, seed=seed, **sampling)]
  else:
    generations = prompter.generate_batch([prompts] * samples, frames, mode, seed=[seed + i for i in range(samples)],
                                          batch_size=min(samples, 16), **sampling)
  grid_png([np.concatenate([g.prompt, g.frames]) for g in generations], len(prompts), out)
  result = {'job': 'lvm generate', 'mode': mode, 'prompts': [str(p) for p in prompts], 'frames': frames,
            'step': prompter.step,
            'tokenizer': str(prompter.tokenizer_dir), 'temperature': temperature, 'top_k': top_k, 'top_p': top_p,
            'seed': seed, 'samples': samples, 'png': str(out),
            'tokens': [g.tokens.reshape(-1).tolist() for g in generations],
            'wall_s': time.time() - started, 'versions': versions()}
  write_result_if_writable(workdir / 'generate_result.json', result)
  return result


def next_frame_report(workdir: str | Path, sentences_dir: str | Path, *, kind: str = 'video', limit: int = 64,
                      png: str | Path | None = None, tpu_path: str | None = None) -> dict:
  """How well the LVM continues held-out sentences of `kind`: greedy next frame from the frames
  before it, against copying the last context frame (lvm/completion.py). Token accuracy against the
  true frame's tokens, and PSNR (dB) of the decoded frames against the decoded true frame."""
  from data_pipelines.token_records import SHARD_SUFFIX, TokenRecordSource
  from lvm import commands
  from lvm.completion import complete_last_frames, completion_scores
  from lvm.sentences import manifest_tokenizer
  from lvm.tokenizer_commands import load_tokenizer
  workdir, sentences_dir = as_path(workdir), as_path(sentences_dir)
  manifest = read_json(sentences_dir / 'manifest.json')
  tpi = manifest['tokens_per_image']
  source = TokenRecordSource(sorted(sentences_dir.glob(f'{kind}-*{SHARD_SUFFIX}')), seq_len=manifest['seq_len'],
                             vocab_size=manifest['vocab_size'])
  records = np.stack([source[i] for i in range(min(limit, len(source)))])
  config, trained_tpu = commands.load_run_config(workdir)
  _, params, _, _, step = commands.restore_params(workdir, config, tpu_path or trained_tpu)
  tokenizer = load_tokenizer(manifest_tokenizer(sentences_dir, manifest), tpu_path or trained_tpu)
  context = records[:, :-tpi]
  predicted = complete_last_frames(jax.device_get(params), config.model, records, tpi, manifest['codebook_size'],
                                   batch_size=len(records))
  scores, pictures = completion_scores(records, predicted, tokenizer, tpi)
  report = {'kind': kind, 'step': step, **scores}
  if png:
    rows = []
    for r in range(min(4, len(records))):
      frames = tokenizer.decode(records[r].reshape(-1, tpi))
      rows.append(np.concatenate([frames, pictures['lvm'][r:r + 1], pictures['copy_last'][r:r + 1]]))
    grid_png(rows, len(frames), Path(png))  # context + true frame | LVM's frame, copy-last
    report['png'] = str(png)
    # The first held-out video's context frames as files: a prompt a user can give `lvm generate`.
    prompt_dir = Path(png).parent / f'{Path(png).stem}_prompt'
    prompt_dir.mkdir(parents=True, exist_ok=True)
    report['prompt_frames'] = []
    for number, frame in enumerate(tokenizer.decode(context[0].reshape(-1, tpi)), 1):
      save_image_atomic(prompt_dir / f'frame{number}.png', (np.clip(frame, 0, 1) * 255).round().astype(np.uint8))
      report['prompt_frames'].append(str(prompt_dir / f'frame{number}.png'))
  return report
