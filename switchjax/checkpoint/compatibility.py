"""Whether a stored tree holds the arrays a model expects, and if not, the first difference."""

from __future__ import annotations

import jax
import numpy as np


def path_name(path) -> str:
  """'decoder.layers_0.mlp.wi' for a tree path (Orbax's naming of saved arrays)."""
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
  return ".".join(parts)


def shapes_by_name(tree) -> dict[str, tuple]:
  return {path_name(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def first_difference(saved, expected) -> str | None:
  """The first difference between the arrays of a stored tree and those expected (their
  names and shapes), or None when they match."""
  saved, expected = shapes_by_name(saved), shapes_by_name(expected)
  missing = sorted(set(expected) - set(saved))
  unexpected = sorted(set(saved) - set(expected))
  if missing or unexpected:
    return (
      f"arrays this config expects but the checkpoint lacks: {missing[:4]}; arrays the "
      f"checkpoint has but this config does not: {unexpected[:4]}"
    )
  for name in sorted(expected):
    if saved[name] != expected[name]:
      return f"{name} has shape {saved[name]} in the checkpoint but {expected[name]} here"
  return None


def params_equal(a, b) -> bool:
  """True when two parameter trees have the same structure and identical values."""
  if jax.tree.structure(a) != jax.tree.structure(b):
    return False
  return all(
    np.array_equal(np.asarray(x), np.asarray(y))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
  )
