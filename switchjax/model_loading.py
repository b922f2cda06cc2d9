"""load_model: a checkpoint's parameters restored one at a time onto devices or a mesh, each
device reading only its own slices, in either layer layout.

The checkpoint package reads and writes arrays without knowing the model; this module builds
the model's abstract parameters to restore them onto (their shapes, dtypes and shardings)."""

from __future__ import annotations

import dataclasses
import logging
import pathlib
from typing import Any

import jax
import numpy as np

from switchjax import scan, sharding
from switchjax.checkpoint.compatibility import first_difference
from switchjax.checkpoint.layout import (
  CHECKPOINTS,
  IncompatibleCheckpointError,
  read_checkpoint_config,
)
from switchjax.checkpoint.memory import release_freed_memory
from switchjax.checkpoint.store import CheckpointStore
from switchjax.checkpoint.stored_array import StoredArray, lazy_params
from switchjax.errors import one_line
from switchjax.model import SwitchTransformer, abstract_params

log = logging.getLogger(__name__)


def load_model(
  directory, step: int | None = None, shardings: Any = None, dtype=None, scan_layers=None
):
  """(Config, params) of a checkpoint directory: the given or newest step, parameters only.

  Parameters are restored one at a time, each device's slice read from the checkpoint and
  placed on that device (`jax.make_array_from_callback`): without `shardings` on the default
  device; with a tree of shardings (e.g. from `sharding.param_shardings` on a mesh) each
  process reads only its own devices' slices, so no host ever holds a copy of the model.
  `dtype` ('float32', 'bfloat16') casts every parameter while reading (and sets
  model.param_dtype); None keeps the config's (a converted checkpoint's is its stored dtype).
  Each step's files are checked against its checksums first; a newest step that is corrupt
  or fails to load is reported in the error of the step tried after it.
  `scan_layers` (True/False; None keeps the checkpoint's) restores into the other layer layout
  (model.scan_layers): the stored layout is restored, restacked on the host
  (`scan.stack_layers` / `unstack_layers`: the host holds the model once) and placed on
  `shardings`.
  """
  config = read_checkpoint_config(directory)
  if scan_layers is not None and bool(scan_layers) != config.model.scan_layers:
    return _load_relayout(directory, step, shardings, dtype, bool(scan_layers))
  if dtype is not None:
    model = dataclasses.replace(config.model, param_dtype=jax.numpy.dtype(dtype).name)
    config = dataclasses.replace(config, model=model).validate()
  store = CheckpointStore(directory, async_save=False, create=False)
  steps = store.steps()
  if not steps:
    raise FileNotFoundError(f"No checkpoint under {pathlib.Path(directory) / CHECKPOINTS}.")
  model = SwitchTransformer(config.model)
  shapes = sharding.unbox(abstract_params(model))
  if shardings is None:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: device, shapes)
  abstract = sharding.abstract_tree(shapes, shardings)
  errors = []
  for s in [step] if step is not None else list(reversed(steps)):
    try:
      store.verify(s)
      params = _place(lazy_params(directory, s, verify=False)[1], abstract, directory)
    except IncompatibleCheckpointError:
      raise
    except Exception as e:  # noqa: BLE001  (any read failure: try the previous step)
      errors.append(f"step {s}: {type(e).__name__}: {one_line(e, 200)}")
      continue
    if errors:
      log.warning("Restored step %d of %s; newer steps failed: %s", s, directory, "; ".join(errors))
    return config, params
  raise ValueError(f"Could not restore parameters from {directory}: " + "; ".join(errors))


def _load_relayout(directory, step, shardings, dtype, scan_layers: bool):
  """`load_model` into the other layer layout: restore, restack, place."""
  config, params = load_model(directory, step, None, dtype)
  model = dataclasses.replace(config.model, scan_layers=scan_layers)
  config = dataclasses.replace(config, model=model).validate()
  convert = scan.stack_layers if scan_layers else scan.unstack_layers
  params = convert(jax.device_get(params), model)  # on the host: no device or mesh involved
  if shardings is None:
    shardings = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return config, jax.device_put(params, shardings)


def _place(stored, abstract, directory) -> Any:
  """Stored arrays onto the shapes, dtypes and shardings of `abstract`, one at a time."""
  difference = first_difference(stored, abstract)
  if difference:
    raise IncompatibleCheckpointError(
      f"{directory} holds parameters of another model ({difference})."
    )

  def place(array: StoredArray, target: jax.ShapeDtypeStruct) -> jax.Array:
    read = lambda index: np.asarray(array[index], target.dtype)  # noqa: E731
    placed = jax.make_array_from_callback(target.shape, target.sharding, read)
    release_freed_memory()
    return placed

  return jax.tree.map(place, stored, abstract)


def load_model_on_mesh(directory, mesh_config, step: int | None = None, dtype=None):
  """(Config, params, mesh): the parameters restored onto the mesh that `mesh_config` (e.g.
  MeshConfig(expert=8)) makes of all devices (of every process), sharded by the logical-axis
  rules: each process reads only its devices' slices and places them there. Run the model
  under `jax.set_mesh(mesh)` and `sharding.axis_rules()`."""
  config = read_checkpoint_config(directory)
  mesh = sharding.make_mesh(mesh_config, config.model.moe.num_experts)
  model = SwitchTransformer(config.model)
  boxed = abstract_params(model)
  config, params = load_model(directory, step, sharding.param_shardings(mesh, boxed), dtype)
  return config, params, mesh
