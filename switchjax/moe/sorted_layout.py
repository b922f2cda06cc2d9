"""The sorted (dropless) layout: choices sorted by expert into runs that grouped matmuls
(`switchjax.gmm`) take one expert at a time."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def dropless_block(num_choices: int, num_experts: int) -> int:
  """Row granularity of the dropless runs: 32 rows (at most 31 padding rows per expert) for
  batches of training size, down to 1 for a decoding step's few tokens."""
  per_expert = max(1, num_choices // (16 * num_experts))
  return min(32, 1 << (per_expert.bit_length() - 1))


def sorted_rows(expert_index: Array, num_experts: int, block: int) -> tuple[Array, Array, int]:
  """Where each choice goes when choices are sorted by expert into runs padded to `block` rows.

  Args:
    expert_index: <int32>[choices], -1 for choices that go nowhere.

  Returns:
    row: <int32>[choices], each choice's row in the buffer (`rows` for choices that go nowhere;
      within an expert, choices keep their order);
    group_sizes: <int32>[experts], each expert's run, a multiple of `block`;
    rows: the static buffer size, enough for any routing (choices + experts * (block - 1)).
  """
  num_choices = expert_index.shape[0]
  rows = num_choices + num_experts * (block - 1)
  key = jnp.where(expert_index >= 0, expert_index, num_experts)  # going nowhere sorts last
  counts = jnp.bincount(key, length=num_experts + 1)  # [experts + 1]
  group_sizes = ((counts[:num_experts] + block - 1) // block * block).astype(jnp.int32)
  run_start = jnp.concatenate([jnp.cumsum(group_sizes) - group_sizes, jnp.array([rows])])
  first = jnp.cumsum(counts) - counts  # where each key starts in sorted order
  order = jnp.argsort(key, stable=True)
  sorted_key = key[order]
  row_sorted = run_start[sorted_key] + jnp.arange(num_choices) - first[sorted_key]
  row_sorted = jnp.where(sorted_key < num_experts, row_sorted, rows)
  row = jnp.zeros((num_choices,), jnp.int32).at[order].set(row_sorted.astype(jnp.int32))
  return row, group_sizes, rows
