"""Pretrain a Switch Transformer with T5 span corruption.

  python scripts/pretrain.py --config=small                  # quick start on a CPU
  python scripts/pretrain.py --config=base8 --workdir=runs/base8 --set mesh.expert=8
  python scripts/pretrain.py --config=base8 --set data.paths='corpus/*.jsonl' \
      --set train.batch_size=64

The run resumes from the newest checkpoint in --workdir. Multi-host: every process runs the
same command; pass --coordinator_address/--num_processes/--process_id, or nothing on TPU pods
and clusters whose environment JAX reads.
"""

import argparse
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
  args = parser.parse_args(argv)

  from switchjax import sharding

  sharding.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
  from switchjax.config import load_config
  from switchjax.training import NonFiniteLossError, train

  try:
    config = load_config(args.config, args.set)
    workdir = args.workdir or f"runs/{config.name}"
    result = train(config, workdir, progress=not args.no_progress)
  except (ValueError, FileNotFoundError, NonFiniteLossError) as e:
    print(f"error: {e}", file=sys.stderr)
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


if __name__ == "__main__":
  sys.exit(main())
