"""Streaming writes: an Orbax handler that writes LazyArray leaves one block at a time, with at
most WRITE_BUDGET bytes of blocks in flight, so that a model bigger than memory converts."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses

import jax
import orbax.checkpoint as ocp
import tensorstore as ts

from switchjax.checkpoint.lazy_array import LazyArray
from switchjax.checkpoint.memory import release_freed_memory

# Bytes of blocks being read and written at once by `save_model`: small arrays are written
# together (so that the writes share commits), big ones a block at a time.
WRITE_BUDGET = 8 << 20


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


class StreamingHandler(ocp.PyTreeCheckpointHandler):
  """PyTreeCheckpointHandler that also saves LazyArray leaves. It writes the layout of
  StandardCheckpointHandler (which StandardCheckpointHandler wraps), and `save_model` records the
  step as written by that: an ordinary checkpoint, restored like any other."""

  def __init__(self):
    registry = ocp.type_handlers.create_type_handler_registry(
      *[(ty, ocp.type_handlers.get_type_handler(ty)) for ty in ocp.type_handlers.supported_types()],
      (LazyArray, _LazyArrayHandler()),
    )
    super().__init__(type_handler_registry=registry)


@ocp.args.register_with_handler(StreamingHandler, for_save=True)
@dataclasses.dataclass
class StreamingSave(ocp.args.PyTreeSave):
  """Save arguments of StreamingHandler (Orbax finds a handler by the class of its args)."""


@ocp.args.register_with_handler(StreamingHandler, for_restore=True)
@dataclasses.dataclass
class StreamingRestore(ocp.args.PyTreeRestore):
  """Restore arguments of StreamingHandler (Orbax wants both registered)."""
