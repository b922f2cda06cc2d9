"""The routing algorithms: pure functions of the router probabilities (easy to test)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from switchjax.routing.losses import load_balancing_loss
from switchjax.routing.results import RouterChoices, RouterIndices, RouterMask

Array = jax.Array


def top_k(x: Array, k: int) -> tuple[Array, Array]:
  """`jax.lax.top_k` over the last axis (ties go to the lower index), from k argmax passes.

  XLA's SPMD partitioner does not split TopK along batch dimensions: under a mesh it
  all-gathers the router probabilities of the whole batch onto every device. argmax partitions
  cleanly, and k is small for tokens-choose routing.
  """
  values, indices = [], []
  for _ in range(k):
    index = jnp.argmax(x, axis=-1)
    values.append(jnp.take_along_axis(x, index[..., None], axis=-1)[..., 0])
    indices.append(index)
    x = jnp.where(jax.nn.one_hot(index, x.shape[-1], dtype=jnp.bool_), -jnp.inf, x)
  return jnp.stack(values, axis=-1), jnp.stack(indices, axis=-1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class Gating:
  """How a tokens-choose router turns scores into choices and combine weights beyond Switch's
  top-k of the softmax (DeepSeek-V3's options; the default changes nothing).

  Attributes:
    choice_bias: <float32>[experts] added to the scores for choosing experts only (auxiliary-
      loss-free balancing); the combine weights stay the scores themselves. None: no bias.
    normalize_top_k: divide each token's k weights by their sum.
    scaling_factor: multiply the weights (routed scaling factor).
    sigmoid: the scores are independent sigmoids, not a distribution: the load-balancing loss
      uses them normalised to sum 1 per token.
  """

  choice_bias: Array | None = None
  normalize_top_k: bool = False
  scaling_factor: float = 1.0
  sigmoid: bool = False

  def choose(self, scores: Array, k: int) -> tuple[Array, Array]:
    """(scores of the chosen experts, their indices), each [..., tokens, k]: top-k of the
    scores, or of scores + choice_bias with the unbiased scores as the gates."""
    if self.choice_bias is None:
      return top_k(scores, k)
    _, index = top_k(scores + self.choice_bias.astype(scores.dtype), k)
    return jnp.take_along_axis(scores, index, axis=-1), index

  def weights(self, gate: Array) -> Array:
    """Combine weights of the chosen scores [..., tokens, k] (normalised, scaled)."""
    if self.normalize_top_k:
      gate = gate / jnp.maximum(jnp.sum(gate, axis=-1, keepdims=True), 1e-20)
    return gate * self.scaling_factor if self.scaling_factor != 1.0 else gate

  def loss_probs(self, scores: Array) -> Array:
    """The probabilities the load-balancing loss averages: the scores, or sigmoid scores
    normalised over the experts."""
    if not self.sigmoid:
      return scores
    return scores / jnp.maximum(jnp.sum(scores, axis=-1, keepdims=True), 1e-20)


SWITCH_GATING = Gating()


def _priority_of_choices(expert_index: Array, num_experts: int, choice_major: bool) -> Array:
  """Position of each (token, choice) in its expert's buffer.

  Args:
    expert_index: <int32>[groups, tokens, k], negative for choices that go nowhere.
    choice_major: every token's first choice outranks every token's second choice
      (flaxformer); else token by token, each token's choices in order (causal).

  Returns:
    <int32>[groups, tokens, k, experts]: the buffer slot at the chosen expert, -1 elsewhere.
  """
  num_groups, tokens, k = expert_index.shape
  if choice_major:  # [groups, k * tokens], k leading
    flat_index = jnp.swapaxes(expert_index, 1, 2).reshape(num_groups, k * tokens)
  else:  # [groups, tokens * k], tokens leading
    flat_index = expert_index.reshape(num_groups, tokens * k)
  # [groups, k * tokens, experts]
  expert_mask = jax.nn.one_hot(flat_index, num_experts, dtype=jnp.int32)
  priority = jnp.cumsum(expert_mask, axis=1) * expert_mask - 1
  if not choice_major:
    return priority.reshape(num_groups, tokens, k, num_experts)
  # [groups, tokens, k, experts]
  return jnp.swapaxes(priority.reshape(num_groups, k, tokens, num_experts), 1, 2)


def choice_priorities(
  expert_index: Array, num_experts: int, order: Array | None = None, choice_major: bool = True
) -> Array:
  """Slots of each token's choices when tokens are served in `order`.

  Args:
    expert_index: <int32>[groups, tokens, k], negative for choices that go nowhere.
    order: <int>[groups, tokens], the tokens in the order they take slots (batch-prioritized:
      by confidence; causal: by position), or None for the group's own order.
    choice_major: see `_priority_of_choices`.

  Returns:
    <int32>[groups, tokens, k, experts]: the slot at the chosen expert, -1 elsewhere.
  """
  if order is None:
    return _priority_of_choices(expert_index, num_experts, choice_major)
  expert_index = jnp.take_along_axis(expert_index, order[..., None], axis=1)
  priority = _priority_of_choices(expert_index, num_experts, choice_major)
  inverse = jnp.argsort(order, axis=-1)  # back to the group's order
  return jnp.take_along_axis(priority, inverse[..., None, None], axis=1)


def tokens_choose(
  router_probs: Array,
  padding_mask: Array | None,
  expert_capacity: int,
  num_selected_experts: int = 1,
  batch_prioritized_routing: bool = False,
  order: Array | None = None,
  choice_major: bool = True,
  route_padding: bool = False,
  gating: Gating = SWITCH_GATING,
) -> RouterIndices:
  """Each token picks its top-k experts; experts take tokens in priority order up to capacity.

  Args:
    router_probs: <float32>[groups, tokens, experts].
    padding_mask: <float>[groups, tokens], 0 for padding tokens, or None.
    expert_capacity: slots per expert per group.
    num_selected_experts: k (1 = Switch, 2 = GShard).
    batch_prioritized_routing: route tokens in decreasing order of their top gate (BPR).
    order, choice_major: the serving order (see `choice_priorities`); a causal decoder passes
      its position order and choice_major=False.
    route_padding: flaxformer's scatter router: padding tokens are down-weighted (probability
      0) but still take slots. Otherwise (its masked router) they are never routed.
    gating: choice bias, top-k normalisation, scaling, sigmoid scores (default: Switch's).
      Batch-prioritized routing orders tokens by their unbiased top score.

  Returns:
    RouterIndices: each choice's (expert, slot); a slot >= capacity (or a padding choice) is
    dropped and has combine weight 0.
  """
  num_experts = router_probs.shape[-1]
  if padding_mask is not None and route_padding:
    router_probs = router_probs * padding_mask[..., None]
  # [groups, tokens, k]
  expert_gate, expert_index = gating.choose(router_probs, num_selected_experts)
  weight = gating.weights(expert_gate)
  routed_index = expert_index
  if padding_mask is not None and not route_padding:
    gate_mask = padding_mask[..., None]  # [groups, tokens, 1]
    expert_gate = expert_gate * gate_mask
    weight = weight * gate_mask
    # Padding choices get negative indices: no expert counts or serves them.
    routed_index = jnp.where(gate_mask > 0, expert_index, -1 - expert_index)
    router_probs = router_probs * gate_mask  # so the load-balancing loss ignores padding

  auxiliary_loss = load_balancing_loss(gating.loss_probs(router_probs), routed_index)
  if batch_prioritized_routing:  # [groups, tokens]: by decreasing top-1 gate
    order = jnp.argsort(-expert_gate[..., 0], axis=-1)
  # [groups, tokens, k]: the slot of each choice at its expert (-1 for padding choices).
  slot = jnp.max(choice_priorities(routed_index, num_experts, order, choice_major), axis=-1)
  slot = jnp.where(slot < 0, expert_capacity, slot)
  combine_weights = weight * (slot < expert_capacity)
  # [groups, tokens, k, 2]
  dispatch_indices = jnp.stack([expert_index, slot], axis=-1).astype(jnp.int32)
  return RouterIndices(dispatch_indices, combine_weights, auxiliary_loss)


def tokens_choose_masked(
  router_probs: Array,
  padding_mask: Array | None,
  expert_capacity: int,
  num_selected_experts: int = 1,
  batch_prioritized_routing: bool = False,
  order: Array | None = None,
  choice_major: bool = True,
  gating: Gating = SWITCH_GATING,
) -> RouterMask:
  """flaxformer's TokensChooseMaskedRouter as one-hot arrays: `tokens_choose` (padding never
  routed) as a RouterMask [groups, tokens, experts, capacity]."""
  route = tokens_choose(
    router_probs,
    padding_mask,
    expert_capacity,
    num_selected_experts,
    batch_prioritized_routing,
    order,
    choice_major,
    gating=gating,
  )
  return route.to_mask(router_probs.shape[-1], expert_capacity)


def tokens_choose_scatter(
  router_probs: Array,
  padding_mask: Array | None,
  expert_capacity: int,
  num_selected_experts: int = 1,
  batch_prioritized_routing: bool = False,
  order: Array | None = None,
  choice_major: bool = True,
  gating: Gating = SWITCH_GATING,
) -> RouterIndices:
  """flaxformer's TokensChooseScatterRouter: the same choices and priorities as
  `tokens_choose_masked`, but padding tokens are down-weighted (probability 0), not excluded:
  they may still take a slot."""
  return tokens_choose(
    router_probs,
    padding_mask,
    expert_capacity,
    num_selected_experts,
    batch_prioritized_routing,
    order,
    choice_major,
    route_padding=True,
    gating=gating,
  )


def tokens_choose_dropless(
  router_probs: Array,
  padding_mask: Array | None,
  num_selected_experts: int = 1,
  gating: Gating = SWITCH_GATING,
) -> RouterChoices:
  """Each token goes to its top-k experts, all of them: no capacity, nothing dropped, and no
  token's routing depends on another's (so it is causal as it stands).

  Padding tokens (ignore_padding_tokens) are not routed, as in the masked router; the
  load-balancing loss is the masked router's (the same choices, before any dropping).
  """
  # [groups, tokens, k]
  expert_gate, expert_index = gating.choose(router_probs, num_selected_experts)
  expert_gate = gating.weights(expert_gate)
  routed_index = expert_index
  if padding_mask is not None:
    gate_mask = padding_mask[..., None]
    expert_gate = expert_gate * gate_mask
    routed_index = jnp.where(gate_mask > 0, expert_index, -1 - expert_index)
    router_probs = router_probs * gate_mask
  auxiliary_loss = load_balancing_loss(gating.loss_probs(router_probs), routed_index)
  expert_index = jnp.where(routed_index >= 0, expert_index, -1).astype(jnp.int32)
  return RouterChoices(expert_index, expert_gate, auxiliary_loss)


def experts_choose(
  router_probs: Array, padding_mask: Array | None, expert_capacity: int
) -> RouterIndices:
  """Each expert takes its top-`capacity` tokens of the group (Zhou et al., 2022).

  A token may go to several experts or none, so the result lists every expert as a choice of
  every token: dispatch_indices [groups, tokens, experts, 2] holds (e, the token's slot at e),
  the slot being >= capacity where e did not take the token. Encoder only: choosing by the whole
  group lets a decoder see the future. Padding tokens are down-weighted (probability 0), as in
  flaxformer. The capacity is capped at the group size (an expert cannot take more tokens than
  exist).
  """
  num_groups, tokens, num_experts = router_probs.shape
  if padding_mask is not None:
    router_probs = router_probs * padding_mask[..., None]
  capacity = min(expert_capacity, tokens)
  # [groups, experts, tokens]; a stable sort keeps lax.top_k's tie order and, unlike TopK,
  # is partitioned along the group axis under a mesh.
  probs_t = jnp.swapaxes(router_probs, 1, 2)
  # [groups, experts, capacity]: the tokens each expert takes, best first.
  token_index = jnp.argsort(-probs_t, axis=-1, stable=True)[..., :capacity]

  def slots_of(token_index):  # one group: [experts, capacity] -> [experts, tokens]
    slots = jnp.full((num_experts, tokens), expert_capacity, jnp.int32)
    rows = jnp.arange(num_experts)[:, None]
    return slots.at[rows, token_index].set(jnp.arange(capacity, dtype=jnp.int32))

  slot = jnp.swapaxes(jax.vmap(slots_of)(token_index), 1, 2)  # [groups, tokens, experts]
  expert_index = jnp.broadcast_to(jnp.arange(num_experts, dtype=jnp.int32), slot.shape)
  combine_weights = jnp.where(slot < expert_capacity, router_probs, 0.0)
  dispatch_indices = jnp.stack([expert_index, slot], axis=-1)
  return RouterIndices(dispatch_indices, combine_weights, jnp.zeros((), jnp.float32))


def experts_choose_masked(
  router_probs: Array, padding_mask: Array | None, expert_capacity: int
) -> RouterMask:
  """`experts_choose` as flaxformer's one-hot RouterMask [groups, tokens, experts, capacity]."""
  route = experts_choose(router_probs, padding_mask, expert_capacity)
  return route.to_mask(router_probs.shape[-1], min(expert_capacity, router_probs.shape[1]))
