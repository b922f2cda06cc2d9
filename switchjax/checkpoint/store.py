"""CheckpointStore: a workdir's checkpoints (asynchronous saves, keep the last K, checksums,
resume over broken steps)."""

from __future__ import annotations

import json
import os
import pathlib
import re
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

from switchjax.checkpoint.compatibility import first_difference
from switchjax.checkpoint.layout import (
  CHECKPOINTS,
  CorruptCheckpointError,
  IncompatibleCheckpointError,
  WriteError,
)
from switchjax.checkpoint.manifest import verify_manifest, write_manifest
from switchjax.errors import one_line


def _everyone_agrees(ok: bool) -> bool:
  """True when `ok` holds on every process (process 0 checks; the others follow it)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils

  return bool(np.all(multihost_utils.process_allgather(np.array(ok))))


class CheckpointStore:
  """The checkpoints of one directory (asynchronous saves, keep the last K, checksums, resume).

  Attributes:
    directory: the workdir; checkpoints go to `directory/checkpoints`.
    last_complete: the newest step this store restored or saw finished (None: none yet), and
      `last_source`, how: 'restored' or 'saved'.
    broken: steps found broken by `restore_latest`, not yet set aside.
  """

  def __init__(self, directory, keep: int | None = None, async_save: bool = True, create=True):
    self.directory = pathlib.Path(directory).resolve()
    options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=create, enable_async_checkpointing=async_save
    )
    self.manager = ocp.CheckpointManager(
      self.directory / CHECKPOINTS,
      options=options,
      item_handlers={
        "params": ocp.StandardCheckpointHandler(),
        "opt_state": ocp.StandardCheckpointHandler(),
        "meta": ocp.JsonCheckpointHandler(),
      },
    )
    self.last_complete: int | None = None
    self.last_source = ""
    self.broken: list[int] = []
    self._pending: list[int] = []

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def step_dir(self, step: int) -> pathlib.Path:
    return self.directory / CHECKPOINTS / str(int(step))

  def training_steps(self) -> list[int]:
    """The steps that hold an optimizer state (a training run's), not parameters only."""
    return [s for s in self.steps() if "opt_state" in _saved_items(self.step_dir(s))]

  def describe_last(self) -> str:
    """'step 4, saved by this run' / 'step 2, which this run resumed from' / 'none yet'."""
    if self.last_complete is None:
      return "none yet"
    how = "saved by this run" if self.last_source == "saved" else "which this run resumed from"
    return f"step {self.last_complete}, {how}"

  def save(
    self, step: int, params, opt_state=None, meta: dict | None = None, force: bool = True
  ) -> None:
    """Starts saving (asynchronously); `wait()` blocks until it is on disk, checksummed. A save
    that fails raises WriteError (here or at the next save or wait)."""
    self._finish()
    items = {
      "params": ocp.args.StandardSave(params),
      "meta": ocp.args.JsonSave({"step": int(step), **(meta or {})}),
    }
    if opt_state is not None:
      items["opt_state"] = ocp.args.StandardSave(opt_state)
    self._pending.append(int(step))
    try:
      self.manager.save(int(step), args=ocp.args.Composite(**items), force=force)
    except Exception as e:  # noqa: BLE001  (any failure to write: one line, the fix)
      raise self._write_error(e) from None

  def _finish(self) -> None:
    """Waits for the saves in flight, then checksums them (process 0)."""
    try:
      self.manager.wait_until_finished()
      for step in self._pending:
        if self.step_dir(step).is_dir():
          if jax.process_index() == 0:
            write_manifest(self.step_dir(step))
          self.last_complete, self.last_source = step, "saved"
    except Exception as e:  # noqa: BLE001
      raise self._write_error(e) from None
    finally:
      self._pending = []

  def _write_error(self, error: Exception) -> WriteError:
    step = self._pending[-1] if self._pending else "?"
    self._pending = []
    return WriteError(
      f"Could not save checkpoint step {step} in {self.directory / CHECKPOINTS} "
      f"({_write_failure(error)}). The last complete checkpoint ({self.describe_last()}) is "
      "kept: free space on that disk (or make it writable) and run the same command to resume."
    )

  def wait(self) -> None:
    self._finish()

  def close(self) -> None:
    try:
      self._finish()
    finally:
      self.manager.close()

  def restore(self, step: int, abstract_params, abstract_opt_state=None) -> dict:
    """Restores one step onto the shardings of the abstract trees (any mesh or device count).

    `abstract_*` are trees of `jax.ShapeDtypeStruct` with `.sharding` (e.g. from
    `jax.eval_shape` plus the target shardings). Returns {'params', 'opt_state', 'meta'}.
    """
    items = {"params": ocp.args.StandardRestore(abstract_params), "meta": ocp.args.JsonRestore()}
    if abstract_opt_state is not None:
      items["opt_state"] = ocp.args.StandardRestore(abstract_opt_state)
    restored = self.manager.restore(int(step), args=ocp.args.Composite(**items))
    return {name: restored[name] for name in items}

  def verify(self, step: int) -> None:
    """Raises CorruptCheckpointError when the step's files differ from its checksums."""
    problem = verify_manifest(self.step_dir(step)) if jax.process_index() == 0 else None
    if not _everyone_agrees(problem is None):
      raise CorruptCheckpointError(problem or "its checksums do not match (see process 0)")

  def restore_latest(
    self, abstract_params, abstract_opt_state=None, report=print, set_aside: bool = True
  ) -> dict | None:
    """The newest checkpoint that verifies and loads, stepping back over broken ones; None if
    the directory has none. With an optimizer state, only training steps count (a converted
    model's parameters-only step is not one). Broken steps are reported and moved to
    `checkpoints_broken/` (kept for inspection, out of the way of the steps this run will save
    again), at once or, with set_aside=False, by `set_aside_broken()` once the run starts."""
    steps = self.steps() if abstract_opt_state is None else self.training_steps()
    try:
      for step in reversed(steps):
        try:
          # Checksums first: changed bytes in OCDBT's index would otherwise surface as a
          # DATA_LOSS error of the metadata read by check_compatible, not as what they are.
          self.verify(step)
          self.check_compatible(step, abstract_params, abstract_opt_state)
          restored = self.restore(step, abstract_params, abstract_opt_state)
          self.last_complete, self.last_source = step, "restored"
          return restored
        except IncompatibleCheckpointError:
          raise
        except Exception as e:  # noqa: BLE001  (any read failure: try the previous one)
          report(
            f"Checkpoint step {step} in {self.directory / CHECKPOINTS} could not be "
            f"restored ({type(e).__name__}: {one_line(e, 200)}); trying the previous one."
          )
          self.broken.append(step)
      return None
    finally:
      if set_aside:
        self.set_aside_broken(report)

  def check_compatible(self, step: int, abstract_params, abstract_opt_state=None) -> None:
    """Raises IncompatibleCheckpointError if `step` holds other arrays than expected (a run of
    another model or optimizer); other read failures propagate as they are."""
    metadata = self.manager.item_metadata(step)
    items = [("params", abstract_params)]
    if abstract_opt_state is not None:
      items.append(("opt_state", abstract_opt_state))
    for item, abstract in items:
      saved = metadata[item]
      if saved is None:
        raise FileNotFoundError(f"step {step} has no readable {item}")
      difference = first_difference(saved, abstract)
      if difference:
        raise IncompatibleCheckpointError(
          f"{self.directory} holds checkpoints of another model or optimizer (step {step}, "
          f"{item}: {difference}). Use a new --workdir, or start a new run from these "
          f"parameters with --set train.init_from={self.directory}."
        )

  def set_aside_broken(self, report=print) -> None:
    """Moves the broken steps found by restore_latest to `checkpoints_broken/` (process 0)."""
    broken, self.broken = self.broken, []
    for step in broken:
      self._set_aside(step, report)

  def _set_aside(self, step: int, report) -> None:
    if jax.process_index() == 0:
      target = self.directory / "checkpoints_broken" / f"{step}-{int(time.time())}"
      target.parent.mkdir(exist_ok=True)
      self.step_dir(step).rename(target)
      report(f"Moved the broken step {step} to {target}.")
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices(f"set aside broken checkpoint {step}")
    self.manager.reload()


def _write_failure(error: Exception) -> str:
  """The OS's reason when a write failed in tensorstore ('... File too large
  [os_error_code=27]' -> 'File too large, errno 27'), else the error in one line."""
  if isinstance(error, OSError) and error.errno:
    return f"{error.strerror}, errno {error.errno}"
  code = re.search(r"\[os_error_code='?(\d+)'?\]", str(error))
  if code:
    return f"{os.strerror(int(code.group(1)))}, errno {code.group(1)}"
  return one_line(error, 300)


def _saved_items(step_dir: pathlib.Path) -> set[str]:
  """The items Orbax recorded for a finished step (its _CHECKPOINT_METADATA); a step whose
  record cannot be read counts as a training step (its restore then reports the problem)."""
  try:
    return set(json.loads((step_dir / "_CHECKPOINT_METADATA").read_text())["item_handlers"])
  except (OSError, ValueError, KeyError, TypeError):
    return {"params", "opt_state"}
