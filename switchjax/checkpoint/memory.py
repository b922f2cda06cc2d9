"""Returning freed memory to the OS, so that streaming a model through memory keeps resident
memory at what is live (glibc; no-ops elsewhere)."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _glibc():
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
  except OSError:  # not glibc
    return None


def release_freed_memory() -> None:
  """Returns freed heap memory to the OS (glibc's malloc_trim; a no-op elsewhere). glibc keeps
  what each thread frees in that thread's arena, so without this the resident memory of a
  streaming conversion grows with the number of blocks written, not with one block."""
  if libc := _glibc():
    libc.malloc_trim(0)


def release_memory_eagerly(threshold: int = 256 << 10) -> None:
  """Makes glibc serve allocations of `threshold` bytes or more from their own mappings,
  returned to the OS when freed (mallopt M_MMAP_THRESHOLD, which also stops glibc from raising
  the threshold as big blocks are freed). For processes that stream a model through memory
  (scripts/convert_hf.py, scripts/generate.py): freed tensors then leave no holes in the heap,
  and resident memory stays at what is live, at the cost of a page fault per big allocation."""
  if libc := _glibc():
    libc.mallopt(-3, threshold)  # M_MMAP_THRESHOLD
