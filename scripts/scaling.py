"""The Switch paper's expert-scaling result, reproduced small on a CPU.

  python scripts/scaling.py --workdir=runs/scaling          # the README's sweep (~40 min, 2 cores)
  python scripts/scaling.py --workdir=runs/s --seeds=0,1,2 --steps=1000 --experts=4,16
  python scripts/scaling.py --study --workdir=runs/study --set data.paths=corpus.txt  # issue 31

Trains a dense T5 and Switch models with --experts experts (top-1, experts as wide as the
dense MLP: the same FLOPs per token) for --steps steps each, then Switch models with
--table_experts experts at every --capacity_factors and --top_k, each for every --seed, on the
embedded corpus (switchjax.scaling.base_config: the small preset shrunk to 2 + 2 layers of
width 64, 16 x (64 + 14) tokens per step; --config picks another, --set changes fields). Runs
live in WORKDIR/<variant>/seed<N> (an interrupted sweep resumes); all of them are written to
--output (default WORKDIR/results.json) and the tables are printed. --study runs the
beyond-Switch variants instead (scaling.study_variants: Switch top-1 with the auxiliary loss,
auxiliary-loss-free and dropless; top-2; shared + fine-grained experts), all at Switch's FLOPs;
--ablations adds the halves of DeepSeek-V3's combination (its bias alone, its gating alone).
notebooks/expert_scaling.ipynb plots them. Run as a script it restarts once with XLA's
buffers on huge pages (switchjax/huge_pages.py; GLIBC_TUNABLES=glibc.malloc.hugetlb=0 opts out).
"""

import argparse
import json
import pathlib
import sys


def numbers(kind):
  return lambda text: [kind(x) for x in text.split(",") if x.strip()]


def select(variants, names):
  """The variants named (in the sweep's order); ValueError naming the known ones otherwise."""
  known = [v.name for v in variants]
  if unknown := [n for n in names if n not in known]:
    raise ValueError(
      f"--only={','.join(unknown)}: no such variant; choose from {', '.join(known)}."
    )
  return [v for v in variants if v.name in names]


def main(argv=None) -> int:
  from switchjax import huge_pages

  huge_pages.reexec_script(argv)  # from the command line: once restarted, on huge pages
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", default="runs/scaling", help="one directory per run in here")
  parser.add_argument("--output", default=None, help="results JSON (WORKDIR/results.json)")
  parser.add_argument("--config", default=None, help="base config (default: scaling base)")
  parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
  parser.add_argument("--steps", type=int, default=800)
  parser.add_argument("--eval_every", type=int, default=50)
  parser.add_argument("--eval_steps", type=int, default=8, help="eval batches per evaluation")
  parser.add_argument("--seeds", type=numbers(int), default=[0, 1])
  parser.add_argument("--experts", type=numbers(int), default=[2, 4, 8, 16])
  parser.add_argument("--table_experts", type=int, default=8)
  parser.add_argument("--capacity_factors", type=numbers(float), default=[1.0, 1.25, 2.0])
  parser.add_argument("--top_k", type=numbers(int), default=[1, 2])
  parser.add_argument(
    "--capacity_factor", type=float, default=1.25, help="of the experts sweep (train)"
  )
  parser.add_argument(
    "--study",
    action="store_true",
    help="run the beyond-Switch study's variants (scaling.study_variants) instead of the sweep",
  )
  parser.add_argument(
    "--ablations",
    action="store_true",
    help="add to --study the halves of DeepSeek-V3's combination: the bias alone (softmax), "
    "sigmoid gating alone (auxiliary loss)",
  )
  parser.add_argument(
    "--only", default="", metavar="NAME[,NAME]", help="run only these variants (by name)"
  )
  parser.add_argument(
    "--bias_update_rate", type=float, default=1e-3, help="of the study's auxiliary-loss-free runs"
  )
  args = parser.parse_args(argv)

  from switchjax import scaling
  from switchjax.config import load_config
  from switchjax.errors import unwritable_output

  try:
    if args.config:
      base = load_config(args.config, args.set)
    else:
      base = scaling.base_config(args.set)
    if args.ablations and not args.study:
      raise ValueError("--ablations belongs to --study; add --study.")
    if args.study:
      variants = scaling.study_variants(base.model.d_ff, args.bias_update_rate, args.ablations)
    else:
      variants = scaling.sweep_variants(
        args.experts, args.table_experts, args.capacity_factors, args.top_k, args.capacity_factor
      )
    if args.only:
      variants = select(variants, args.only.split(","))
    if len(args.seeds) < 1 or args.steps < 1 or not 1 <= args.eval_every <= args.steps:
      raise ValueError("need --seeds, --steps >= 1 and 1 <= --eval_every <= --steps.")
    output = pathlib.Path(args.output or pathlib.Path(args.workdir) / "results.json")
    if pathlib.Path(args.workdir).exists() and not pathlib.Path(args.workdir).is_dir():
      raise ValueError(f"--workdir={args.workdir} is a file; choose a directory.")
    if args.output and (problem := unwritable_output(args.output, "--output")):
      raise ValueError(problem)
    print(f"{len(variants)} variants x {len(args.seeds)} seeds: {[v.name for v in variants]}")
    results = scaling.run_sweep(
      base,
      variants,
      args.seeds,
      args.workdir,
      steps=args.steps,
      eval_every=args.eval_every,
      eval_steps=args.eval_steps,
    )
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    return 1
  output.parent.mkdir(parents=True, exist_ok=True)
  output.write_text(json.dumps(results, indent=1) + "\n")
  print(scaling.format_tables(results))
  print(f"Wrote {output}.")
  return 0


if __name__ == "__main__":
  sys.exit(main())
