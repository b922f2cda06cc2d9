"""The resolved config as JSON: saved in the workdir and next to converted checkpoints."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import typing

from switchjax.config.paths import optional_dataclass
from switchjax.config.schema import Config


def to_dict(config) -> dict:
  return dataclasses.asdict(config)


def from_dict(cls, data: dict):
  """Builds dataclass `cls` from a (JSON) dict, converting lists back to tuples."""
  hints = typing.get_type_hints(cls)
  kwargs = {}
  for f in dataclasses.fields(cls):
    if f.name not in data:
      continue
    value, ann = data[f.name], hints[f.name]
    ann = optional_dataclass(ann) if value is not None and optional_dataclass(ann) else ann
    if dataclasses.is_dataclass(ann):
      value = from_dict(ann, value)
    elif isinstance(value, list):
      value = tuple(value)
    kwargs[f.name] = value
  unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
  if unknown:
    raise ValueError(f"Unknown {cls.__name__} fields in saved config: {sorted(unknown)}.")
  return cls(**kwargs)


def save_config(config: Config, path: str | os.PathLike) -> None:
  pathlib.Path(path).write_text(json.dumps(to_dict(config), indent=2) + "\n")


def read_config(path: str | os.PathLike) -> Config:
  return from_dict(Config, json.loads(pathlib.Path(path).read_text()))
