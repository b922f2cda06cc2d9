"""Compiles the real train step for an emulated pod mesh and reports memory and collectives.

  python scripts/simulate_pod.py --config=base8 --mesh 1,8,1 --mesh 2,8,1 --mesh 4,8,1 \\
      --mesh 8,8,1                                   # 8 sequences per device (the default)
  python scripts/simulate_pod.py --config=base8 --mesh 4,8,1 --batch 256 --set model.remat=full
  python scripts/simulate_pod.py --config=large128 --mesh 8,16,1 --json pod.json

Nothing is allocated: `switchjax.pod.simulate` lowers the train step of pretrain.py with
abstract inputs for each (data, expert, model) mesh and compiles it; the table gives XLA's
per-device memory (arguments = parameters + optimizer state + batch shard, temp =
activations), the all-to-all (expert parallelism) and all-gather instructions, all-gathers of
token-sized activations, and compile time. The CPU devices are emulated; the script restarts
itself with the XLA flag that makes enough of them. Errors print one line and exit 1.
"""

import argparse
import dataclasses
import json
import math
import sys


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", default="base8", help="preset or .py config (default base8)")
  parser.add_argument(
    "--mesh",
    action="append",
    required=True,
    metavar="D,E,M",
    help="data,expert,model sizes (repeat for a table)",
  )
  parser.add_argument(
    "--batch",
    type=int,
    action="append",
    default=[],
    help="global batch per --mesh (one for all, or one each); default: "
    "--per_device sequences on each data x expert device",
  )
  parser.add_argument("--per_device", type=int, default=8, help="sequences per device (8)")
  parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
  parser.add_argument("--json", default=None, metavar="PATH", help="also write the reports")
  args = parser.parse_args(argv)
  try:
    args.mesh = [tuple(int(x) for x in m.split(",")) for m in args.mesh]
    assert all(len(m) == 3 and min(m) >= 1 for m in args.mesh)
  except (ValueError, AssertionError):
    parser.error(f"--mesh {args.mesh}: give three sizes >= 1, e.g. 4,8,1")
  if args.batch and len(args.batch) not in (1, len(args.mesh)):
    parser.error("give one --batch for all meshes or one per --mesh")
  return args


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  args = parse_args(argv)
  from switchjax import pod

  pod.reexec_with_devices(max(math.prod(m) for m in args.mesh), [__file__, *argv])
  from switchjax.config import load_config

  reports = []
  try:
    config = load_config(args.config, args.set)
    for i, mesh in enumerate(args.mesh):
      batch = (
        args.batch[min(i, len(args.batch) - 1)]
        if args.batch
        else (args.per_device * mesh[0] * mesh[1])
      )
      run = dataclasses.replace(config, train=dataclasses.replace(config.train, batch_size=batch))
      reports.append(pod.simulate(run, mesh))
      print(f"compiled {mesh} in {reports[-1].compile_seconds:.0f} s", file=sys.stderr)
  except ValueError as e:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    return 1
  print(f"{config.name}: train step compiled per mesh (XLA CPU, emulated devices)\n")
  print(pod.format_table(pod.HEADERS, [r.row() for r in reports]))
  if args.json:
    with open(args.json, "w") as f:
      json.dump([dataclasses.asdict(r) for r in reports], f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
