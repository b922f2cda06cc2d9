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

The package: `results` (the three forms), `losses`, `algorithms` and `routers` (the Router
classes and their registry).
"""

from switchjax.config.router_registry import ROUTERS, register_router, router_class
from switchjax.routing.algorithms import (
  SWITCH_GATING,
  Gating,
  choice_priorities,
  experts_choose,
  experts_choose_masked,
  tokens_choose,
  tokens_choose_dropless,
  tokens_choose_masked,
  tokens_choose_scatter,
  top_k,
)
from switchjax.routing.losses import load_balancing_loss, router_z_loss
from switchjax.routing.results import RouterChoices, RouterIndices, RouterMask, choices_of
from switchjax.routing.routers import (
  CHOICE_BIAS,
  ExpertsChooseMaskedRouter,
  RenormalizedTokensChooseRouter,
  Router,
  TokensChooseDroplessRouter,
  TokensChooseMaskedRouter,
  TokensChooseRouter,
  TokensChooseScatterRouter,
  default_router_init,
  make_router,
)

__all__ = [
  "CHOICE_BIAS",
  "ROUTERS",
  "SWITCH_GATING",
  "Gating",
  "ExpertsChooseMaskedRouter",
  "RenormalizedTokensChooseRouter",
  "Router",
  "RouterChoices",
  "RouterIndices",
  "RouterMask",
  "TokensChooseDroplessRouter",
  "TokensChooseMaskedRouter",
  "TokensChooseRouter",
  "TokensChooseScatterRouter",
  "choice_priorities",
  "choices_of",
  "default_router_init",
  "experts_choose",
  "experts_choose_masked",
  "load_balancing_loss",
  "make_router",
  "register_router",
  "router_class",
  "router_z_loss",
  "tokens_choose",
  "tokens_choose_dropless",
  "tokens_choose_masked",
  "tokens_choose_scatter",
  "top_k",
]
