"""The training objective: one loss function for the train step, evaluation, fine-tuning and
the benchmark.

`loss_fn` applies the model to a (micro)batch and returns T5X's MoE loss with the sums its
metrics are made of (`switchjax.losses.loss_sums`; `losses.metrics_from_sums` turns them into
the logged metrics).
"""

from __future__ import annotations

import jax

from switchjax import losses
from switchjax.config import TrainConfig
from switchjax.routing import balance

Array = jax.Array


def loss_fn(
  model,
  params,
  batch: dict[str, Array],
  cfg: TrainConfig,
  *,
  train: bool,
  rng: Array | None = None,
  normalizer: Array | None = None,
  moe_weight: float = 1.0,
) -> tuple[Array, dict[str, Array]]:
  """T5X's MoE loss of one (micro)batch and its sums.

  loss = (CE + z-loss summed over real target tokens) / normalizer
         + moe_weight * (aux_loss_factor * mean aux + router_z_loss_factor * mean router z)

  Args:
    model: a SwitchTransformer.
    params: its parameters.
    batch: encoder_input_tokens, decoder_input_tokens, decoder_target_tokens and (optional)
      decoder_loss_weights, each [batch, length].
    cfg: the loss factors (z_loss, label_smoothing, aux_loss_factor, router_z_loss_factor).
    train: training mode (dropout, jitter, the train capacity factor).
    rng: key of the dropout and jitter noise (training).
    normalizer: real target tokens of the whole batch when this is one microbatch of it, so
      that microbatch losses add up to the batch loss (default: this batch's).
    moe_weight: 1 / microbatches, for the same reason.

  Returns:
    (loss, sums) with sums as `losses.loss_sums`, plus `expert_loads` (each MoE layer's
    tokens per expert, `balance.expert_loads`) when a router balances with a choice bias.
  """
  rngs = (
    None
    if rng is None
    else {"dropout": jax.random.fold_in(rng, 0), "jitter": jax.random.fold_in(rng, 1)}
  )
  logits, state = model.apply(
    {"params": params},
    batch["encoder_input_tokens"],
    batch["decoder_input_tokens"],
    batch["decoder_target_tokens"],
    enable_dropout=train,
    mutable=["intermediates"],
    rngs=rngs,
  )
  sums = losses.loss_sums(
    logits,
    batch,
    state.get("intermediates", {}),  # a dense model (no MoE layer) sows nothing
    z_loss=cfg.z_loss,
    label_smoothing=cfg.label_smoothing,
    aux_loss_factor=cfg.aux_loss_factor,
    router_z_loss_factor=cfg.router_z_loss_factor,
  )
  if balance.uses_choice_bias(model.config):
    sums["expert_loads"] = balance.expert_loads(state.get("intermediates", {}))
  ce = losses.loss_from_sums({**sums, "moe_loss": 0.0}, normalizer)
  return ce + moe_weight * sums["moe_loss"], sums
