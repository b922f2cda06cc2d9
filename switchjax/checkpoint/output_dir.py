"""The output directory of a conversion: never its input, never a non-empty one unless asked."""

from __future__ import annotations

import pathlib
import shutil


def check_output_dir(out, sources=(), overwrite: bool = False, flag: str = "output") -> None:
  """Refuses (ValueError naming the directory and the fix) to write a conversion into `out`
  when it is, holds or lies inside one of `sources`, or when it is not empty (unless
  `overwrite`); checked before anything is read or written."""
  out = pathlib.Path(out)
  target = out.resolve()
  for source in sources:
    source = pathlib.Path(source).resolve()
    if target == source or source in target.parents or target in source.parents:
      raise ValueError(
        f"{out} would overlap the input {source}: a conversion never writes into its input; "
        f"choose a {flag} outside it."
      )
  if out.exists() and not out.is_dir():
    raise ValueError(f"{out} is a file, not a directory: choose another {flag}.")
  if not overwrite and out.is_dir() and any(out.iterdir()):
    raise ValueError(
      f"{out} is not empty: choose a new or empty {flag}, or pass --overwrite "
      "(overwrite=True) to replace the files a conversion writes there."
    )


def clear_output_dir(out, patterns) -> None:
  """Removes the files and directories of `out` that match `patterns` (a previous
  conversion's outputs, when overwriting); everything else stays."""
  out = pathlib.Path(out)
  for pattern in patterns:
    for path in out.glob(pattern) if out.is_dir() else ():
      if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
      else:
        path.unlink()
