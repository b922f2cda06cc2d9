"""Writes the benchmark page (docs/benchmarks.md) from `scripts/benchmark.py --json` output.

python scripts/benchmark.py moe vs_hf --mesh none --json docs/benchmarks.json
python scripts/benchmark_report.py docs/benchmarks.json --out docs/benchmarks.md
"""

import argparse
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # the benchmarks/ package

from benchmarks import report


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("json", help="the file scripts/benchmark.py --json wrote")
  parser.add_argument("--out", default=None, help="write the page here (default: print it)")
  args = parser.parse_args(argv)
  try:
    results = json.loads(pathlib.Path(args.json).read_text())
    page = report.markdown(results, args.json)
  except (OSError, ValueError, KeyError) as e:
    print(
      f"error: {args.json} is not a benchmark.py --json output ({type(e).__name__}: {e}); "
      "run python scripts/benchmark.py --json PATH first.",
      file=sys.stderr,
    )
    return 1
  if args.out:
    pathlib.Path(args.out).write_text(page)
    print(f"Wrote {args.out}")
  else:
    print(page)
  return 0


if __name__ == "__main__":
  sys.exit(main())
