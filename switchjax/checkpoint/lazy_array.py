"""LazyArray: an array read on demand, one block at a time."""

from __future__ import annotations

import pathlib
from collections.abc import Callable

import numpy as np


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
