"""Speed and memory of switchjax, reported as ratios measured within one run.

  python scripts/benchmark.py                      # every section (long on 2 CPU cores)
  python scripts/benchmark.py moe vs_hf --mesh none --json out.json   # README's table
  python scripts/benchmark.py train --set model.moe.router_type=tokens_choose_scatter --mesh 1,8,1
  python scripts/benchmark.py --quick --json out.json   # the smoke test

--quick shrinks everything (the tiny preset, small MoE layers, 3 repetitions) and compiles with
XLA's CPU backend at optimisation level 0, as the tests do: it checks that the benchmark runs,
its figures mean little. --json PATH writes every figure, the raw per-call times and the
machine (CPU model, cores, versions, XLA flags, the measured matmul peak).

Sections (each a module of the repository's benchmarks/; this script parses the flags and runs
them):
  moe       MoeLayer forward + backward (jit, float32, 1 device) on B x L x d_model (8 x 512 x
            768, d_ff 3072) against a dense MlpBlock of the same d_ff, over expert counts E
            (8, 32, 128): Switch's top-1 router through each model.moe.dispatch (einsum,
            buffers, sorted), the scatter and dropless routers, and flaxformer's MoeLayer
            when its source is found (--flaxformer); a larger batch shows the cost per token
            when more tokens share the experts' weights. Memory is XLA's compiled-program
            figure (`memory_analysis()`).
  train     The jitted, sharded train step (`switchjax.training`, Adafactor, as
            pretrain.py builds it) of --config (with --set overrides) on synthetic batches of
            the config's shapes (data loading excluded): ms/step, tokens/s (inputs + targets),
            model TFLOP/s (`train_flops_per_example`, all devices together), MFU against the
            float32 matmul peak measured at the start of the run, and the compiled step's
            temporary memory per device, on 1 device and on the --mesh (data, expert, model)
            mesh; microbatches as pretrain.py picks them. Default --config small.
  generate  `switchjax.generate` (greedy) of a randomly initialised --config model with and
            without the KV cache: new tokens/s; EOS is disabled so every row decodes every step.
  vs_hf     The same random transformers SwitchTransformersForConditionalGeneration converted
            by `switchjax.hf.from_hf` (a `small`-sized 4+4-layer d_model 128 model and a
            6+6-layer d_model 512 one, E = 8), when torch and transformers are installed:
            greedy generation (same tokens checked) and an AdamW train step on the same loss,
            tokens/s and MFU of both.

How to read it: every time is the median of --reps timed calls after --warmup untimed ones
(compilation is done before, with `jit(...).lower(...).compile()`), and the variants being
compared are timed interleaved (A B A B ...) so that machine noise hits them alike. Absolute
times on a shared CPU move by tens of percent between runs; compare the RATIOS, which this run
measures side by side: buffers/einsum and sorted/einsum time and memory (< 1: cheaper than
flaxformer's one-hot einsums), mesh/1-device step time, uncached/cached generation time (the
cache's speed-up).

Emulated devices: the mesh needs that many devices; on a CPU host they are emulated with
XLA_FLAGS=--xla_force_host_platform_device_count=N, which XLA reads only when jax starts. When
the flag is missing (or too small) the script re-executes itself with it added. Emulated devices
share the host's cores, so on a CPU the mesh ratio measures the cost of partitioning and
collectives (all-to-all), not a speed-up. --mesh none skips the mesh.

Huge pages: run as a script, it restarts once with GLIBC_TUNABLES=glibc.malloc.hugetlb=1
(`switchjax.huge_pages`; both sides of vs_hf run under it); set glibc.malloc.hugetlb=0 to
measure without.
"""

import argparse
import json
import math
import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repository's benchmarks/ (measurement code, not installed)

from benchmarks import machine
from benchmarks.generation import bench_generate
from benchmarks.moe_layer import bench_moe
from benchmarks.timing import matmul_peak_tflops
from benchmarks.train_step import bench_train
from benchmarks.vs_hf import bench_vs_hf
from switchjax import huge_pages, pod
from switchjax.config import load_config
from switchjax.errors import unwritable_output

SECTIONS = ("moe", "train", "generate", "vs_hf")


def parse_args(argv=None):
  parser = argparse.ArgumentParser(
    description=__doc__.split("\n\n")[0],
    formatter_class=argparse.RawDescriptionHelpFormatter,
    epilog=__doc__.split("\n\n", 2)[2],
  )
  parser.add_argument(
    "sections", nargs="*", metavar="SECTION", help=f"any of {', '.join(SECTIONS)} (default: all)"
  )
  parser.add_argument(
    "--quick",
    action="store_true",
    help="tiny sizes and few repetitions (the smoke test; the figures mean little)",
  )
  parser.add_argument(
    "--config",
    default=None,
    help="preset of the train and generate sections (default: small; tiny with --quick)",
  )
  parser.add_argument(
    "--set",
    action="append",
    default=[],
    metavar="FIELD=VALUE",
    help="override a config field, as in pretrain.py (repeatable)",
  )
  parser.add_argument(
    "--mesh",
    default="2,4,1",
    help="data,expert,model sizes of the mesh "
    "compared with 1 device in the train section, or 'none' (default: 2,4,1)",
  )
  parser.add_argument(
    "--reps", type=int, default=None, help="timed repetitions (default 10; 3 with --quick)"
  )
  parser.add_argument(
    "--warmup",
    type=int,
    default=None,
    help="untimed calls before timing (default 2; 1 with --quick)",
  )
  parser.add_argument("--json", default=None, metavar="PATH", help="also write all figures here")
  parser.add_argument(
    "--flaxformer",
    default=None,
    metavar="DIR",
    help="directory of flaxformer-*.tgz (and aqt-stub.tgz) for the moe section's reference "
    "column (default: ../shared/refs next to the repository; skipped when absent)",
  )
  parser.add_argument(
    "--hf_reps",
    type=int,
    default=None,
    help="timed repetitions of the vs_hf section (default 3; 2 with --quick)",
  )
  args = parser.parse_args(argv)
  bad = [s for s in args.sections if s not in SECTIONS]
  if bad:
    parser.error(f"unknown section(s) {', '.join(bad)}; choose from {', '.join(SECTIONS)}")
  args.sections = [s for s in SECTIONS if s in args.sections] or list(SECTIONS)
  for flag, value, least in (
    ("--reps", args.reps, 1),
    ("--warmup", args.warmup, 0),
    ("--hf_reps", args.hf_reps, 1),
  ):
    if value is not None and value < least:
      parser.error(f"{flag}={value}: give a whole number >= {least}")
  if problem := unwritable_output(args.json, "--json"):
    parser.error(problem)
  args.config = args.config or ("tiny" if args.quick else "small")
  args.reps = args.reps or (3 if args.quick else 10)
  args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
  text, args.mesh = args.mesh, None
  if text.lower() not in ("none", "", "1,1,1"):
    sizes = text.split(",")
    if len(sizes) != 3 or not all(s.strip().isdigit() and int(s) >= 1 for s in sizes):
      parser.error(f"--mesh={text}: give three sizes >= 1 (data,expert,model), e.g. 2,4,1, or none")
    args.mesh = tuple(map(int, sizes))
    try:
      pod.check_emulated(math.prod(args.mesh))
    except ValueError as e:
      parser.error(str(e))
  return args


def check_mesh(args, config) -> None:
  """Refuses, before any section runs, a --mesh the train section could not use."""
  experts = config.model.moe.num_experts
  if args.mesh and "train" in args.sections and experts % args.mesh[1]:
    raise ValueError(
      f"--mesh={','.join(map(str, args.mesh))}: the expert axis {args.mesh[1]} does not divide "
      f"the {experts} experts of --config={args.config}; choose an expert size that divides it."
    )


def reexec_with_xla_flags(args, argv) -> None:
  """XLA reads XLA_FLAGS once, when jax starts: re-executes this script with the flags it needs
  (the mesh's emulated devices; with --quick, fast compilation as in the tests)."""
  need = math.prod(args.mesh) if args.mesh and "train" in args.sections else 1
  extra = ("--xla_backend_optimization_level=0",) if args.quick else ()
  if need > 1 or extra:
    pod.reexec_with_devices(need, [os.path.abspath(__file__), *argv], extra)


def run_sections(args, config) -> dict:
  """{section: its figures} for each section asked for, in SECTIONS order."""
  timing = dict(reps=args.reps, warmup=args.warmup)
  results = {}
  if "moe" in args.sections:
    refs = pathlib.Path(args.flaxformer) if args.flaxformer else ROOT.parent / "shared" / "refs"
    results["moe"] = bench_moe(quick=args.quick, flaxformer_refs=refs, **timing)
  if "train" in args.sections:
    results["train"] = bench_train(config, mesh=args.mesh, peak_tflops=args.peak_tflops, **timing)
  if "generate" in args.sections:
    results["generate"] = bench_generate(config, quick=args.quick, **timing)
  if "vs_hf" in args.sections:
    hf_reps = args.hf_reps or (2 if args.quick else 3)
    results["vs_hf"] = bench_vs_hf(
      quick=args.quick, reps=hf_reps, warmup=args.warmup, peak_tflops=args.peak_tflops
    )
  return results


def main(argv=None) -> int:
  arguments = sys.argv[1:] if argv is None else list(argv)
  args = parse_args(arguments)
  reexec_with_xla_flags(args, arguments)  # with huge pages when it restarts
  huge_pages.reexec_script(argv)  # both sides of vs_hf share the setting
  try:
    config = load_config(args.config, args.set)
    check_mesh(args, config)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  env = machine.describe()
  env.update(
    reps=args.reps,
    warmup=args.warmup,
    quick=args.quick,
    hf_reps=args.hf_reps or (2 if args.quick else 3),
    command=" ".join(["scripts/benchmark.py"] + arguments),
  )
  args.peak_tflops = env["matmul_peak_tflops"] = matmul_peak_tflops(256 if args.quick else 1024)
  print(machine.headline(env))
  machine.warn_if_loaded(env["load_average_1min"], env["cpu_count"])
  print(
    f"Times: median of {args.reps} interleaved repetitions after {args.warmup} warm-up "
    "calls, compilation excluded. Compare the ratios, not absolute times."
  )
  try:
    results = {"env": env, **run_sections(args, config)}
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=1)
    print(f"\nWrote {args.json}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
