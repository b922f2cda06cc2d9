"""Checksums: written once Orbax has finished a step, verified before it is restored."""

from __future__ import annotations

import hashlib
import json
import pathlib

from switchjax.checkpoint.layout import MANIFEST
from switchjax.errors import one_line


def _sha256(path: pathlib.Path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    while block := f.read(1 << 20):
      digest.update(block)
  return digest.hexdigest()


def write_manifest(step_dir) -> None:
  """Records the size and sha256 of every file of a finished step in its MANIFEST (written to a
  temporary name and renamed, so a manifest is whole or absent)."""
  step_dir = pathlib.Path(step_dir)
  files = {
    str(p.relative_to(step_dir)): [p.stat().st_size, _sha256(p)]
    for p in sorted(step_dir.rglob("*"))
    if p.is_file() and p.name != MANIFEST
  }
  tmp = step_dir / f".{MANIFEST}.tmp"
  tmp.write_text(json.dumps({"algorithm": "sha256", "files": files}, indent=0) + "\n")
  tmp.replace(step_dir / MANIFEST)


def verify_manifest(step_dir) -> str | None:
  """What differs between a step's files and its MANIFEST, or None when they match. A step
  without a manifest (saved before checksums existed, or by a run killed between Orbax's commit
  and the manifest) is taken as it is."""
  step_dir = pathlib.Path(step_dir)
  path = step_dir / MANIFEST
  if not path.is_file():
    return None
  try:
    files = json.loads(path.read_text())["files"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    return f"its {MANIFEST} is unreadable ({one_line(e, 100)})"
  for name, (size, digest) in files.items():
    file = step_dir / name
    if not file.is_file():
      return f"{name} is missing"
    if file.stat().st_size != size:
      return f"{name} has {file.stat().st_size} bytes, {size} when saved"
    if _sha256(file) != digest:
      return f"the bytes of {name} changed since it was saved (sha256 mismatch)"
  return None
