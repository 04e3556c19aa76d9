"""Config files (`get_config()` returning an `ml_collections.ConfigDict`) and overrides.

A config is named by a file path or by the name of a shipped config (`quickstart`,
`cats_vs_dogs`, ...). `--config.KEY=VALUE` overrides are parsed against the type of the existing
value; an unknown key is an error that lists the valid ones, never silently ignored.
"""

from __future__ import annotations

from transfer.errors import UserError

import ast
import importlib
import importlib.util
import os

import ml_collections

DEFAULT = "quickstart"


def shipped() -> list[str]:
  """Names of the config files shipped with the package."""
  here = os.path.dirname(__file__)
  return sorted(f[:-3] for f in os.listdir(here) if f.endswith(".py") and not f.startswith("_"))


def load(name_or_path: str | None = None) -> ml_collections.ConfigDict:
  """Loads `get_config()` from a shipped config name or a `.py` file path.

  A path may carry one argument after a colon (`configs/x.py:arg`), passed to `get_config(arg)`,
  as with `ml_collections.config_flags`.
  """
  name_or_path = name_or_path or DEFAULT
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
        raise UserError(f"unknown config key {key!r}; valid keys: {', '.join(sorted(node.keys()))}")
      node = node[part]
    if leaf not in node:
      raise UserError(f"unknown config key {key!r}; valid keys: {', '.join(sorted(node.keys()))}")
    current = node[leaf]
    try:
      value = parse_value(text, current) if current is not None else _parse_untyped(text)
    except ValueError as e:
      raise UserError(f"--config.{key}: {e}") from None
    with node.unlocked() if hasattr(node, "unlocked") else _nullcontext():
      node[leaf] = value
  return config


def _parse_untyped(text: str):
  """A value for a key whose default is None: a Python literal if it parses, else the string."""
  if text.lower() == "none":
    return None
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


class _nullcontext:
  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return False


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
