"""Preparing a corpus as a distributed job: the parts of switchjax.data.prepared tokenized by
Apache Beam workers (or, without Beam, by local worker processes).

The driver lists the input files, trains the tokenizer where none is given (as a run would,
into the same cache), writes spiece.model and preparation.json, and hands the unfinished parts
to the workers; each worker tokenizes whole parts and renames them into place, so a rerun after
a crash reuses the finished ones; the driver writes manifest.json last. The bytes do not depend
on the runner or the number of workers.

Beam (`pip install -e ".[data]"`) runs on its DirectRunner with `num_workers` local processes
by default; any other runner (Dataflow, Flink, Spark) takes Beam's own pipeline options
(`--runner=...`), given that its workers can read the input files and write the output
directory (a shared file system, or gs:// URLs for both through etils.epath, with gcsfs
installed on the workers).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from switchjax.data import prepared, workers
from switchjax.data.parts import DEFAULT_BLOCK_BYTES

ENGINES = ("beam", "processes")


def beam_map(num_workers: int, pipeline_args: Sequence[str] = ()) -> Callable:
  """map_parts for `prepared.prepare`: the parts as a Beam pipeline; blocks until done."""
  try:
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions
  except ImportError:
    raise ValueError(
      "--engine=beam needs Apache Beam: pip install -e '.[data]' (or use --engine=processes)."
    ) from None

  def run(task, specs):
    if not specs:
      return []
    options = PipelineOptions(
      list(pipeline_args),
      direct_num_workers=num_workers,
      direct_running_mode="multi_processing" if num_workers > 1 else "in_memory",
      default_sdk_harness_log_level="WARNING",  # the workers' own start/stop chatter
    )
    with beam.Pipeline(options=options) as pipeline:
      _ = (
        pipeline
        | "Parts" >> beam.Create(list(specs))
        | "Spread" >> beam.Reshuffle()  # one part per element, spread over the workers
        | "Tokenize" >> beam.Map(task)
      )
    return []

  return run


def process_map(num_workers: int) -> Callable:
  """map_parts for `prepared.prepare`: local worker processes (no Beam needed), spawned (no
  forked JAX or SentencePiece threads), as a run's local tokenization uses (workers.py)."""

  def run(task, specs):
    return list(workers.ordered_map(task, list(specs), num_workers))

  return run


def prepare_corpus(
  data_cfg,
  output: str,
  *,
  num_workers: int = 1,
  engine: str = "beam",
  block_bytes: int = DEFAULT_BLOCK_BYTES,
  pipeline_args: Sequence[str] = (),
  threads_per_worker: int | None = None,
) -> dict:
  """Prepares the corpus of a DataConfig into `output` with `num_workers` workers; returns the
  manifest. SentencePiece threads per worker: `threads_per_worker`, by default the usable cores
  shared out among the workers. The bytes written depend on neither."""
  if engine not in ENGINES:
    raise ValueError(f"--engine={engine!r}: choose one of {', '.join(ENGINES)}.")
  if num_workers < 1:
    raise ValueError(f"--num_workers={num_workers} must be >= 1.")
  if threads_per_worker is not None and threads_per_worker < 1:
    raise ValueError(
      f"--threads_per_worker={threads_per_worker} must be >= 1 (or left out: the cores shared "
      "out among the workers)."
    )
  mapper = beam_map(num_workers, pipeline_args) if engine == "beam" else process_map(num_workers)
  threads = threads_per_worker or workers.threads_per_worker(num_workers)
  return prepared.prepare(
    data_cfg, output, block_bytes=block_bytes, map_parts=mapper, num_threads=threads
  )
