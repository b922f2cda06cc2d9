"""The router losses: Switch's load-balancing loss and ST-MoE's router z-loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def load_balancing_loss(router_probs: Array, expert_indices: Array) -> Array:
  """Switch Transformer's auxiliary load-balancing loss (eqs. 4-6 of the paper).

  loss = E^2 * mean over (groups, experts) of f * P, where f is the fraction of a group's
  tokens whose top-k choices include the expert and P the mean router probability.

  Args:
    router_probs: <float>[..., tokens, experts].
    expert_indices: <int>[..., tokens, k]; negative indices (padding) count for no expert.
  """
  num_experts = router_probs.shape[-1]
  # [..., tokens, k, experts] -> [..., tokens, experts]: was the token routed to the expert?
  expert_mask = jax.nn.one_hot(expert_indices.astype(jnp.int32), num_experts, dtype=jnp.int32)
  expert_mask = jnp.max(expert_mask, axis=-2)
  tokens_per_group_and_expert = jnp.mean(expert_mask, dtype=jnp.float32, axis=-2)
  router_prob_per_group_and_expert = jnp.mean(router_probs, dtype=jnp.float32, axis=-2)
  return (
    jnp.mean(tokens_per_group_and_expert * router_prob_per_group_and_expert, dtype=jnp.float32)
    * num_experts**2
  )


def router_z_loss(router_logits: Array) -> Array:
  """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2 (keeps logits small).

  Args:
    router_logits: <float>[..., tokens, experts].
  """
  log_z = jax.nn.logsumexp(router_logits.astype(jnp.float32), axis=-1)
  return jnp.mean(log_z**2)
