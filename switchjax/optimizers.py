"""Optimizers: T5X's learning-rate schedule, T5X's MoE Adafactor, AdamW, and the
PartitionSpecs of their state.

`t5x_adafactor` reproduces the update rule of T5X's `t5x.adafactor.Adafactor` as the
Switch/ST-MoE recipes configure it (flaxformer `tokens_choose_base.gin`: decay_rate 0.8,
step_offset 0, `logical_factor_rules=t5x.contrib.moe.adafactor_utils.logical_factor_rules()`),
as an optax `GradientTransformation`. T5X decides how to factor each parameter's second moments
from its logical axis names:

- an axis named `expert` (or `layers`, `stack`) is a BATCH axis: each expert gets its own
  factored statistics, its own parameter RMS (the update scale) and its own update clipping;
- a parameter with a BATCH axis is factored along its ROW (`embed`) and COLUMN (`expert_mlp`,
  `mlp`, `heads`, `kv`, `vocab`) axes whatever their sizes;
- a matrix without a BATCH axis falls back to Adafactor's size heuristic: the smaller of its two
  dimensions is the row, the larger the column, and it is factored only when both are at least
  `min_dim_size_to_factor` (128); vectors are never factored.

flaxformer stores the attention kernels as matrices, [d_model, heads * d_kv] and
[heads * d_kv, d_model] (axis `joined_kv`); we store them [embed, heads, kv] and
[heads, kv, embed]. Adjacent axes with the same factor dimension (`heads`, `kv`) are therefore
treated as one joined axis, so every statistic equals T5X's on the flaxformer layout, while the
state keeps our axes (and their sharding).

optax.adafactor differs: it factors the two largest axes of any tensor (with the 128 threshold),
and computes the parameter RMS and the update clipping over the whole tensor, so the experts of a
stacked [E, d, f] kernel share one update scale and one clipping factor.
"""

from __future__ import annotations

import dataclasses
import enum
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from switchjax import sharding
from switchjax.config import TrainConfig

Array = jax.Array
ScalarOrSchedule = float | Callable[[Array], Array]


# --------------------------------------------------------------------------------------------
# Learning rate.


def learning_rate_schedule(cfg: TrainConfig) -> Callable[[Array], Array]:
  """T5X's rsqrt schedule: learning_rate / sqrt(max(step, warmup_steps)), or a constant."""
  if cfg.schedule == "constant":
    return lambda step: jnp.float32(cfg.learning_rate)
  return lambda step: (
    cfg.learning_rate / jnp.sqrt(jnp.maximum(step.astype(jnp.float32), cfg.warmup_steps))
  )


# --------------------------------------------------------------------------------------------
# Factor rules: logical axis name -> how Adafactor treats that axis.


class FactorDim(enum.Enum):
  """T5X's `FactorDim`: what a parameter axis is to Adafactor's second-moment estimator."""

  NONE = "none"  # not factored
  BATCH = "batch"  # independent slices: statistics, RMS and clipping per index
  ROW = "row"
  COLUMN = "column"


_N, _B, _R, _C = FactorDim.NONE, FactorDim.BATCH, FactorDim.ROW, FactorDim.COLUMN

# t5x.adafactor.standard_logical_factor_rules() updated by
# t5x.contrib.moe.adafactor_utils.logical_factor_rules().
MOE_FACTOR_RULES: Mapping[str, FactorDim] = types.MappingProxyType(
  {
    "vocab": _C,
    "embed": _R,
    "mlp": _C,
    "heads": _C,
    "kv": _C,
    "joined_kv": _C,
    "relpos_buckets": _N,
    "layers": _B,
    "stack": _B,
    "q_wi_fused": _C,
    "o_wo_fused": _C,
    "multiquery_heads": _C,
    "kv_fused": _C,
    "layer_norm_scale": _N,
    # MoE additions.
    "expert": _B,
    "expert_mlp": _C,
    "unmodeled": _N,
  }
)


@dataclasses.dataclass(frozen=True)
class FactorPlan:
  """How Adafactor treats one parameter (T5X's `_parse_rule` and `_factored_dims`).

  Attributes:
    averaging_dims: the axes the parameter RMS and the update clipping average over (all but
      the BATCH axes).
    row_dims, col_dims: the factored axes, both empty when the parameter is not factored.
      v_row averages the squared gradient over col_dims, v_col over row_dims.
  """

  averaging_dims: tuple[int, ...]
  row_dims: tuple[int, ...] = ()
  col_dims: tuple[int, ...] = ()

  @property
  def factored(self) -> bool:
    return bool(self.row_dims)


def _axis_factor_dims(
  axes: Sequence[str | None], rules: Mapping[str, FactorDim], name: str
) -> list[FactorDim]:
  """The factor dimension of each logical axis; a clear error for a name the rules lack."""
  unknown = [a for a in axes if a not in rules]
  if unknown:
    raise ValueError(
      f"Adafactor has no factor rule for logical axis {unknown[0]!r} of parameter {name} "
      f"(axes {tuple(axes)}). Known axis names: {', '.join(sorted(rules))}. Add the name to "
      "the factor rules (switchjax.optimizers.MOE_FACTOR_RULES) as ROW, COLUMN, BATCH or NONE."
    )
  return [rules[a] for a in axes]


def _join_adjacent(dims: list[FactorDim]) -> list[tuple[tuple[int, ...], FactorDim]]:
  """Groups adjacent ROW or COLUMN axes: [embed, heads, kv] (ROW, COLUMN, COLUMN) becomes
  [(0,), ROW], [(1, 2), COLUMN], flaxformer's [embed, joined_kv] matrix."""
  groups: list[tuple[tuple[int, ...], FactorDim]] = []
  for i, d in enumerate(dims):
    if groups and d in (_R, _C) and groups[-1][1] == d:
      groups[-1] = (groups[-1][0] + (i,), d)
    else:
      groups.append(((i,), d))
  return groups


def _heuristic_plan(
  shape: Sequence[int], groups: list[tuple[tuple[int, ...], FactorDim]], min_dim_size: int
) -> FactorPlan:
  """Adafactor's default for a vector or matrix (of joined axes): factor the two dimensions
  when the smaller is >= min_dim_size; the smaller is the row (ties: the first)."""
  everything = tuple(range(len(shape)))
  sizes = [int(np.prod([shape[a] for a in g])) for g, _ in groups]
  if len(sizes) < 2:
    return FactorPlan(everything)
  order = np.argsort(sizes)  # as T5X's `_factored_dims`
  if sizes[order[-2]] < min_dim_size:
    return FactorPlan(everything)
  return FactorPlan(everything, groups[order[-2]][0], groups[order[-1]][0])


def factor_plan(
  shape: Sequence[int],
  axes: Sequence[str | None],
  *,
  rules: Mapping[str, FactorDim] = MOE_FACTOR_RULES,
  factored: bool = True,
  min_dim_size_to_factor: int = 128,
  name: str = "?",
) -> FactorPlan:
  """T5X's treatment of a parameter with logical `axes` (`set_param_axes` then `_parse_rule`),
  on the flaxformer layout (adjacent ROW or COLUMN axes joined)."""
  if len(axes) != len(shape):
    raise ValueError(f"Parameter {name} has shape {tuple(shape)} but logical axes {tuple(axes)}.")
  dims = _axis_factor_dims(axes, rules, name)
  if not factored:  # T5X: no rule at all, so BATCH axes are averaged over too
    return FactorPlan(tuple(range(len(shape))))
  groups = _join_adjacent(dims)
  kinds = {d for _, d in groups}
  if {_R, _C, _N} <= kinds:
    raise ValueError(f"Incomplete Adafactor factor rule {tuple(axes)} of parameter {name}.")
  if not {_R, _C} <= kinds:  # partially factored: only the BATCH annotations count
    groups = [(g, _N if d in (_R, _C) else d) for g, d in groups]
  batch = tuple(a for g, d in groups if d == _B for a in g)
  if len(groups) <= 2 and not batch:  # T5X ignores the rule of a matrix without batch axes
    return _heuristic_plan(shape, groups, min_dim_size_to_factor)
  averaging = tuple(a for a in range(len(shape)) if a not in batch)
  rows = tuple(a for g, d in groups if d == _R for a in g)
  cols = tuple(a for g, d in groups if d == _C for a in g)
  return FactorPlan(averaging, rows, cols)


def factor_plans(params, param_axes, **options) -> Any:
  """`factor_plan` of every parameter: a tree like `params` with FactorPlan leaves.

  Args:
    params: arrays (or shapes) of the parameters.
    param_axes: a tree like `params` whose leaves are PartitionSpecs of logical axis names
      (`nn.get_partition_spec` of the boxed parameters).
    **options: rules, factored, min_dim_size_to_factor.
  """

  def plan(path, param, axes):
    return factor_plan(param.shape, tuple(axes), name=jax.tree_util.keystr(path), **options)

  return jax.tree_util.tree_map_with_path(plan, params, param_axes)


# --------------------------------------------------------------------------------------------
# The transformation.


class T5XAdafactorState(NamedTuple):
  """State of `t5x_adafactor`; unused slots hold a [1] placeholder, as in T5X.

  Attributes:
    count: int32 [], updates applied so far (T5X's optimizer step).
    v_row: per parameter, the squared gradient's EMA averaged over the column axes
      (the parameter's shape without col_dims) when factored.
    v_col: ... averaged over the row axes (without row_dims) when factored.
    v: the full EMA (the parameter's shape) when not factored.
    m: momentum (the parameter's shape) when beta1 is set.
  """

  count: Array
  v_row: Any
  v_col: Any
  v: Any
  m: Any


_SLOTS = ("v_row", "v_col", "v", "m")
_PLACEHOLDER = (1,)


def _state_shapes(shape: Sequence[int], plan: FactorPlan, momentum: bool) -> dict[str, tuple]:
  """Shapes of one parameter's v_row, v_col, v, m."""
  shape = tuple(shape)
  drop = lambda dims: tuple(s for i, s in enumerate(shape) if i not in dims)
  return {
    "v_row": drop(plan.col_dims) if plan.factored else _PLACEHOLDER,
    "v_col": drop(plan.row_dims) if plan.factored else _PLACEHOLDER,
    "v": _PLACEHOLDER if plan.factored else shape,
    "m": shape if momentum else _PLACEHOLDER,
  }


def _state_axes(axes: Sequence[str | None], plan: FactorPlan, momentum: bool) -> dict[str, P]:
  """Logical axes of one parameter's v_row, v_col, v, m (placeholders replicated)."""
  drop = lambda dims: P(*(a for i, a in enumerate(axes) if i not in dims))
  return {
    "v_row": drop(plan.col_dims) if plan.factored else P(),
    "v_col": drop(plan.row_dims) if plan.factored else P(),
    "v": P() if plan.factored else P(*axes),
    "m": P(*axes) if momentum else P(),
  }


def _unzip(plans, per_param, keys: Sequence[str]) -> dict[str, Any]:
  """{key: tree} from a tree (shaped like `plans`) of per-parameter dicts {key: value}."""
  treedef = jax.tree.structure(plans)
  leaves = treedef.flatten_up_to(per_param)
  return {k: treedef.unflatten([leaf[k] for leaf in leaves]) for k in keys}


def _decay_rate_pow(step: Array, exponent: float) -> Array:
  """Second-moment decay beta2_t = 1 - (t + 1)^-exponent (T5X's `_decay_rate_pow`)."""
  t = step.astype(jnp.float32) + 1.0
  return 1.0 - t**-exponent


def _second_moment_step(grad, v_row, v_col, v, plan: FactorPlan, beta2, epsilon1):
  """New statistics and the normalised gradient y = grad / sqrt(V), V factored or full."""
  grad_sqr = grad * grad + epsilon1
  if plan.factored:
    rows, cols = plan.row_dims, plan.col_dims
    new_v_row = beta2 * v_row + (1.0 - beta2) * jnp.mean(grad_sqr, axis=cols)  # shape \ cols
    new_v_col = beta2 * v_col + (1.0 - beta2) * jnp.mean(grad_sqr, axis=rows)  # shape \ rows
    rows_in_v_row = tuple(d - sum(c < d for c in cols) for d in rows)
    row_col_mean = jnp.mean(new_v_row, axis=rows_in_v_row, keepdims=True)
    row_factor = (new_v_row / row_col_mean) ** -0.5
    col_factor = new_v_col**-0.5
    y = grad * jnp.expand_dims(row_factor, cols) * jnp.expand_dims(col_factor, rows)
    return {"v_row": new_v_row, "v_col": new_v_col, "v": v}, y
  new_v = beta2 * v + (1.0 - beta2) * grad_sqr
  return {"v_row": v_row, "v_col": v_col, "v": new_v}, grad * new_v**-0.5


def t5x_adafactor(
  learning_rate: ScalarOrSchedule,
  param_axes: Any,
  *,
  decay_rate: float = 0.8,
  step_offset: int = 0,
  beta1: float | None = None,
  clipping_threshold: float | None = 1.0,
  multiply_by_parameter_scale: bool = True,
  factored: bool = True,
  min_dim_size_to_factor: int = 128,
  epsilon1: float = 1e-30,
  epsilon2: float = 1e-3,
  rules: Mapping[str, FactorDim] = MOE_FACTOR_RULES,
) -> optax.GradientTransformation:
  """T5X's Adafactor (`t5x.adafactor.Adafactor`) driven by logical factor rules, as optax.

  Per parameter, with step t = count - step_offset, averaging axes A (all but BATCH axes):
    beta2 = 1 - (t + 1)^-decay_rate;  g2 = grad^2 + epsilon1
    factored:   v_row = beta2 v_row + (1 - beta2) mean_cols(g2)
                v_col = beta2 v_col + (1 - beta2) mean_rows(g2)
                y = grad / sqrt(v_row / mean_rows(v_row) * v_col)
    unfactored: v = beta2 v + (1 - beta2) g2;  y = grad / sqrt(v)
    y = y / max(1, rms_A(y) / clipping_threshold)
    scale = learning_rate(count) * max(rms_A(param), epsilon2)   (multiply_by_parameter_scale)
    update = -scale * y   (with beta1: m = beta1 m + (1 - beta1) scale y;  update = -m)

  Args:
    learning_rate: a constant or a schedule of the update count (T5X's step).
    param_axes: a tree like the parameters whose leaves are PartitionSpecs of logical axis
      names (`nn.get_partition_spec` of the boxed parameters).
    decay_rate, step_offset, beta1, clipping_threshold, multiply_by_parameter_scale, factored,
      min_dim_size_to_factor, epsilon1, epsilon2: as T5X's Adafactor.
    rules: logical axis name -> FactorDim (default: T5X's MoE rules).

  Returns:
    A GradientTransformation whose `update` needs the parameters.
  """
  options = dict(rules=rules, factored=factored, min_dim_size_to_factor=min_dim_size_to_factor)
  momentum = beta1 is not None

  def init(params):
    plans = factor_plans(params, param_axes, **options)
    zeros = lambda plan, p: {
      k: jnp.zeros(s, jnp.float32) for k, s in _state_shapes(p.shape, plan, momentum).items()
    }
    slots = _unzip(plans, jax.tree.map(zeros, plans, params), _SLOTS)
    return T5XAdafactorState(count=jnp.zeros([], jnp.int32), **slots)

  def update(grads, state, params=None):
    if params is None:
      raise ValueError("t5x_adafactor needs the parameters: tx.update(grads, state, params).")
    plans = factor_plans(params, param_axes, **options)
    count = state.count
    beta2 = _decay_rate_pow(count - step_offset, decay_rate)
    lr = learning_rate(count) if callable(learning_rate) else learning_rate

    def one(plan, grad, param, v_row, v_col, v, m):
      grad = grad.astype(jnp.float32)
      slots, y = _second_moment_step(grad, v_row, v_col, v, plan, beta2, epsilon1)
      rms = lambda x: jnp.sqrt(jnp.mean(x * x, axis=plan.averaging_dims, keepdims=True))
      if clipping_threshold is not None:
        y = y / jnp.maximum(1.0, rms(y) / clipping_threshold)
      scale = lr
      if multiply_by_parameter_scale:
        scale = scale * jnp.maximum(rms(param.astype(jnp.float32)), epsilon2)
      subtrahend = scale * y
      if momentum:
        subtrahend = beta1 * m + (1.0 - beta1) * subtrahend
        m = subtrahend
      return {**slots, "m": m, "update": -subtrahend}

    out = jax.tree.map(one, plans, grads, params, state.v_row, state.v_col, state.v, state.m)
    out = _unzip(plans, out, (*_SLOTS, "update"))
    updates = out.pop("update")
    return updates, T5XAdafactorState(count=optax.safe_increment(count), **out)

  return optax.GradientTransformation(init, update)


def t5x_adafactor_state_axes(param_shapes, param_axes, *, beta1=None, **options) -> Any:
  """Logical axes of `t5x_adafactor`'s state (a T5XAdafactorState of PartitionSpecs): the
  parameter's axes, without the averaged-over axes for v_row / v_col (a per-expert statistic
  keeps `expert`); the count and the placeholders are replicated."""
  plans = factor_plans(param_shapes, param_axes, **options)
  axes = lambda plan, a: _state_axes(tuple(a), plan, beta1 is not None)
  slots = _unzip(plans, jax.tree.map(axes, plans, param_axes), _SLOTS)
  return T5XAdafactorState(count=P(), **slots)


# --------------------------------------------------------------------------------------------
# The configured optimizer and the sharding of its state.


def make_optimizer(cfg: TrainConfig, param_axes: Any) -> optax.GradientTransformation:
  """The run's optimizer: T5X's MoE Adafactor (decay_rate 0.8, step_offset 0, factored by the
  logical factor rules, update clipping 1.0, updates scaled by the parameter RMS, no momentum)
  or AdamW, with `learning_rate_schedule(cfg)`.

  Args:
    cfg: the train config.
    param_axes: the parameters' logical axes, a tree of PartitionSpecs of axis names
      (`nn.get_partition_spec` of the boxed parameters); Adafactor factors by them.
  """
  schedule = learning_rate_schedule(cfg)
  if cfg.optimizer == "adafactor":
    return t5x_adafactor(
      schedule,
      param_axes,
      decay_rate=cfg.adafactor_decay_rate,
      clipping_threshold=cfg.clipping_threshold,
      multiply_by_parameter_scale=cfg.multiply_by_parameter_scale,
      factored=cfg.factored,
    )
  return optax.adamw(schedule, weight_decay=cfg.weight_decay)


def opt_state_logical_axes(cfg: TrainConfig, param_shapes, param_axes) -> Any:
  """Logical axes of `make_optimizer(cfg, param_axes)`'s state, a tree of PartitionSpecs of
  axis names shaped like the state (checked): Adafactor's statistics as
  `t5x_adafactor_state_axes`; AdamW's moments take their parameter's axes; counts replicated."""
  tx = make_optimizer(cfg, param_axes)
  state_shapes = jax.eval_shape(tx.init, param_shapes)
  if cfg.optimizer == "adafactor":
    axes = t5x_adafactor_state_axes(param_shapes, param_axes, factored=cfg.factored)
  else:
    axes = optax.tree_map_params(
      tx,
      lambda _, a: a,
      state_shapes,
      param_axes,
      transform_non_params=lambda _: P(),
      is_leaf=lambda x: isinstance(x, P),
    )
  expected, got = jax.tree.structure(state_shapes), jax.tree.structure(axes)
  if expected != got:
    raise ValueError(f"Optimizer state axes do not match its state: {got} vs {expected}.")
  return axes


def opt_state_specs(cfg: TrainConfig, param_shapes, param_axes, fsdp: bool = False) -> Any:
  """Mesh PartitionSpecs of the optimizer state: its logical axes mapped by the parameters'
  sharding rules (`sharding.param_rules`)."""
  axes = opt_state_logical_axes(cfg, param_shapes, param_axes)
  return nn.logical_to_mesh(axes, sharding.param_rules(fsdp))
