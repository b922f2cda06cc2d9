"""Tokenized corpora: all documents' ids concatenated, cached as one memory-mapped .npy.

`tokenize_corpus` concatenates the token ids of all documents without separators, as T5's
`reduce_concat_tokens` does (no eos between documents), into one flat array saved as
tokens-KEY.npy in the cache (KEY: the corpus's fingerprint and the tokenizer's hash), so a
corpus is tokenized once and not per run.

The corpus is read and encoded in the parts of parts.plan_parts (a file, a 64 MB block of a
large one, a range of the embedded corpus's sources), by local worker processes (one per
usable core, each with cores / workers SentencePiece threads: workers.py) when there are
several cores and parts, else in this process as one stream. Either way the parts' tokens are
written in part order, so the bytes do not depend on the number of workers, and they are those
of a prepared corpus's parts concatenated (prepared.py).

A worker writes its part to a temporary file next to the cache entry, which this process
appends to the raw temporary; the raw ids are then copied into the .npy under a temporary name
and renamed. An error (a reader's one-line message naming the file), Ctrl-C or SIGTERM stops
the workers and leaves no file behind.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import pathlib
import shutil

import numpy as np

from switchjax.data import cache, workers
from switchjax.data.corpus import DefaultCorpus, default_documents, empty_corpus_error
from switchjax.data.parts import PartSpec, encode_batches, load_tokenizer, plan_parts
from switchjax.data.tokenizer import Tokenizer

log = logging.getLogger(__name__)


def token_dtype(vocab_size: int) -> np.dtype:
  """uint16 when every id fits (vocab_size < 65536), else int32."""
  return np.dtype(np.uint16 if vocab_size < 2**16 else np.int32)


def tokenize_corpus(
  corpus, tokenizer: Tokenizer, cache_root: str | os.PathLike, num_workers: int | None = None
) -> np.ndarray:
  """All documents' ids concatenated without separators: a read-only memmap [num_tokens].

  Cached as tokens-KEY.npy under `cache_root`/tokens, KEY from the corpus fingerprint and the
  tokenizer's hash. `num_workers`: worker processes (default: workers.LOCAL_WORKERS, else one
  per usable core); the array is the same for any number.
  """
  key = cache.fingerprint("tokens-v1", corpus.fingerprint(), tokenizer.fingerprint)
  path = pathlib.Path(cache_root) / "tokens" / f"tokens-{key}.npy"
  if not path.exists():
    log.info("Tokenizing %s (first use; cached at %s).", corpus.description, path)
    _write_tokens(corpus, tokenizer, path, num_workers)
  return np.load(path, mmap_mode="r")


def _write_tokens(corpus, tokenizer: Tokenizer, path: pathlib.Path, num_workers=None) -> None:
  """Writes the ids to a raw temporary file, then copies them into the .npy (atomically)."""
  dtype = token_dtype(tokenizer.vocab_size)
  raw_path = cache.temporary_path(path.with_suffix(".raw"))
  try:
    with open(raw_path, "wb") as raw:
      num_tokens = _write_raw(corpus, tokenizer, raw, raw_path, dtype, num_workers)
    if num_tokens == 0:
      raise empty_corpus_error(corpus)
    source = np.memmap(raw_path, dtype=dtype, mode="r", shape=(num_tokens,))
    with cache.atomic_path(path) as tmp:
      target = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(num_tokens,))
      step = 1 << 24
      for start in range(0, num_tokens, step):
        target[start : start + step] = source[start : start + step]
      target.flush()
      del target, source
  finally:
    raw_path.unlink(missing_ok=True)
    for leftover in raw_path.parent.glob(f"{raw_path.name}.part-*"):
      leftover.unlink(missing_ok=True)  # parts of workers that were stopped


def _write_raw(corpus, tokenizer, raw, raw_path: pathlib.Path, dtype, num_workers) -> int:
  """Writes the ids of all parts, in part order, to the open file `raw`; returns their count."""
  specs = plan_parts(corpus)
  text_field = getattr(corpus, "text_field", "text")
  count = workers.num_workers(len(specs), num_workers)
  if count <= 1 or _held_in_memory(corpus):  # one stream in this process, all cores encoding
    total = 0
    for spec in specs:
      for ids, _ in encode_batches(spec, tokenizer, text_field, dtype, None):
        raw.write(ids.tobytes())
        total += len(ids)
    return total
  log.info("Tokenizing %d parts in %d worker processes.", len(specs), count)
  task = functools.partial(
    _tokenize_part,
    tokenizer.spm_path,
    tokenizer.extra_ids,
    tokenizer.fingerprint,
    text_field,
    dtype.name,
    workers.threads_per_worker(count),
    str(raw_path),
  )
  total = 0
  with contextlib.closing(workers.ordered_map(task, specs, count)) as parts:
    for part_path, num_tokens in parts:
      with open(part_path, "rb") as part:
        shutil.copyfileobj(part, raw, 1 << 22)
      os.unlink(part_path)
      total += num_tokens
  return total


def _held_in_memory(corpus) -> bool:
  """The embedded corpus whose documents this process has parsed already (to train the
  tokenizer): encoding them here beats parsing them again in workers."""
  return isinstance(corpus, DefaultCorpus) and default_documents.cache_info().currsize > 0


def _tokenize_part(
  spm_path: str,
  extra_ids: int,
  fingerprint: str,
  text_field: str,
  dtype: str,
  num_threads: int,
  raw_path: str,
  spec: PartSpec,
) -> tuple[str, int]:
  """In a worker: writes the ids of part `spec` to `raw_path`.part-NNNNN (temporary, beside
  the cache entry); returns that path and the number of ids. Picklable (module level)."""
  tokenizer = load_tokenizer(spm_path, extra_ids, fingerprint)
  path, total = f"{raw_path}.{spec.name}", 0
  with open(path, "wb") as out:
    for ids, _ in encode_batches(spec, tokenizer, text_field, dtype, num_threads):
      out.write(ids.tobytes())
      total += len(ids)
  return path, total
