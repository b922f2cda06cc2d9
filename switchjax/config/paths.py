"""Dotted field names of a config (`model.moe.num_experts`): every overridable name, the value
at a name, and the defaults an unset optional sub-config (model.decoder_moe) derives."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any


def optional_dataclass(annotation) -> type | None:
  """The dataclass D of an `Optional[D]` annotation, else None."""
  args = [a for a in typing.get_args(annotation) if a is not type(None)]
  return args[0] if len(args) == 1 and dataclasses.is_dataclass(args[0]) else None


def derived_default(obj, name: str):
  """The value an unset (None) dataclass field takes when one of its fields is overridden:
  `obj.default_<name>()` if the class defines it (e.g. ModelConfig.default_decoder_moe), else
  the field class's defaults."""
  maker = getattr(obj, f"default_{name}", None)
  return maker() if maker else optional_dataclass(typing.get_type_hints(type(obj))[name])()


def all_paths(obj, prefix="") -> list[str]:
  """Every overridable dotted name; unset optional sub-configs list theirs too."""
  out = []
  hints = typing.get_type_hints(type(obj))
  for f in dataclasses.fields(obj):
    value = getattr(obj, f.name)
    path = f"{prefix}{f.name}"
    if value is None and optional_dataclass(hints[f.name]):
      out.append(path)  # may be set back to none
      value = derived_default(obj, f.name)
    if dataclasses.is_dataclass(value):
      out += all_paths(value, path + ".")
    else:
      out.append(path)
  return out


def get_path(obj, path):
  """The value at a dotted path, through the derived defaults of unset sub-configs."""
  parts = path.split(".")
  for i, part in enumerate(parts):
    parent, obj = obj, getattr(obj, part)
    if obj is None and i < len(parts) - 1:
      obj = derived_default(parent, part)
  return obj


def flatten(config) -> dict[str, Any]:
  """{dotted path: value} of every leaf field; an unset optional sub-config (model.decoder_moe)
  gives the values it derives, so two configs that behave alike flatten alike."""
  paths = all_paths(config)
  leaves = [
    p for i, p in enumerate(paths) if not paths[i + 1 :] or not paths[i + 1].startswith(p + ".")
  ]
  return {p: get_path(config, p) for p in leaves}


def format_config(config, prefix="") -> str:
  """One `path = value` line per field, for printing the resolved config; an unset optional
  sub-config shows the values it derives."""
  paths = all_paths(config, prefix)
  lines = []
  for i, p in enumerate(paths):
    derived = i + 1 < len(paths) and paths[i + 1].startswith(p + ".")
    lines.append(
      f"{p} = {get_path(config, p)!r}" + ("  (derived: the values below)" if derived else "")
    )
  return "\n".join(lines)
