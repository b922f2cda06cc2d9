"""Prefetching: the training iterator's batches made ahead of the step in a background thread.

Reading the tokens of a batch's chunks (from a memory map or shared storage), span corruption
and batching run in a thread while the step runs on the devices (NumPy and file reads release
the GIL for much of their work). The batches and the saved position are those of the wrapped
iterator: `get_state()` is the position after the last batch *taken*, not after the last one
made, so a checkpoint resumes exactly where the run's steps stopped.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any


class Prefetcher:
  """Wraps a TrainIterator: `next()` returns its next batch, made up to `depth` batches ahead.

  An error of the iterator is raised by the `next()` that would have returned that batch.
  `input_rate()` is the examples per second the iterator makes when it is busy (rows of this
  host over the time spent making them), to compare with what the step consumes.
  """

  def __init__(self, inner, depth: int = 2):
    self.inner, self.depth = inner, max(1, depth)
    self._state = inner.get_state()
    self._thread: threading.Thread | None = None
    self._stats = {"rows": 0, "seconds": 0.0}

  def __getattr__(self, name: str) -> Any:
    return getattr(self.inner, name)  # global_batch_size, process_index, chunk_index, ...

  def __iter__(self) -> Prefetcher:
    return self

  def __next__(self) -> dict:
    if self._thread is None:
      self._start()
    item = self._queue.get()
    if isinstance(item, BaseException):
      self.close()
      raise item
    batch, self._state = item
    return batch

  def get_state(self) -> dict[str, Any]:
    return dict(self._state)

  def set_state(self, state: dict[str, Any]) -> None:
    self.close()
    self.inner.set_state(state)
    self._state = self.inner.get_state()

  def input_rate(self) -> float | None:
    """Examples per busy second of the iterator since the last call (None before a batch)."""
    rows, seconds = self._stats["rows"], self._stats["seconds"]
    self._stats["rows"], self._stats["seconds"] = 0, 0.0
    return rows / seconds if seconds > 0 else None

  def _start(self) -> None:
    self._queue: queue.Queue = queue.Queue(self.depth)
    self._stop = threading.Event()
    args = (self.inner, self._queue, self._stop, self._stats)
    self._thread = threading.Thread(target=_produce, args=args, daemon=True, name="prefetch")
    self._thread.start()

  def close(self) -> None:
    """Stops the thread; the batches made ahead are dropped (the inner iterator is rewound to
    the position of the last batch taken)."""
    if self._thread is None:
      return
    self._stop.set()
    while self._thread.is_alive():
      try:
        self._queue.get(timeout=0.05)
      except queue.Empty:
        pass
    self._thread = None
    self.inner.set_state(self._state)

  def __del__(self):
    stop = getattr(self, "_stop", None)
    if stop is not None:
      stop.set()


def _produce(inner, out: queue.Queue, stop: threading.Event, stats: dict) -> None:
  """The thread: batches (with the position after each) into `out` until `stop`."""
  while not stop.is_set():
    start = time.perf_counter()
    try:
      batch = next(inner)
      item = (batch, inner.get_state())
    except BaseException as e:  # noqa: BLE001  (raised in the consumer's thread)
      item = e
    if not isinstance(item, BaseException):
      stats["seconds"] += time.perf_counter() - start
      stats["rows"] += len(next(iter(batch.values())))
    while not stop.is_set():
      try:
        out.put(item, timeout=0.1)
        break
      except queue.Full:
        continue
    if isinstance(item, BaseException):
      return
