"""save_model: a model's config.json and parameters as a checkpoint, written leaf by leaf (a
LazyArray block by block) so that saving needs no copy of the model."""

from __future__ import annotations

import json
import pathlib

import jax
import orbax.checkpoint as ocp

from switchjax import config as config_lib
from switchjax.checkpoint.layout import CHECKPOINTS, CONFIG_FILE
from switchjax.checkpoint.lazy_array import LazyArray
from switchjax.checkpoint.manifest import write_manifest
from switchjax.checkpoint.streaming import StreamingHandler, StreamingSave


def _lazy_host_array(x) -> LazyArray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    raise ValueError(
      "save_model writes host-addressable parameters; a multi-host run saves its sharded "
      "parameters with CheckpointStore.save."
    )
  return LazyArray.of(x)


def save_model(directory, config: config_lib.Config, params, step: int = 0) -> pathlib.Path:
  """Writes config.json and the parameters as checkpoint `step` (synchronously).

  Leaves may be numpy or jax arrays or LazyArrays; numpy arrays and LazyArrays are written
  one at a time (LazyArrays one block at a time), so that saving needs no copy of the model.
  """
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  config_lib.save_config(config, directory / CONFIG_FILE)
  params = jax.tree.map(lambda x: x if isinstance(x, LazyArray) else _lazy_host_array(x), params)
  manager = ocp.CheckpointManager(
    directory.resolve() / CHECKPOINTS,
    options=ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False),
    item_handlers={"params": StreamingHandler(), "meta": ocp.JsonCheckpointHandler()},
  )
  manager.save(
    int(step),
    args=ocp.args.Composite(
      params=StreamingSave(params), meta=ocp.args.JsonSave({"step": int(step)})
    ),
  )
  manager.wait_until_finished()
  manager.close()
  if jax.process_index() == 0:
    _record_standard_handler(directory / CHECKPOINTS / str(int(step)))
    write_manifest(directory / CHECKPOINTS / str(int(step)))
  return directory


def _record_standard_handler(step_dir: pathlib.Path) -> None:
  """Records the params item as StandardCheckpointHandler's (whose layout StreamingHandler
  writes), so that Orbax restores it without switchjax's handler, like any checkpoint."""
  path = step_dir / "_CHECKPOINT_METADATA"
  metadata = json.loads(path.read_text())
  metadata["item_handlers"]["params"] = ocp.StandardCheckpointHandler.typestr()
  path.with_suffix(".tmp").write_text(json.dumps(metadata))
  path.with_suffix(".tmp").replace(path)
