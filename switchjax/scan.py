"""Scanned layers (`model.scan_layers`): each stack as `nn.scan` over a repeated block.

Dense and sparse layers alternate, so the scanned unit is a block of `period` consecutive
layers (base8: a dense and a sparse layer); every parameter of the block gets a leading
'layers' axis of num_layers / period blocks, which XLA compiles once instead of per layer.

Parameter trees (and 'intermediates' and 'cache' collections):

  unscanned:  encoder/layers_{i}/...              for layers i = 0 .. n - 1
  scanned:    encoder/scan_p{p}/layers_{k}/...    k = 0 .. p - 1, leaves [n / p, ...]

Layer i is block j = i // p, position k = i % p. `stack_layers` and `unstack_layers` convert
between the two (pure functions of numpy or jax arrays).
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from switchjax.checkpoint import LazyArray, StoredArray
from switchjax.config import ModelConfig
from switchjax.config.sparse_layout import (
  STACKS,
  stack_layout,
)

SCAN_NAME = re.compile(r"scan_p(\d+)$")
LAYER_NAME = re.compile(r"layers_(\d+)$")


def scan_name(period: int) -> str:
  """The name of a scanned stack's module (and parameter subtree)."""
  return f"scan_p{period}"


def _stack(leaves):
  """np.stack of numpy leaves, jnp.stack when any is a jax array; LazyArrays (a streaming
  conversion's) stay lazy: a LazyArray whose block is one layer, read when written."""
  if any(isinstance(x, LazyArray) for x in leaves):
    first = leaves[0]
    return LazyArray(
      (len(leaves), *first.shape),
      first.dtype,
      lambda start, stop: np.stack([np.asarray(x) for x in leaves[start:stop]]),
      block=1,
      source=getattr(first, "source", None),
    )
  if any(isinstance(x, jax.Array) for x in leaves):
    return jnp.stack(leaves)
  return np.stack([np.asarray(x) for x in leaves])


def _take(x, j: int):
  """x[j]; of a LazyArray (a checkpoint read lazily), a LazyArray of that layer, read by
  blocks along its first axis (one expert at a time for expert kernels)."""
  if not isinstance(x, LazyArray):
    return x[j]
  shape = x.shape[1:]
  if isinstance(x, StoredArray):
    read = lambda start, stop: x[j, start:stop]  # noqa: E731
  else:
    read = lambda start, stop: np.asarray(x.read(j, j + 1))[0, start:stop]  # noqa: E731
  block = 1 if len(shape) >= 3 else None
  return LazyArray(shape, x.dtype, read, block=block, source=x.source)


def stack_layers(params: dict, cfg: ModelConfig) -> dict:
  """Unscanned (`layers_{i}`) parameters -> the scanned layout of `cfg` (unboxed trees)."""
  out = dict(params)
  for stack in STACKS:
    if stack not in params:
      continue
    period, _ = stack_layout(cfg, stack)
    tree = dict(params[stack])
    layers = sorted(
      (int(LAYER_NAME.match(k).group(1)) for k in tree if LAYER_NAME.match(k)),
    )
    n = len(layers)
    if layers != list(range(n)) or n % period:
      raise ValueError(f"{stack} layers {layers} cannot be stacked in blocks of {period}.")
    blocks = {
      f"layers_{k}": jax.tree.map(
        lambda *xs: _stack(xs), *[tree.pop(f"layers_{i}") for i in range(k, n, period)]
      )
      for k in range(period)
    }
    tree[scan_name(period)] = blocks
    out[stack] = tree
  return out


def unstack_layers(tree: Any, cfg: ModelConfig | None = None) -> Any:
  """Scanned -> unscanned layout: every `scan_p{p}/layers_{k}` subtree of stacked leaves
  becomes `layers_{j * p + k}` holding leaf [j]. Works on parameter trees and on the
  'intermediates' and 'cache' collections; other nodes are kept. `cfg` is not needed (the
  period is in the names) and is accepted for symmetry with `stack_layers`."""
  if not hasattr(tree, "items"):
    return tree
  out = {}
  for key, child in tree.items():
    match = SCAN_NAME.match(key)
    if match is None:
      out[key] = unstack_layers(child, cfg)
      continue
    period = int(match.group(1))
    for name, block in child.items():
      k = int(LAYER_NAME.match(name).group(1))
      num_blocks = jax.tree.leaves(block)[0].shape[0]
      for j in range(num_blocks):
        out[f"layers_{j * period + k}"] = jax.tree.map(lambda x, j=j: _take(x, j), block)
  return out


def is_scanned(params: dict) -> bool:
  """Whether a parameter tree is in the scanned layout."""
  return any(SCAN_NAME.match(k) for s in STACKS for k in params.get(s, {}))
