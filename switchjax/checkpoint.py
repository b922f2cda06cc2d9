"""Orbax checkpoints: one layout for training runs, converted models and fine-tuning starts.

A checkpoint directory (a training workdir or the output of `scripts/convert_hf.py`) holds

  config.json                 the resolved switchjax Config
  checkpoints/<step>/params   the model parameters (Orbax, sharded arrays)
  checkpoints/<step>/opt_state  optimizer state (training runs only)
  checkpoints/<step>/meta     JSON: {"step": ..., "data": input-pipeline position, ...}

  checkpoints/<step>/checksums.json  size and sha256 of each file of the step (MANIFEST)

Orbax writes each step to a temporary directory and renames it when complete, so a run killed
while saving leaves the previous steps intact. Once Orbax has finished a step, its files are
checksummed; `CheckpointStore.restore_latest` verifies them and steps back over a newest
checkpoint whose bytes changed or that fails to load, and says so. A directory written by
`save_model` (a converted model) holds parameters only: a read-only input of new runs, never
resumed as a training run.

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
import hashlib
import json
import logging
import os
import pathlib
import re
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
from switchjax.errors import one_line

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
CHECKPOINTS = "checkpoints"
MANIFEST = "checksums.json"


class IncompatibleCheckpointError(ValueError):
  """A checkpoint of another model or optimizer (not a broken one): never set aside."""


class CorruptCheckpointError(ValueError):
  """A step whose files differ from the checksums recorded when it was saved."""


class WriteError(RuntimeError):
  """A run's directory could not be written (full disk, permissions); what was complete is
  kept."""


# --------------------------------------------------------------------------------------------
# Checksums: written once Orbax has finished a step, verified before it is restored.


def _sha256(path: pathlib.Path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    while block := f.read(1 << 20):
      digest.update(block)
  return digest.hexdigest()


def write_manifest(step_dir) -> None:
  """Records the size and sha256 of every file of a finished step in its MANIFEST (written to a
  temporary name and renamed, so a manifest is whole or absent)."""
  step_dir = pathlib.Path(step_dir)
  files = {
    str(p.relative_to(step_dir)): [p.stat().st_size, _sha256(p)]
    for p in sorted(step_dir.rglob("*"))
    if p.is_file() and p.name != MANIFEST
  }
  tmp = step_dir / f".{MANIFEST}.tmp"
  tmp.write_text(json.dumps({"algorithm": "sha256", "files": files}, indent=0) + "\n")
  tmp.replace(step_dir / MANIFEST)


def verify_manifest(step_dir) -> str | None:
  """What differs between a step's files and its MANIFEST, or None when they match. A step
  without a manifest (saved before checksums existed, or by a run killed between Orbax's commit
  and the manifest) is taken as it is."""
  step_dir = pathlib.Path(step_dir)
  path = step_dir / MANIFEST
  if not path.is_file():
    return None
  try:
    files = json.loads(path.read_text())["files"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    return f"its {MANIFEST} is unreadable ({one_line(e, 100)})"
  for name, (size, digest) in files.items():
    file = step_dir / name
    if not file.is_file():
      return f"{name} is missing"
    if file.stat().st_size != size:
      return f"{name} has {file.stat().st_size} bytes, {size} when saved"
    if _sha256(file) != digest:
      return f"the bytes of {name} changed since it was saved (sha256 mismatch)"
  return None


def _everyone_agrees(ok: bool) -> bool:
  """True when `ok` holds on every process (process 0 checks; the others follow it)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils

  return bool(np.all(multihost_utils.process_allgather(np.array(ok))))


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
      difference = _first_difference(_shapes_by_name(saved), _shapes_by_name(abstract))
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
    write_manifest(directory / CHECKPOINTS / str(int(step)))
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
  from switchjax.model import SwitchTransformer  # local: model imports are heavy

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
  shapes = sharding.unbox(_abstract_params(model))
  if shardings is None:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: device, shapes)
  abstract = sharding.abstract_tree(shapes, shardings)
  errors = []
  for s in [step] if step is not None else list(reversed(steps)):
    try:
      store.verify(s)
      params = _place(lazy_params(directory, s)[1], abstract, directory)
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
  from switchjax import scan  # local: scan imports the model

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
  store = CheckpointStore(directory, async_save=False, create=False)
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
