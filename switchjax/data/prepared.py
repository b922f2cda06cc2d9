"""Prepared corpora: a corpus tokenized once, into a directory every host of a pod can read.

A prepared corpus is a directory (local, an NFS or gcsfuse mount, or a URL such as gs://...
that etils.epath opens) holding

  spiece.model            the tokenizer's SentencePiece model (the sentinels: extra_ids)
  preparation.json        what is being prepared: corpus, tokenizer, the parts (written first)
  part-NNNNN.tokens       the token ids of one part (parts.py: an input file, a Block of a
                          large file, a range of the embedded corpus's sources), raw
                          little-endian `dtype` values (uint16 when the vocabulary fits)
  part-NNNNN.ends         int64 [num_documents]: the end of each document in the part's tokens
  part-NNNNN.json         the part's record (token and document counts, sha256), written after
                          its .tokens and .ends: a part with a record is finished
  manifest.json           the parts in order and their counts (written last: the corpus is
                          complete when it exists)

Every file is written under a temporary name and renamed, so a killed preparation leaves whole
files only, and a rerun reuses the finished parts. The parts concatenated are exactly the token
array `tokens.tokenize_corpus` caches for a run without a prepared corpus (the same parts,
encoded alike, documents concatenated without separators), so a run reading a prepared corpus
gets the same chunks, batches and noise as one that tokenizes the corpus itself.

A run (data.prepared=DIR) reads manifest.json and spiece.model at start-up and then only the
byte ranges of the chunks of its own rows (np.memmap for local directories, seek and read
through etils.epath for URLs): its start-up time and memory do not grow with the corpus.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import pathlib
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from switchjax.data import cache, paths
from switchjax.data.corpus import get_tokenizer, open_corpus
from switchjax.data.parts import (
  DEFAULT_BLOCK_BYTES,
  PartSpec,
  encode_part,
  load_tokenizer,
  plan_parts,
)
from switchjax.data.paths import is_url  # re-exported; URL tests patch it here
from switchjax.data.tokenizer import Tokenizer
from switchjax.data.tokens import token_dtype
from switchjax.errors import one_line

log = logging.getLogger(__name__)

FORMAT = "switchjax-prepared-corpus"
VERSION = 1
MANIFEST, PREPARATION, SPIECE = "manifest.json", "preparation.json", "spiece.model"
_OPEN_PARTS = 64  # Part files a reader keeps open.


# --------------------------------------------------------------------------------------------
# Paths: local directories as pathlib, URLs through etils.epath.


def as_path(location: str | os.PathLike):
  """A path object for `location`: pathlib for local paths, etils.epath for URLs (gs://...);
  a URL is what this module's `is_url` says (tests patch it to run the URL code locally)."""
  return paths.as_path(location, url=is_url(str(location)))


def _write_atomic(path, data: bytes) -> None:
  """Writes `data` to a temporary name next to `path`, then renames it to `path`."""
  tmp = path.parent / f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
  try:
    tmp.write_bytes(data)
    tmp.replace(path)  # overwrites (a rerun rewrites spiece.model and preparation.json)
  finally:
    if tmp.exists():
      tmp.unlink()


def _write_json(path, value: Any) -> None:
  _write_atomic(path, (json.dumps(value, indent=1, sort_keys=True) + "\n").encode())


def _read_json(path) -> dict:
  return json.loads(path.read_text())


# --------------------------------------------------------------------------------------------
# Writing.


@dataclasses.dataclass(frozen=True)
class Preparation:
  """What a preparation makes: written to preparation.json before the first part, compared by
  a rerun (which then reuses finished parts), copied into the manifest."""

  corpus: dict  # description, fingerprint, patterns, text_field
  tokenizer: dict  # fingerprint, sha256 of spiece.model, extra_ids, sizes, data settings
  dtype: str
  block_bytes: int
  parts: tuple[PartSpec, ...]

  def to_json(self) -> dict:
    return {
      "format": FORMAT,
      "version": VERSION,
      "corpus": self.corpus,
      "tokenizer": self.tokenizer,
      "dtype": self.dtype,
      "block_bytes": self.block_bytes,
      "parts": [p.to_json() for p in self.parts],
    }


def describe_preparation(
  data_cfg, tokenizer: Tokenizer, corpus, block_bytes: int = DEFAULT_BLOCK_BYTES
) -> Preparation:
  """The Preparation of a corpus with a tokenizer (lists and stats the input files)."""
  corpus_info = {
    "description": corpus.description,
    "fingerprint": corpus.fingerprint(),
    "patterns": list(data_cfg.paths),
    "text_field": data_cfg.text_field,
  }
  model = pathlib.Path(tokenizer.spm_path).read_bytes()
  tokenizer_info = {
    "fingerprint": tokenizer.fingerprint,
    "spiece_sha256": hashlib.sha256(model).hexdigest(),
    "extra_ids": tokenizer.extra_ids,
    "num_pieces": tokenizer.num_pieces,
    "vocab_size": tokenizer.vocab_size,
    "trained": not data_cfg.spm_path,  # else data.spm_path (wherever that file is)
    "spm_vocab_size": None if data_cfg.spm_path else data_cfg.spm_vocab_size,
  }
  dtype = token_dtype(tokenizer.vocab_size)
  parts = tuple(plan_parts(corpus, block_bytes))
  return Preparation(corpus_info, tokenizer_info, dtype.name, block_bytes, parts)


def begin(output, preparation: Preparation, tokenizer: Tokenizer) -> None:
  """Makes `output` a preparation in progress: checks it is empty, or holds this very
  preparation (a rerun: its finished parts are kept), then writes spiece.model and
  preparation.json. Leftover temporary files of killed writers are removed."""
  out = as_path(output)
  wanted = preparation.to_json()
  if out.exists() and any(out.iterdir()):
    if not (out / PREPARATION).exists():
      raise ValueError(
        f"--output={output} is not empty and holds no preparation ({PREPARATION}); give a "
        "new or empty directory."
      )
    found = _read_json(out / PREPARATION)
    if found != wanted:
      raise ValueError(
        f"--output={output} holds the preparation of {_difference(found, wanted)}; give a "
        "new or empty directory, or delete it to prepare again."
      )
    for leftover in out.glob(".*.tmp"):
      leftover.unlink()
  out.mkdir(parents=True, exist_ok=True)
  _write_atomic(out / SPIECE, pathlib.Path(tokenizer.spm_path).read_bytes())
  _write_json(out / PREPARATION, wanted)


def _difference(found: dict, wanted: dict) -> str:
  """What differs between two preparations, in words."""
  if found.get("format") != FORMAT or found.get("version") != VERSION:
    return f"another format ({found.get('format')} v{found.get('version')})"
  if found["tokenizer"] != wanted["tokenizer"]:
    return "another tokenizer (its spiece.model or extra_ids differ)"
  if found["corpus"] != wanted["corpus"]:
    return f"another corpus ({found['corpus']['description']}, or files changed since)"
  return "the same corpus cut into other parts (block size)"


def part_is_finished(output, spec: PartSpec, dtype: np.dtype) -> bool:
  """A part is finished when its record exists and its tokens file has the recorded size."""
  out = as_path(output)
  record_path = out / f"{spec.name}.json"
  if not record_path.exists():
    return False
  record = _read_json(record_path)
  tokens = out / f"{spec.name}.tokens"
  return (
    record.get("part") == spec.to_json()
    and tokens.exists()
    and paths.file_size(tokens) == record["num_tokens"] * np.dtype(dtype).itemsize
  )


def write_part(
  output, spec: PartSpec, tokenizer: Tokenizer, text_field: str, dtype, num_threads=None
) -> dict:
  """Tokenizes one part into `output` (skipped if already finished); returns its record."""
  out = as_path(output)
  dtype = np.dtype(dtype)
  if not part_is_finished(out, spec, dtype):
    tokens, ends = encode_part(spec, tokenizer, text_field, dtype, num_threads)
    record = {
      "part": spec.to_json(),
      "num_tokens": len(tokens) // dtype.itemsize,
      "num_documents": len(ends),
      "sha256": hashlib.sha256(tokens).hexdigest(),
    }
    _write_atomic(out / f"{spec.name}.tokens", tokens)
    _write_atomic(out / f"{spec.name}.ends", np.asarray(ends, np.int64).tobytes())
    _write_json(out / f"{spec.name}.json", record)
  return _read_json(out / f"{spec.name}.json")


def finish(output, preparation: Preparation) -> dict:
  """Writes manifest.json from the parts' records (all must be finished); returns it."""
  out = as_path(output)
  records = []
  for spec in preparation.parts:
    if not part_is_finished(out, spec, np.dtype(preparation.dtype)):
      raise ValueError(
        f"{output}: {spec.name} was not written (a worker failed); rerun the same "
        "preparation to finish it."
      )
    record = _read_json(out / f"{spec.name}.json")
    records.append({"name": spec.name, **{k: v for k, v in record.items() if k != "part"}})
  manifest = preparation.to_json()
  manifest["parts"] = [{**p.to_json(), **r} for p, r in zip(preparation.parts, records)]
  manifest["num_tokens"] = sum(r["num_tokens"] for r in records)
  manifest["num_documents"] = sum(r["num_documents"] for r in records)
  if manifest["num_tokens"] == 0:
    raise ValueError(
      f"the corpus is empty: {preparation.corpus['description']} holds no text; add "
      "documents to the files or point data.paths at other files."
    )
  _write_json(out / MANIFEST, manifest)
  return manifest


def prepare(
  data_cfg,
  output,
  *,
  block_bytes: int = DEFAULT_BLOCK_BYTES,
  map_parts: Callable | None = None,
  num_threads: int | None = None,
) -> dict:
  """Prepares the corpus of a DataConfig into `output`; returns the manifest.

  The tokenizer is data.spm_path, or the one trained on the corpus (and cached) as a run
  without a prepared corpus trains it. `map_parts(fn, specs)` runs fn on every PartSpec (the
  default: in this process, in order; scripts/prepare_data.py passes a parallel one).
  """
  data_cfg.validate()
  corpus = open_corpus(data_cfg)
  tokenizer = get_tokenizer(data_cfg, corpus)
  preparation = describe_preparation(data_cfg, tokenizer, corpus, block_bytes)
  begin(output, preparation, tokenizer)
  out, dtype = as_path(output), np.dtype(preparation.dtype)
  todo = [s for s in preparation.parts if not part_is_finished(out, s, dtype)]
  if todo and (out / MANIFEST).exists():
    (out / MANIFEST).unlink()  # a damaged corpus being completed: not readable meanwhile
  log.info("Preparing %d of %d parts of %s.", len(todo), len(preparation.parts), corpus.description)
  task = functools.partial(
    _write_spec,
    str(output),
    tokenizer.spm_path,
    tokenizer.extra_ids,
    data_cfg.text_field,
    preparation.dtype,
    num_threads,
  )
  list((map_parts or map)(task, todo))
  return finish(output, preparation)


def _write_spec(output, spm_path, extra_ids, text_field, dtype, num_threads, spec) -> int:
  """write_part with a tokenizer loaded once per process: picklable for worker processes."""
  tokenizer = load_tokenizer(spm_path, extra_ids)
  record = write_part(output, spec, tokenizer, text_field, dtype, num_threads)
  return record["num_tokens"]


# --------------------------------------------------------------------------------------------
# Reading.


class PartedTokens:
  """The concatenated parts as one read-only token array: len() and slicing [a:b] only.

  Parts are opened at their first read (np.memmap for local directories, a file object for
  URLs), and their size is checked then, so start-up reads the manifest only.
  """

  def __init__(self, location: str, names: Sequence[str], counts: Sequence[int], dtype):
    self.location, self.names, self.dtype = location, list(names), np.dtype(dtype)
    self.counts = np.asarray(counts, np.int64)  # [num_parts]
    self.starts = np.concatenate([[0], np.cumsum(self.counts)])  # [num_parts + 1]
    self._open: dict[int, Any] = {}
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return int(self.starts[-1])

  def __getitem__(self, index: slice) -> np.ndarray:
    if not isinstance(index, slice) or index.step not in (None, 1):
      raise TypeError("PartedTokens supports contiguous slices [a:b] only.")
    start, stop, _ = index.indices(len(self))
    if stop <= start:
      return np.zeros((0,), self.dtype)
    first = int(np.searchsorted(self.starts, start, side="right")) - 1
    pieces = []
    part = first
    while start < stop:
      part_start, part_end = int(self.starts[part]), int(self.starts[part + 1])
      end = min(stop, part_end)
      if end > start:
        pieces.append(self._read(part, start - part_start, end - part_start))
      start, part = end, part + 1
    return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

  def _read(self, part: int, start: int, stop: int) -> np.ndarray:
    """Tokens [start, stop) of one part."""
    handle = self._handle(part)
    if isinstance(handle, np.ndarray):
      return np.array(handle[start:stop])
    with self._lock:
      handle.seek(start * self.dtype.itemsize)
      data = handle.read((stop - start) * self.dtype.itemsize)
    return np.frombuffer(data, self.dtype)

  def _handle(self, part: int):
    with self._lock:
      if part not in self._open:
        if len(self._open) >= _OPEN_PARTS:
          old = self._open.pop(next(iter(self._open)))
          getattr(old, "close", lambda: None)()
        self._open[part] = self._open_part(part)
      return self._open[part]

  def _open_part(self, part: int):
    with paths.backend_errors(self.location):
      return self._open_part_file(part)

  def _open_part_file(self, part: int):
    path = as_path(self.location) / f"{self.names[part]}.tokens"
    expected = int(self.counts[part]) * self.dtype.itemsize
    size = paths.file_size(path) if path.exists() else None
    if size != expected:
      state = "is missing" if size is None else f"has {size} bytes, not {expected} (truncated)"
      raise ValueError(
        f"prepared corpus {self.location}: {path.name} {state}; rerun scripts/prepare_data.py "
        "with the same settings to rewrite it."
      )
    if expected == 0:
      return np.zeros((0,), self.dtype)
    if is_url(self.location):
      return path.open("rb")
    return np.memmap(path, dtype=self.dtype, mode="r", shape=(int(self.counts[part]),))


@dataclasses.dataclass
class PreparedCorpus:
  """A prepared corpus opened for reading: its manifest and where it is."""

  location: str
  manifest: dict

  @property
  def description(self) -> str:
    return f"data.prepared={self.location!r} ({self.manifest['corpus']['description']})"

  def tokens(self) -> PartedTokens:
    parts = self.manifest["parts"]
    return PartedTokens(
      self.location,
      [p["name"] for p in parts],
      [p["num_tokens"] for p in parts],
      self.manifest["dtype"],
    )

  def tokenizer(self, cache_root, extra_ids: int) -> Tokenizer:
    """The corpus's tokenizer, its spiece.model copied to the local cache (checked)."""
    info = self.manifest["tokenizer"]
    path = pathlib.Path(cache_root) / "tokenizers" / f"prepared-{info['spiece_sha256'][:20]}.model"
    if not path.exists():
      model = as_path(self.location) / SPIECE
      data = model.read_bytes() if model.exists() else b""
      if hashlib.sha256(data).hexdigest() != info["spiece_sha256"]:
        raise ValueError(
          f"prepared corpus {self.location}: {SPIECE} is missing or is another tokenizer than "
          "its manifest's; prepare the corpus again (scripts/prepare_data.py)."
        )
      path.parent.mkdir(parents=True, exist_ok=True)
      cache.atomic_write_bytes(path, data)
    return Tokenizer(path, extra_ids=extra_ids)


def open_prepared(location: str) -> PreparedCorpus:
  """Reads the manifest of a prepared corpus; a missing or unfinished one is a ValueError, as
  is a URL this machine cannot read (no gcsfs for gs://, no credentials)."""
  location = str(location)
  with paths.backend_errors(location):
    return _open_prepared(location)


def _open_prepared(location: str) -> PreparedCorpus:
  root = as_path(location)
  setting = f"data.prepared={location!r}"
  if not root.exists():
    raise ValueError(
      f"{setting} does not exist; prepare the corpus there first: python "
      f"scripts/prepare_data.py --config=... --output={location}."
    )
  if not (root / MANIFEST).exists():
    if (root / PREPARATION).exists():
      raise ValueError(
        f"{setting} is still being prepared, or its preparation was killed (no {MANIFEST} "
        "yet); wait for scripts/prepare_data.py to finish, or rerun it with the same "
        "settings to complete it."
      )
    raise ValueError(
      f"{setting} is not a prepared corpus (no {MANIFEST}); make one with "
      f"scripts/prepare_data.py --output={location}."
    )
  try:
    manifest = _read_json(root / MANIFEST)
  except (OSError, ValueError) as e:
    raise ValueError(
      f"{setting}: {MANIFEST} cannot be read ({one_line(e, 120)}); prepare the corpus again."
    ) from None
  if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
    raise ValueError(
      f"{setting}: {MANIFEST} is not a switchjax prepared corpus of version {VERSION}; "
      "prepare the corpus again with this version's scripts/prepare_data.py."
    )
  return PreparedCorpus(location, manifest)


def check_settings(prepared: PreparedCorpus, data_cfg) -> None:
  """The run's data settings that decide the tokens must agree with the prepared corpus's:
  data.paths and data.text_field (when data.paths is set), data.extra_ids, and
  data.spm_vocab_size (when the tokenizer was trained, not given)."""
  corpus, tok = prepared.manifest["corpus"], prepared.manifest["tokenizer"]
  where = f"data.prepared={prepared.location!r}"
  if data_cfg.paths and list(data_cfg.paths) != corpus["patterns"]:
    _disagree(where, "data.paths", data_cfg.paths, tuple(corpus["patterns"]))
  if data_cfg.paths and data_cfg.text_field != corpus["text_field"]:
    _disagree(where, "data.text_field", data_cfg.text_field, corpus["text_field"])
  if data_cfg.extra_ids != tok["extra_ids"]:
    _disagree(where, "data.extra_ids", data_cfg.extra_ids, tok["extra_ids"])
  trained = not data_cfg.spm_path and tok["trained"]
  if trained and data_cfg.spm_vocab_size != tok["spm_vocab_size"]:
    _disagree(where, "data.spm_vocab_size", data_cfg.spm_vocab_size, tok["spm_vocab_size"])
  if data_cfg.paths:
    _check_same_files(prepared, data_cfg)


def _check_same_files(prepared: PreparedCorpus, data_cfg) -> None:
  """Where the run sees data.paths itself (one machine, a shared mount, URLs), they must still
  be the files the corpus was prepared from (URLs: read again to hash them); on hosts without
  them (or without the file-system package of their URLs) the manifest is trusted."""
  try:
    fingerprint = open_corpus(data_cfg).fingerprint()
  except (ValueError, OSError):
    return
  if fingerprint != prepared.manifest["corpus"]["fingerprint"]:
    raise ValueError(
      f"data.prepared={prepared.location!r} was prepared from another corpus: the files of "
      f"data.paths={tuple(data_cfg.paths)!r} changed since; prepare the corpus again, or "
      "leave data.paths empty to train on the prepared corpus as it is."
    )


def _disagree(where: str, setting: str, run_value, prepared_value) -> None:
  raise ValueError(
    f"{setting}={run_value!r} disagrees with {where}, prepared with {setting}="
    f"{prepared_value!r}; set {setting}={prepared_value!r}"
    + (" or leave data.paths empty" if setting == "data.paths" else "")
    + ", or prepare the corpus again with this run's settings."
  )


def check_tokenizer(prepared: PreparedCorpus, tokenizer: Tokenizer, origin: str) -> None:
  """A tokenizer given to the run (`origin`: the workdir's, data.spm_path) must be the one the
  corpus was prepared with."""
  if tokenizer.fingerprint != prepared.manifest["tokenizer"]["fingerprint"]:
    raise ValueError(
      f"data.prepared={prepared.location!r} was tokenized with another tokenizer than "
      f"{origin} (its spiece.model or extra_ids differ); use the corpus's tokenizer, or "
      "prepare the corpus with this one."
    )


def load_prepared(data_cfg, tokenizer: Tokenizer | None = None):
  """(PreparedCorpus, its tokenizer, its tokens) for a run with data.prepared set, checked
  against the run's data settings and the tokenizer the run was given."""
  prepared = open_prepared(data_cfg.prepared)
  try:
    check_settings(prepared, data_cfg)
    tokens = prepared.tokens()
  except (KeyError, TypeError) as e:  # a manifest edited by hand, or from a development version
    raise ValueError(
      f"data.prepared={prepared.location!r}: {MANIFEST} lacks or garbles {one_line(e)}; "
      "prepare the corpus again (scripts/prepare_data.py)."
    ) from None
  if data_cfg.spm_path:
    given = Tokenizer(
      os.path.expanduser(data_cfg.spm_path), data_cfg.extra_ids, setting="data.spm_path"
    )
    check_tokenizer(prepared, given, f"data.spm_path={data_cfg.spm_path!r}")
  if tokenizer is not None:
    check_tokenizer(prepared, tokenizer, f"the run's tokenizer ({tokenizer.spm_path})")
  own = prepared.tokenizer(cache.cache_dir(data_cfg.cache_dir), data_cfg.extra_ids)
  return prepared, tokenizer or own, tokens


def concatenated_tokens(location: str) -> np.ndarray:
  """All tokens of a prepared corpus in one array (for tests and checks: reads every part)."""
  tokens = open_prepared(location).tokens()
  return tokens[0 : len(tokens)]
