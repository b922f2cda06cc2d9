"""Dotted overrides (`--set a.b=value`): values parsed and type checked against the dataclass
annotations; an unknown name is an error naming the nearest valid ones."""

from __future__ import annotations

import ast
import dataclasses
import difflib
import types
import typing
from typing import Any

from switchjax.config.paths import all_paths, derived_default


def _derives(config, key: str) -> bool:
  """Does `key` go through an unset sub-config whose default derives from other fields?"""
  obj = config
  for part in key.split(".")[:-1]:
    value = getattr(obj, part, None)
    if value is None and hasattr(obj, f"default_{part}"):
      return True
    obj = value
  return False


def _parse_value(text: str, annotation, field: str):
  """Parses `text` as a value of type `annotation`; errors name the field and the type."""
  origin = typing.get_origin(annotation)
  args = typing.get_args(annotation)
  lowered = text.strip()
  if origin in (typing.Union, types.UnionType):
    if type(None) in args and lowered.lower() in ("none", "null", ""):
      return None
    inner = [a for a in args if a is not type(None)]
    return _parse_value(text, inner[0], field)
  if annotation is bool:
    if lowered.lower() in ("true", "1", "yes"):
      return True
    if lowered.lower() in ("false", "0", "no"):
      return False
    raise ValueError(f"--set {field}={text}: expected a bool (true or false).")
  if annotation in (int, float):
    try:
      value = ast.literal_eval(lowered)
    except (ValueError, SyntaxError):
      value = None
    if (
      isinstance(value, bool)
      or not isinstance(value, (int, float))
      or (annotation is int and not float(value).is_integer())
    ):
      raise ValueError(f"--set {field}={text}: expected {annotation.__name__}.")
    return annotation(value)
  if annotation is str:
    return lowered
  if origin is tuple:
    if lowered.startswith(("(", "[")):
      try:
        items = list(ast.literal_eval(lowered))
      except (ValueError, SyntaxError) as e:
        raise ValueError(f"--set {field}={text}: cannot parse as a tuple ({e}).") from None
      items = [str(x) if args[0] is str else x for x in items]
      items = [_parse_value(str(x), args[0], field) for x in items]
    else:
      items = [_parse_value(x, args[0], field) for x in lowered.split(",") if x.strip()]
    return tuple(items)
  raise ValueError(f"--set {field}: fields of type {annotation} cannot be set from text.")


def apply_overrides(config, overrides) -> Any:
  """Returns `config` with each `a.b.c=value` applied (type checked).

  Overrides of an unset sub-config whose default derives from other fields (e.g.
  model.decoder_moe.* from model.moe) are applied last, so the order of --set flags does not
  matter.
  """
  items = []
  for item in overrides:
    if "=" not in item:
      raise ValueError(
        f"--set {item!r}: expected the form field.path=value, e.g. train.batch_size=32."
      )
    items.append(tuple(s.strip() for s in item.split("=", 1)))
  items.sort(key=lambda kv: _derives(config, kv[0]))  # stable: derived ones last
  for key, text in items:
    valid = all_paths(config)
    if key not in valid:
      raise ValueError(f"Unknown config field {key!r}.{_suggest(key, valid)}")
    config = _set_path(config, key.split("."), text, key)
  return config


def _suggest(key: str, valid: list[str]) -> str:
  """' Nearest valid names: ...' for an unknown dotted name (by full path, then last part)."""
  close = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
  if not close:
    last = key.rsplit(".", 1)[-1]
    by_last = {p.rsplit(".", 1)[-1]: p for p in valid}
    close = [by_last[m] for m in difflib.get_close_matches(last, list(by_last), n=3)]
  return f" Nearest valid names: {', '.join(close)}." if close else ""


def _set_path(obj, parts, text, full):
  name = parts[0]
  current = getattr(obj, name)
  if current is None and len(parts) > 1:
    current = derived_default(obj, name)
  if len(parts) == 1:
    value = _parse_value(text, typing.get_type_hints(type(obj))[name], full)
  else:
    value = _set_path(current, parts[1:], text, full)
  return dataclasses.replace(obj, **{name: value})
