"""Orbax checkpoints: one layout for training runs, converted models and fine-tuning starts.

A checkpoint directory (a training workdir or the output of `scripts/convert_hf.py`) holds

  config.json                 the resolved switchjax Config
  checkpoints/<step>/params   the model parameters (Orbax, sharded arrays)
  checkpoints/<step>/opt_state  optimizer state (training runs only)
  checkpoints/<step>/meta     JSON: {"step": ..., "data": input-pipeline position, ...}

Orbax writes each step to a temporary directory and renames it when complete, so a run killed
while saving leaves the previous steps intact; `CheckpointStore.restore_latest` also steps back
over a newest checkpoint that fails to load, and says so.

Models bigger than memory: `save_model` writes `LazyArray` leaves one block at a time (an Orbax
type handler of its own, storing what Orbax's NumpyHandler stores), `lazy_params` reads a
checkpoint's arrays on demand (`StoredArray`), and `load_model` restores one parameter at a time,
each device reading only its own slices.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import dataclasses
import functools
import json
import logging
import pathlib
import shutil
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts

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
# Streaming: arrays written one block at a time, so that a model bigger than memory converts.


# Bytes of blocks being read and written at once by `save_model`: small arrays are written
# together (so that the writes share commits), big ones a block at a time.
WRITE_BUDGET = 8 << 20


@functools.cache
def _glibc():
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
  except OSError:  # not glibc
    return None


def release_freed_memory() -> None:
  """Returns freed heap memory to the OS (glibc's malloc_trim; a no-op elsewhere). glibc keeps
  what each thread frees in that thread's arena, so without this the resident memory of a
  streaming conversion grows with the number of blocks written, not with one block."""
  if libc := _glibc():
    libc.malloc_trim(0)


def release_memory_eagerly(threshold: int = 256 << 10) -> None:
  """Makes glibc serve allocations of `threshold` bytes or more from their own mappings,
  returned to the OS when freed (mallopt M_MMAP_THRESHOLD, which also stops glibc from raising
  the threshold as big blocks are freed). For processes that stream a model through memory
  (scripts/convert_hf.py, scripts/generate.py): freed tensors then leave no holes in the heap,
  and resident memory stays at what is live, at the cost of a page fault per big allocation."""
  if libc := _glibc():
    libc.mallopt(-3, threshold)  # M_MMAP_THRESHOLD


class LazyArray:
  """An array read on demand, in blocks along one axis, and never whole unless asked.

  `save_model` writes it block by block (a block is read, written, committed and released,
  with at most WRITE_BUDGET bytes of blocks in flight), stored exactly as a numpy array would
  be, one zarr chunk per block.

  Attributes:
    shape, dtype: of the whole array.
    read: read(start, stop) -> the array's [start:stop] along `axis`, of `dtype`.
    axis: the axis the blocks split.
    block: the length of a block along `axis` (the last may be shorter).
    source: the directory it is read from, if any (converters never write there).
  """

  def __init__(
    self,
    shape,
    dtype,
    read: Callable,
    axis: int = 0,
    block: int | None = None,
    source: pathlib.Path | None = None,
  ):
    self.shape, self.dtype = tuple(shape), np.dtype(dtype)
    self.read, self.axis, self.source = read, axis, source
    self.block = max(1, min(block or self.length, self.length))

  @classmethod
  def of(cls, array) -> LazyArray:
    """A host-addressable array as one block, read (for a jax.Array: copied to the host)
    only when it is written."""
    return cls(array.shape, array.dtype, lambda start, stop: np.asarray(array))

  def __repr__(self) -> str:
    return f"LazyArray({self.shape}, {self.dtype}, blocks of {self.block} along axis {self.axis})"

  @property
  def length(self) -> int:
    return self.shape[self.axis] if self.shape else 1

  @property
  def nbytes(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

  @property
  def block_shape(self) -> tuple[int, ...]:
    shape = list(self.shape)
    if shape:
      shape[self.axis] = self.block
    return tuple(shape)

  def block_ranges(self) -> list[tuple[int, int]]:
    return [(i, min(i + self.block, self.length)) for i in range(0, self.length, self.block)]

  def index(self, start: int, stop: int) -> tuple:
    """The index of the block [start:stop) in the whole array."""
    return (slice(None),) * self.axis + (slice(start, stop),) if self.shape else ()

  def read_block(self, start: int, stop: int) -> np.ndarray:
    """The block [start:stop) along `axis`, checked."""
    block = np.asarray(self.read(start, stop), self.dtype)
    expected = self.shape[: self.axis] + (stop - start,) + self.shape[self.axis + 1 :]
    if self.shape and block.shape != expected:
      raise ValueError(f"a block of shape {block.shape} where {expected} was expected")
    return block.reshape(self.shape) if not self.shape else block

  def __array__(self, dtype=None, copy=None) -> np.ndarray:
    if len(self.block_ranges()) == 1:
      out = np.ascontiguousarray(self.read_block(0, self.length))
    else:
      out = np.empty(self.shape, self.dtype)
      for start, stop in self.block_ranges():
        out[self.index(start, stop)] = self.read_block(start, stop)
    return out if dtype is None else out.astype(dtype)


class _ByteBudget:
  """At most `limit` bytes held at once (a request for more than the limit takes it all)."""

  def __init__(self, limit: int):
    self.limit, self.free = limit, limit
    self.changed = asyncio.Condition()

  @contextlib.asynccontextmanager
  async def hold(self, nbytes: int):
    nbytes = min(nbytes, self.limit)
    async with self.changed:
      await self.changed.wait_for(lambda: self.free >= nbytes)
      self.free -= nbytes
    try:
      yield
    finally:
      async with self.changed:
        self.free += nbytes
        self.changed.notify_all()


class _LazyArrayHandler(ocp.type_handlers.NumpyHandler):
  """Writes LazyArrays block by block: a block is read just before its write and released
  once committed, with at most WRITE_BUDGET bytes of blocks in flight. The stored array is what
  Orbax's NumpyHandler writes for a numpy array of the same shape and dtype (typestr
  'np.ndarray', zarr chunks of one block), so every restore path reads it as usual."""

  async def serialize(self, values, infos, args=None):
    args = args or [ocp.type_handlers.SaveArgs()] * len(values)
    ocp.type_handlers.check_input_arguments(values, infos, args)
    return [
      ocp.future.CommitFutureAwaitingContractedSignals(
        self._write_all(values, infos, args), name="lazy_array_handler"
      )
    ]

  async def _write_all(self, values, infos, args) -> None:
    budget = _ByteBudget(WRITE_BUDGET)
    await asyncio.gather(*(self._write(v, i, a, budget) for v, i, a in zip(values, infos, args)))

  async def _write(self, value: LazyArray, info, arg, budget: _ByteBudget) -> None:
    await info.await_path_creation()
    spec = ocp.type_handlers.get_json_tspec_write(
      info,
      use_ocdbt=info.is_ocdbt_checkpoint,
      global_shape=value.shape,
      local_shape=value.block_shape,
      dtype=value.dtype,
      process_index=jax.process_index() if info.is_ocdbt_checkpoint else None,
      arg=arg,
    )
    if jax.process_index() != 0:
      return
    store = await ts.open(ts.Spec(spec), create=True, open=True, context=info.ts_context)
    row_bytes = value.nbytes // max(value.length, 1)
    for start, stop in value.block_ranges():
      async with budget.hold((stop - start) * row_bytes):
        await store[value.index(start, stop)].write(value.read_block(start, stop))
      release_freed_memory()


class _StreamingHandler(ocp.PyTreeCheckpointHandler):
  """PyTreeCheckpointHandler that also saves LazyArray leaves. It writes the layout of
  StandardCheckpointHandler (which StandardCheckpointHandler wraps), and `save_model` records the
  step as written by that: an ordinary checkpoint, restored like any other."""

  def __init__(self):
    registry = ocp.type_handlers.create_type_handler_registry(
      *[(ty, ocp.type_handlers.get_type_handler(ty)) for ty in ocp.type_handlers.supported_types()],
      (LazyArray, _LazyArrayHandler()),
    )
    super().__init__(type_handler_registry=registry)


@ocp.args.register_with_handler(_StreamingHandler, for_save=True)
@dataclasses.dataclass
class _StreamingSave(ocp.args.PyTreeSave):
  """Save arguments of _StreamingHandler (Orbax finds a handler by the class of its args)."""


@ocp.args.register_with_handler(_StreamingHandler, for_restore=True)
@dataclasses.dataclass
class _StreamingRestore(ocp.args.PyTreeRestore):
  """Restore arguments of _StreamingHandler (Orbax wants both registered)."""


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


# --------------------------------------------------------------------------------------------
# Model checkpoints (parameters plus config), for conversion, generation and fine-tuning.


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
    item_handlers={"params": _StreamingHandler(), "meta": ocp.JsonCheckpointHandler()},
  )
  manager.save(
    int(step),
    args=ocp.args.Composite(
      params=_StreamingSave(params), meta=ocp.args.JsonSave({"step": int(step)})
    ),
  )
  manager.wait_until_finished()
  manager.close()
  if jax.process_index() == 0:
    _record_standard_handler(directory / CHECKPOINTS / str(int(step)))
  return directory


def _record_standard_handler(step_dir: pathlib.Path) -> None:
  """Records the params item as StandardCheckpointHandler's (whose layout _StreamingHandler
  writes), so that Orbax restores it without switchjax's handler, like any checkpoint."""
  path = step_dir / "_CHECKPOINT_METADATA"
  metadata = json.loads(path.read_text())
  metadata["item_handlers"]["params"] = ocp.StandardCheckpointHandler.typestr()
  path.with_suffix(".tmp").write_text(json.dumps(metadata))
  path.with_suffix(".tmp").replace(path)


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


def _abstract_params(model):
  """The boxed parameter shapes of `model`. The key is made inside the trace: a concrete key
  would run (and compile) a first XLA computation, which costs ~50 MB before any restore."""
  from switchjax.model import init_params

  return jax.eval_shape(lambda: init_params(model, jax.random.key(0)))


def load_model(directory, step: int | None = None, shardings: Any = None, dtype=None):
  """(Config, params) of a checkpoint directory: the given or newest step, parameters only.

  Parameters are restored one at a time, each device's slice read from the checkpoint and
  placed on that device (`jax.make_array_from_callback`): without `shardings` on the default
  device; with a tree of shardings (e.g. from `sharding.param_shardings` on a mesh) each
  process reads only its own devices' slices, so no host ever holds a copy of the model.
  `dtype` ('float32', 'bfloat16') casts every parameter while reading (and sets
  model.param_dtype); None keeps the config's (a converted checkpoint's is its stored dtype).
  A newest step that fails to load is reported in the error of the step tried after it.
  """
  from switchjax.model import SwitchTransformer  # local: model imports are heavy

  config = read_checkpoint_config(directory)
  if dtype is not None:
    model = dataclasses.replace(config.model, param_dtype=jax.numpy.dtype(dtype).name)
    config = dataclasses.replace(config, model=model).validate()
  steps = CheckpointStore(directory, async_save=False).steps()
  if not steps:
    raise FileNotFoundError(f"No checkpoint under {pathlib.Path(directory) / CHECKPOINTS}.")
  model = SwitchTransformer(config.model)
  shapes = sharding.unbox(_abstract_params(model))
  if shardings is None:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: device, shapes)
  abstract = sharding.abstract_tree(shapes, shardings)
  errors = []
  for s in [step] if step is not None else list(reversed(steps)):
    try:
      return config, _place(lazy_params(directory, s)[1], abstract, directory)
    except IncompatibleCheckpointError:
      raise
    except Exception as e:  # noqa: BLE001  (any read failure: try the previous step)
      errors.append(f"step {s}: {type(e).__name__}: {str(e)[:200]}")
  raise ValueError(f"Could not restore parameters from {directory}: " + "; ".join(errors))


def _place(stored, abstract, directory) -> Any:
  """Stored arrays onto the shapes, dtypes and shardings of `abstract`, one at a time."""
  difference = _first_difference(_shapes_by_name(stored), _shapes_by_name(abstract))
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
  from switchjax.model import SwitchTransformer  # local: model imports are heavy

  config = read_checkpoint_config(directory)
  mesh = sharding.make_mesh(mesh_config, config.model.moe.num_experts)
  model = SwitchTransformer(config.model)
  boxed = _abstract_params(model)
  config, params = load_model(directory, step, sharding.param_shardings(mesh, boxed), dtype)
  return config, params, mesh


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


def lazy_params(directory, step: int | None = None) -> tuple[config_lib.Config, Any]:
  """(Config, params) of a checkpoint directory (the given or newest step) whose leaves are
  StoredArrays of the stored shapes and dtypes, read when used: converting (`hf.to_hf`) or
  copying (`save_model`) them holds a stored chunk (one expert) at a time, never the model."""
  config = read_checkpoint_config(directory)
  store = CheckpointStore(directory, async_save=False)
  steps = store.steps()
  if not steps:
    raise FileNotFoundError(f"No checkpoint under {pathlib.Path(directory) / CHECKPOINTS}.")
  step = steps[-1] if step is None else int(step)
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


def params_equal(a, b) -> bool:
  """True when two parameter trees have the same structure and identical values."""
  if jax.tree.structure(a) != jax.tree.structure(b):
    return False
  return all(
    np.array_equal(np.asarray(x), np.asarray(y))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
  )
