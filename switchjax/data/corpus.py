"""Corpora: the embedded default corpus, user files, and the tokenizer trained on them.

A corpus is a deterministic sequence of documents (strings):

- the embedded default corpus (data.paths empty) is text that ships with CPython itself, so it
  needs no download on any machine with Python: the reference documentation topics of
  `pydoc_data.topics` (language reference pages), then the docstrings of 200+ characters of
  the standard library's modules, classes and functions, read from its source files with `ast`
  (nothing is imported). About 1.7 MB of English text (400k tokens at 8000 pieces) on
  Python 3.11. Parsing the standard library takes seconds, so it is cut into DEFAULT_PARTS
  parts (ranges of its files) that local worker processes parse (workers.py); the documents
  are the same, in the same order, for any number of workers.
- user corpora (data.paths: files or globs, in the given order, each glob sorted; local, or
  URLs such as gs://bucket/dir/*.jsonl.gz that etils.epath reads: paths.py):
  `.txt`: one document per paragraph (lines up to a blank line), which streams large files;
  `.jsonl` / `.json`: JSON Lines, one object per line, the text in data.text_field;
  `.parquet`: the string column data.text_field. `.gz` versions of .txt/.jsonl/.json work too.
  A large file is read in Blocks (byte or row-group ranges) by several workers.

Tokenizing a corpus is tokens.py's (`tokenize_corpus`), in the parts of parts.py.
`TokenChunks` cuts the token array into chunks of the raw span-corruption length (568 for
512/114).
"""

from __future__ import annotations

import ast
import bisect
import contextlib
import dataclasses
import functools
import glob
import gzip
import itertools
import json
import logging
import os
import pathlib
import sys
import sysconfig
import warnings
import zlib
from collections.abc import Iterator, Sequence
from typing import IO, Any

import numpy as np

from switchjax.data import cache, paths, workers
from switchjax.data.tokenizer import (
  EmptyTextError,
  Tokenizer,
  VocabularyTooLargeError,
  train_tokenizer,
)

log = logging.getLogger(__name__)

SUPPORTED_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
TOKENIZER_TRAINING_SENTENCES = 300_000  # Lines of the corpus the tokenizer is trained on.
DEFAULT_PARTS = 8  # The embedded corpus is parsed (and tokenized) in this many parts.


# --------------------------------------------------------------------------------------------
# Sources.

_STDLIB_SKIP = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"}
_MIN_DOCSTRING_CHARS = 200


def _stdlib_files() -> list[pathlib.Path]:
  """The standard library's .py files, without tests, IDLE and installed packages."""
  files = []
  for directory, subdirs, names in os.walk(sysconfig.get_paths()["stdlib"]):
    subdirs[:] = [d for d in subdirs if d not in _STDLIB_SKIP]
    files += [pathlib.Path(directory, n) for n in names if n.endswith(".py")]
  return sorted(files)


def _docstrings(path: pathlib.Path) -> list[str]:
  """Docstrings of 200+ characters of the module, classes and functions of a file."""
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # e.g. SyntaxWarning for invalid escapes.
      tree = ast.parse(path.read_bytes())
  except (SyntaxError, ValueError, OSError):
    return []
  docs = []
  for node in ast.walk(tree):
    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
      doc = ast.get_docstring(node)
      if doc and len(doc) >= _MIN_DOCSTRING_CHARS:
        docs.append(doc)
  return docs


def default_parts() -> list[tuple[int, int]]:
  """The embedded corpus's parts: ranges [start, end) of its sources (source 0: the
  documentation topics; source i >= 1: the standard-library file i - 1), contiguous and of
  about equal bytes of Python to parse. Fixed by the installation (its fingerprint)."""
  sizes = [0] + [path.stat().st_size for path in _stdlib_files()]  # the topics parse at once
  ends = list(itertools.accumulate(sizes))  # ends[i]: bytes of sources 0..i
  targets = [ends[-1] * k / DEFAULT_PARTS for k in range(1, DEFAULT_PARTS)]
  cuts = {bisect.bisect_left(ends, target) + 1 for target in targets}  # after the source
  bounds = [0, *sorted(c for c in cuts if 0 < c < len(sizes)), len(sizes)]
  return list(zip(bounds[:-1], bounds[1:]))


def default_part_documents(start: int, end: int) -> list[str]:
  """The documents of sources [start, end) of the embedded corpus (see default_parts)."""
  import pydoc_data.topics

  docs = []
  if start == 0:
    topics = pydoc_data.topics.topics
    docs += [topics[name] for name in sorted(topics)]
  for path in _stdlib_files()[max(start, 1) - 1 : end - 1]:
    docs += _docstrings(path)
  return docs


def _default_part(bounds: tuple[int, int]) -> list[str]:
  return default_part_documents(*bounds)


@functools.lru_cache(maxsize=1)
def default_documents() -> tuple[str, ...]:
  """The embedded corpus's documents: CPython's documentation topics, then stdlib docstrings.

  Its parts are parsed by local worker processes (one per usable core), in order. Kept in
  memory (2 MB) for the process: parsing the standard library takes seconds of CPU.
  """
  parts = default_parts()
  docs = workers.ordered_map(_default_part, parts, workers.num_workers(len(parts)))
  return tuple(itertools.chain.from_iterable(docs))


class DefaultCorpus:
  """The embedded corpus (data.paths empty): text that ships with CPython."""

  @property
  def description(self) -> str:
    return f"the embedded default corpus (Python {sys.version.split()[0]} documentation)"

  def fingerprint(self) -> str:
    import pydoc_data.topics

    files = [pydoc_data.topics.__file__] + _stdlib_files()
    return cache.fingerprint("default-corpus-v1", sys.version, cache.file_stats(files))

  def documents(self) -> Iterator[str]:
    return iter(default_documents())


@dataclasses.dataclass(frozen=True)
class FileCorpus:
  """Documents read from text, JSON Lines and Parquet files (see the module docstring)."""

  files: tuple[pathlib.PurePath, ...]  # pathlib.Path, or etils.epath.Path for URLs
  text_field: str = "text"
  patterns: tuple[str, ...] = ()

  @property
  def description(self) -> str:
    return f"data.paths={self.patterns!r} ({len(self.files)} files)"

  def fingerprint(self) -> str:
    return cache.fingerprint("file-corpus-v1", self.text_field, cache.file_stats(self.files))

  def documents(self) -> Iterator[str]:
    for path in self.files:
      yield from read_documents(path, self.text_field)


def resolve_paths(patterns: Sequence[str]) -> list[pathlib.PurePath]:
  """The files named by `patterns` (paths or globs, ~ expanded; URLs through etils.epath), in
  order, without repeats: pathlib.Path for local files, etils.epath.Path for URLs."""
  files: list[pathlib.PurePath] = []
  for pattern in patterns:
    matches = paths.glob_url(pattern) if paths.is_url(pattern) else _local_matches(pattern)
    if not matches:
      raise ValueError(f"no files match data.paths={pattern!r}; check the path or glob.")
    for match in matches:
      path = paths.file_path(match)
      with paths.backend_errors(match, "list"):
        is_dir = path.is_dir()
      if is_dir:
        raise ValueError(
          f"data.paths entry {match!r} is a directory; give files or a glob "
          f"such as {os.path.join(match, '*.jsonl')!r}."
        )
      _check_suffix(path)
      if path not in files:
        files.append(path)
  return files


def _local_matches(pattern: str) -> list[str]:
  """The local files a path or glob names (~ expanded), each glob sorted."""
  expanded = os.path.expanduser(pattern)
  if glob.has_magic(expanded):
    return sorted(glob.glob(expanded, recursive=True))
  return [expanded] if os.path.exists(expanded) else []


def _suffix(path: pathlib.PurePath) -> str:
  """The format suffix, looking through .gz: a.jsonl.gz -> .jsonl."""
  suffixes = [s.lower() for s in path.suffixes]
  if suffixes and suffixes[-1] == ".gz":
    suffixes = suffixes[:-1]
  return suffixes[-1] if suffixes else ""


def _check_suffix(path: pathlib.PurePath) -> None:
  suffix = _suffix(path)
  gzipped = path.suffix.lower() == ".gz"
  if suffix not in SUPPORTED_SUFFIXES or (gzipped and suffix == ".parquet"):
    name = (suffix + (".gz" if gzipped else "")) or "(no extension)"
    raise ValueError(
      f"{path}: unsupported file type {name!r}; "
      "data.paths takes .txt (a document per paragraph), .jsonl/.json (JSON "
      "Lines with data.text_field) and .parquet files."
    )


def _lines(path: pathlib.PurePath, block: Block | None = None) -> Iterator[tuple[int, str]]:
  """(line number, line without its end) of a UTF-8 text file, gzipped if it ends in .gz.

  The file is read as bytes and decoded line by line, so an encoding error names its line (a
  text-mode reader decodes ahead in blocks). Lines end at \n, \r\n or \r, as in text mode.
  Read and decode errors are ValueErrors naming the file (and the line) and the fix. With a
  `block`, only its lines (see Block); line numbers then count from the block's first line.
  """
  gzipped = path.suffix.lower() == ".gz"
  where = _where(path, block)
  try:
    with _open_bytes(path, gzipped) as f:
      raws = f if block is None else _block_lines(f, block, _suffix(path) == ".txt")
      for number, raw in enumerate(raws, start=1):
        try:
          line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
          raise ValueError(
            f"{where}, line {number}: not valid UTF-8 (byte {raw[e.start]:#04x} at offset "
            f"{e.start} of the line); data.paths files must be UTF-8 text: convert the file, "
            "e.g. with iconv -f latin1 -t utf-8."
          ) from None
        line = line[:-1] if line.endswith("\n") else line
        line = line[:-1] if line.endswith("\r") else line
        if "\r" in line:  # Old Mac line ends.
          for part in line.split("\r"):
            yield number, part
        else:
          yield number, line
  except (OSError, EOFError, zlib.error) as e:
    kind = "gzip" if gzipped else "text"
    raise ValueError(
      f"{where}: cannot read the file ({_one_line(e)}); check that it is a complete, readable "
      f"{kind} file, or remove it from data.paths."
    ) from None


@contextlib.contextmanager
def _open_bytes(path: pathlib.PurePath, gzipped: bool) -> Iterator[IO[bytes] | gzip.GzipFile]:
  """The bytes of a file, decompressed if `gzipped`: a local file or a URL's file object."""
  with paths.open_binary(path) as raw:
    if not gzipped:
      yield raw
      return
    with gzip.GzipFile(fileobj=raw, mode="rb") as f:
      yield f


def _one_line(error: BaseException) -> str:
  return " ".join(str(error).split()) or type(error).__name__


@dataclasses.dataclass(frozen=True)
class Block:
  """A part of one file, so that a large file is read (tokenized) by several workers.

  Text files (.txt, .jsonl, .json, not gzipped): the nominal byte range [start, end); a line
  belongs to the block its first byte is in, and for .txt a paragraph to the block in which its
  first line starts after the first blank line at or after `start` (so no document is cut).
  Parquet: the row groups [start, end). The documents of a file's consecutive blocks are, in
  order, exactly the documents of the whole file.
  """

  start: int
  end: int


def _where(path: pathlib.PurePath, block: Block | None) -> str:
  return str(path) if block is None else f"{path} (block from byte {block.start})"


def _blank(raw: bytes) -> bool:
  """A whitespace-only line: it ends a .txt paragraph (undecodable bytes are not blank)."""
  return not raw.decode("utf-8", errors="replace").strip()


def _block_lines(f, block: Block, paragraphs: bool) -> Iterator[bytes]:
  """The raw lines of `block` of the binary file `f` (see Block), ends included; `paragraphs`
  for .txt files (a block starts after a blank line)."""
  if block.start > 0:
    f.seek(block.start - 1)
    f.readline()  # now at the first line starting at or after block.start
    if paragraphs:  # the block starts after the first blank line at or after its start
      position = f.tell()
      for raw in iter(f.readline, b""):
        if _blank(raw):
          break
        position = f.tell()
      if position >= block.end:
        return  # that blank line is past the block: the next block starts there
  while True:
    position = f.tell()
    raw = f.readline()
    if not raw or (position >= block.end and (not paragraphs or _blank(raw))):
      return
    yield raw


def read_documents(
  path: str | os.PathLike, text_field: str = "text", block: Block | None = None
) -> Iterator[str]:
  """The documents of one file (or of one Block of it), chosen by its extension; `path` may be
  a URL (etils.epath)."""
  file = paths.file_path(path)
  _check_suffix(file)
  suffix = _suffix(file)
  if suffix == ".txt":
    return _txt_documents(file, block)
  if suffix in (".jsonl", ".json"):
    return _jsonl_documents(file, text_field, block)
  return _parquet_documents(file, text_field, block)


def _txt_documents(path: pathlib.PurePath, block: Block | None = None) -> Iterator[str]:
  """Paragraphs: runs of non-blank lines."""
  paragraph: list[str] = []
  for _, line in _lines(path, block):
    if line.strip():
      paragraph.append(line)
    elif paragraph:
      yield "\n".join(paragraph)
      paragraph = []
  if paragraph:
    yield "\n".join(paragraph)


def _jsonl_documents(
  path: pathlib.PurePath, text_field: str, block: Block | None = None
) -> Iterator[str]:
  where = _where(path, block)
  for line_number, line in _lines(path, block):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(
        f"{where}, line {line_number}: not valid JSON ({e.msg}: column {e.colno}); "
        ".jsonl/.json files must hold one JSON object per line (JSON Lines)."
      ) from None
    if not isinstance(record, dict):
      raise ValueError(
        f"{where}, line {line_number}: a JSON {type(record).__name__}, not an object; "
        ".jsonl/.json files must hold one JSON object per line (JSON Lines), the text in "
        "data.text_field."
      )
    if text_field not in record:
      raise ValueError(
        f"{where}, line {line_number}: no field {text_field!r} (the line has: "
        f"{', '.join(map(repr, record))}); set --set data.text_field=NAME to the field that "
        "holds the text."
      )
    text = record[text_field]
    if not isinstance(text, str):
      raise ValueError(
        f"{where}, line {line_number}: field {text_field!r} is a "
        f"{type(text).__name__}, not a string; set --set data.text_field=NAME "
        "to the field that holds the text."
      )
    if text.strip():
      yield text


def _parquet_documents(
  path: pathlib.PurePath, text_field: str, block: Block | None = None
) -> Iterator[str]:
  import pyarrow as pa

  with parquet_file(path) as parquet:
    schema = parquet.schema_arrow
    if text_field not in schema.names:
      raise ValueError(
        f"{path}: no column {text_field!r} (columns: {', '.join(schema.names)}); set "
        "--set data.text_field=NAME to the column that holds the text."
      )
    kind = schema.field(text_field).type
    value_kind = kind.value_type if pa.types.is_dictionary(kind) else kind
    if not (pa.types.is_string(value_kind) or pa.types.is_large_string(value_kind)):
      raise ValueError(
        f"{path}: column {text_field!r} holds {kind}, not strings; set --set "
        "data.text_field=NAME to the column that holds the text."
      )
    groups = None if block is None else range(block.start, block.end)
    batches = parquet.iter_batches(columns=[text_field], batch_size=1024, row_groups=groups)
    while True:
      try:
        batch = next(batches, None)
      except (OSError, ValueError) as e:
        raise _unreadable_parquet(path, e) from None
      if batch is None:
        return
      for text in batch.column(0).to_pylist():
        if isinstance(text, str) and text.strip():
          yield text


@contextlib.contextmanager
def parquet_file(path: pathlib.PurePath) -> Iterator[Any]:
  """pyarrow's ParquetFile of a local file, or over a URL's file object (opened 'rb'); an
  unreadable file is a ValueError naming the fix."""
  import pyarrow.parquet as pq

  with contextlib.ExitStack() as files:
    source = files.enter_context(paths.open_binary(path)) if paths.is_url(str(path)) else path
    # pyarrow's errors: ArrowInvalid (not Parquet, truncated) is a ValueError, IO errors OSError.
    try:
      parquet = pq.ParquetFile(source)
    except (OSError, ValueError) as e:
      raise _unreadable_parquet(path, e) from None
    yield parquet


def _unreadable_parquet(path: pathlib.PurePath, error: Exception) -> ValueError:
  return ValueError(
    f"{path}: not a readable Parquet file ({_one_line(error)}); check the file (a complete "
    "Parquet file), or give the text as .txt or .jsonl files."
  )


def open_corpus(data_cfg) -> DefaultCorpus | FileCorpus:
  """The corpus of a DataConfig: its files, or the embedded default corpus if paths is empty."""
  if not data_cfg.paths:
    return DefaultCorpus()
  patterns = tuple(data_cfg.paths)
  return FileCorpus(tuple(resolve_paths(patterns)), data_cfg.text_field, patterns)


def empty_corpus_error(corpus) -> ValueError:
  hint = " (is data.text_field right?)" if isinstance(corpus, FileCorpus) else ""
  return ValueError(
    f"the corpus is empty: {corpus.description} holds no text{hint}; add "
    "documents to the files or point data.paths at other files."
  )


# --------------------------------------------------------------------------------------------
# The tokenizer of a corpus.


def get_tokenizer(data_cfg, corpus=None) -> Tokenizer:
  """The tokenizer of a DataConfig.

  data.spm_path if set (it must exist); otherwise a T5-layout unigram model with
  data.spm_vocab_size pieces trained on the first TOKENIZER_TRAINING_SENTENCES lines of the
  corpus at first use and cached under the cache directory, keyed by the corpus files and the
  vocabulary size. The number of sentinels is data.extra_ids.

  The embedded default corpus (about 1.7 MB of text) supports about 12,000 pieces; presets made
  for real corpora ask for 32,000. On the default corpus only, the tokenizer is then trained
  with as many pieces as the text allows, with a warning, so that any preset runs without a
  download; on a user corpus a vocabulary the text cannot support is an error.
  """
  extra_ids = data_cfg.extra_ids
  if data_cfg.spm_path:
    if not os.path.exists(os.path.expanduser(data_cfg.spm_path)):
      raise ValueError(
        f"data.spm_path={data_cfg.spm_path!r} does not exist; point it at a "
        "SentencePiece .model file (e.g. an HF checkpoint's spiece.model), or "
        "leave it unset to train a tokenizer on the corpus."
      )
    return Tokenizer(
      os.path.expanduser(data_cfg.spm_path), extra_ids=extra_ids, setting="data.spm_path"
    )
  corpus = corpus or open_corpus(data_cfg)
  vocab = data_cfg.spm_vocab_size
  key = cache.fingerprint("spm-v1", corpus.fingerprint(), vocab, TOKENIZER_TRAINING_SENTENCES)
  path = cache.cache_dir(data_cfg.cache_dir) / "tokenizers" / f"spm{vocab}-{key}.model"
  if not path.exists():
    log.info(
      "Training a %d-piece SentencePiece tokenizer on %s (first use; cached at %s).",
      vocab,
      corpus.description,
      path,
    )
    try:
      try:
        train_tokenizer(corpus.documents(), vocab, path, max_sentences=TOKENIZER_TRAINING_SENTENCES)
      except VocabularyTooLargeError as e:
        if not isinstance(corpus, DefaultCorpus):
          raise
        log.warning(
          "The embedded default corpus supports at most %d SentencePiece pieces; "
          "training %d instead of data.spm_vocab_size=%d (give data.paths for a "
          "real run).",
          e.limit,
          e.limit,
          vocab,
        )
        train_tokenizer(
          corpus.documents(), e.limit, path, max_sentences=TOKENIZER_TRAINING_SENTENCES
        )
    except EmptyTextError:
      raise empty_corpus_error(corpus) from None
  return Tokenizer(path, extra_ids=extra_ids)


# --------------------------------------------------------------------------------------------
# Batches of documents, chunks of tokens.


def in_batches(items, size):
  """Lists of `size` consecutive items (the last may be shorter)."""
  batch = []
  for item in items:
    batch.append(item)
    if len(batch) == size:
      yield batch
      batch = []
  if batch:
    yield batch


@dataclasses.dataclass(frozen=True)
class TokenChunks:
  """The flat token array cut into consecutive chunks of `chunk_length` tokens.

  Chunk i is tokens[i * chunk_length : (i + 1) * chunk_length]; the final partial chunk (fewer
  than chunk_length tokens) is dropped, so every example fills the lengths exactly.
  """

  tokens: np.ndarray  # [num_tokens], memory-mapped
  chunk_length: int

  def __len__(self) -> int:
    return len(self.tokens) // self.chunk_length

  def __getitem__(self, i: int) -> np.ndarray:
    if not 0 <= i < len(self):
      raise IndexError(f"chunk {i} out of range [0, {len(self)}).")
    start = i * self.chunk_length
    return np.asarray(self.tokens[start : start + self.chunk_length], dtype=np.int32)
