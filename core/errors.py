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
