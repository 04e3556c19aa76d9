"""Config files (`get_config()` returning an `ml_collections.ConfigDict`), overrides, validation.

A config is named by a file path, by the name of a shipped config (`quickstart`,
`cats_vs_dogs`, ...), or by a run's own record (`workdir/config.json`, or the workdir itself), so
a run can be reproduced from what it wrote. `--config.KEY=VALUE` overrides are parsed against the
type of the existing value; an unknown key is an error that lists the valid ones, never silently
ignored. `validate` then fills any key a config lacks from `default.py` (the one home of every
default) and checks every value with a range or a fixed set of names against one table
(`_schema.py`), so a bad value fails at load with one line, not deep inside a run.
"""

from __future__ import annotations

from transfer.errors import UserError

import ast
import contextlib
import importlib
import importlib.util
import json
import numbers
import os

# ml_collections and numpy are imported where they are used: the command line splits and parses
# its arguments (`split_overrides`) before anything heavy is imported, so `--help` is instant.
from transfer.configs import _schema
# Each key's role in a run (identity or bookkeeping), read by the rerun checks in workdir/runs.
from transfer.configs._schema import (BOOKKEEPING, DERIVED_STATE, IDENTITY, LENGTH, ROLES,
                                      STATE, keys_with)
# The checks that need the run's length in steps (known once the data is): assembly.build.
from transfer.configs._schema import check_lengths

DEFAULT = "quickstart"


def shipped() -> list[str]:
  """Names of the config files shipped with the package."""
  here = os.path.dirname(__file__)
  return sorted(f[:-3] for f in os.listdir(here) if f.endswith(".py") and not f.startswith("_"))


RUN_RECORD = "config.json"  # What `transfer train` writes into its workdir.


def load(name_or_path: str | None = None) -> ml_collections.ConfigDict:
  """Loads a config from a shipped name, a `.py` file, a `.json` run record or a workdir.

  A `.py` path may carry one argument after a colon (`configs/x.py:arg`), passed to
  `get_config(arg)`, as with `ml_collections.config_flags`. A `.json` file (the `config.json` a
  training run writes) or a directory holding one is read back over the defaults (see
  `load_json`), which reproduces that run.
  """
  name_or_path = name_or_path or DEFAULT
  if os.path.isdir(name_or_path):
    record = os.path.join(name_or_path, RUN_RECORD)
    if not os.path.isfile(record):
      raise UserError(f"config directory {name_or_path} has no {RUN_RECORD}; give a workdir "
                      f"written by `transfer train`, a .py or .json file, or a config name")
    return load_json(record)
  if name_or_path.endswith(".json"):
    return load_json(name_or_path)
  path, _, arg = name_or_path.partition(":")
  if path.endswith(".py") or os.sep in path:
    if not os.path.exists(path):
      raise FileNotFoundError(f"config file {path} does not exist")
    module_spec = importlib.util.spec_from_file_location("_transfer_user_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
  else:
    if path not in shipped():
      raise UserError(f"unknown config {path!r}; shipped configs: {', '.join(shipped())} "
                       "(or give a path to a .py file)")
    module = importlib.import_module(f"transfer.configs.{path}")
  config = module.get_config(arg) if arg else module.get_config()
  return config


def load_json(path: str) -> ml_collections.ConfigDict:
  """Reads a config saved as JSON (`config.to_json_best_effort()`) back over the defaults.

  Starting from `default.get_config()` keeps every value's type (JSON has no tuples, and an
  override must still parse as an int where the default is one) and the nested `synthetic` and
  `lr_mults` dicts. A key the defaults do not have is an error, never silently dropped.

  Args:
    path: a `.json` file, e.g. a workdir's `config.json`.

  Returns:
    The config.

  Raises:
    FileNotFoundError: no such file.
    UserError: not JSON, not an object, an unknown key or a value of the wrong type.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config file {path} does not exist")
  with open(path) as f:
    try:
      data = json.load(f)
    except json.JSONDecodeError as e:
      raise UserError(f"config file {path} is not valid JSON ({e})") from None
  if not isinstance(data, dict):
    raise UserError(f"config file {path} holds a JSON {type(data).__name__}, not an object of "
                    f"config keys")
  from transfer.configs import default
  config = default.get_config()
  _merge_json(config, data, path, prefix="")
  return config


def _merge_json(node: ml_collections.ConfigDict, data: dict, path: str, prefix: str) -> None:
  """Sets `data`'s values on `node` in place, recursing into nested ConfigDicts."""
  import ml_collections
  for key, value in data.items():
    name = f"{prefix}{key}"
    if key not in node:
      raise UserError(f"config file {path}: unknown config key {name!r}; valid keys: "
                      f"{', '.join(sorted(node.keys()))}")
    current = node[key]
    if isinstance(current, ml_collections.ConfigDict) and isinstance(value, dict):
      if len(current):  # A fixed set of keys (synthetic): strict, key by key.
        _merge_json(current, value, path, prefix=f"{name}.")
        continue
      value = ml_collections.ConfigDict(value)  # A free-form map (lr_mults): taken whole.
    elif isinstance(current, (list, tuple)) and isinstance(value, list):
      value = type(current)(value)
    try:
      node[key] = value
    except TypeError:
      raise UserError(f"config file {path}: {name}={value!r} has the wrong type; expected "
                      f"{type(current).__name__} like the default {current!r}") from None


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Fills the keys a config lacks with their defaults, then checks every value; returns `config`.

  The one validation pass. `default.py` holds every key's default and `_schema.py` its allowed
  values, so a config built in Python with only some keys is completed here (in place), and code
  past this point reads `config.KEY` without a fallback. Free text such as `dataset` is checked
  where it is used.

  Args:
    config: a config as from `load` plus `apply_overrides`, or a partial one built in Python.

  Returns:
    `config`, with every key of the default config.

  Raises:
    UserError: one line naming the key, the bad value and what is allowed, e.g.
      `learning_rate=-0.001 is out of range: must be > 0`.
  """
  fill_defaults(config)
  _check_types(config)
  for key, choices in _schema.CHOICES.items():
    if config[key] not in choices:
      shown = ", ".join(c if c else "''" for c in choices)
      raise UserError(f"{key}={config[key]!r} is not valid: must be one of {shown}")
  for key, rule in _schema.RANGES.items():
    waiver = config[rule.waived_by] if rule.waived_by else None
    if isinstance(waiver, (int, float)) and waiver > 0:
      continue
    if not rule.allows(config[key]):
      raise UserError(f"{key}={config[key]!r} is out of range: must be {rule.describe()}")
  _schema.check_one_cycle(config)
  _schema.check_warmup(config)
  _schema.check_labels_from(config)
  _schema.check_model_options(config)
  _schema.check_stages(config, validate)
  return config


def fill_defaults(config, defaults=None) -> None:
  """Sets each key `config` lacks to its default from `default.py`, in place (nested: by key)."""
  import ml_collections
  if defaults is None:
    from transfer.configs import default
    defaults = default.get_config()
  for key, default_value in defaults.items():
    if key not in config:
      with config.unlocked() if hasattr(config, "unlocked") else contextlib.nullcontext():
        config[key] = default_value
    elif (isinstance(default_value, ml_collections.ConfigDict) and len(default_value)
          and hasattr(config[key], "items")):
      fill_defaults(config[key], default_value)


def _check_types(config, defaults=None, prefix: str = "") -> None:
  """Rejects a value whose type differs from its default's (e.g. `batch_size="32"` in a file)."""
  import ml_collections
  if defaults is None:
    from transfer.configs import default
    defaults = default.get_config()
  for key, default_value in defaults.items():
    if key not in config:
      continue
    value, name = config[key], f"{prefix}{key}"
    if isinstance(default_value, ml_collections.ConfigDict):
      if not hasattr(value, "items"):
        raise UserError(f"{name}={value!r} has the wrong type: expected a dict of keys")
      if len(default_value):
        _check_types(value, default_value, prefix=f"{name}.")
      continue
    expected = _type_name(default_value)
    if expected and _type_name(value) not in _ACCEPTS[expected]:
      raise UserError(f"{name}={value!r} has the wrong type: expected {expected} "
                      f"(like the default {default_value!r})")


# For each default's type, the value types that may stand in for it (an int is a fine float).
_ACCEPTS = {"bool": ("bool",), "int": ("int",), "float": ("float", "int"), "str": ("str",),
            "list": ("list", "tuple"), "tuple": ("list", "tuple")}


def _type_name(value) -> str | None:
  """`bool`, `int`, `float`, `str`, `list` or `tuple`; numpy scalars count as int or float."""
  import numpy as np
  if isinstance(value, (bool, np.bool_)):
    return "bool"
  if isinstance(value, numbers.Integral):
    return "int"
  if isinstance(value, numbers.Real):
    return "float"
  for t in (str, list, tuple):
    if isinstance(value, t):
      return t.__name__
  return None


def parse_value(text: str, current):
  """Parses `text` as a value of the same kind as `current` (the config's existing value)."""
  if isinstance(current, bool):
    lowered = text.lower()
    if lowered in ("true", "1", "yes"):
      return True
    if lowered in ("false", "0", "no"):
      return False
    raise ValueError(f"expected true/false, got {text!r}")
  if isinstance(current, str):
    return text
  if isinstance(current, int):
    return int(text)
  if isinstance(current, float):
    return float(text)
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    value = text
  if isinstance(current, (list, tuple)):
    if isinstance(value, str):
      value = [v for v in value.split(",") if v]
    return type(current)(value)
  return value


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict[str, str]):
  """Applies `{"a.b": "value"}` overrides in place; returns `config`.

  Raises:
    ValueError: for an unknown key (listing the valid ones) or a value of the wrong type.
  """
  for key, text in overrides.items():
    parent, _, leaf = key.rpartition(".")
    node = config
    for part in parent.split(".") if parent else []:
      if part not in node:
        raise UserError(_unknown_key(key, part, node))
      node = node[part]
    if leaf not in node:
      raise UserError(_unknown_key(key, leaf, node))
    current = node[leaf]
    try:
      value = parse_value(text, current) if current is not None else _parse_untyped(text)
    except ValueError as e:
      raise UserError(f"--config.{key}: {e}") from None
    with node.unlocked() if hasattr(node, "unlocked") else contextlib.nullcontext():
      node[leaf] = value
  return config


def _unknown_key(key: str, name: str, node) -> str:
  """One line for a key the config does not have: the likely meant key first, then them all."""
  import difflib
  close = difflib.get_close_matches(name, list(node.keys()), n=1)
  meant = f"did you mean {close[0]!r}? " if close else ""
  return f"unknown config key {key!r}; {meant}valid keys: {', '.join(sorted(node.keys()))}"


def _parse_untyped(text: str):
  """A value for a key whose default is None: a Python literal if it parses, else the string."""
  if text.lower() == "none":
    return None
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def split_overrides(argv: list[str]) -> tuple[list[str], dict[str, str]]:
  """Separates `--config.KEY=VALUE` (or `--config.KEY VALUE`) arguments from the rest."""
  rest, overrides, i = [], {}, 0
  while i < len(argv):
    arg = argv[i]
    if arg.startswith("--config."):
      key, eq, value = arg[len("--config."):].partition("=")
      if not eq:
        if i + 1 >= len(argv):
          raise UserError(f"{arg} needs a value: {arg}=VALUE")
        value, i = argv[i + 1], i + 1
      overrides[key] = value
    else:
      rest.append(arg)
    i += 1
  return rest, overrides


def describe_keys() -> list[str]:
  """One line per config key for `transfer train --help`: the key, its default (`default.py`),
  its allowed values (`_schema.py`) and the comment beside it in `default.py`, so the help
  lists what the two homes of the keys say, not a copy of them."""
  import re
  from transfer.configs import default
  comments = {}
  with open(default.__file__, encoding="utf-8") as f:
    for line in f:
      found = re.match(r"\s*c\.(\w+)\s*=.*?#\s*(.*)$", line)
      if found:
        comments[found.group(1)] = found.group(2).strip()
  lines = []
  for key, value in default.get_config().items():
    shown = dict(value) if hasattr(value, "items") else value
    comment = comments.get(key, "")
    choices = _schema.CHOICES.get(key, ())
    rule = (" | ".join(c or "''" for c in choices) if not all(c in comment for c in choices)
            else "" if choices
            else _schema.RANGES[key].describe() if key in _schema.RANGES else "")
    note = "; ".join(p for p in (rule, comment) if p)
    lines.append(f"{key}={shown!r}" + (f"  ({note})" if note else ""))
  return lines
