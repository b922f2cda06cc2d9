"""Training losses and routing metrics, as T5X's MoE encoder-decoder model computes them.

loss = CE (with label smoothing, plus z_loss * logsumexp(logits)^2 per token), summed over real
target tokens and divided by their number, + aux_loss_factor * mean over MoE layers of the
load-balancing loss + router_z_loss_factor * mean over MoE layers of the router z-loss.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from switchjax import routing, scan

Array = jax.Array
ROUTING_METRICS = (
  "auxiliary_loss",
  "router_z_loss",
  "fraction_tokens_left_behind",
  "expert_usage",
  "router_confidence",
  "load_imbalance",
  "fraction_choices_dropped",
)
# Per-layer metrics logged as layers/{path}/{name}; the choice bias ones only where the layer
# balances without an auxiliary loss (moe.router_bias_update_rate > 0), the capped share only
# where dropless dispatch runs expert-parallel (a mesh with an expert axis).
LAYER_METRICS = (
  "expert_usage",
  "fraction_tokens_left_behind",
  "router_confidence",
  "load_imbalance",
  "fraction_choices_dropped",
  "fraction_choices_capped",
  "choice_bias_min",
  "choice_bias_max",
  "choice_bias_abs_mean",
)


def cross_entropy_with_z_loss(
  logits: Array, targets: Array, weights: Array, z_loss: float = 0.0, label_smoothing: float = 0.0
) -> tuple[Array, Array, Array]:
  """T5X's weighted cross-entropy.

  Args:
    logits: <float>[batch, length, vocab].
    targets: <int>[batch, length].
    weights: <float>[batch, length], 1 for real target tokens.
    z_loss: coefficient of logsumexp(logits)^2 (T5X: 1e-4).
    label_smoothing: mass spread uniformly over the other classes.

  Returns:
    (sum of CE + z-loss, sum of the z-loss part, sum of weights), each a float32 scalar.
  """
  vocab = logits.shape[-1]
  logits = logits.astype(jnp.float32)
  confidence = 1.0 - label_smoothing
  low_confidence = label_smoothing / (vocab - 1)
  # Entropy of the smoothed target distribution: the CE of a perfect prediction.
  normalizing_constant = (
    -(
      confidence * math.log(confidence)
      + (vocab - 1) * low_confidence * math.log(low_confidence + 1e-20)
    )
    if label_smoothing > 0
    else 0.0
  )
  log_z = jax.nn.logsumexp(logits, axis=-1)  # [batch, length]
  log_probs = logits - log_z[..., None]
  target_log_prob = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
  if label_smoothing > 0:
    ce = -(
      confidence * target_log_prob
      + low_confidence * (jnp.sum(log_probs, axis=-1) - target_log_prob)
    )
  else:
    ce = -target_log_prob
  ce = ce - normalizing_constant
  z = z_loss * log_z**2
  weights = weights.astype(jnp.float32)
  return jnp.sum((ce + z) * weights), jnp.sum(z * weights), jnp.sum(weights)


# --------------------------------------------------------------------------------------------
# Routing metrics sown by the MoE layers.


def moe_layer_metrics(intermediates: Any) -> dict[str, dict[str, Array]]:
  """{layer path: {metric: value}} for every MoE layer found in the 'intermediates'
  collection (paths like 'encoder/layers_1/mlp'; scanned layers are unstacked to these)."""
  found: dict[str, dict[str, Array]] = {}
  intermediates = scan.unstack_layers(intermediates)

  def visit(node, path):
    if isinstance(node, dict) or hasattr(node, "items"):
      if "auxiliary_loss" in node:
        found["/".join(path)] = {
          name: value[0] if isinstance(value, tuple) else value for name, value in node.items()
        }
        return
      for key, child in node.items():
        visit(child, path + [key])

  visit(intermediates, [])
  return found


def moe_losses_and_metrics(
  intermediates: Any, aux_loss_factor: float, router_z_loss_factor: float
) -> tuple[Array, dict[str, Array]]:
  """(weighted MoE loss terms, metrics averaged over layers plus per-layer values)."""
  layers = moe_layer_metrics(intermediates)
  if not layers:
    return jnp.float32(0.0), {}
  metrics = {
    name: jnp.mean(jnp.stack([m[name] for m in layers.values()])).astype(jnp.float32)
    for name in ROUTING_METRICS
  }
  for name in ("choice_bias_abs_mean", "fraction_choices_capped"):  # where layers sow them
    values = [m[name] for m in layers.values() if name in m]
    if values:
      metrics[name] = jnp.mean(jnp.stack(values)).astype(jnp.float32)
  for path, m in layers.items():
    for name in LAYER_METRICS:
      if name in m:
        metrics[f"layers/{path}/{name}"] = m[name].astype(jnp.float32)
  loss = (
    aux_loss_factor * metrics["auxiliary_loss"] + router_z_loss_factor * metrics["router_z_loss"]
  )
  return loss, metrics


# Add up over microbatches (the rest average); none of them is a logged metric. expert_loads
# (a tree: tokens per expert of each MoE layer) feeds the choice-bias update of the train step.
SUMMED = ("ce_sum", "z_sum", "correct", "num_tokens", "expert_loads")


def loss_sums(
  logits: Array,
  batch: dict[str, Array],
  intermediates: Any,
  *,
  z_loss: float = 1e-4,
  label_smoothing: float = 0.0,
  aux_loss_factor: float = 0.01,
  router_z_loss_factor: float = 0.0,
) -> dict[str, Array]:
  """What the T5X MoE loss of a batch is made of: the sums of CE + z-loss (`ce_sum` without
  the z part, `z_sum`), correct predictions and real target tokens over the batch, and the
  weighted MoE loss with the routing metrics (means over layers).

  `batch` holds decoder_target_tokens and, optionally, decoder_loss_weights (default:
  target != 0).
  """
  targets = batch["decoder_target_tokens"]
  weights = batch.get("decoder_loss_weights")
  if weights is None:
    weights = (targets > 0).astype(jnp.float32)
  total, total_z, num_tokens = cross_entropy_with_z_loss(
    logits, targets, weights, z_loss, label_smoothing
  )
  moe_loss, moe_metrics = moe_losses_and_metrics(
    intermediates, aux_loss_factor, router_z_loss_factor
  )
  correct = jnp.sum((jnp.argmax(logits, -1) == targets) * weights)
  return {
    "ce_sum": total - total_z,
    "z_sum": total_z,
    "correct": correct,
    "num_tokens": num_tokens,
    "moe_loss": moe_loss,
    **moe_metrics,
  }


def loss_from_sums(sums: dict[str, Array], normalizer: Array | None = None) -> Array:
  """(CE + z-loss) / normalizer + MoE loss; the normalizer defaults to the real target tokens
  (T5X's NUM_REAL_TARGET_TOKENS)."""
  if normalizer is None:
    normalizer = jnp.maximum(sums["num_tokens"], 1.0)
  return (sums["ce_sum"] + sums["z_sum"]) / normalizer + sums["moe_loss"]


def metrics_from_sums(sums: dict[str, Array]) -> dict[str, Array]:
  """Loss, cross-entropy, z-loss and accuracy per real target token, plus the MoE metrics."""
  denominator = jnp.maximum(sums["num_tokens"], 1.0)
  metrics = {k: v for k, v in sums.items() if k not in SUMMED}
  metrics.update(
    {
      "loss": loss_from_sums(sums),
      "cross_entropy": sums["ce_sum"] / denominator,
      "z_loss": sums["z_sum"] / denominator,
      "accuracy": sums["correct"] / denominator,
      "num_target_tokens": sums["num_tokens"],
    }
  )
  return metrics


def loss_and_metrics(
  logits: Array, batch: dict[str, Array], intermediates: Any, **factors
) -> tuple[Array, dict[str, Array]]:
  """The T5X MoE training loss of one batch (normalised by its real target tokens) and its
  metrics; `factors` are those of `loss_sums`."""
  metrics = metrics_from_sums(loss_sums(logits, batch, intermediates, **factors))
  return metrics["loss"], metrics


# --------------------------------------------------------------------------------------------
# Hugging Face's pooled router losses.


def hf_router_losses(intermediates: Any, stack: str) -> tuple[Array, Array]:
  """(z-loss, load-balancing loss) as Hugging Face computes them with
  `output_router_logits=True`: the router logits of all sparse layers of a stack concatenated
  along the sequence, top-1 expert by argmax (before capacity). Note that HF skips both
  (reports 0) when every layer of the stack is sparse.

  Args:
    intermediates: the 'intermediates' collection of a forward pass.
    stack: 'encoder' or 'decoder'.
  """
  logits = [
    m["router_logits"]
    for path, m in sorted(
      moe_layer_metrics(intermediates).items(), key=lambda kv: _layer_index(kv[0])
    )
    if path.startswith(stack)
  ]
  # [batch, sum of lengths, experts]
  logits = jnp.concatenate(logits, axis=1).astype(jnp.float32)
  z = routing.router_z_loss(logits)
  aux = routing.load_balancing_loss(jax.nn.softmax(logits, -1), jnp.argmax(logits, -1)[..., None])
  return z, aux


def _layer_index(path: str) -> int:
  return next(int(p.split("_")[1]) for p in path.split("/") if p.startswith("layers_"))


def hf_loss(
  logits: Array,
  intermediates: Any,
  targets: Array,
  weights: Array,
  model_config,
  z_coef: float = 0.001,
  aux_coef: float = 0.001,
) -> Array:
  """The loss of transformers' SwitchTransformersForConditionalGeneration given `labels` and
  `output_router_logits=True`: the mean cross-entropy over the real target tokens (weights 1;
  HF's labels -100 are weight 0) + z_coef * (encoder + decoder router z-loss) + aux_coef *
  (their load-balancing losses), pooled by `hf_router_losses`. As in transformers, a stack
  adds no router loss when its sparse step is not > 1: all its layers sparse, or none.
  The defaults are SwitchTransformersConfig's router_z_loss_coef and router_aux_loss_coef.

  Args:
    logits: <float>[batch, length, vocab]; targets, weights: [batch, length].
    intermediates: the 'intermediates' collection of the same forward pass.
    model_config: the model's ModelConfig (which layers of each stack are sparse).
  """
  total, _, count = cross_entropy_with_z_loss(logits, targets, weights)
  loss = total / count
  for stack, num_layers, sparse in (
    ("encoder", model_config.num_layers, model_config.sparse_encoder_layers),
    ("decoder", model_config.decoder_layers, model_config.sparse_decoder_layers),
  ):
    if 0 < len(sparse) < num_layers:
      z, aux = hf_router_losses(intermediates, stack)
      loss = loss + z_coef * z + aux_coef * aux
  return loss
