"""Routers: one class per routing algorithm, registered by the name configs use; the Router
base owns the weights (float32 logits, jitter, padding) and calls its algorithm."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from switchjax.config import MoeConfig
from switchjax.config.router_registry import register_router, router_class
from switchjax.routing.algorithms import (
  SWITCH_GATING,
  Gating,
  experts_choose,
  tokens_choose,
  tokens_choose_dropless,
  tokens_choose_scatter,
  top_k,
)
from switchjax.routing.losses import router_z_loss
from switchjax.routing.results import RouterChoices, RouterIndices, RouterMask

Array = jax.Array

# flaxformer: "slightly better results adopting typical normally-distributed scaling for the
# router, rather than the 0.1-scaled variance_scaling".
default_router_init = nn.initializers.normal(stddev=2e-2)
# The router parameter of auxiliary-loss-free balancing (moe.router_bias_update_rate > 0):
# [experts], added to the scores for choosing only; the train step writes it, the optimizer not.
CHOICE_BIAS = "choice_bias"


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
  # Every expert is a choice of every token (experts choose): the gathered buffers combine by
  # adding each slot's output to its token instead of gathering each token's k outputs.
  combine_by_scatter: ClassVar[bool] = False

  # -- class facts ----------------------------------------------------------------------------

  @classmethod
  def config_problem(cls, config: MoeConfig, prefix: str) -> str | None:
    """What is wrong with `config` for this router (one sentence with the fix), or None."""
    return cls.gating_problem(config, prefix)

  @classmethod
  def gating_problem(cls, config: MoeConfig, prefix: str) -> str | None:
    """Why this router cannot use the gating options (router_score, normalize_top_k,
    routed_scaling_factor, router_bias_update_rate: `routing.Gating`), or None. Only the
    tokens-choose routers whose top-k takes a `Gating` support them."""
    if config.default_gating:
      return None
    return (
      f"{prefix}.router_type={cls.router_type!r} has Switch's softmax gating only; "
      f"router_score, normalize_top_k, routed_scaling_factor and router_bias_update_rate "
      f"need a tokens-choose top-k router: set {prefix}.router_type=tokens_choose_masked "
      f"(or tokens_choose_scatter, tokens_choose_dropless)."
    )

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
    # [groups, tokens, experts]: softmax probabilities, or independent sigmoid scores.
    if self.config.router_score == "sigmoid":
      scores = jax.nn.sigmoid(router_logits)
    else:
      scores = jax.nn.softmax(router_logits, axis=-1)
    router_probs = nn.with_logical_constraint(scores, ("batch", "length", "unmodeled"))
    padding_mask = None
    if self.config.ignore_padding_tokens:
      # [groups, tokens]: padding positions hold all-zero inputs.
      padding_mask = (jnp.sum(jnp.abs(token_inputs), axis=-1) > 0).astype(jnp.float32)
      router_logits = router_logits * padding_mask[..., None]  # as flaxformer, for the z-loss
    out = self.route(router_probs, padding_mask, expert_capacity, causal, order)
    return dataclasses.replace(out, router_z_loss=router_z_loss(router_logits)), router_logits

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

  def gating(self) -> Gating:
    """The config's gating options, with the choice bias parameter when balancing is on.

    The bias is a parameter so that it is saved, restored and sharded (replicated; stacked
    under scanned layers) with the model and reaches every apply; it is held outside
    training: stop_gradient gives it no gradient and the train step overwrites whatever the
    optimizer did with the balancing update (`routing.balance`)."""
    cfg = self.config
    if cfg.default_gating:
      return SWITCH_GATING
    bias: Array | None = None
    if cfg.router_bias_update_rate > 0:
      param = self.param(
        CHOICE_BIAS,
        nn.with_logical_partitioning(nn.initializers.zeros, ("unmodeled",)),
        (cfg.num_experts,),
        jnp.float32,
      )
      bias = jax.lax.stop_gradient(jnp.asarray(param, jnp.float32))
    return Gating(
      choice_bias=bias,
      normalize_top_k=cfg.normalize_top_k,
      scaling_factor=cfg.routed_scaling_factor,
      sigmoid=cfg.router_score == "sigmoid",
    )


class TokensChooseRouter(Router):
  """Shared facts of the tokens-choose routers: each token picks its top-k experts."""

  @classmethod
  def config_problem(cls, config: MoeConfig, prefix: str) -> str | None:
    if not 1 <= config.num_selected_experts <= config.num_experts:
      return (
        f"{prefix}.num_selected_experts={config.num_selected_experts} must be between 1 and "
        f"{prefix}.num_experts={config.num_experts}; lower k or add experts."
      )
    return cls.gating_problem(config, prefix)

  @classmethod
  def gating_problem(cls, config: MoeConfig, prefix: str) -> str | None:
    return None  # top-k through `Gating`: every option works

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
      gating=self.gating(),
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
  combine_by_scatter: ClassVar[bool] = True

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
    return tokens_choose_dropless(
      router_probs, padding_mask, self.config.num_selected_experts, gating=self.gating()
    )


@register_router("tokens_choose_renormalized")
class RenormalizedTokensChooseRouter(TokensChooseMaskedRouter):
  """Tokens-choose top-k whose combine weights are the chosen experts' probabilities divided
  by their sum: 1 for top-1 (sparse upcycling's "normalised router weights": an upcycled model
  then computes the dense model exactly, `switchjax.upcycle`). Routing, capacity, priorities
  and the router losses are `tokens_choose_masked`'s; only the combine weights differ. A token
  whose choice is dropped still gets 0 for it (the others are not scaled up)."""

  @classmethod
  def hf_problem(cls, config: MoeConfig) -> str | None:
    return (
      f"{cls.router_type} routing: HF weights each token's expert output by the router "
      "probability; set model.moe.router_type='tokens_choose_masked'"
    )

  @classmethod
  def gating_problem(cls, config: MoeConfig, prefix: str) -> str | None:
    if config.default_gating:
      return None
    return (
      f"{prefix}.router_type='tokens_choose_renormalized' renormalises softmax top-k weights "
      f"itself; for router_score, normalize_top_k, routed_scaling_factor or "
      f"router_bias_update_rate set {prefix}.router_type=tokens_choose_masked "
      f"(normalize_top_k=True gives its weights)."
    )

  def route(self, router_probs, padding_mask, expert_capacity, causal, order):
    routed = super().route(router_probs, padding_mask, expert_capacity, causal, order)
    # [groups, tokens]: the probability mass of each token's k choices (> 0: a softmax).
    chosen = jnp.sum(top_k(router_probs, self.config.num_selected_experts)[0], axis=-1)
    if isinstance(routed, RouterIndices):  # combine weights [groups, tokens, k]
      return dataclasses.replace(routed, combine_weights=routed.combine_weights / chosen[..., None])
    assert isinstance(routed, RouterMask)
    return dataclasses.replace(routed, combine_array=routed.combine_array / chosen[..., None, None])


def make_router(config: MoeConfig, **kwargs) -> Router:
  """The router of `config.router_type`, built from the config (the one place that does)."""
  return router_class(config.router_type)(config, **kwargs)
