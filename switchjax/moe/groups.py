"""Routing groups and expert capacity: the static shape arithmetic of flaxformer's MoeLayer
(how many groups, how much padding, how many slots per expert) and a decoder's serving order."""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np

from switchjax import sharding
from switchjax.config import MoeConfig


@dataclasses.dataclass(frozen=True)
class GroupLayout:
  """How a [batch, length] block of tokens is routed.

  Attributes:
    padded_batch, padded_length: the token block after flaxformer's padding (zero tokens are
      added along batch or length when the token count is not a multiple of the group count's
      multiple).
    num_groups, tokens_per_group: the routing groups (contiguous runs of flattened tokens).
    expert_capacity: flaxformer's capacity per expert per group (what expert_usage counts).
  """

  padded_batch: int
  padded_length: int
  num_groups: int
  tokens_per_group: int
  expert_capacity: int

  @property
  def slots(self) -> int:
    """Buffer slots per expert per group: the capacity, but never more than the group's
    tokens (an expert cannot receive more), so small groups do not pad the expert buffers."""
    return min(self.expert_capacity, self.tokens_per_group)


def num_groups(num_tokens: int, max_group_size: int, multiple: int) -> int:
  """flaxformer's `_num_groups`: the fewest groups, at least num_tokens // max_group_size and
  at least `multiple`, that divide the tokens evenly and are a multiple of `multiple` (so the
  groups split evenly over the devices that hold the batch)."""
  if max_group_size < 1:
    raise ValueError(f"moe.max_group_size={max_group_size} must be >= 1 token.")
  n = max(num_tokens // max_group_size, multiple)
  while n < num_tokens and not (num_tokens % n == 0 and n % multiple == 0):
    n += 1
  if num_tokens % n or n % multiple:
    raise ValueError(
      f"Cannot split {num_tokens} tokens into a multiple of {multiple} routing groups; use a "
      "batch size or sequence length whose product is a multiple of it."
    )
  return n


def _padding_for(batch: int, length: int, multiple: int) -> tuple[int, int]:
  """flaxformer's `_maybe_pad`: extra (batch, length) so that tokens % multiple == 0, along the
  dimension that needs fewer padding tokens (length on ties)."""
  if (batch * length) % multiple == 0:
    return 0, 0
  pad_b = next(p for p in range(1, multiple + 1) if (batch + p) * length % multiple == 0)
  pad_l = next(p for p in range(1, multiple + 1) if batch * (length + p) % multiple == 0)
  return (0, pad_l) if pad_l * batch <= pad_b * length else (pad_b, 0)


def mesh_group_shards() -> int:
  """The data x expert devices of the mesh set by `jax.set_mesh` (1 without one): the devices
  the batch, and so the routing groups, are split over."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return 1
  return math.prod(mesh.shape.get(axis, 1) for axis in sharding.BATCH_MESH_AXES)


def group_layout(
  batch: int, length: int, config: MoeConfig, train: bool, num_shards: int = 1
) -> GroupLayout:
  """Groups and capacity for a [batch, length] input whose batch is split over `num_shards`
  devices.

  The group count is a multiple of `config.group_multiple`, or of `num_shards` when that is 0;
  a fixed multiple whose groups cannot split over `num_shards` devices is refused.
  Capacity = max(round(cf * tokens_per_group / E), min_expert_capacity), with cf multiplied
  by k for config.capacity_per_choice (tokens-choose routers).
  """
  if config.expert_capacity is not None:  # Hugging Face: one group per sequence.
    return GroupLayout(batch, length, batch, length, config.expert_capacity)
  multiple = config.group_multiple or num_shards
  pad_b, pad_l = _padding_for(batch, length, multiple)
  tokens = (batch + pad_b) * (length + pad_l)
  groups = num_groups(tokens, config.max_group_size, multiple)
  if groups % num_shards:
    raise ValueError(
      f"moe.group_multiple={config.group_multiple} gives {groups} routing groups, which do not "
      f"split over the {num_shards} data x expert devices of the mesh; set moe.group_multiple "
      f"to a multiple of {num_shards}, or to 0 so that groups follow the mesh."
    )
  tokens_per_group = tokens // groups
  factor = config.train_capacity_factor if train else config.eval_capacity_factor
  factor *= choices_per_token(config)
  capacity = max(
    int(round(factor * tokens_per_group / config.num_experts)), config.min_expert_capacity
  )
  return GroupLayout(batch + pad_b, length + pad_l, groups, tokens_per_group, capacity)


def choices_per_token(config: MoeConfig) -> int:
  """The multiple of cf * tokens / E that an expert's capacity is: k for a tokens-choose
  router with config.capacity_per_choice, else 1 (flaxformer; experts-choose routers, whose
  experts pick cf * tokens / E tokens each, have no k)."""
  if not config.capacity_per_choice or config.router().fills_capacity:
    return 1
  return config.num_selected_experts


def causal_token_order(layout: GroupLayout) -> np.ndarray | None:
  """[groups, tokens] order in which a decoder's tokens take expert slots: by position in
  their sequence, then by place in the group, so a token's slot never depends on later
  positions (of its own or another sequence of its group). None when that is the group's own
  order (every group within one sequence)."""
  tokens = np.arange(layout.num_groups * layout.tokens_per_group)
  positions = (tokens % layout.padded_length).reshape(layout.num_groups, layout.tokens_per_group)
  order = np.argsort(positions, axis=1, kind="stable")
  return (
    None
    if np.array_equal(order, np.broadcast_to(np.arange(order.shape[1]), order.shape))
    else order
  )
