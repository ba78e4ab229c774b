"""The one base class of errors caused by what the user gave us (a file, a flag, a config value).

`launch.py` prints these as one line, `error: <message>`, and exits 2; anything else is a bug and
keeps its traceback. Every message names the file, record or field at fault and what to do.
Subclasses also derive from ValueError, so callers of the Python API can catch either.
"""
from __future__ import annotations


class UserError(ValueError):
  """Bad input: a missing or malformed file, an out-of-range value, a mismatched workdir."""


class ConfigError(UserError):
  """A config field, preset or command-line value that is out of range or inconsistent."""


class TrainingDiverged(UserError):
  """The loss or the gradient norm became NaN or infinite: usually a learning rate too high for the
  model or data (or non-finite inputs). The loop stops before saving the non-finite state, so every
  checkpoint on disk is finite."""


class Stopped(Exception):
  """A job of several stages stopped at a saved state before its end: one of its trainings got
  SIGTERM (a preemption, `tpu stop`, a user's kill) and saved a checkpoint. Its later stages did not
  run, because they would have used the half-trained model (and recorded it: the teacher's rankings
  name the model step, a token shard its tokenizer's checksum), so that the rerun, which continues
  the training, could not reuse them. `launch.py` prints the message and exits 143 (128 + SIGTERM);
  the same command continues. Not a UserError: nothing the user gave was wrong."""


def stop_if_preempted(result: dict, what: str) -> None:
  """Raises Stopped when `result` (a training job's result) says the training was preempted."""
  if result.get('preempted'):
    raise Stopped(f"{what} stopped by SIGTERM at step {result.get('step')} (saved); the later stages did not run: "
                  'rerun the same command to continue')


def disk_full_message(error: BaseException) -> str | None:
  """The message of a write that failed for want of disk space (or quota), anywhere in `error`'s
  chain, else None. Not every writer raises OSError(ENOSPC): ArrayRecord raises RuntimeError and
  TensorStore (orbax) ValueError, with the C library's text in the message; so the text is matched."""
  import errno
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
      return str(error)
    if any(text in str(error) for text in ('No space left on device', 'Disk quota exceeded')):
      return str(error)
    error = error.__cause__ or error.__context__
  return None
