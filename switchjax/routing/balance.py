"""Auxiliary-loss-free load balancing (DeepSeek-V3): the per-expert choice bias and its update.

A router with `moe.router_bias_update_rate > 0` adds its `choice_bias` parameter [experts] to
the scores when it chooses experts (never to the combine weights, `Gating`). After each train
step every bias becomes

    bias + rate * sign(mean load - load)

with `load` the tokens each expert of that layer took over the whole global batch (all
microbatches and devices; under jit the count is global, so one device and a mesh agree).
The bias has no gradient (stop_gradient) and the train step writes the update over whatever
the optimizer did to it, so no optimizer (Adafactor scaling, AdamW weight decay) touches it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from switchjax.config import ModelConfig
from switchjax.routing.routers import CHOICE_BIAS

Array = jax.Array
LOAD = "tokens_per_expert"  # what each MoE layer sows: tokens each expert took


def uses_choice_bias(config: ModelConfig) -> bool:
  """Whether any MoE layer of the model balances with a choice bias."""
  return any(config.moe_for(s).router_bias_update_rate > 0 for s in ("encoder", "decoder"))


def bias_update(bias: Array, load: Array, rate: float) -> Array:
  """bias + rate * sign(mean load - load) over the last (experts) axis: underloaded experts
  gain, overloaded ones lose. Leading axes (scanned layers) are separate layers.

  Args:
    bias: <float32>[..., experts].
    load: <number>[..., experts], tokens per expert.
  """
  load = load.astype(jnp.float32)
  mean = jnp.mean(load, axis=-1, keepdims=True)
  return bias + jnp.float32(rate) * jnp.sign(mean - load)


def expert_loads(intermediates: Any) -> dict:
  """The per-expert loads of every MoE layer, as float32 in the 'intermediates' tree's module
  structure ({..., 'mlp': {'tokens_per_expert': [..., experts]}}; scanned layers stacked), so
  that microbatch loads add up and each sits where its router's parameters do."""
  found: dict = {}
  for key, node in intermediates.items():
    if key == LOAD:
      value = node[0] if isinstance(node, tuple) else node
      found[key] = jnp.asarray(value, jnp.float32)
    elif isinstance(node, Mapping):
      if child := expert_loads(node):
        found[key] = child
  return found


def update_choice_biases(old_params: Any, new_params: Any, loads: dict, rates: dict) -> Any:
  """`new_params` with every choice bias replaced by `bias_update` of its value in
  `old_params` (before the optimizer) and its layer's load.

  Args:
    old_params, new_params: the parameters before and after the optimizer update.
    loads: `expert_loads` of the step (summed over microbatches).
    rates: {'encoder': rate, 'decoder': rate}, each stack's router_bias_update_rate.
  """

  def visit(old, new, load, rate):
    if not isinstance(new, Mapping):
      return new
    out = dict(new)
    router = new.get("router")
    if isinstance(router, Mapping) and CHOICE_BIAS in router and LOAD in load:
      bias = bias_update(old["router"][CHOICE_BIAS], load[LOAD], rate)
      out["router"] = {**router, CHOICE_BIAS: bias.astype(router[CHOICE_BIAS].dtype)}
    for key, child in new.items():
      if key != "router" and isinstance(child, Mapping) and key in load:
        out[key] = visit(old[key], child, load[key], rate)
    return out

  out = dict(new_params)
  for stack, rate in rates.items():
    if rate > 0 and stack in new_params and stack in loads:
      out[stack] = visit(old_params[stack], new_params[stack], loads[stack], rate)
  return out


def stack_rates(config: ModelConfig) -> dict[str, float]:
  """{'encoder': rate, 'decoder': rate}: each stack's router_bias_update_rate."""
  return {s: config.moe_for(s).router_bias_update_rate for s in ("encoder", "decoder")}
