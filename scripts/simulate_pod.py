"""Compiles the real train and eval steps for a TPU slice or an emulated pod; reports memory.

  python scripts/simulate_pod.py --config=base8 --topology=v5p-32          # XLA's TPU compiler
  python scripts/simulate_pod.py --config=large128 --topology=v5p-64 --mesh 2,16,1
  python scripts/simulate_pod.py --config=base8 --topology=v5p-16 --num_slices=2
  python scripts/simulate_pod.py --config=base8 --mesh 1,8,1 --mesh 4,8,1    # emulated CPUs
  python scripts/simulate_pod.py --config=base8 --mesh 4,8,1 --batch 256 --set model.remat=full

Nothing is allocated and no TPU is needed: `switchjax.pod.simulate` lowers pretrain.py's train
and eval steps with abstract inputs and compiles them. With --topology (Cloud TPU's names: v4-8,
v5p-32, v5e-16, v6e-256, or a topology such as v5p:2x2x4; needs `pip install -e ".[tpu]"`) the
compiler is XLA's TPU compiler, for the slice's chips (one device per chip), and the table says
whether the steps fit the chip's HBM; the mesh defaults to the experts over as many chips as
they divide and the batch over the rest, the batch to the config's own. Without --topology the
devices are emulated CPUs (the script restarts itself with the XLA flag that makes enough of
them; memory figures are then XLA:CPU's) and the batch defaults to --per_device sequences per
device. Per device: arguments (parameters, optimizer state, batch shard), temporaries
(activations), the all-to-alls (expert parallelism) and all-gathers, all-gathers of
token-sized activations, and compile time. Errors print one line and exit 1.
"""

import argparse
import dataclasses
import json
import math
import os
import sys


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", default="base8", help="preset or .py config (default base8)")
  parser.add_argument("--topology", default=None, help="a TPU slice: v5p-32, v6e-16, v5p:2x2x4")
  parser.add_argument("--num_slices", type=int, default=1, help="slices joined over DCN (1)")
  parser.add_argument(
    "--mesh", action="append", default=[], metavar="D,E,M", help="data,expert,model sizes"
  )
  parser.add_argument(
    "--batch",
    type=int,
    action="append",
    default=[],
    help="global batch per --mesh (one for all, or one each); default: the config's with "
    "--topology, else --per_device sequences on each data x expert device",
  )
  parser.add_argument("--per_device", type=int, default=8, help="sequences per device (8)")
  parser.add_argument("--no_eval", action="store_true", help="compile the train step only")
  parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
  parser.add_argument("--json", default=None, metavar="PATH", help="also write the reports")
  args = parser.parse_args(argv)
  try:
    args.mesh = [tuple(int(x) for x in m.split(",")) for m in args.mesh]
    assert all(len(m) == 3 and min(m) >= 1 for m in args.mesh)
  except (ValueError, AssertionError):
    parser.error(f"--mesh {args.mesh}: give three sizes >= 1, e.g. 4,8,1")
  if not args.mesh and not args.topology:
    parser.error("give --topology (a TPU slice) or at least one --mesh (emulated CPU devices)")
  if args.batch and len(args.batch) not in (1, len(args.mesh)):
    parser.error("give one --batch for all meshes or one per --mesh")
  if min(args.batch, default=1) < 1 or args.per_device < 1 or args.num_slices < 1:
    parser.error("--batch, --per_device and --num_slices must be >= 1")
  from switchjax import pod  # (jax is not started by the import: XLA_FLAGS are read later)
  from switchjax.errors import unwritable_output

  try:
    if not args.topology:
      pod.check_emulated(max(math.prod(m) for m in args.mesh))
  except ValueError as e:
    parser.error(str(e))
  if problem := unwritable_output(args.json, "--json"):
    parser.error(problem)
  return args


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  args = parse_args(argv)
  if args.topology:
    # Compiling for described TPU devices needs no device of this machine: keep jax on the
    # CPU (a TPU host's chips stay free for its runs).
    os.environ["JAX_PLATFORMS"] = "cpu"
  from switchjax import pod, topologies
  from switchjax.config import load_config

  if not args.topology:
    pod.reexec_with_devices(max(math.prod(m) for m in args.mesh), [__file__, *argv])
  try:
    tpu = topologies.parse_slice(args.topology, args.num_slices) if args.topology else None
    config = load_config(args.config, args.set)
    meshes = args.mesh or [pod.default_mesh(config, tpu.chips)]
    reports = []
    for i, mesh in enumerate(meshes):
      batch = args.batch[min(i, len(args.batch) - 1)] if args.batch else None
      if batch is None and not tpu:
        batch = args.per_device * mesh[0] * mesh[1]
      run = config
      if batch is not None:
        run = dataclasses.replace(config, train=dataclasses.replace(config.train, batch_size=batch))
      reports.append(pod.simulate(run, mesh, tpu, eval_step=not args.no_eval))
      print(f"compiled {mesh} in {reports[-1].compile_seconds:.0f} s", file=sys.stderr)
  except ValueError as e:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    return 1
  where = f"XLA's TPU compiler, {tpu.name}" if tpu else "XLA CPU, emulated devices"
  print(f"{config.name}: train step compiled per mesh ({where})\n")
  print(pod.format_table(pod.HEADERS, [r.row() for r in reports]))
  if args.json:
    with open(args.json, "w") as f:
      json.dump([dataclasses.asdict(r) for r in reports], f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
