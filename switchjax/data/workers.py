"""Local worker processes: an ordered map over the usable cores, for reading and tokenizing.

Reading a corpus (JSON, Parquet, the embedded corpus's `ast` parsing of the standard library)
is single-threaded Python; SentencePiece's batch encoding is not. `ordered_map` runs a function
over a list of items (the parts of a corpus) in `num_workers` worker processes and yields the
results in the items' order, so that what is made from them does not depend on the number of
workers.

The workers are spawned, not forked: a fork of a process that holds JAX's or SentencePiece's
threads may deadlock. A spawned interpreter imports what it runs; `worker_bootstrap.py`, run in
each worker first, keeps that to switchjax.data's readers and tokenizer (not the package's
`__init__`, which imports the routers and JAX: about a second per worker on an idle machine).

Interruption (Ctrl-C, SIGTERM, an error in the consumer) terminates the workers at once.
A worker's ValueError (a reader's one-line message naming the file and the fix) is raised in
the caller as it is, without multiprocessing's remote traceback; a worker that dies (killed,
out of memory) is a one-line ValueError.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import multiprocessing
import os
import pathlib
import runpy
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from switchjax.errors import one_line

log = logging.getLogger(__name__)

# Worker processes: None for one per usable core; tests set it (2 forces a pool, 1 none).
LOCAL_WORKERS: int | None = None
# The workers' initializer: runpy.run_path(*_BOOTSTRAP_ARGS) (a stdlib function: unpickling it
# imports nothing of switchjax).
_BOOTSTRAP_ARGS = (
  str(pathlib.Path(__file__).with_name("worker_bootstrap.py")),
  None,
  "switchjax-data-worker",
)
_IN_WORKER = False  # set in the workers: their own maps run in-process (no nested pools)


def usable_cores() -> int:
  """The cores this process may run on (its CPU affinity, e.g. under taskset or a cgroup)."""
  if hasattr(os, "sched_getaffinity"):
    return max(1, len(os.sched_getaffinity(0)))
  return os.cpu_count() or 1


def num_workers(num_items: int, requested: int | None = None) -> int:
  """Workers for `num_items` items: `requested`, else LOCAL_WORKERS, else the usable cores;
  never more than the items, and 1 (no pool) inside a worker."""
  if _IN_WORKER:
    return 1
  wanted = requested or LOCAL_WORKERS or usable_cores()
  return max(1, min(wanted, num_items))


def threads_per_worker(workers: int) -> int:
  """SentencePiece threads of each of `workers` workers: the usable cores shared out."""
  return max(1, usable_cores() // max(1, workers))


def ordered_map(fn: Callable, items: Sequence, workers: int) -> Iterator[Any]:
  """fn(item) for each item, in order: in this process when `workers` <= 1 or there is one
  item, else in `workers` spawned processes (fn and the items must pickle). At most 2 x workers
  items are in flight (submitted, not yet yielded), so few results wait in memory. Close the
  iterator (contextlib.closing) to stop the workers when not consuming it to the end.
  """
  if workers <= 1 or len(items) <= 1 or _IN_WORKER:
    yield from map(fn, items)
    return
  context = multiprocessing.get_context("spawn")
  try:
    pool = concurrent.futures.ProcessPoolExecutor(
      workers, mp_context=context, initializer=runpy.run_path, initargs=_BOOTSTRAP_ARGS
    )
  except (OSError, NotImplementedError) as e:  # no POSIX semaphores here (some sandboxes)
    log.warning("No worker processes (%s): reading in this process.", one_line(e, 120))
    yield from map(fn, items)
    return
  try:
    pending: collections.deque = collections.deque()
    todo = iter(items)
    for item in todo:
      pending.append(pool.submit(fn, item))
      if len(pending) >= 2 * workers:
        break
    while pending:
      result = _result(pending.popleft())
      for item in todo:  # one more item in flight for the one taken
        pending.append(pool.submit(fn, item))
        break
      yield result
  except BaseException:  # an error, Ctrl-C / SIGTERM, or the consumer closing the iterator
    _terminate(pool)
    raise
  pool.shutdown(wait=True)


def _result(future: concurrent.futures.Future) -> Any:
  """The future's result; a worker's ValueError as raised there, a dead worker as a ValueError."""
  try:
    return future.result()
  except BrokenProcessPool as e:
    raise ValueError(
      f"a local data worker process stopped unexpectedly ({one_line(e, 160)}); see its error "
      "above (a script must keep its code under `if __name__ == '__main__':` for worker "
      "processes), or run again."
    ) from None
  except ValueError as e:  # one line, naming the file: without the worker's traceback
    raise e.with_traceback(None) from None


def _terminate(pool: concurrent.futures.ProcessPoolExecutor) -> None:
  """Stops the workers now: running items are killed (SIGTERM), queued ones dropped. The pool's
  own thread then sees them dead and reaps them (joined here by shutdown: a second thread
  reaping the same processes could miss their exit codes)."""
  for process in list((getattr(pool, "_processes", None) or {}).values()):
    process.terminate()
  pool.shutdown(wait=True, cancel_futures=True)
