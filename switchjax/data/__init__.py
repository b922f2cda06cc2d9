"""Data: T5 tokenizer, span corruption, corpora and the pretraining input pipeline.

tokenizer.py        Tokenizer (SentencePiece with T5's pad/eos/unk and sentinel ids),
                    train_tokenizer
span_corruption.py  T5 span corruption in NumPy
corpus.py           the embedded default corpus (in parts), user files, the corpus's tokenizer
parts.py            a corpus in parts (a file, a 64 MB block of one) and their encoding
tokens.py           tokenize_corpus: the parts encoded on the local cores, cached as one .npy
workers.py          the local worker processes (an ordered map, spawned)
cache.py            the cache directory and atomic writes
paths.py            local paths (pathlib) and URLs (etils.epath): globs, reads, errors
prepared.py         prepared corpora: parts + manifest on shared storage, read by row
pipeline.py         make_pretraining_data: global, host-sharded, resumable batches

The pipeline's names (make_pretraining_data, ...) are imported on first use, so that importing
a module of the package (a worker process reading a corpus imports corpus.py and tokens.py)
does not load the pipeline's Grain and JAX.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from switchjax.data.cache import cache_dir
from switchjax.data.corpus import (
  DefaultCorpus,
  FileCorpus,
  TokenChunks,
  default_documents,
  get_tokenizer,
  open_corpus,
  read_documents,
  resolve_paths,
)
from switchjax.data.span_corruption import (
  check_sentinels,
  noise_span_to_unique_sentinel,
  nonnoise_span_to_unique_sentinel,
  num_noise_spans,
  random_spans_helper,
  random_spans_noise_mask,
  reconstruct_tokens,
  span_corruption,
)
from switchjax.data.tokenizer import (
  EOS_ID,
  PAD_ID,
  UNK_ID,
  Tokenizer,
  check_t5_layout,
  train_tokenizer,
)
from switchjax.data.tokens import token_dtype, tokenize_corpus

# The input pipeline (Grain, JAX), imported on first use.
_LAZY = (
  "ChunkSplit",
  "PretrainingData",
  "SpanCorruptionTask",
  "TrainIterator",
  "make_batch",
  "make_pretraining_data",
)

if TYPE_CHECKING:  # what the lazy names are, for type checkers and editors (never run)
  from switchjax.data.pipeline import (
    ChunkSplit,
    PretrainingData,
    SpanCorruptionTask,
    TrainIterator,
    make_batch,
    make_pretraining_data,
  )


def __getattr__(name: str):
  """The pipeline's names above and the submodules (switchjax.data.prepared), on first use."""
  if name in _LAZY:
    value = getattr(importlib.import_module(f"{__name__}.pipeline"), name)
    globals()[name] = value
    return value
  try:
    return importlib.import_module(f"{__name__}.{name}")
  except ModuleNotFoundError as e:
    if e.name != f"{__name__}.{name}":
      raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(_LAZY))
