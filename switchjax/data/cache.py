"""The on-disk cache of trained tokenizers and tokenized corpora.

Entries are named by a fingerprint of what they were made from (file paths, sizes and content
hashes; the tokenizer's hash; the settings), so a changed input makes a new entry
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

from switchjax.data import paths

ENV_VAR = "SWITCHJAX_CACHE"


def cache_dir(configured: str | None = None) -> pathlib.Path:
  """data.cache_dir if set, else $SWITCHJAX_CACHE, else ~/.cache/switchjax."""
  path = configured or os.environ.get(ENV_VAR) or "~/.cache/switchjax"
  return pathlib.Path(path).expanduser()


def fingerprint(*parts: Any) -> str:
  """A short hex digest of JSON-serialisable `parts`."""
  text = json.dumps(parts, sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:20]


def file_stats(files) -> list[tuple[str, int, str]]:
  """(absolute path, size, sha256 of the content) of each file; (URL, size, sha256) for a URL
  (etils.epath). A path, a size and a clock are not enough (a rewrite that keeps them, as
  `cp -p` and `rsync -t` do, or a coarse file-system clock, would reuse stale tokens), so the
  content is hashed; for a local file the digest is remembered under the file's inode, size,
  mtime and ctime (which no copy tool can set back), so an unchanged file is read once. A URL's
  content is read each time: etils.epath's stat has only a size and a time in whole seconds,
  which a rewrite may keep."""
  out = []
  for path in files:
    if paths.is_url(str(path)):
      out.append(url_stats(str(path)))
      continue
    resolved = pathlib.Path(path).resolve()
    out.append((str(resolved), os.stat(resolved).st_size, content_digest(resolved)))
  return out


def url_stats(url: str) -> tuple[str, int, str]:
  """(url, size, sha256 of the content) of a file at a URL, its content streamed in chunks."""
  digest = hashlib.sha256()
  with paths.backend_errors(url):
    size = paths.file_size(paths.as_path(url))
    with paths.open_binary(url) as f:
      while block := f.read(1 << 22):
        digest.update(block)
  return url, size, digest.hexdigest()


def content_digest(path: pathlib.Path) -> str:
  """The sha256 of a file's bytes, remembered in the cache (see `file_stats`)."""
  stat = os.stat(path)
  key = fingerprint(
    "content-v1",
    str(path),
    stat.st_dev,
    stat.st_ino,
    stat.st_size,
    stat.st_mtime_ns,
    stat.st_ctime_ns,
  )
  memo = cache_dir() / "content" / key
  with contextlib.suppress(OSError):
    return memo.read_text().strip()
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    while block := f.read(1 << 22):
      digest.update(block)
  with contextlib.suppress(OSError):  # a read-only cache: hashed again next time
    atomic_write_bytes(memo, digest.hexdigest().encode())
  return digest.hexdigest()


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
