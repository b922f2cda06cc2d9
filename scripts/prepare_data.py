"""Prepare a pretraining corpus once, for every host of a pod to read its rows from.

  python scripts/prepare_data.py --config=base8 --set data.paths='corpus/*.jsonl' \
      --output=/shared/c4_prepared --num_workers=8
  python scripts/pretrain.py --config=base8 --set data.paths='corpus/*.jsonl' \
      --set data.prepared=/shared/c4_prepared

The corpus of --config's data settings (data.paths, data.text_field; the embedded default
corpus if data.paths is empty) is tokenized with data.spm_path, or with the tokenizer trained on
it as a run would train it, into --output: one part per input file or per --block_mb of a large
file, and a manifest written last (switchjax/data/prepared.py). data.paths and --output may be
URLs (gs://bucket/dir/*.jsonl.gz, through etils.epath: pip install gcsfs for gs://). An Apache
Beam pipeline (pip install -e ".[data]") on the DirectRunner with --num_workers local
processes; other Beam runners take Beam's own options after the flags (e.g.
--runner=DataflowRunner --project=...); --engine=processes uses a multiprocessing pool instead
of Beam. A rerun with the same settings reuses the finished parts and writes the same bytes.
Expected errors (an --output that is not empty or holds another preparation, unreadable input)
print one line and exit with status 1.
"""

import argparse
import logging
import sys
import time


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", default="small", help="a preset or .py file: its data settings")
  parser.add_argument(
    "--set",
    action="append",
    default=[],
    metavar="FIELD=VALUE",
    help="override a config field, e.g. --set data.paths='corpus/*.jsonl' (repeatable)",
  )
  parser.add_argument("--output", required=True, help="the prepared corpus's directory or URL")
  parser.add_argument("--num_workers", type=int, default=1, help="local worker processes")
  parser.add_argument("--engine", default="beam", choices=("beam", "processes"))
  parser.add_argument("--block_mb", type=float, default=64.0, help="text per part of large files")
  parser.add_argument(
    "--threads_per_worker",
    type=int,
    default=None,
    help="SentencePiece threads per worker (default: the local cores / --num_workers)",
  )
  args, pipeline_args = parser.parse_known_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  for name in ("apache_beam", "root"):
    logging.getLogger(name).setLevel(logging.WARNING)  # Beam's chatter
  logging.getLogger("switchjax").setLevel(logging.INFO)
  try:
    return _prepare(args, pipeline_args)
  except (ValueError, OSError) as e:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    return 1


def _prepare(args, pipeline_args) -> int:
  from switchjax.config import load_config
  from switchjax.data.prepare_job import prepare_corpus

  data_cfg = load_config(args.config, args.set).data
  start = time.perf_counter()
  manifest = prepare_corpus(
    data_cfg,
    args.output,
    num_workers=args.num_workers,
    engine=args.engine,
    block_bytes=max(1, int(args.block_mb * (1 << 20))),
    pipeline_args=pipeline_args,
    threads_per_worker=args.threads_per_worker,
  )
  seconds = time.perf_counter() - start
  megabytes = _input_bytes(data_cfg) / 1e6
  rate = (
    f", {megabytes:.1f} MB of input files ({megabytes / seconds:.1f} MB/s)" if megabytes else ""
  )
  print(
    f"Prepared {manifest['num_tokens']:,} tokens of {manifest['num_documents']:,} documents "
    f"in {len(manifest['parts'])} parts into {args.output} in {seconds:.1f} s{rate}. Train "
    f"with --set data.prepared={args.output}"
  )
  return 0


def _input_bytes(data_cfg) -> int:
  """Bytes of the input files, local or URLs (0 for the embedded default corpus)."""
  from switchjax.data import open_corpus, paths

  return sum(paths.file_size(f) for f in getattr(open_corpus(data_cfg), "files", ()))


if __name__ == "__main__":
  sys.exit(main())
