"""How well an LVM completes held-out visual sentences (`lvm eval --completion N`, the quickstart's
next-frame check): the last frame of each record generated greedily from the frames before it, as a
prompt of those frames would be answered (a video's next frame, an analogy's B', a label in context),
scored against the true frame:

  token_accuracy  the share of the frame's codes equal to the true frame's
  psnr_db         PSNR of the decoded frame against the decoded true frame (mean over records)

next to `copy_last`, the last context frame given as the answer: a video's trivial guess (its frames
change little), and for pairs or colorization the image itself as its own label. Perplexity says how
likely the true frame is; these say whether the frame the model would draw is the right one.
"""
from __future__ import annotations

import numpy as np

from lvm.prompting import generate_frames


def complete_last_frames(params, config, records: np.ndarray, tokens_per_image: int, codebook_size: int,
                         batch_size: int) -> np.ndarray:
  """Greedy last frame of each record [n, T] from its first T - tokens_per_image tokens: int32
  [n, tokens_per_image], `batch_size` records at a time (the last batch filled with copies, so one
  compiled program serves every batch; each row is generated as it would be alone)."""
  out = []
  for start in range(0, len(records), batch_size):
    chunk = records[start:start + batch_size]
    filled = np.concatenate([chunk, np.repeat(chunk[:1], batch_size - len(chunk), axis=0)]) \
        if len(records) > batch_size else chunk
    out.append(generate_frames(params, config, filled[:, :-tokens_per_image], frames=1,
                               tokens_per_image=tokens_per_image, codebook_size=codebook_size)[:len(chunk)])
  return np.concatenate(out)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
  mse = np.mean(np.square(a - b), axis=(1, 2, 3))
  return float(np.mean(10 * np.log10(1 / np.maximum(mse, 1e-10))))


def completion_scores(records: np.ndarray, predicted: np.ndarray, tokenizer, tokens_per_image: int):
  """(scores, pictures): the model's last frames against the truth and against copying the last
  context frame; pictures holds the decoded 'truth', 'lvm' and 'copy_last' frames [n, s, s, 3]."""
  truth, copy_last = records[:, -tokens_per_image:], records[:, -2 * tokens_per_image:-tokens_per_image]
  pictures = {name: tokenizer.decode(tokens) for name, tokens in
              (('truth', truth), ('lvm', predicted), ('copy_last', copy_last))}
  scores = {'sentences': int(len(records)),
            'token_accuracy': {'lvm': float(np.mean(predicted == truth)),
                               'copy_last': float(np.mean(copy_last == truth))},
            'psnr_db': {'lvm': _psnr(pictures['lvm'], pictures['truth']),
                        'copy_last': _psnr(pictures['copy_last'], pictures['truth'])}}
  return scores, pictures


def completion_per_kind(params, config, sources: dict, tokenizer, tokens_per_image: int, codebook_size: int,
                        limit: int, batch_size: int) -> dict:
  """{kind: scores} over the first `limit` records of each kind's source."""
  from core import progress
  report = {}
  for kind, source in sources.items():
    records = np.stack([source[i] for i in range(min(limit, len(source)))])
    progress.say(f'lvm eval: completing the last frame of {len(records)} {kind} records')
    predicted = complete_last_frames(params, config, records, tokens_per_image, codebook_size, batch_size)
    report[kind], _ = completion_scores(records, predicted, tokenizer, tokens_per_image)
  return report
