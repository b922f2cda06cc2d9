"""Tokenizing a corpus without a prepared one: one process against the local worker processes.

  python -m benchmarks.local_tokenization_speed --mb=40 --dir=/tmp/local_bench --rounds=2

Two corpora, each tokenized from a cold token cache (the tokenizer trained once beforehand, not
timed) in a fresh process, with `tokenize_corpus(..., num_workers=1)` (one process: reading,
then SentencePiece's threads) and with the default (one worker process per usable core), back
to back, `--rounds` times:
  - the embedded default corpus (the quick start's; the small preset's 2,000 pieces): parsing
    the standard library dominates;
  - --mb MB of JSON Lines in six files (benchmarks/prepare_data_speed.py's write_corpus;
    4,000 pieces): encoding dominates.
Prints a Markdown table: seconds of tokenize_corpus (after imports), and the CPU seconds of
the process and its workers (imports included).
"""

import argparse
import json
import pathlib
import shutil
import subprocess
import sys

from benchmarks.prepare_data_speed import ROOT, _children_cpu, write_corpus


def tokenize(settings: list[str], cache: pathlib.Path, workers: int | None) -> dict:
  """tokenize_corpus in a fresh interpreter; the token cache is removed first."""
  shutil.rmtree(cache / "tokens", ignore_errors=True)
  code = f"""
import json, os, time
from switchjax.config import load_config
from switchjax.data import corpus as c, tokens as t, workers as w
cfg = load_config("small", {[*settings, f"data.cache_dir={cache}"]!r}).data
corpus = c.open_corpus(cfg)
tok = c.get_tokenizer(cfg, corpus)
start = time.perf_counter()
tokens = t.tokenize_corpus(corpus, tok, cfg.cache_dir, num_workers={workers!r})
print(json.dumps({{"seconds": time.perf_counter() - start, "tokens": len(tokens),
                  "workers": w.num_workers(99, {workers!r})}}))
"""
  cpu = _children_cpu()
  out = subprocess.run(
    [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
  )
  result = json.loads(out.stdout.strip().splitlines()[-1])
  return {**result, "cpu": _children_cpu() - cpu}


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--mb", type=float, default=40)
  parser.add_argument("--dir", default="/tmp/local_bench")
  parser.add_argument("--rounds", type=int, default=2)
  args = parser.parse_args()
  root = pathlib.Path(args.dir)
  files = write_corpus(root / "corpus", args.mb, kinds=("jsonl",))
  megabytes = sum(pathlib.Path(f).stat().st_size for f in files) / 1e6
  corpora = {
    "embedded default corpus": ["data.spm_vocab_size=2000"],
    f"{megabytes:.1f} MB of JSON Lines, 6 files": [
      "data.spm_vocab_size=4000",
      f"data.paths={','.join(files)}",
    ],
  }
  rows = []
  for name, settings in corpora.items():
    tokenize(settings, root / "cache", 1)  # trains the tokenizer (not timed), warms the disk
    for round_ in range(1, args.rounds + 1):
      for workers in (1, None):
        result = tokenize(settings, root / "cache", workers)
        rows.append((name, round_, result))
  print("| corpus | round | workers | tokens | tokenize_corpus s | CPU s (all processes) |")
  print("|---|---|---|---|---|---|")
  for name, round_, r in rows:
    print(
      f"| {name} | {round_} | {r['workers']} | {r['tokens']:,} | {r['seconds']:.2f} | "
      f"{r['cpu']:.1f} |"
    )


if __name__ == "__main__":
  main()
