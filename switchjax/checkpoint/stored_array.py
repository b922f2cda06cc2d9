"""StoredArray and lazy_params: a checkpoint's parameters read when used, a slice or a stored
chunk at a time."""

from __future__ import annotations

import functools
import json
import pathlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts

from switchjax import config as config_lib
from switchjax.checkpoint.layout import CHECKPOINTS, CorruptCheckpointError, read_checkpoint_config
from switchjax.checkpoint.lazy_array import LazyArray
from switchjax.checkpoint.store import CheckpointStore


class StoredArray(LazyArray):
  """An array of an Orbax checkpoint, read when used: `x[index]` reads one slice (what a
  device holds), the blocks of a LazyArray are the stored chunks along the first axis (one
  expert for a converted model). Read with the spec Orbax's NumpyHandler reads with."""

  def __init__(self, meta, spec: ts.Spec, context, source: pathlib.Path):
    chunk = meta.storage.chunk_shape if meta.storage else None
    block = chunk[0] if chunk and meta.shape else None
    super().__init__(meta.shape, meta.dtype, self._rows, block=block, source=source)
    self._spec, self._context = spec, context

  @functools.cached_property
  def _store(self):
    return ts.open(self._spec, open=True, context=self._context).result()

  def __getitem__(self, index) -> np.ndarray:
    return np.asarray(self._store[index].read().result(), self.dtype)

  def _rows(self, start: int, stop: int) -> np.ndarray:
    return self[start:stop] if self.shape else self[()]


def lazy_params(
  directory, step: int | None = None, verify: bool = True
) -> tuple[config_lib.Config, Any]:
  """(Config, params) of a checkpoint directory (the given or newest step) whose leaves are
  StoredArrays of the stored shapes and dtypes, read when used: converting (`hf.to_hf`) or
  copying (`save_model`) them holds a stored chunk (one expert) at a time, never the model.

  The step's files are checked against its checksums first (`verify`; load_model, which has
  checked them already, skips it): a corrupt step is a CorruptCheckpointError, never passed
  on."""
  config = read_checkpoint_config(directory)
  store = CheckpointStore(directory, async_save=False, create=False)
  steps = store.steps()
  if not steps:
    raise FileNotFoundError(f"No checkpoint under {pathlib.Path(directory) / CHECKPOINTS}.")
  step = steps[-1] if step is None else int(step)
  if verify:
    _verify(store, step, steps)
  metadata = store.manager.item_metadata(step)["params"]
  store.close()
  metadata = getattr(metadata, "tree", metadata)  # the plain tree of ArrayMetadata
  if metadata is None:
    raise FileNotFoundError(f"Step {step} of {directory} has no readable parameters.")
  params_dir = store.directory / CHECKPOINTS / str(step) / "params"
  layout = json.loads((params_dir / "_METADATA").read_text())
  use_ocdbt = bool(layout.get("use_ocdbt", True))
  context = ocp.type_handlers.get_ts_context(use_ocdbt=use_ocdbt)

  def leaf(meta) -> StoredArray:
    info = ocp.type_handlers.ParamInfo(
      name=meta.name,
      parent_dir=params_dir,
      is_ocdbt_checkpoint=use_ocdbt,
      use_zarr3=bool(layout.get("use_zarr3", False)),
      ts_context=context,
    )
    spec = ts.Spec(ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=use_ocdbt))
    return StoredArray(meta, spec, context, pathlib.Path(directory))

  return config, jax.tree.map(leaf, metadata)


def _verify(store: CheckpointStore, step: int, steps: list[int]) -> None:
  """Refuses a step whose bytes changed since it was saved, naming it and the fix."""
  try:
    store.verify(step)
  except CorruptCheckpointError as e:
    store.close()
    older = [s for s in steps if s < step]
    fix = (
      f"resuming its run steps back to step {older[-1]} and sets step {step} aside, "
      "or restore the directory from a copy"
      if older
      else "restore the directory from a copy (or convert or train it again)"
    )
    raise CorruptCheckpointError(
      f"checkpoint step {step} of {store.directory} is corrupt ({e}): its parameters are not "
      f"read. {fix[0].upper()}{fix[1:]}."
    ) from None
