"""The output directory of a conversion: never its input, never a non-empty one unless asked,
never a directory a run is writing (its workdir lock), never a training run's checkpoints."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
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
  if out.is_dir():
    _refuse_training_run(out, flag)
    with claim_output_dir(out, flag):  # a run holding the lock: refused now, before any work
      pass


def _refuse_training_run(out: pathlib.Path, flag: str) -> None:
  """A training run's workdir (a step with an optimizer state) is never a conversion's output:
  --overwrite replaces a previous conversion's files, not a run's checkpoints."""
  for meta in sorted(out.glob("checkpoints/*/_CHECKPOINT_METADATA")):
    try:
      items = json.loads(meta.read_text())["item_handlers"]
    except (OSError, ValueError, KeyError, TypeError):
      items = {"opt_state"}
    if "opt_state" in items:
      raise ValueError(
        f"{out} holds a training run (checkpoint step {meta.parent.name} with an optimizer "
        f"state): a conversion never replaces a run's checkpoints, --overwrite or not; "
        f"choose another {flag}."
      )


@contextlib.contextmanager
def claim_output_dir(out, flag: str = "output"):
  """Holds the workdir lock of `out` (an exclusive flock on the directory, the one a training
  run holds for its lifetime) while a conversion writes there; a directory a run is using is
  refused (ValueError naming the process). A directory that does not exist yet is not locked."""
  out = pathlib.Path(out)
  if not out.is_dir():
    yield
    return
  fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise ValueError(
        f"{out} is in use by a running run{lock_holder(out)}: its files are never replaced "
        f"while it writes them. Wait for it to finish (or stop it), or choose another {flag}."
      ) from None
    yield
  finally:
    os.close(fd)


def lock_holder(path) -> str:
  """' (process 1234)' when /proc/locks names the holder of the directory's lock."""
  try:
    st = os.stat(path)
    device = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in pathlib.Path("/proc/locks").read_text().splitlines():
      fields = line.split()
      if "FLOCK" in fields and device in fields:
        return f" (process {fields[fields.index(device) - 1]})"
  except (OSError, ValueError, IndexError):
    pass
  return ""


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
