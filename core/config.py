"""Configs are code: a Python file whose `get_config()` returns frozen dataclasses.

Overrides come as `a.b=c` strings (from `--set`). Each value is parsed to the field's declared type,
and an unknown key is rejected with the list of valid ones, so a typo never silently does nothing.
"""
from __future__ import annotations

from core.errors import ConfigError, UserError  # noqa: F401 (ConfigError re-exported: configs raise it)

import dataclasses
import difflib
import importlib.util
import json
import math
import sys
import types
import typing
from pathlib import Path
from typing import Any, Sequence


CHECKOUT = Path(__file__).resolve().parent.parent


def bundled_or_given(path: str | Path) -> Path:
  """`path` itself, or where it is not a file and is relative, the bundled file of that name: the
  README's `--config lvm/configs/tiny.py` then works from any folder, not only the checkout's (a
  file of that name in the current folder still comes first)."""
  path = Path(path)
  if path.is_file() or path.is_absolute() or not (CHECKOUT / path).is_file():
    return path
  return CHECKOUT / path


def load_config_file(path: str | Path, *args, expect: type | None = None) -> Any:
  """Imports `path` and returns its `get_config(*args)`, checked to be an `expect` if given (so a
  slice preset passed as a model config, or the reverse, is named at once).

  `file.py:arg` passes `arg` to get_config (ml_collections' convention), e.g.
  `lvm/configs/vqlm_7b.py:vqlm_3b` for another size of the same recipe."""
  if not bundled_or_given(path).is_file() and ':' in str(path) and not args:
    path, arg = str(path).rsplit(':', 1)
    args = (arg,)
  path = bundled_or_given(path)
  if not path.is_file():
    raise ConfigError(f'config file not found: {path}')
  module_name = f'_config_{abs(hash(str(path.resolve())))}'
  spec = importlib.util.spec_from_file_location(module_name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[module_name] = module  # dataclasses need their module registered
  try:
    spec.loader.exec_module(module)
  except SyntaxError as e:
    raise ConfigError(f'{path} line {e.lineno}: {e.msg}') from None
  except UserError:
    raise
  except Exception as e:  # noqa: BLE001 (a config is the user's code: an import or name it lacks)
    raise ConfigError(f'{path}{_line_in(path, e)}: {type(e).__name__}: {e}') from None
  if not hasattr(module, 'get_config'):
    raise ConfigError(f'{path} defines no get_config()')
  try:
    config = module.get_config(*args)
  except UserError:
    raise
  except (KeyError, TypeError) as e:
    if not args:
      raise ConfigError(f'{path}{_line_in(path, e)}: {type(e).__name__}: {e}') from None
    raise ConfigError(f'{path}: get_config does not take {":".join(args)!r} ({type(e).__name__}: {e})') from None
  except Exception as e:  # noqa: BLE001
    raise ConfigError(f'{path}{_line_in(path, e)}: {type(e).__name__}: {e}') from None
  if expect is not None and not isinstance(config, expect):
    raise ConfigError(f'{path} holds a {type(config).__name__}, but this argument needs a {expect.__name__} '
                      f'file ({_EXPECTED_PLACE.get(expect.__name__, "see the README")})')
  return config


def _line_in(path: Path, error: BaseException) -> str:
  """' line N' of the deepest frame of `error`'s traceback that runs in the config file `path`."""
  import traceback
  lines = [frame.lineno for frame in traceback.extract_tb(error.__traceback__)
           if Path(frame.filename).resolve() == path.resolve()]
  return f' line {lines[-1]}' if lines else ''


_EXPECTED_PLACE = {'SliceConfig': 'a preset from tpu_configs/', 'LvmConfig': 'a model config from lvm/configs/',
                   'DiffusionConfig': 'a model config from attrib/configs/',
                   'FastGDAConfig': 'a fastgda_*.py config from attrib/configs/'}


def valid_keys(config: Any, prefix: str = '') -> list[str]:
  """All dotted leaf paths of a dataclass config, for error messages."""
  keys = []
  for field in dataclasses.fields(config):
    value = getattr(config, field.name)
    if dataclasses.is_dataclass(value):
      keys += valid_keys(value, f'{prefix}{field.name}.')
    else:
      keys.append(f'{prefix}{field.name}')
  return keys


# What users call a field elsewhere (optax, HF Trainer) -> its leaf name here.
_OTHER_NAMES = {'learning_rate': 'lr', 'batch_size': 'global_batch', 'batch': 'global_batch',
                'num_steps': 'steps', 'max_steps': 'steps', 'num_train_steps': 'steps'}


def _did_you_mean(config: Any, dotted: str) -> str:
  """' (did you mean 'optim.lr'?)' for 'train.lr': the same leaf (or its other name) in another group
  first, then a close spelling."""
  keys = valid_keys(config)
  leaf = dotted.rsplit('.', 1)[-1]
  leaf = _OTHER_NAMES.get(leaf, leaf)
  guesses = ([k for k in keys if k.rsplit('.', 1)[-1] == leaf]
             or difflib.get_close_matches(dotted, keys, n=1, cutoff=0.8))
  return f' (did you mean {" or ".join(map(repr, guesses))}?)' if guesses else ''


def _parse_bool(text: str) -> bool:
  lowered = text.strip().lower()
  if lowered in ('1', 'true', 'yes', 'on'):
    return True
  if lowered in ('0', 'false', 'no', 'off'):
    return False
  raise ConfigError(f'not a boolean: {text!r}')


def _sequence_items(text: str) -> list:
  """'(32, 64)', '[32,64]', '(32,)', '32,64' or '[video, analogy]' -> the items (numbers as JSON
  values, bare words as strings). An unclosed bracket is an error, not a silently shorter list."""
  stripped = text.strip()
  closing = {'(': ')', '[': ']'}.get(stripped[:1])
  if closing is None:
    inner = stripped
  elif not stripped.endswith(closing):
    raise ValueError(f'{stripped[0]!r} is not closed by {closing!r}')
  else:
    inner = stripped[1:-1].strip()
    if inner.endswith(','):  # Python's one-item tuple, (32,)
      inner = inner[:-1]
    try:
      return json.loads('[' + inner + ']')
    except json.JSONDecodeError:
      pass  # bare words, as without brackets
  return [part.strip() for part in inner.split(',') if part.strip()]


def _parse_int(text: str) -> int:
  """int('1e3') fails, yet '1e3' steps is what a user writes; a fraction stays an error."""
  try:
    return int(text)
  except ValueError:
    try:
      value = float(text)
    except ValueError:
      value = math.nan
    if not (math.isfinite(value) and value.is_integer()):
      raise ValueError(f'{text!r} is not a whole number') from None
    return int(value)


def parse_value(text: str, annotation: Any) -> Any:
  """Parses an override string to `annotation` (int, float, bool, str, Optional, tuple, Literal)."""
  origin = typing.get_origin(annotation)
  args = typing.get_args(annotation)
  if origin in (typing.Union, types.UnionType):
    if text.strip().lower() in ('none', 'null') and type(None) in args:
      return None
    errors = []
    for option in args:
      if option is type(None):
        continue
      try:
        return parse_value(text, option)
      except (ValueError, TypeError) as e:
        errors.append(str(e))
    raise ConfigError('; '.join(errors))
  if origin is typing.Literal:
    for option in args:
      if str(option) == text:
        return option
    raise ConfigError(f'{text!r} is not one of {list(args)}')
  if origin in (tuple, list):
    items = _sequence_items(text)
    item_type = args[0] if args else Any
    if item_type is Ellipsis or (len(args) == 2 and args[1] is Ellipsis):
      item_type = args[0]
    parsed = [parse_value(i if isinstance(i, str) else json.dumps(i), item_type) for i in items]
    return tuple(parsed) if origin is tuple else parsed
  if annotation is bool:
    return _parse_bool(text)
  if annotation is int:
    return _parse_int(text)
  if annotation is float:
    value = float(text)
    if not math.isfinite(value):  # nan passes every `> 0` check and trains to nan
      raise ValueError(f'{text!r} is not a finite number')
    return value
  if annotation is str:
    return text
  if annotation is Any:
    return text
  raise TypeError(f'cannot parse overrides of type {annotation}')


def parse_override(config: Any, dotted: str, text: str, _root: Any = None, _path: str = '') -> Any:
  """The value of field `dotted` of `config` parsed from `text` to the field's type (the key checked)."""
  root = _root if _root is not None else config
  head, _, rest = dotted.partition('.')
  names = {f.name: f for f in dataclasses.fields(config)}
  if head not in names:
    raise ConfigError(f'unknown config key {_path + head!r}{_did_you_mean(root, _path + dotted)}; '
                      f'valid keys: {", ".join(valid_keys(root))}')
  current = getattr(config, head)
  if rest:
    if not dataclasses.is_dataclass(current):
      raise ConfigError(f'{_path + head!r} is a leaf; valid keys: {", ".join(valid_keys(root))}')
    return parse_override(current, rest, text, root, f'{_path}{head}.')
  if dataclasses.is_dataclass(current):
    raise ConfigError(f'{_path + head!r} is a group, set one of its fields: '
                      f'{", ".join(valid_keys(current, _path + head + "."))}')
  hints = typing.get_type_hints(type(config))
  try:
    return parse_value(text, hints[head])
  except (ValueError, TypeError, json.JSONDecodeError) as e:
    raise ConfigError(f'bad value for {_path + head!r} (type {hints[head]}): {text!r}: {e}') from None


def _replace_nested(config: Any, changes: dict) -> Any:
  """One dataclasses.replace per changed dataclass, children first: each __post_init__ validates
  the final combination of its fields, never a half-applied one."""
  updates = {name: _replace_nested(getattr(config, name), value) if isinstance(value, dict) else value
             for name, value in changes.items()}
  return dataclasses.replace(config, **updates)


def apply_overrides(config: Any, overrides: Sequence[str]) -> Any:
  """Applies `key=value` strings; later ones win. Fields that depend on each other (a weight and
  the file it needs) may come in any order: each dataclass validates once, with all its overrides."""
  changes: dict = {}
  for item in overrides:
    if '=' not in item:
      raise ConfigError(f'override {item!r} is not of the form key=value')
    key, text = item.split('=', 1)
    key = key.strip()
    value = parse_override(config, key, text.strip())
    *groups, leaf = key.split('.')
    node = changes
    for group in groups:
      node = node.setdefault(group, {})
    node[leaf] = value
  return _replace_nested(config, changes) if changes else config


def to_dict(config: Any) -> dict:
  return dataclasses.asdict(config)


def from_dict(cls: type, data: dict) -> Any:
  """Rebuilds a (nested) dataclass config from `to_dict` output, as stored in a workdir."""
  hints = typing.get_type_hints(cls)
  kwargs = {}
  for field in dataclasses.fields(cls):
    if field.name not in data:
      continue
    value = data[field.name]
    field_type = hints[field.name]
    if dataclasses.is_dataclass(field_type):
      value = from_dict(field_type, value)
    elif typing.get_origin(field_type) is tuple and value is not None:
      value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
    kwargs[field.name] = value
  return cls(**kwargs)


def check_at_least(minimum: int, **arguments: int | None) -> None:
  """Command-line counts (`--queries 0`, `--k -1`) rejected by name before any work starts."""
  for name, value in arguments.items():
    if value is not None and value < minimum:
      raise ConfigError(f'--{name.replace("_", "-")} must be >= {minimum}, got {value}')


def parse_counts(items: list[str], flag: str) -> dict[str, int]:
  """['video=4096', 'edges=0'] -> {'video': 4096, 'edges': 0}, with the bad item named."""
  out = {}
  for item in items:
    name, _, value = item.partition('=')
    if not name or not value.strip().lstrip('-').isdigit():
      raise ConfigError(f'{flag} {item!r}: expected NAME=COUNT')
    out[name.strip()] = int(value)
  return out
