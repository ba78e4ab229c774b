"""The LVM half of `launch.py quickstart`, on the bundled real images, end to end:

  tiny VQGAN tokenizer -> visual sentences (train / held-out images) -> tiny LVM -> perplexity of each
  held-out sentence's last frame against the token-frequency baseline, and its next-frame predictions.

Every stage is a regular job (the same functions the CLI runs) and resumes: a rerun skips what is done.
"""
from __future__ import annotations

import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LVM_CONFIG = ROOT / 'lvm/configs/tiny.py'
TOKENIZER_CONFIG = ROOT / 'lvm/configs/tokenizer_tiny.py'
LVM_SETTINGS = ['train.steps=1500', 'optim.decay_steps=1480']  # on lvm/configs/tiny.py, its time budget


def run(workdir: Path, tpu: str, lvm_settings: list[str], train_tokenizer, clock) -> dict:
  """The LVM half in `workdir` (tokenizer/, data/, lvm/); `train_tokenizer()` trains workdir/tokenizer
  and returns its result (launch.py runs it in a one-device process when this one has several)."""
  import numpy as np
  from core import progress
  from core.errors import stop_if_preempted
  from data_pipelines.digit_sentences import unigram_perplexity
  from data_pipelines.token_records import TokenRecordSource, find_shards
  from lvm import commands
  from lvm.prompting import next_frame_report
  from lvm.sentences import tokenize_command
  progress.say('quickstart LVM 1/4: train the tiny VQGAN tokenizer (32-px images -> 64 tokens, 128 codes)')
  tokenizer = train_tokenizer()
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
  train_result = commands.train_command(str(LVM_CONFIG), tpu, str(workdir / 'lvm'),
                                        [f'data.train_path={workdir / "data" / "train"}', f'model.vocab_size={vocab}',
                                         f'data.seq_len={seq_len}'] + LVM_SETTINGS + lvm_settings)
  stop_if_preempted(train_result, 'quickstart: the LVM')
  progress.say(f'quickstart: trained ({clock.lap("lvm train"):.1f} s)\nquickstart LVM 4/4: perplexity of the last frame')
  eval_result = commands.eval_command(str(workdir / 'lvm'), str(workdir / 'data' / 'eval'), tpu,
                                      manifests['train']['tokens_per_image'], 32)
  next_frame = next_frame_report(workdir / 'lvm', workdir / 'data' / 'eval', kind='video',
                                 png=workdir / 'lvm' / 'next_frame.png', tpu_path=tpu)
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


def prompt_command(lvm_workdir: Path, next_frame: dict) -> str:
  """The `lvm generate` command that continues the held-out video whose frames the quickstart wrote."""
  return shlex.join(['python', 'launch.py', 'lvm', 'generate', '--workdir', str(lvm_workdir), '--prompt',
                     *next_frame['prompt_frames'], '--frames', '2', '--out', 'next_frames.png'])


def print_summary(lvm: dict, workdir: Path) -> None:
  print(f"\nquickstart: tokenizer PSNR {lvm['tokenizer']['psnr_db']:.1f} dB on the bundled images; "
        f"LVM perplexity of the last frame {lvm['eval']['perplexity']:.1f} on held-out digits "
        f"(token-frequency baseline {lvm['baseline_unigram_perplexity']:.1f})")
  nf = lvm['next_frame']
  print(f"quickstart: next frame of held-out digit videos: token accuracy {nf['token_accuracy']['lvm']:.2f} "
        f"(copy-last {nf['token_accuracy']['copy_last']:.2f}), PSNR {nf['psnr_db']['lvm']:.1f} dB "
        f"(copy-last {nf['psnr_db']['copy_last']:.1f} dB); {nf['png']}")
  show = ['python', 'launch.py', 'lvm', 'show', '--data', str(workdir / 'data' / 'train'), '--kind', 'analogy',
          '--out', 'analogies.png']
  print(f'quickstart: the sentences it trained on, decoded: {shlex.join(show)}')
  print(f'quickstart: your own prompt: {prompt_command(workdir / "lvm", nf)}')
  # A rerun of the run folder alone continues it, with the quickstart's settings and preset.
  train_on = ['python', 'launch.py', 'lvm', 'train', '--workdir', str(workdir / 'lvm'),
              '--set', f'train.steps={2 * lvm["train"]["step"]}']
  print(f'quickstart: train the LVM on, twice as long: {shlex.join(train_on)}')
