"""Paths and URLs: local files through pathlib, URLs (gs://, s3://, ...) through etils.epath.

A location is a URL when it holds `://`. etils.epath reads gs://, s3://, az:// and hf:// URLs
through fsspec and the file-system package of the scheme (gcsfs for gs://), or through
TensorFlow's gfile when TensorFlow is installed. Its errors on a URL (no package for the
scheme, an unsupported scheme, a file that cannot be listed or read) become one-line
ValueErrors that name the fix (`backend_errors`).
"""

from __future__ import annotations

import contextlib
import glob
import os
import pathlib
from collections.abc import Iterator
from typing import IO, TYPE_CHECKING

from switchjax.errors import one_line

if TYPE_CHECKING:
  from etils import epath

# The package that gives etils.epath (fsspec) the file system of a URL scheme.
_PACKAGES = {"gs": "gcsfs", "s3": "s3fs", "az": "adlfs", "hf": "huggingface_hub"}


def is_url(location: str) -> bool:
  return "://" in str(location)


def as_path(location: str | os.PathLike, url: bool | None = None) -> pathlib.Path | epath.Path:
  """A path object for `location`: pathlib for local paths (~ expanded), etils.epath for URLs
  (gs://...). `url`: whether it is a URL (default: is_url)."""
  if not (is_url(str(location)) if url is None else url):
    return pathlib.Path(location).expanduser()
  with backend_errors(str(location)):
    from etils import epath

    return epath.Path(str(location))


def file_path(location: str | os.PathLike) -> pathlib.Path | epath.Path:
  """A path object for an input file as named (no ~ expansion): etils.epath for URLs."""
  return as_path(location) if is_url(str(location)) else pathlib.Path(location)


def file_size(path) -> int:
  """Bytes of a file: os.stat_result.st_size, or etils.epath's StatResult.length."""
  stat = path.stat()
  return stat.st_size if hasattr(stat, "st_size") else stat.length


def open_binary(path) -> IO[bytes]:
  """`path` opened for reading bytes: open() for local paths, etils.epath's file object (seek,
  read, readline) for URLs. A missing package for the URL's scheme is a ValueError."""
  if not is_url(str(path)):
    return open(path, "rb")
  with backend_errors(str(path)):
    return as_path(path).open("rb")


def glob_url(pattern: str) -> list[str]:
  """The files a URL names, sorted: a glob's matches (* ? [] in any component, not **), or
  the URL itself if it exists."""
  with backend_errors(pattern, "list"):
    if not glob.has_magic(pattern):
      return [pattern] if as_path(pattern, url=True).exists() else []
    parts = pattern.split("/")
    first = next(i for i, part in enumerate(parts) if glob.has_magic(part))
    root, rest = "/".join(parts[:first]), "/".join(parts[first:])
    return sorted(str(path) for path in as_path(root, url=True).glob(rest))


@contextlib.contextmanager
def backend_errors(location: str, doing: str = "read") -> Iterator[None]:
  """etils.epath's errors on `location`, if a URL, as one-line ValueErrors naming the fix."""
  if not is_url(str(location)):
    yield
    return
  scheme = str(location).split("://", 1)[0]
  try:
    yield
  except ImportError as e:  # etils itself, fsspec, or the scheme's package (gcsfs for gs://)
    package = "etils[epath]" if "etils" in str(e) else _PACKAGES.get(scheme, f"{scheme}fs")
    raise ValueError(
      f"{location}: cannot {doing} {scheme}:// URLs here ({one_line(e, 160)}); pip install "
      f"{package}."
    ) from None
  except KeyError:  # epath.Path of a scheme it does not know
    raise ValueError(
      f"{location}: etils.epath does not read {scheme}:// URLs; give a local path or a "
      f"{', '.join(s + '://' for s in _PACKAGES)} URL."
    ) from None
  except NotImplementedError as e:  # epath's globs: no ** (one request per object on GCS)
    raise ValueError(
      f"{location}: {one_line(e, 160)}; give the directories with * instead of **."
    ) from None
  except OSError as e:
    raise ValueError(
      f"{location}: cannot {doing} it ({one_line(e, 160)}); check the URL and that this "
      "machine may read it (credentials, permissions)."
    ) from None
