"""The train and eval steps, in t5x's parts: gradients accumulated over microbatches, the
optimizer update, and the metrics, around one loss (`objective.loss_fn`).

`compile_steps` jit-compiles them with the shardings of a `StateLayout`; the returned train
step maps a TrainState and a global batch to the next TrainState and the step's metrics.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from switchjax import losses, sharding
from switchjax.config import TrainConfig
from switchjax.optimizers import learning_rate_schedule
from switchjax.routing import balance
from switchjax.training.objective import loss_fn
from switchjax.training.state import StateLayout, TrainState

Array = jax.Array


def split_microbatches(batch: dict[str, Array], n: int) -> dict[str, Array]:
  """[batch, ...] -> [n, batch / n, ...], microbatch i holding rows i, i + n, i + 2n, ...

  Strided, not contiguous: every device holds a contiguous block of the batch's rows, so each
  microbatch takes rows from every device's block and splitting needs no communication (a
  contiguous split would gather each microbatch's tokens onto the devices).
  """
  return jax.tree.map(
    lambda x: jnp.swapaxes(x.reshape((x.shape[0] // n, n) + x.shape[1:]), 0, 1), batch
  )


def accumulate_gradients(
  model, params, batch: dict[str, Array], cfg: TrainConfig, rng: Array
) -> tuple[Any, dict[str, Array]]:
  """Gradients of the batch loss and its loss sums, over cfg.num_microbatches microbatches.

  Each microbatch's loss is normalised by the whole batch's real target tokens and its MoE
  terms weighted 1 / microbatches, so the summed gradients are the full-batch gradient (up to
  MoE routing groups being per microbatch). Microbatch i draws its noise from fold_in(rng, i).
  """
  n = cfg.num_microbatches
  normalizer = jnp.maximum(jnp.sum(batch["decoder_loss_weights"]), 1.0)
  grad_fn = jax.grad(
    lambda p, mb, key: loss_fn(
      model, p, mb, cfg, train=True, rng=key, normalizer=normalizer, moe_weight=1.0 / n
    ),
    has_aux=True,
  )
  if n == 1:
    return grad_fn(params, batch, rng)

  def add(carry, xs):
    index, mb = xs
    grads_i, sums_i = grad_fn(params, mb, jax.random.fold_in(rng, index))
    return jax.tree.map(jnp.add, carry, (grads_i, sums_i)), None

  microbatches = split_microbatches(batch, n)
  first = jax.tree.map(lambda x: x[0], microbatches)
  zeros = jax.tree.map(
    lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(grad_fn, params, first, rng)
  )
  (grads, sums), _ = jax.lax.scan(add, zeros, (jnp.arange(n), microbatches))
  # Sums stay sums; the MoE metrics (per-microbatch means) become means over microbatches.
  sums = {k: v if k in losses.SUMMED else v / n for k, v in sums.items()}
  return grads, sums


def apply_update(tx: optax.GradientTransformation, params, opt_state, grads) -> tuple[Any, Any]:
  """One optimizer update: (new params, new optimizer state)."""
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state


def make_train_step(model, tx: optax.GradientTransformation, cfg: TrainConfig) -> Callable:
  """train_step(params, opt_state, step, batch) -> (params, opt_state, metrics).

  The dropout/jitter key of step s is fold_in(key(train.seed), s), made inside the trace (a
  concrete key would be an array on a device, which a program compiled for devices that are
  only described, e.g. a TPU topology, cannot hold). metrics["finite"] says whether the loss
  and gradients were finite. Routers that balance without an auxiliary loss get their choice
  biases updated from the step's expert loads (`routing.balance`), after the optimizer.
  """
  schedule = learning_rate_schedule(cfg)
  rates = balance.stack_rates(model.config)

  def train_step(params, opt_state, step, batch):
    key = jax.random.fold_in(jax.random.key(cfg.seed), step)
    grads, sums = accumulate_gradients(model, params, batch, cfg, key)
    loads = sums.pop("expert_loads", None)
    old_params = params
    params, opt_state = apply_update(tx, params, opt_state, grads)
    if loads is not None:
      params = balance.update_choice_biases(old_params, params, loads, rates)
    metrics = losses.metrics_from_sums(sums)
    metrics["learning_rate"] = schedule(step)
    metrics["grad_norm"] = optax.tree.norm(grads)
    metrics["finite"] = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
    return params, opt_state, metrics

  return train_step


def make_eval_step(model, cfg: TrainConfig) -> Callable:
  """eval_step(params, batch) -> metrics, in eval mode (eval capacity factor, no dropout)."""

  def eval_step(params, batch):
    _, sums = loss_fn(model, params, batch, cfg, train=False)
    return losses.metrics_from_sums(sums)

  return eval_step


@dataclasses.dataclass(frozen=True)
class Steps:
  """The compiled steps of a run.

  Attributes:
    core: the jitted train step on arrays (params, opt_state, step, batch), for lowering.
    eval: the jitted eval step (params, batch) -> metrics.
    global_batch_size: sequences per step (the data position advances by this).
  """

  core: Any
  eval: Any
  global_batch_size: int
  mesh: Any

  def train(self, state: TrainState, batch: dict[str, Array]) -> tuple[TrainState, dict]:
    """One step: the next TrainState (parameters donated) and the step's metrics."""
    step = jax.device_put(jnp.int32(state.step), sharding.replicated(self.mesh))
    params, opt_state, metrics = self.core(state.params, state.opt_state, step, batch)
    position = state.data_position + self.global_batch_size
    return TrainState(state.step + 1, params, opt_state, position), metrics


def compile_steps(layout: StateLayout, cfg: TrainConfig) -> Steps:
  """The train and eval steps jitted with the layout's shardings; the batch is split over
  ('data', 'expert') and the parameters and optimizer state are donated."""
  scalar = sharding.replicated(layout.mesh)
  batch = sharding.batch_sharding(layout.mesh)
  params, opt = layout.param_shardings, layout.opt_state_shardings
  core = jax.jit(
    make_train_step(layout.model, layout.tx, cfg),
    in_shardings=(params, opt, scalar, batch),
    out_shardings=(params, opt, scalar),
    donate_argnums=(0, 1),
  )
  evaluate = jax.jit(
    make_eval_step(layout.model, cfg), in_shardings=(params, batch), out_shardings=scalar
  )
  return Steps(core, evaluate, cfg.batch_size, layout.mesh)


def abstract_batch(config, mesh) -> dict[str, jax.ShapeDtypeStruct]:
  """The global batch of `config` as abstract arrays split over ('data', 'expert')."""
  batch, data = config.train.batch_size, config.data
  where = sharding.batch_sharding(mesh)
  shapes = {
    "encoder_input_tokens": ((batch, data.inputs_length), jnp.int32),
    "decoder_input_tokens": ((batch, data.targets_length), jnp.int32),
    "decoder_target_tokens": ((batch, data.targets_length), jnp.int32),
    "decoder_loss_weights": ((batch, data.targets_length), jnp.float32),
  }
  return {
    k: jax.ShapeDtypeStruct(shape, dtype, sharding=where) for k, (shape, dtype) in shapes.items()
  }


def lower_train_step(layout: StateLayout, config) -> jax.stages.Lowered:
  """The run's train step lowered for the layout's mesh with abstract inputs (nothing is
  allocated): `.compile()` it to run it, or to read its memory and collectives."""
  steps = compile_steps(layout, config.train)
  step = jax.ShapeDtypeStruct((), jnp.int32, sharding=sharding.replicated(layout.mesh))
  with jax.set_mesh(layout.mesh), sharding.axis_rules():
    return steps.core.lower(
      layout.params, layout.opt_state, step, abstract_batch(config, layout.mesh)
    )


def lower_eval_step(layout: StateLayout, config) -> jax.stages.Lowered:
  """The run's eval step (a whole global batch, eval capacity) lowered like the train step."""
  steps = compile_steps(layout, config.train)
  with jax.set_mesh(layout.mesh), sharding.axis_rules():
    return steps.eval.lower(layout.params, abstract_batch(config, layout.mesh))
