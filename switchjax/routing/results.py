"""What a router returns: RouterMask (flaxformer's one-hot form), RouterIndices (each choice's
expert and slot) and RouterChoices (each token's experts, no capacity)."""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp

Array = jax.Array


@flax.struct.dataclass
class RouterMask:
  """Dispatch and combine arrays for routing by one-hot einsum (masked routers).

  Attributes:
    dispatch_mask: <bool>[groups, tokens, experts, capacity], 1 where a token takes a slot.
    combine_array: <float32>[groups, tokens, experts, capacity], the router probability of
      each dispatched (token, expert, slot), 0 elsewhere.
    auxiliary_loss: load-balancing loss (0 for experts-choose routing).
    router_z_loss: mean squared log-partition of the router logits.
  """

  dispatch_mask: Array
  combine_array: Array
  auxiliary_loss: Array
  router_z_loss: Array | float = 0.0


@flax.struct.dataclass
class RouterIndices:
  """Dispatch indices and combine weights for routing by scatter / gather.

  Attributes:
    dispatch_indices: <int32>[groups, tokens, k, 2]: (expert, slot in that expert's buffer) of
      each of a token's k choices; slot >= capacity means the choice was dropped.
    combine_weights: <float32>[groups, tokens, k]: router probability, 0 for dropped choices.
    auxiliary_loss, router_z_loss: as in RouterMask.
  """

  dispatch_indices: Array
  combine_weights: Array
  auxiliary_loss: Array
  router_z_loss: Array | float = 0.0

  def to_mask(self, num_experts: int, expert_capacity: int) -> RouterMask:
    """The same routing as flaxformer's one-hot RouterMask (dispatch mask and combine array
    [groups, tokens, experts, capacity]); the combine array holds each kept choice's weight."""
    expert_index, slot = self.dispatch_indices[..., 0], self.dispatch_indices[..., 1]
    kept = (slot < expert_capacity) & (expert_index >= 0)  # [groups, tokens, k]
    # [groups, tokens, k, experts]: the chosen expert of each kept choice.
    chosen = jax.nn.one_hot(jnp.where(kept, expert_index, -1), num_experts, dtype=jnp.bool_)
    # [groups, tokens, experts]: each token's slot at each expert (-1: none), and its weight.
    token_slot = jnp.max(jnp.where(chosen, slot[..., None], -1), axis=2)
    weight = jnp.sum(jnp.where(chosen, self.combine_weights[..., None], 0.0), axis=2)
    dispatch_mask = jax.nn.one_hot(token_slot, expert_capacity, dtype=jnp.bool_)
    combine_array = weight[..., None] * dispatch_mask
    return RouterMask(dispatch_mask, combine_array, self.auxiliary_loss, self.router_z_loss)


@flax.struct.dataclass
class RouterChoices:
  """Each token's k experts and combine weights, without capacity (dropless routing): the MoE
  layer sorts the choices by expert and runs every expert on exactly its tokens.

  Attributes:
    expert_index: <int32>[groups, tokens, k], -1 for choices that go nowhere (ignored padding).
    combine_weights: <float32>[groups, tokens, k]: router probability (0 where expert_index < 0).
    auxiliary_loss, router_z_loss: as in RouterMask.
  """

  expert_index: Array
  combine_weights: Array
  auxiliary_loss: Array
  router_z_loss: Array | float = 0.0


def choices_of(route: RouterIndices, expert_capacity: int) -> RouterChoices:
  """The kept choices of a capacity routing (dropped ones become expert -1, weight 0)."""
  expert_index, slot = route.dispatch_indices[..., 0], route.dispatch_indices[..., 1]
  kept = slot < expert_capacity
  return RouterChoices(
    jnp.where(kept, expert_index, -1),
    jnp.where(kept, route.combine_weights, 0.0),
    route.auxiliary_loss,
    route.router_z_loss,
  )
