"""Routers: which experts each token goes to, with what weight, and the router losses.

Faithful to flaxformer's `routing.py` (the code Switch Transformers was trained with):
- router logits are computed in float32 whatever the activation dtype, and jitter (training
  only) multiplies the router's float32 copy of the inputs, never the experts' inputs;
- tokens-choose top-k routing lays the k choices out as [k, tokens] before the cumulative sum,
  so every token's first choice outranks every token's second choice; batch-prioritized
  routing (BPR) first sorts tokens by their top gate;
- the combine weight of a routed token is its raw softmax probability (no renormalisation);
- the load-balancing loss is computed before capacity dropping.

The routing algorithms are pure functions of the router probabilities (easy to test); the
`Router` module owns the weights and is the one template that calls them.

Routing results come in three forms. The built-in routers return the compact ones, which never
hold a [groups, tokens, experts, capacity] tensor: `RouterIndices` (each token's k choices as
(expert, slot), for routing with capacity; the MoE layer dispatches by gathering the slots) and
`RouterChoices` (each token's k experts, no capacity: dropless routing). `RouterMask` is
flaxformer's one-hot form (`RouterIndices.to_mask` builds it); a router that returns it is
dispatched by one-hot einsums, as flaxformer does.
"""

from __future__ import annotations

from typing import ClassVar

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from switchjax.config import MoeConfig

Array = jax.Array

# flaxformer: "slightly better results adopting typical normally-distributed scaling for the
# router, rather than the 0.1-scaled variance_scaling".
default_router_init = nn.initializers.normal(stddev=2e-2)


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
  router_z_loss: Array = 0.0


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
  router_z_loss: Array = 0.0

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
  router_z_loss: Array = 0.0


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


# --------------------------------------------------------------------------------------------
# Losses.


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


# --------------------------------------------------------------------------------------------
# Routing algorithms (pure functions of the router probabilities).


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

  Returns:
    RouterIndices: each choice's (expert, slot); a slot >= capacity (or a padding choice) is
    dropped and has combine weight 0.
  """
  num_experts = router_probs.shape[-1]
  if padding_mask is not None and route_padding:
    router_probs = router_probs * padding_mask[..., None]
  # [groups, tokens, k]
  expert_gate, expert_index = top_k(router_probs, num_selected_experts)
  routed_index = expert_index
  if padding_mask is not None and not route_padding:
    gate_mask = padding_mask[..., None]  # [groups, tokens, 1]
    expert_gate = expert_gate * gate_mask
    # Padding choices get negative indices: no expert counts or serves them.
    routed_index = jnp.where(gate_mask > 0, expert_index, -1 - expert_index)
    router_probs = router_probs * gate_mask  # so the load-balancing loss ignores padding

  auxiliary_loss = load_balancing_loss(router_probs, routed_index)
  if batch_prioritized_routing:  # [groups, tokens]: by decreasing top-1 gate
    order = jnp.argsort(-expert_gate[..., 0], axis=-1)
  # [groups, tokens, k]: the slot of each choice at its expert (-1 for padding choices).
  slot = jnp.max(choice_priorities(routed_index, num_experts, order, choice_major), axis=-1)
  slot = jnp.where(slot < 0, expert_capacity, slot)
  combine_weights = expert_gate * (slot < expert_capacity)
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
  )


def tokens_choose_dropless(
  router_probs: Array, padding_mask: Array | None, num_selected_experts: int = 1
) -> RouterChoices:
  """Each token goes to its top-k experts, all of them: no capacity, nothing dropped, and no
  token's routing depends on another's (so it is causal as it stands).

  Padding tokens (ignore_padding_tokens) are not routed, as in the masked router; the
  load-balancing loss is the masked router's (the same choices, before any dropping).
  """
  expert_gate, expert_index = top_k(router_probs, num_selected_experts)  # [groups, tokens, k]
  routed_index = expert_index
  if padding_mask is not None:
    gate_mask = padding_mask[..., None]
    expert_gate = expert_gate * gate_mask
    routed_index = jnp.where(gate_mask > 0, expert_index, -1 - expert_index)
    router_probs = router_probs * gate_mask
  auxiliary_loss = load_balancing_loss(router_probs, routed_index)
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


# --------------------------------------------------------------------------------------------
# Routers: one class per routing algorithm, registered by the name configs use.

ROUTERS: dict[str, type[Router]] = {}


def register_router(name: str):
  """Class decorator: makes a Router subclass available as `moe.router_type=name`."""

  def register(cls):
    cls.router_type = name
    ROUTERS[name] = cls
    return cls

  return register


def router_class(name: str) -> type[Router]:
  """The Router class registered as `name`; ValueError naming the known ones otherwise."""
  if name not in ROUTERS:
    raise ValueError(
      f"moe.router_type={name!r} is not a router; use one of {', '.join(ROUTERS)} (or register "
      "a Router subclass with switchjax.routing.register_router)."
    )
  return ROUTERS[name]


class Router(nn.Module):
  """Router weights (float32 logits and probabilities, jitter, padding) and, in a subclass,
  one routing algorithm (`route`), in the spirit of flaxformer's router classes.

  A new router is one subclass registered with `@register_router("name")`: it implements
  `route` (returning RouterIndices, RouterChoices or RouterMask) and, where they differ from
  these defaults, the class facts the rest of the code asks for (`config_problem`,
  `causal_problem`, `experts_per_token`, `hf_problem`, `fills_capacity`, `dropless`).

  Attributes:
    config: the MoE settings (num_experts, jitter_noise, router_bias, ignore_padding_tokens,
      router_precision and the router's own fields such as num_selected_experts).
    kernel_init: initialiser of the [d_model, experts] kernel (normal(0.02)).
  """

  config: MoeConfig
  kernel_init: nn.initializers.Initializer = default_router_init

  router_type: ClassVar[str] = ""
  # Experts always fill their buffers (expert_usage is then 1 by definition, as flaxformer).
  fills_capacity: ClassVar[bool] = False
  # Routes without capacity (returns RouterChoices; the layer runs no capacity buffers).
  dropless: ClassVar[bool] = False

  # -- class facts ----------------------------------------------------------------------------

  @classmethod
  def config_problem(cls, config: MoeConfig, prefix: str) -> str | None:
    """What is wrong with `config` for this router (one sentence with the fix), or None."""
    return None

  @classmethod
  def causal_problem(cls, config: MoeConfig, prefix: str) -> str | None:
    """Why this router cannot route a decoder (a token's routing would depend on later
    tokens), or None."""
    return None

  @classmethod
  def experts_per_token(cls, config: MoeConfig, train: bool = True) -> float:
    """Experts a token passes through on average (for FLOP counts)."""
    return 1.0

  @classmethod
  def hf_problem(cls, config: MoeConfig) -> str | None:
    """Why Hugging Face's SwitchTransformers (tokens-choose top-1) cannot express this routing,
    or None."""
    return (
      f"{cls.router_type} routing: HF has only the tokens-choose top-1 router; set "
      "model.moe.router_type='tokens_choose_masked'"
    )

  # -- the computation ------------------------------------------------------------------------

  def route(
    self,
    router_probs: Array,
    padding_mask: Array | None,
    expert_capacity: int,
    causal: bool,
    order: Array | None,
  ) -> RouterIndices | RouterChoices | RouterMask:
    """The routing instructions of a batch of groups (see `__call__`)."""
    raise NotImplementedError(f"{type(self).__name__} must implement route().")

  @nn.compact
  def __call__(
    self,
    token_inputs: Array,
    expert_capacity: int,
    apply_jitter: bool = False,
    causal: bool = False,
    order: Array | None = None,
  ) -> tuple[RouterIndices | RouterChoices | RouterMask, Array]:
    """Routes a batch of token groups.

    Args:
      token_inputs: <float>[groups, tokens, d_model].
      expert_capacity: slots per expert per group.
      apply_jitter: apply jitter noise (training).
      causal: a decoder's routing: tokens take slots in `order` (their positions), each
        token's k choices before the next token's, so no slot depends on a later token.
      order: <int>[groups, tokens] serving order of a causal layer (None: the group's order).

    Returns:
      The routing instructions (with both losses) and the router logits
      <float32>[groups, tokens, experts].
    """
    if causal and (problem := self.causal_problem(self.config, "moe")):
      raise ValueError(problem)
    router_logits = self._logits(token_inputs, apply_jitter)
    router_logits = nn.with_logical_constraint(router_logits, ("batch", "length", "unmodeled"))
    router_probs = nn.with_logical_constraint(
      jax.nn.softmax(router_logits, axis=-1), ("batch", "length", "unmodeled")
    )
    padding_mask = None
    if self.config.ignore_padding_tokens:
      # [groups, tokens]: padding positions hold all-zero inputs.
      padding_mask = (jnp.sum(jnp.abs(token_inputs), axis=-1) > 0).astype(jnp.float32)
      router_logits = router_logits * padding_mask[..., None]  # as flaxformer, for the z-loss
    out = self.route(router_probs, padding_mask, expert_capacity, causal, order)
    return out.replace(router_z_loss=router_z_loss(router_logits)), router_logits

  def _logits(self, token_inputs: Array, apply_jitter: bool) -> Array:
    """<float32>[groups, tokens, experts]: selective precision, the router is float32."""
    cfg = self.config
    x = token_inputs.astype(jnp.float32)
    if apply_jitter and cfg.jitter_noise > 0:  # on the router's copy of the inputs only
      x = x * jax.random.uniform(
        self.make_rng("jitter"),
        x.shape,
        jnp.float32,
        minval=1.0 - cfg.jitter_noise,
        maxval=1.0 + cfg.jitter_noise,
      )
    kernel = self.param(
      "kernel",
      nn.with_logical_partitioning(self.kernel_init, ("embed", "unmodeled")),
      (x.shape[-1], cfg.num_experts),
      jnp.float32,
    )
    precision = jax.lax.Precision[cfg.router_precision.upper()]
    logits = jnp.einsum("gtd,de->gte", x, jnp.asarray(kernel, jnp.float32), precision=precision)
    if cfg.router_bias:
      bias = self.param(
        "bias",
        nn.with_logical_partitioning(nn.initializers.zeros, ("unmodeled",)),
        (cfg.num_experts,),
        jnp.float32,
      )
      logits = logits + jnp.asarray(bias, jnp.float32)
    return logits


class TokensChooseRouter(Router):
  """Shared facts of the tokens-choose routers: each token picks its top-k experts."""

  @classmethod
  def config_problem(cls, config: MoeConfig, prefix: str) -> str | None:
    if not 1 <= config.num_selected_experts <= config.num_experts:
      return (
        f"{prefix}.num_selected_experts={config.num_selected_experts} must be between 1 and "
        f"{prefix}.num_experts={config.num_experts}; lower k or add experts."
      )
    return None

  @classmethod
  def causal_problem(cls, config: MoeConfig, prefix: str) -> str | None:
    if config.batch_prioritized_routing:
      return (
        f"{prefix}.batch_prioritized_routing=True cannot route a decoder: tokens are served "
        f"by confidence, so a token's slot depends on later tokens; set "
        f"{prefix}.batch_prioritized_routing=False."
      )
    return None

  @classmethod
  def experts_per_token(cls, config: MoeConfig, train: bool = True) -> float:
    return float(config.num_selected_experts)

  @classmethod
  def hf_problem(cls, config: MoeConfig) -> str | None:
    if config.num_selected_experts != 1:
      return (
        f"top-{config.num_selected_experts} routing: HF routes each token to one expert; set "
        "model.moe.num_selected_experts=1"
      )
    if config.batch_prioritized_routing:
      return (
        "batch-prioritized routing: HF fills the experts in position order; set "
        "model.moe.batch_prioritized_routing=False"
      )
    return None

  def _route_with(self, algorithm, router_probs, padding_mask, expert_capacity, causal, order):
    cfg = self.config
    return algorithm(
      router_probs,
      padding_mask,
      expert_capacity,
      cfg.num_selected_experts,
      cfg.batch_prioritized_routing,
      order=order,
      choice_major=not causal,
    )


@register_router("tokens_choose_masked")
class TokensChooseMaskedRouter(TokensChooseRouter):
  """Switch top-1 / GShard top-k with flaxformer's masked-router semantics (padding is never
  routed). It returns the routing as (expert, slot) indices: the MoE layer gathers the slots,
  with the results of flaxformer's one-hot einsums (`tokens_choose_masked` gives the one-hot
  arrays)."""

  def route(self, router_probs, padding_mask, expert_capacity, causal, order):
    return self._route_with(
      tokens_choose, router_probs, padding_mask, expert_capacity, causal, order
    )


@register_router("tokens_choose_scatter")
class TokensChooseScatterRouter(TokensChooseRouter):
  """The same choices as the masked router with flaxformer's scatter-router semantics: padding
  tokens are down-weighted, not excluded (`tokens_choose_scatter`)."""

  def route(self, router_probs, padding_mask, expert_capacity, causal, order):
    return self._route_with(
      tokens_choose_scatter, router_probs, padding_mask, expert_capacity, causal, order
    )


@register_router("experts_choose_masked")
class ExpertsChooseMaskedRouter(Router):
  """Each expert takes its top-capacity tokens (`experts_choose`; flaxformer's
  ExpertsChooseMaskedRouter, dispatched by gathering the slots); encoder only."""

  fills_capacity: ClassVar[bool] = True

  @classmethod
  def causal_problem(cls, config: MoeConfig, prefix: str) -> str | None:
    return (
      f"{prefix}.router_type='experts_choose_masked' cannot route a decoder: each expert picks "
      f"its tokens from the whole group, so a token's routing depends on later tokens; use "
      f"--set {prefix}.router_type=tokens_choose_masked (flaxformer's experts-choose models "
      f"route their decoders with top-2: --set {prefix}.num_selected_experts=2)."
    )

  @classmethod
  def hf_problem(cls, config: MoeConfig) -> str | None:
    return (
      "experts-choose routing: HF has only the tokens-choose top-1 router; set "
      "model.moe.router_type='tokens_choose_masked'"
    )

  @classmethod
  def experts_per_token(cls, config: MoeConfig, train: bool = True) -> float:
    # Each expert takes cf x tokens / E tokens: cf experts per token on average.
    return config.train_capacity_factor if train else config.eval_capacity_factor

  def route(self, router_probs, padding_mask, expert_capacity, causal, order):
    return experts_choose(router_probs, padding_mask, expert_capacity)


@register_router("tokens_choose_dropless")
class TokensChooseDroplessRouter(TokensChooseRouter):
  """Every token goes to its top-k experts, with no capacity (MegaBlocks / MaxText dropless
  routing): the MoE layer sorts the choices by expert and runs each expert on exactly its
  tokens (`tokens_choose_dropless`). Capacity factors and group sizes only shape the
  load-balancing loss (computed per routing group, as the other routers); expert_usage is the
  mean over the experts of their load relative to the busiest one (1 = perfectly balanced)."""

  dropless: ClassVar[bool] = True

  @classmethod
  def config_problem(cls, config: MoeConfig, prefix: str) -> str | None:
    if config.batch_prioritized_routing:
      return (
        f"{prefix}.batch_prioritized_routing=True orders tokens competing for capacity; "
        f"{prefix}.router_type='tokens_choose_dropless' has no capacity, so set it to False."
      )
    return super().config_problem(config, prefix)

  @classmethod
  def hf_problem(cls, config: MoeConfig) -> str | None:
    return (
      "dropless routing: HF's router drops the tokens beyond expert_capacity; set "
      "model.moe.router_type='tokens_choose_masked' and model.moe.expert_capacity"
    )

  def route(self, router_probs, padding_mask, expert_capacity, causal, order):
    return tokens_choose_dropless(router_probs, padding_mask, self.config.num_selected_experts)


def make_router(config: MoeConfig, **kwargs) -> Router:
  """The router of `config.router_type`, built from the config (the one place that does)."""
  return router_class(config.router_type)(config, **kwargs)
