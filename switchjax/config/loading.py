"""Loading a config by name or path: a preset (configs/NAME.py, installed as
`switchjax.configs`), a .py file with get_config(), a saved config.json or a checkpoint
directory; every problem is a one-line ValueError naming the file and the fix."""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import numbers
import os
import pathlib
import pkgutil
import sys
import types
import typing

from switchjax.config.overrides import apply_overrides
from switchjax.config.schema import Config
from switchjax.config.serialization import read_config
from switchjax.errors import one_line

PRESETS_PACKAGE = "switchjax.configs"  # The top-level configs/ directory, installed by setup.py.


def _presets() -> types.ModuleType:
  """The package of the presets, `switchjax.configs`.

  setup.py installs the top-level configs/ directory as this package (a wheel copies it; an
  editable install maps it to configs/). A source tree on sys.path without an install of its
  own (PYTHONPATH=repo, or an editable install made before configs/ was a package) has no such
  package: then configs/ next to the switchjax directory is imported under that name.
  """
  try:
    return importlib.import_module(PRESETS_PACKAGE)
  except ModuleNotFoundError as e:
    if e.name != PRESETS_PACKAGE:
      raise
  source = pathlib.Path(__file__).resolve().parents[2] / "configs" / "__init__.py"
  if not source.is_file():
    raise ValueError(
      f"the presets package {PRESETS_PACKAGE} is not installed; reinstall switchjax "
      "(pip install . in its source tree), or pass a .py file with get_config()."
    )
  spec = importlib.util.spec_from_file_location(
    PRESETS_PACKAGE, source, submodule_search_locations=[str(source.parent)]
  )
  module = importlib.util.module_from_spec(spec)
  sys.modules[PRESETS_PACKAGE] = module
  spec.loader.exec_module(module)
  sys.modules["switchjax"].configs = module  # As the import system does for a subpackage.
  return module


def available_configs() -> list[str]:
  """Names of the presets (the files of configs/, installed as switchjax.configs)."""
  return sorted(
    m.name
    for m in pkgutil.iter_modules(_presets().__path__)
    if not m.ispkg and not m.name.startswith("_")
  )


def load_config(name_or_path: str, overrides: tuple[str, ...] | list[str] = ()) -> Config:
  """Loads a config, then applies `a.b=value` overrides and validates the result.

  `name_or_path` is a preset name (configs/NAME.py), a .py file with get_config(), a saved
  config.json, or a checkpoint directory (a converted model or a training workdir): its
  config, with train.init_from set to the directory so a new run starts from its parameters
  (and data.spm_path, unless set, to its spiece.model). Every problem is a one-line ValueError
  naming the file or setting and the fix.
  """
  path = pathlib.Path(name_or_path)
  if path.is_dir() and (path / "config.json").is_file():
    config = _checkpoint_config(path)
  elif path.suffix == ".json" and path.is_file():
    config = _read_json_config(path)
  elif path.suffix == ".py":
    if not path.is_file():
      raise ValueError(f"config file {str(path)!r} does not exist; check the --config path.")
    config = _config_from_file(path)
  elif str(name_or_path) in available_configs():
    config = _config_from_preset(str(name_or_path))
  else:
    names = available_configs()
    close = difflib.get_close_matches(str(name_or_path), names, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ValueError(
      f"Unknown config {name_or_path!r}.{hint} Available: {', '.join(names)} "
      "(or a .py file with get_config(), a config.json, or a checkpoint "
      "directory)."
    )
  return apply_overrides(config, overrides).validate()


def _checkpoint_config(path: pathlib.Path) -> Config:
  """The config of a checkpoint directory, made to start a new run from it: train.init_from is
  the directory, always (a run that itself started from another checkpoint names that one in its
  config.json: its own trained parameters are the ones to start from), and data.spm_path its
  spiece.model when it has one (the tokenizer its parameters were trained with travels with
  them; the saved path may name a file changed since)."""
  config = _read_json_config(path / "config.json")
  train = dataclasses.replace(config.train, init_from=os.path.abspath(path))
  data = config.data
  if (path / "spiece.model").is_file():
    data = dataclasses.replace(data, spm_path=str((path / "spiece.model").resolve()))
  return dataclasses.replace(config, train=train, data=data)


def _read_json_config(path: pathlib.Path) -> Config:
  """A saved config.json; a file that is not one is a ValueError naming it."""
  try:
    return read_config(path)
  except (ValueError, TypeError, KeyError, AttributeError, UnicodeDecodeError) as e:
    raise ValueError(
      f"{path} is not a switchjax config.json ({one_line(e)}); give a config.json written by "
      "switchjax (pretrain.py or convert_hf.py), a preset name or a .py file."
    ) from None


def _config_from_file(path: pathlib.Path) -> Config:
  """get_config() of a Python file (imported under a private module name)."""
  spec = importlib.util.spec_from_file_location(f"switchjax_config_{path.stem}", path)
  return _config_from_module(path, lambda: _exec_module(spec))


def _config_from_preset(name: str) -> Config:
  """get_config() of configs/NAME.py (the module switchjax.configs.NAME)."""
  module_name = f"{PRESETS_PACKAGE}.{name}"
  spec = importlib.util.find_spec(module_name)
  where = pathlib.Path(spec.origin) if spec and spec.origin else pathlib.Path(f"configs/{name}.py")
  return _config_from_module(where, lambda: importlib.import_module(module_name))


def _exec_module(spec) -> types.ModuleType:
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _config_from_module(path: pathlib.Path, load) -> Config:
  """Runs `load()` (which imports the config file at `path`) and its get_config().

  Whatever goes wrong (a syntax error, a failed import, get_config raising or returning
  something else than a Config with fields of the declared types) becomes one ValueError that
  names the file and the problem.
  """
  try:
    module = load()
  except SyntaxError as e:
    where = "" if e.filename and pathlib.Path(e.filename) == path else f" in {e.filename}"
    raise ValueError(
      f"{path}: syntax error{where} at line {e.lineno}: {e.msg}; fix the file."
    ) from None
  except ImportError as e:
    raise ValueError(
      f"{path}: an import failed ({one_line(e)}); fix the import or install what it needs."
    ) from None
  except Exception as e:  # noqa: BLE001  (any error of the user's file: report it in one line)
    raise ValueError(
      f"{path}: running the file raised {type(e).__name__}: {one_line(e)}; fix the file."
    ) from None
  get_config = getattr(module, "get_config", None)
  if not callable(get_config):
    raise ValueError(f"{path} has no get_config() function returning a switchjax Config.")
  try:
    config = get_config()
  except Exception as e:  # noqa: BLE001
    raise ValueError(
      f"{path}: get_config() raised {type(e).__name__}: {one_line(e)}; fix the file."
    ) from None
  if not isinstance(config, Config):
    kind = f"{type(config).__module__}.{type(config).__qualname__}"
    raise ValueError(
      f"{path}: get_config() returned a {kind}, not a switchjax.config.Config; return a "
      "Config (see configs/small.py)."
    )
  problem = _type_problem(config)
  if problem:
    raise ValueError(f"{path}: get_config() returned a Config whose {problem}; fix the file.")
  return config


def _type_problem(obj, prefix: str = "") -> str | None:
  """'model.d_model='big' is a str, expected int' for the first field of the wrong type."""
  hints = typing.get_type_hints(type(obj))
  for f in dataclasses.fields(obj):
    value, annotation, name = getattr(obj, f.name), hints[f.name], prefix + f.name
    if dataclasses.is_dataclass(annotation):
      if not isinstance(value, annotation):
        return f"{name} is a {type(value).__name__}, expected a {annotation.__name__}"
      problem = _type_problem(value, name + ".")
      if problem:
        return problem
    elif not _has_type(value, annotation):
      return f"{name}={value!r} is a {type(value).__name__}, expected {_type_name(annotation)}"
  return None


def _has_type(value, annotation) -> bool:
  origin, args = typing.get_origin(annotation), typing.get_args(annotation)
  if origin in (typing.Union, types.UnionType):
    return any(_has_type(value, a) for a in args)
  if annotation is type(None):
    return value is None
  if annotation is bool:
    return isinstance(value, bool)
  if annotation is int:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
  if annotation is float:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
  if origin is tuple:
    return isinstance(value, (tuple, list)) and all(_has_type(v, args[0]) for v in value)
  return isinstance(value, annotation) if isinstance(annotation, type) else True


def _type_name(annotation) -> str:
  if typing.get_origin(annotation) in (typing.Union, types.UnionType):
    return " or ".join(_type_name(a) for a in typing.get_args(annotation))
  if typing.get_origin(annotation) is tuple:
    return f"a tuple of {_type_name(typing.get_args(annotation)[0])}"
  return "None" if annotation is type(None) else getattr(annotation, "__name__", str(annotation))
