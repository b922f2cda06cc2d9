"""Pretrain a Switch Transformer with T5 span corruption.

  python scripts/pretrain.py --config=small                  # quick start on a CPU
  python scripts/pretrain.py --config=base8 --workdir=runs/base8 --set mesh.expert=8
  python scripts/pretrain.py --config=base8 --set data.paths='corpus/*.jsonl' \
      --set train.batch_size=64

The run resumes from the newest checkpoint in --workdir (the resume rules are in the README:
settings that would change the model or its tokenizer are refused, a changed data order needs
--restart_data). Multi-host: every process runs the same command; pass
--coordinator_address/--num_processes/--process_id, or nothing on TPU pods and clusters whose
environment JAX reads. Expected errors print one line and exit with status 1; SIGTERM or Ctrl-C
stops with status 130 (at once during start-up, after saving a checkpoint once training).
"""

import argparse
import logging
import os
import sys


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument(
    "--config",
    default="small",
    help="a preset in configs/ (small, tiny, base8, ..., c2048) or a .py file",
  )
  parser.add_argument(
    "--workdir", default=None, help="checkpoints, logs and config (default: runs/<config name>)"
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
  args = parser.parse_args(argv)
  try:
    return run(args)
  except KeyboardInterrupt:  # a second Ctrl-C, or one before training starts its handlers
    print("\nInterrupted.", file=sys.stderr)
    return 130


def run(args) -> int:
  from switchjax import checkpoint, sharding
  from switchjax.training import NonFiniteLossError, StartupInterrupted, train

  _one_line_background_errors()
  try:
    sharding.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
    from switchjax.config import load_config

    config = load_config(args.config, args.set)
    workdir = args.workdir or f"runs/{config.name}"
    result = train(
      config,
      workdir,
      progress=not args.no_progress,
      restart_data=args.restart_data,
      allow_converted_workdir=args.allow_converted_workdir,
    )
  except StartupInterrupted as e:
    print(f"\n{e}", file=sys.stderr)
    return 130
  except checkpoint.WriteError as e:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    _exit_now(1)
  except (ValueError, OSError, NonFiniteLossError) as e:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    return 1
  if result.losses:
    first, last = min(result.losses), max(result.losses)
    print(
      f"Trained to step {result.step} in {workdir}: loss {result.losses[first]:.3f} "
      f"(step {first}) -> {result.losses[last]:.3f} (step {last})."
    )
  else:
    print(f"Nothing to do: {workdir} is already at step {result.step}.")
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


if __name__ == "__main__":
  sys.exit(main())
