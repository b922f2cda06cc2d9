"""XLA:CPU's buffers on transparent huge pages (Linux, glibc >= 2.35).

XLA:CPU allocates every execution's temporaries and outputs with malloc, and glibc serves large
blocks by fresh mmaps that it unmaps on free: each step the kernel faults them in again, 4 KiB
page by page, and zeroes every page: a sizeable share of a small model's step time, and of
memory bandwidth (docs/benchmarks.md has the figures).

`GLIBC_TUNABLES=glibc.malloc.hugetlb=1` makes malloc ask for transparent huge pages (2 MiB) on
its mappings (the kernel's `madvise` mode, the default of most distributions, grants them only
to who asks). glibc reads it once, when the process starts, so the training scripts and the
benchmark re-execute themselves with it (`reexec`). An explicit setting
(`GLIBC_TUNABLES=glibc.malloc.hugetlb=0`) is left alone: that is the way to opt out.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping

TUNABLE = "glibc.malloc.hugetlb"
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def thp_mode(path: str = THP_SETTING) -> str | None:
  """The kernel's transparent-huge-page mode ('always', 'madvise', 'never'), None if unknown."""
  try:
    with open(path) as f:
      text = f.read()
  except OSError:
    return None
  start, end = text.find("["), text.find("]")
  return text[start + 1 : end] if 0 <= start < end else None


def _glibc_at_least(version: tuple[int, int]) -> bool:
  libc, release = platform.libc_ver()
  if libc != "glibc":
    return False
  try:
    return tuple(int(part) for part in release.split(".")[:2]) >= version
  except ValueError:
    return False


def environment(
  environ: Mapping[str, str] | None = None, *, mode: str | None = None
) -> dict[str, str] | None:
  """`environ` (default: this process's) with glibc's huge-page tunable added, or None when
  there is nothing to add: not Linux with glibc >= 2.35, the kernel's mode (`mode`, read from
  /sys when None) not 'madvise' ('always' needs no advice, 'never' ignores it), or
  GLIBC_TUNABLES already naming the tunable (whatever its value: the user's choice)."""
  environ = dict(os.environ if environ is None else environ)
  mode = thp_mode() if mode is None else mode
  if not sys.platform.startswith("linux") or not _glibc_at_least((2, 35)) or mode != "madvise":
    return None
  tunables = environ.get("GLIBC_TUNABLES", "")
  if any(t.split("=")[0] == TUNABLE for t in tunables.split(":")):
    return None
  environ["GLIBC_TUNABLES"] = ":".join(filter(None, [tunables, f"{TUNABLE}=1"]))
  return environ


def reexec_script(argv: list[str] | None) -> None:
  """`reexec()` for a script's `main(argv=None)`: only when run from the command line (argv
  None); a main() called with arguments (tests, notebooks) stays in its process."""
  if argv is None:
    reexec()


def reexec() -> None:
  """Re-executes this process's command line (`sys.orig_argv`, interpreter options included)
  with huge pages on, or returns when there is nothing to change. Call it first thing in a
  script's main(), before anything runs on a device: the process is replaced."""
  environ = environment()
  if environ is not None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, environ)
