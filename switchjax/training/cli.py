"""What the training scripts (pretrain.py, finetune.py) share: the run flags and one way to
run a command, with one-line errors and the exit statuses of the README (0 done, 1 an error,
130 stopped by SIGTERM / Ctrl-C).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

from switchjax import checkpoint, sharding
from switchjax.training.hooks import NonFiniteLossError, StartupInterrupted


def add_run_flags(parser: argparse.ArgumentParser, workdir_default: str) -> None:
  """--workdir, --set, the multi-host flags, --no_progress and the resume options."""
  parser.add_argument(
    "--workdir", default=None, help=f"checkpoints, logs and config (default: {workdir_default})"
  )
  parser.add_argument(
    "--set",
    action="append",
    default=[],
    metavar="FIELD=VALUE",
    help="override a config field, e.g. --set train.batch_size=64 (repeatable)",
  )
  parser.add_argument("--coordinator_address", default=None, help="host:port of process 0")
  parser.add_argument("--num_processes", type=int, default=None)
  parser.add_argument("--process_id", type=int, default=None)
  parser.add_argument("--no_progress", action="store_true", help="log lines, no progress bar")
  parser.add_argument(
    "--restart_data",
    action="store_true",
    help="resume the model and optimizer but start the data from its first example (to resume "
    "with settings that change the data order, e.g. data.paths)",
  )
  parser.add_argument(
    "--allow_converted_workdir",
    action="store_true",
    help="train in a directory holding a converted model, starting from its parameters "
    "(otherwise it is a read-only input: --config=DIR --workdir=NEW)",
  )


def train_options(args) -> dict:
  """The keyword arguments of training.train that the run flags set."""
  return {
    "progress": not args.no_progress,
    "restart_data": args.restart_data,
    "allow_converted_workdir": args.allow_converted_workdir,
  }


def run_command(args, start: Callable[[], tuple], report: Callable[[str, object], None]) -> int:
  """Initialises multi-host JAX, calls `start() -> (workdir, RunResult)` and `report(workdir,
  result)`; returns the exit status, every expected error printed as one line."""
  try:
    return _run(args, start, report)
  except KeyboardInterrupt:  # a second Ctrl-C, or one before training starts its handlers
    print("\nInterrupted.", file=sys.stderr)
    return 130


def _run(args, start, report) -> int:
  _one_line_background_errors()
  try:
    sharding.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
    workdir, result = start()
  except StartupInterrupted as e:
    print(f"\n{e}", file=sys.stderr)
    return 130
  except checkpoint.WriteError as e:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    _exit_now(1)
  except (ValueError, OSError, NonFiniteLossError) as e:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    return 1
  report(workdir, result)
  return 130 if result.stopped_by else 0


def _one_line_background_errors() -> None:
  """A failed background save (a full disk) is raised to the loop, which reports it in one line
  (checkpoint.WriteError, the error's text included). Dropped: Orbax's own error logs of it
  (each with a traceback), and the tracebacks of its writes still in flight, which complete
  into its closed event loop ('RuntimeError: Event loop is closed', reported by tensorstore
  as unraisable)."""

  def keep(record: logging.LogRecord) -> bool:
    return not ("orbax" in record.pathname and record.levelno >= logging.ERROR)

  logging.getLogger("absl").addFilter(keep)
  previous = sys.unraisablehook

  def hook(unraisable):
    if not (unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == _CLOSED):
      previous(unraisable)

  sys.unraisablehook = hook


_CLOSED = "Event loop is closed"


def _exit_now(status: int) -> None:
  """Exits without waiting for the writes still in flight in Orbax's threads after a failed
  save: each would print a traceback into its closed event loop."""
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(status)
