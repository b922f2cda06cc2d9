"""Orbax checkpoints: one layout for training runs, converted models and fine-tuning starts.

A checkpoint directory (a training workdir or the output of `scripts/convert_hf.py`) holds

  config.json                 the resolved switchjax Config
  checkpoints/<step>/params   the model parameters (Orbax, sharded arrays)
  checkpoints/<step>/opt_state  optimizer state (training runs only)
  checkpoints/<step>/meta     JSON: {"step": ..., "data": input-pipeline position, ...}

Orbax writes each step to a temporary directory and renames it when complete, so a run killed
while saving leaves the previous steps intact; `CheckpointStore.restore_latest` also steps back
over a newest checkpoint that fails to load, and says so.
"""

from __future__ import annotations

import functools
import logging
import pathlib
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from switchjax import config as config_lib
from switchjax import sharding

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
CHECKPOINTS = "checkpoints"


class IncompatibleCheckpointError(ValueError):
  """A checkpoint of another model or optimizer (not a broken one): never set aside."""


def _path_name(path) -> str:
  """'decoder.layers_0.mlp.wi' for a tree path (Orbax's naming of saved arrays)."""
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
  return ".".join(parts)


def _shapes_by_name(tree) -> dict[str, tuple]:
  return {_path_name(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def _first_difference(saved: dict, expected: dict) -> str | None:
  missing = sorted(set(expected) - set(saved))
  unexpected = sorted(set(saved) - set(expected))
  if missing or unexpected:
    return (
      f"arrays this config expects but the checkpoint lacks: {missing[:4]}; arrays the "
      f"checkpoint has but this config does not: {unexpected[:4]}"
    )
  for name in sorted(expected):
    if saved[name] != expected[name]:
      return f"{name} has shape {saved[name]} in the checkpoint but {expected[name]} here"
  return None


class CheckpointStore:
  """The checkpoints of one directory (asynchronous saves, keep the last K, resume).

  Attributes:
    directory: the workdir; checkpoints go to `directory/checkpoints`.
  """

  def __init__(self, directory, keep: int | None = None, async_save: bool = True):
    self.directory = pathlib.Path(directory).resolve()
    options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=True, enable_async_checkpointing=async_save
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

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(
    self, step: int, params, opt_state=None, meta: dict | None = None, force: bool = True
  ) -> None:
    """Starts saving (asynchronously); `wait()` blocks until it is on disk."""
    items = {
      "params": ocp.args.StandardSave(params),
      "meta": ocp.args.JsonSave({"step": int(step), **(meta or {})}),
    }
    if opt_state is not None:
      items["opt_state"] = ocp.args.StandardSave(opt_state)
    self.manager.save(int(step), args=ocp.args.Composite(**items), force=force)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
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

  def restore_latest(self, abstract_params, abstract_opt_state=None, report=print) -> dict | None:
    """The newest checkpoint that loads, stepping back over broken ones; None if the directory
    has no checkpoint. Broken steps are reported and moved to `checkpoints_broken/` (kept for
    inspection, out of the way of the steps this run will save again)."""
    broken = []
    try:
      for step in reversed(self.steps()):
        try:
          self.check_compatible(step, abstract_params, abstract_opt_state)
          return self.restore(step, abstract_params, abstract_opt_state)
        except IncompatibleCheckpointError:
          raise
        except Exception as e:  # noqa: BLE001  (any read failure: try the previous one)
          report(
            f"Checkpoint step {step} in {self.directory / CHECKPOINTS} could not be "
            f"restored ({type(e).__name__}: {str(e)[:200]}); trying the previous one."
          )
          broken.append(step)
      return None
    finally:
      for step in broken:
        self._set_aside(step, report)

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
      difference = _first_difference(_shapes_by_name(saved), _shapes_by_name(abstract))
      if difference:
        raise IncompatibleCheckpointError(
          f"{self.directory} holds checkpoints of another model or optimizer (step {step}, "
          f"{item}: {difference}). Use a new --workdir, or start a new run from these "
          f"parameters with --set train.init_from={self.directory}."
        )

  def _set_aside(self, step: int, report) -> None:
    if jax.process_index() == 0:
      target = self.directory / "checkpoints_broken" / f"{step}-{int(time.time())}"
      target.parent.mkdir(exist_ok=True)
      (self.directory / CHECKPOINTS / str(step)).rename(target)
      report(f"Moved the broken step {step} to {target}.")
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices(f"set aside broken checkpoint {step}")
    self.manager.reload()


# --------------------------------------------------------------------------------------------
# Model checkpoints (parameters plus config), for conversion, generation and fine-tuning.


def save_model(directory, config: config_lib.Config, params, step: int = 0) -> pathlib.Path:
  """Writes config.json and the parameters as checkpoint `step` (synchronously)."""
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  config_lib.save_config(config, directory / CONFIG_FILE)
  store = CheckpointStore(directory, async_save=False)
  store.save(step, params)
  store.close()
  return directory


def read_checkpoint_config(directory) -> config_lib.Config:
  """The Config saved in a checkpoint directory (its config.json), as it was saved.

  Unlike `switchjax.load_config`, which also takes presets and applies overrides, this reads
  exactly what a training run or a conversion wrote next to the parameters.
  """
  path = pathlib.Path(directory) / CONFIG_FILE
  if not path.exists():
    raise FileNotFoundError(
      f"{path} not found: {directory} is not a switchjax checkpoint "
      "directory (make one with scripts/convert_hf.py or pretrain.py)."
    )
  return config_lib.read_config(path)


def load_model(directory, step: int | None = None, shardings: Any = None):
  """(Config, params) of a checkpoint directory: the given or newest step, parameters only.

  Without `shardings` the parameters land on the default device; with a tree of shardings
  (matching the parameters) they are restored sharded.
  """
  from switchjax.model import SwitchTransformer, init_params  # local: model imports are heavy

  config = read_checkpoint_config(directory)
  store = CheckpointStore(directory, async_save=False)
  steps = store.steps()
  if not steps:
    raise FileNotFoundError(f"No checkpoint under {pathlib.Path(directory) / CHECKPOINTS}.")
  model = SwitchTransformer(config.model)
  shapes = sharding.unbox(jax.eval_shape(functools.partial(init_params, model), jax.random.key(0)))
  if shardings is None:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: device, shapes)
  abstract = sharding.abstract_tree(shapes, shardings)
  candidates = [step] if step is not None else list(reversed(steps))
  errors = []
  for s in candidates:
    try:
      restored = store.restore(s, abstract)
      store.close()
      return config, restored["params"]
    except Exception as e:  # noqa: BLE001
      errors.append(f"step {s}: {type(e).__name__}: {str(e)[:200]}")
  store.close()
  raise ValueError(f"Could not restore parameters from {directory}: " + "; ".join(errors))


def params_equal(a, b) -> bool:
  """True when two parameter trees have the same structure and identical values."""
  if jax.tree.structure(a) != jax.tree.structure(b):
    return False
  return all(
    np.array_equal(np.asarray(x), np.asarray(y))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
  )
