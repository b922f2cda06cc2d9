"""The on-disk cache of trained tokenizers and tokenized corpora.

Entries are named by a fingerprint of what they were made from (file paths, sizes and
modification times; the tokenizer's hash; the settings), so a changed input makes a new entry
instead of reusing a stale one. Every entry is written to a temporary file and renamed into
place, so a killed run never leaves a half-written entry, and concurrent runs (several processes
of one host) at worst both compute the same entry.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pathlib
from collections.abc import Iterator
from typing import Any

ENV_VAR = "SWITCHJAX_CACHE"


def cache_dir(configured: str | None = None) -> pathlib.Path:
  """data.cache_dir if set, else $SWITCHJAX_CACHE, else ~/.cache/switchjax."""
  path = configured or os.environ.get(ENV_VAR) or "~/.cache/switchjax"
  return pathlib.Path(path).expanduser()


def fingerprint(*parts: Any) -> str:
  """A short hex digest of JSON-serialisable `parts`."""
  text = json.dumps(parts, sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:20]


def file_stats(paths) -> list[tuple[str, int, int]]:
  """(absolute path, size, mtime in ns) of each file: cheap change detection."""
  out = []
  for path in paths:
    stat = os.stat(path)
    out.append((str(pathlib.Path(path).resolve()), stat.st_size, stat.st_mtime_ns))
  return out


def temporary_path(path: pathlib.Path) -> pathlib.Path:
  """A unique hidden file name next to `path` (in its directory, which is created)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  return path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")


@contextlib.contextmanager
def atomic_path(path: pathlib.Path) -> Iterator[pathlib.Path]:
  """Yields a temporary path next to `path`; renames it to `path` if the block succeeds."""
  tmp = temporary_path(path)
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: pathlib.Path, data: bytes) -> None:
  with atomic_path(path) as tmp:
    tmp.write_bytes(data)
