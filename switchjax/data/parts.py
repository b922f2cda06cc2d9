"""A corpus in parts, and the encoding of a part: what the local tokenization (tokens.py) and
a prepared corpus's workers (prepared.py) share.

The parts of a corpus (`plan_parts`), in stream order: a part per input file, or per Block (64
MB of a large uncompressed text or JSON Lines file, or a group of Parquet row groups); the
embedded default corpus in its DEFAULT_PARTS ranges of sources. Parts are independent, so
processes can read and encode them in any order; concatenated in part order, their tokens are
the documents' tokens in corpus order, without separators (T5's `reduce_concat_tokens`):
encoding is per document, so neither the parts nor the encoding batches change a byte.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import pathlib
from collections.abc import Iterable, Iterator

import numpy as np

from switchjax.data import paths
from switchjax.data.corpus import (
  Block,
  DefaultCorpus,
  default_documents,
  default_part_documents,
  default_parts,
  in_batches,
  parquet_file,
  read_documents,
)
from switchjax.data.tokenizer import Tokenizer, call_interruptibly

DEFAULT_BLOCK_BYTES = 64 << 20  # A part per 64 MB of a large text file.
ENCODE_BATCH_DOCS = 512  # Documents per SentencePiece encode_batch call.


@dataclasses.dataclass(frozen=True)
class PartSpec:
  """Part `index`: the documents of `source` (a file, a URL, or 'default' for the embedded
  corpus), or of one Block of it (for 'default': the range of its sources, see
  corpus.default_parts)."""

  index: int
  source: str
  block: tuple[int, int] | None = None

  @property
  def name(self) -> str:
    return f"part-{self.index:05d}"

  def documents(self, text_field: str) -> Iterable[str]:
    if self.source == "default":
      return default_part_documents(*self.block) if self.block else default_documents()
    block = Block(*self.block) if self.block else None
    return read_documents(self.source, text_field, block)

  def to_json(self) -> dict:
    return {"index": self.index, "source": self.source, "block": list(self.block or []) or None}


def _file_blocks(path: pathlib.PurePath, block_bytes: int) -> list[tuple[int, int] | None]:
  """The Blocks of one file (local, or a URL's etils.epath.Path): byte ranges of text files,
  row-group ranges of Parquet files; [None] (the whole file) for gzipped and small files."""
  with paths.backend_errors(str(path)):
    size = paths.file_size(path)
  if path.suffix.lower() == ".gz" or size <= block_bytes:
    return [None]
  if path.suffix.lower() == ".parquet":
    with parquet_file(path) as parquet:
      groups = parquet.metadata.num_row_groups
    per_block = max(1, groups * block_bytes // size)
    return [(s, min(s + per_block, groups)) for s in range(0, groups, per_block)]
  return [(s, min(s + block_bytes, size)) for s in range(0, size, block_bytes)]


def plan_parts(corpus, block_bytes: int = DEFAULT_BLOCK_BYTES) -> list[PartSpec]:
  """The parts of a corpus in stream order: a part per file, or per Block of a large file; the
  embedded corpus's DEFAULT_PARTS ranges of sources."""
  if isinstance(corpus, DefaultCorpus):
    return [PartSpec(i, "default", bounds) for i, bounds in enumerate(default_parts())]
  specs: list[PartSpec] = []
  for path in corpus.files:
    source = str(path) if paths.is_url(str(path)) else str(pathlib.Path(path).resolve())
    for block in _file_blocks(paths.file_path(path), block_bytes):
      specs.append(PartSpec(len(specs), source, block))
  return specs


def encode_batches(
  spec: PartSpec, tokenizer: Tokenizer, text_field: str, dtype, num_threads: int | None
) -> Iterator[tuple[np.ndarray, list[int]]]:
  """A part's documents encoded ENCODE_BATCH_DOCS at a time: per batch, (its ids concatenated,
  `dtype` [n], the number of ids of each document). SentencePiece runs `num_threads` threads
  (None: one per core), waited on interruptibly (tokenizer.call_interruptibly)."""
  dtype = np.dtype(dtype)
  for docs in in_batches(spec.documents(text_field), ENCODE_BATCH_DOCS):
    encoded = call_interruptibly(tokenizer.encode_batch, docs, num_threads=num_threads)
    lengths = list(map(len, encoded))
    yield np.fromiter(itertools.chain.from_iterable(encoded), dtype, sum(lengths)), lengths


def encode_part(spec, tokenizer, text_field, dtype, num_threads) -> tuple[bytes, list[int]]:
  """(token bytes, document ends) of a whole part: its documents' ids, no separators."""
  pieces, ends, count = [], [], 0
  for ids, lengths in encode_batches(spec, tokenizer, text_field, dtype, num_threads):
    pieces.append(ids.tobytes())
    for length in lengths:
      count += length
      ends.append(count)
  return b"".join(pieces), ends


@functools.lru_cache(maxsize=4)
def load_tokenizer(spm_path: str, extra_ids: int, fingerprint: str | None = None) -> Tokenizer:
  """A tokenizer loaded once per worker process; with `fingerprint`, checked to be the one the
  caller holds (the model file was not replaced meanwhile)."""
  tokenizer = Tokenizer(spm_path, extra_ids=extra_ids)
  if fingerprint is not None and tokenizer.fingerprint != fingerprint:
    raise ValueError(
      f"the tokenizer {spm_path} changed while the corpus was being tokenized; run again "
      "(and do not rewrite a tokenizer that runs are using)."
    )
  return tokenizer
