"""Corpus preparation speed and the start-up cost of reading a prepared corpus.

  python benchmarks/prepare_data_speed.py --mb=50 --dir=/tmp/prep_bench

Writes a synthetic corpus of --mb MB (sentences of CPython's documentation topics, shuffled
into new documents; JSON Lines, text and Parquet files), trains its tokenizer once (not timed),
then measures, each in a fresh process:
  - tokenization in one process (`tokenize_corpus(..., num_workers=1)`: SentencePiece threads;
    a run without a prepared corpus uses a worker process per core, see
    benchmarks/local_tokenization_speed.py);
  - scripts/prepare_data.py with --num_workers 1 and 2, Beam and plain worker processes;
  - a run's start-up from the prepared corpus (make_pretraining_data and the first batch):
    seconds and peak RSS, for the whole corpus and for a smaller one (--small_mb, a fifth).
--threads_per_worker=1 shows how the rate grows with workers alone; --engines picks them;
--repeats runs each pair again (the speed of a shared machine wanders from run to run).
Prints a Markdown table (the one in docs/pod_data.md).
"""

import argparse
import json
import pathlib
import re
import resource
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = pathlib.Path(__file__).resolve().parents[1]
SETTINGS = ["data.spm_vocab_size=4000", "data.inputs_length=512", "data.targets_length=114"]


def write_corpus(
  directory: pathlib.Path, megabytes: float, seed: int = 0, kinds=("jsonl", "txt", "parquet")
) -> list[str]:
  """Six files of about `megabytes` MB in all, their formats `kinds` in turn; their paths."""
  import pydoc_data.topics

  text = " ".join(pydoc_data.topics.topics.values())
  sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if len(s.strip()) > 20]
  rng = np.random.default_rng(seed)
  directory.mkdir(parents=True, exist_ok=True)
  files, per_file = [], megabytes * 1e6 / 6
  for i in range(6):
    docs, size = [], 0
    while size < per_file:
      doc = " ".join(sentences[j] for j in rng.integers(0, len(sentences), rng.integers(3, 30)))
      docs.append(doc)
      size += len(doc) + 20
    kind = kinds[i % len(kinds)]
    path = directory / f"part{i}.{kind}"
    if kind == "jsonl":
      path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    elif kind == "txt":
      path.write_text("\n\n".join(d.replace("\n", " ") for d in docs) + "\n")
    else:
      pq.write_table(pa.table({"text": docs}), path, row_group_size=2000)
    files.append(str(path))
  return files


def python(code: str) -> dict:
  """Runs `code` in a fresh interpreter; its last stdout line is JSON."""
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
  if out.returncode:  # the child's own last word (e.g. a corpus too small for a batch of 256)
    sys.exit(f"error: {(out.stderr.strip().splitlines() or ['(no message)'])[-1]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def overrides(files, cache, extra=()) -> list[str]:
  return [*SETTINGS, f"data.paths={','.join(files)}", f"data.cache_dir={cache}", *extra]


def in_process(files, cache) -> dict:
  code = f"""
import json, time, resource
from switchjax.config import load_config
from switchjax.data import corpus as c, tokens as t
cfg = load_config("small", {overrides(files, cache)!r}).data
corpus = c.open_corpus(cfg)
tok = c.get_tokenizer(cfg, corpus)
start = time.perf_counter()
tokens = t.tokenize_corpus(corpus, tok, cfg.cache_dir, num_workers=1)
print(json.dumps({{"seconds": time.perf_counter() - start, "tokens": len(tokens)}}))
"""
  return python(code)


def prepare(files, cache, output, workers, engine, threads=None) -> float:
  args = [f"--set={o}" for o in overrides(files, cache)]
  command = [sys.executable, "scripts/prepare_data.py", "--config=small", *args]
  command += [f"--output={output}", f"--num_workers={workers}", f"--engine={engine}"]
  command += ["--block_mb=8"] + ([f"--threads_per_worker={threads}"] if threads else [])
  start, cpu = time.perf_counter(), _children_cpu()
  out = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, check=True).stdout
  wall, cpu = time.perf_counter() - start, _children_cpu() - cpu
  return wall, float(re.search(r"parts into .* in ([0-9.]+) s", out).group(1)), cpu


def _children_cpu() -> float:
  """CPU seconds (user + system) of the finished child processes (and theirs) so far."""
  usage = resource.getrusage(resource.RUSAGE_CHILDREN)
  return usage.ru_utime + usage.ru_stime


def startup(output, cache) -> dict:
  code = f"""
import json, time
start = time.perf_counter()
from switchjax.config import load_config
from switchjax.data import make_pretraining_data
cfg = load_config("small", {[*SETTINGS, f"data.prepared={output}", f"data.cache_dir={cache}"]!r})
data = make_pretraining_data(cfg.data, 256)
batch = next(data.train)
# VmHWM, the peak RSS of this address space: ru_maxrss would also count the benchmark's
# own RSS, which a forked child starts from and keeps across exec.
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(json.dumps({{"seconds": time.perf_counter() - start, "rss_mb": int(hwm.split()[1]) / 1024}}))
"""
  return python(code)


def baseline_rss() -> float:
  code = """
import json
import switchjax.config, switchjax.data, grain
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(json.dumps({"rss_mb": int(hwm.split()[1]) / 1024}))
"""
  return python(code)["rss_mb"]


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--mb", type=float, default=50)
  parser.add_argument("--dir", default="/tmp/prep_bench")
  parser.add_argument("--small_mb", type=float, default=None, help="the start-up's smaller corpus")
  parser.add_argument("--engines", default="beam,processes", help="comma-separated")
  parser.add_argument(
    "--threads_per_worker", type=int, default=None, help="(default: the cores / the workers)"
  )
  parser.add_argument(
    "--repeats", type=int, default=1, help="runs of each engine's 1- and 2-worker pair"
  )
  args = parser.parse_args()
  root = pathlib.Path(args.dir)
  cache = root / "cache"
  small_mb = args.small_mb or args.mb / 5
  files = write_corpus(root / "corpus", args.mb)
  small = write_corpus(root / "corpus_small", small_mb, seed=1)
  megabytes = sum(pathlib.Path(f).stat().st_size for f in files) / 1e6
  spm = in_process(files, cache)  # trains the tokenizer and tokenizes once: warm caches
  for token_file in (cache / "tokens").glob("*.npy"):
    token_file.unlink()
  cpu = _children_cpu()
  today = in_process(files, cache)["seconds"]
  rows = [("tokenize_corpus, one process", today, today, _children_cpu() - cpu)]
  threads = args.threads_per_worker
  flag = f" --threads_per_worker={threads}" if threads else ""
  for repeat in range(args.repeats):  # a pair back to back: this machine's speed wanders
    for engine in args.engines.split(","):
      for workers in (1, 2):
        output = root / f"out_{engine}_{workers}"
        subprocess.run(["rm", "-rf", str(output)], check=True)
        wall, job, cpu = prepare(files, cache, output, workers, engine, threads)
        name = f"prepare_data.py --engine={engine} --num_workers={workers}{flag}"
        rows.append((name + (f" (run {repeat + 1})" if args.repeats > 1 else ""), wall, job, cpu))
  print(f"{megabytes:.1f} MB of text, {spm['tokens']:,} tokens\n")
  print(
    "| what | wall s (with imports) | s of the job | MB/s of text (job) | CPU s (all processes) |"
  )
  print("|---|---|---|---|---|")
  for name, wall, job, cpu in rows:
    print(f"| {name} | {wall:.1f} | {job:.1f} | {megabytes / job:.1f} | {cpu:.1f} |")
  prepare([*small], cache, root / "out_small", 2, "processes")
  print(f"\nbaseline RSS (imports only): {baseline_rss():.0f} MB\n")
  print("| prepared corpus | start-up + first batch of 256 (s) | peak RSS (MB) |\n|---|---|---|")
  largest = f"out_{args.engines.split(',')[-1]}_2"
  for name, output in ((f"{small_mb:.0f} MB", "out_small"), (f"{args.mb:.0f} MB", largest)):
    result = startup(root / output, cache)
    print(f"| {name} | {result['seconds']:.2f} | {result['rss_mb']:.0f} |")


if __name__ == "__main__":
  main()
