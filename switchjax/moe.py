"""The sparse Mixture-of-Experts MLP layer (flaxformer's `MoeLayer`).

Tokens of the flattened batch are cut into groups; a router assigns each token of a group to
experts, each expert holding at most `capacity` tokens per group; the experts (one stacked MLP)
run on their buffers; outputs are combined with the router probabilities. Dropped tokens give 0
(the residual connection around the layer passes them through).

Two capacity modes:
- flaxformer (default): groups of at most `max_group_size` tokens, the count chosen by
  flaxformer's rule; capacity = max(round(cf * tokens_per_group / E), min_expert_capacity) with
  the train or eval capacity factor.
- Hugging Face (`expert_capacity` set): every sequence is one group, capacity is fixed.

Expert parallelism: buffers are laid out [groups, experts, capacity, d] with groups sharded over
('data', 'expert') and moved to [experts, groups, capacity, d] with experts sharded over
'expert'; under a mesh the compiler turns that resharding into an all-to-all.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from switchjax import routing, sharding
from switchjax.config import MoeConfig

Array = jax.Array


# --------------------------------------------------------------------------------------------
# Grouping and capacity (static shape arithmetic).


@dataclasses.dataclass(frozen=True)
class GroupLayout:
  """How a [batch, length] block of tokens is routed.

  Attributes:
    padded_batch, padded_length: the token block after flaxformer's padding (zero tokens are
      added along batch or length when the token count is not a multiple of the group count's
      multiple).
    num_groups, tokens_per_group: the routing groups (contiguous runs of flattened tokens).
    expert_capacity: flaxformer's capacity per expert per group (what expert_usage counts).
  """

  padded_batch: int
  padded_length: int
  num_groups: int
  tokens_per_group: int
  expert_capacity: int

  @property
  def slots(self) -> int:
    """Buffer slots per expert per group: the capacity, but never more than the group's
    tokens (an expert cannot receive more), so small groups do not pad the expert buffers."""
    return min(self.expert_capacity, self.tokens_per_group)


def num_groups(num_tokens: int, max_group_size: int, multiple: int) -> int:
  """flaxformer's `_num_groups`: the fewest groups, at least num_tokens // max_group_size and
  at least `multiple`, that divide the tokens evenly and are a multiple of `multiple` (so the
  groups split evenly over the devices that hold the batch)."""
  if max_group_size < 1:
    raise ValueError(f"moe.max_group_size={max_group_size} must be >= 1 token.")
  n = max(num_tokens // max_group_size, multiple)
  while n < num_tokens and not (num_tokens % n == 0 and n % multiple == 0):
    n += 1
  if num_tokens % n or n % multiple:
    raise ValueError(
      f"Cannot split {num_tokens} tokens into a multiple of {multiple} routing groups; use a "
      "batch size or sequence length whose product is a multiple of it."
    )
  return n


def _padding_for(batch: int, length: int, multiple: int) -> tuple[int, int]:
  """flaxformer's `_maybe_pad`: extra (batch, length) so that tokens % multiple == 0, along the
  dimension that needs fewer padding tokens (length on ties)."""
  if (batch * length) % multiple == 0:
    return 0, 0
  pad_b = next(p for p in range(1, multiple + 1) if (batch + p) * length % multiple == 0)
  pad_l = next(p for p in range(1, multiple + 1) if batch * (length + p) % multiple == 0)
  return (0, pad_l) if pad_l * batch <= pad_b * length else (pad_b, 0)


def mesh_group_shards() -> int:
  """The data x expert devices of the mesh set by `jax.set_mesh` (1 without one): the devices
  the batch, and so the routing groups, are split over."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return 1
  return math.prod(mesh.shape.get(axis, 1) for axis in sharding.BATCH_MESH_AXES)


def group_layout(
  batch: int, length: int, config: MoeConfig, train: bool, num_shards: int = 1
) -> GroupLayout:
  """Groups and capacity for a [batch, length] input whose batch is split over `num_shards`
  devices.

  The group count is a multiple of `config.group_multiple`, or of `num_shards` when that is 0;
  a fixed multiple whose groups cannot split over `num_shards` devices is refused.
  Capacity = max(round(cf * tokens_per_group / E), min_expert_capacity).
  """
  if config.expert_capacity is not None:  # Hugging Face: one group per sequence.
    return GroupLayout(batch, length, batch, length, config.expert_capacity)
  multiple = config.group_multiple or num_shards
  pad_b, pad_l = _padding_for(batch, length, multiple)
  tokens = (batch + pad_b) * (length + pad_l)
  groups = num_groups(tokens, config.max_group_size, multiple)
  if groups % num_shards:
    raise ValueError(
      f"moe.group_multiple={config.group_multiple} gives {groups} routing groups, which do not "
      f"split over the {num_shards} data x expert devices of the mesh; set moe.group_multiple "
      f"to a multiple of {num_shards}, or to 0 so that groups follow the mesh."
    )
  tokens_per_group = tokens // groups
  factor = config.train_capacity_factor if train else config.eval_capacity_factor
  capacity = max(
    int(round(factor * tokens_per_group / config.num_experts)), config.min_expert_capacity
  )
  return GroupLayout(batch + pad_b, length + pad_l, groups, tokens_per_group, capacity)


def causal_token_order(layout: GroupLayout) -> np.ndarray | None:
  """[groups, tokens] order in which a decoder's tokens take expert slots: by position in
  their sequence, then by place in the group, so a token's slot never depends on later
  positions (of its own or another sequence of its group). None when that is the group's own
  order (every group within one sequence)."""
  positions = np.arange(layout.num_groups * layout.tokens_per_group) % layout.padded_length
  positions = positions.reshape(layout.num_groups, layout.tokens_per_group)
  order = np.argsort(positions, axis=1, kind="stable")
  return (
    None
    if np.array_equal(order, np.broadcast_to(np.arange(order.shape[1]), order.shape))
    else order
  )


# --------------------------------------------------------------------------------------------
# Activations shared with the dense MLP.


def activation_fn(name: str):
  """Activation names -> functions. 'gelu' is the tanh approximation (flaxformer; HF's
  'gelu_new'); 'gelu_exact' is the erf form (HF's 'gelu')."""
  return {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_exact": lambda x: jax.nn.gelu(x, approximate=False),
    "silu": jax.nn.silu,
    "linear": lambda x: x,
  }[name]


def expert_kernel_init(scale: float):
  """flaxformer's expert init: variance_scaling(scale, fan_in, normal) per expert (the expert
  axis is a batch axis, not part of the fan-in)."""
  return nn.initializers.variance_scaling(scale, "fan_in", "normal", batch_axis=(0,))


# --------------------------------------------------------------------------------------------
# The layer.


class MoeLayer(nn.Module):
  """Sparse MoE MLP: router, capacity-limited dispatch, stacked experts, combine, metrics.

  Attributes:
    config: routing and capacity settings.
    d_ff: hidden width of each expert.
    activations: ('relu',), ('gelu',), or two for a gated unit: act(x @ wi_0) * (x @ wi_1).
    dropout_rate: dropout on the experts' hidden activations, one mask per expert shared by all
      its slots (flaxformer's vmapped expert MLPs with dropout broadcast along their tokens).
    causal: the layer sits in a decoder: tokens take expert slots in position order (see
      `causal_token_order`), top-k choices token by token; routers that cannot be causal
      (experts-choose, batch-prioritized) are refused.
    dtype: activation and expert compute dtype; the router always computes in float32 and the
      output has the config's combine dtype (float32 by default, as flaxformer).
    param_dtype: dtype of the expert kernels.
    kernel_init: initialiser of the [E, in, out] expert kernels.
  """

  config: MoeConfig
  d_ff: int
  activations: Sequence[str] = ("relu",)
  dropout_rate: float = 0.0
  causal: bool = False
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  kernel_init: nn.initializers.Initializer = expert_kernel_init(1.0)

  @nn.compact
  def __call__(self, inputs: Array, *, enable_dropout: bool = False) -> Array:
    """Applies the layer.

    Args:
      inputs: <float>[batch, length, d_model].
      enable_dropout: training mode (train capacity factor, jitter, dropout).

    Returns:
      <float>[batch, length, d_model].
    """
    cfg = self.config
    cfg.validate()
    if inputs.ndim != 3:
      raise ValueError(
        f"MoeLayer expects inputs [batch, length, d_model]; got shape {inputs.shape}."
      )
    batch, length, d_model = inputs.shape
    if self.causal:
      cfg.validate_causal("model.decoder_moe")
    layout = group_layout(batch, length, cfg, enable_dropout, mesh_group_shards())
    x = inputs
    if (layout.padded_batch, layout.padded_length) != (batch, length):
      x = jnp.pad(x, ((0, layout.padded_batch - batch), (0, layout.padded_length - length), (0, 0)))
    # [groups, tokens, d_model]
    x = x.reshape(layout.num_groups, layout.tokens_per_group, d_model)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))

    router = routing.make_router(cfg, name="router")
    order = causal_token_order(layout) if self.causal else None
    route, router_logits = router(
      x, layout.slots, apply_jitter=enable_dropout, causal=self.causal, order=order
    )

    if isinstance(route, routing.RouterIndices):
      y, routed = self._scatter_dispatch_and_combine(x, route, layout, enable_dropout)
    else:
      y, routed = self._masked_dispatch_and_combine(x, route, enable_dropout)

    self._sow_metrics(x, route, routed, router_logits, layout, batch, length, type(router))

    y = y.reshape(layout.padded_batch, layout.padded_length, d_model)[:batch, :length]
    return nn.with_logical_constraint(y, ("batch", "length", "embed"))

  # ------------------------------------------------------------------------------------------

  def _masked_dispatch_and_combine(self, x, route: routing.RouterMask, enable_dropout):
    """One-hot einsum dispatch. Returns outputs [groups, tokens, d] and, per (group, token),
    how many experts took the token [groups, tokens]."""
    dispatch = route.dispatch_mask.astype(self.dtype)
    # [groups, experts, capacity, d_model]
    expert_inputs = jnp.einsum("gtd,gtec->gecd", x.astype(self.dtype), dispatch)
    expert_outputs = self._experts(expert_inputs, enable_dropout)
    # [groups, tokens, d_model], in the combine dtype (float32 by default).
    combine = route.combine_array.astype(self.config.combine_dtype)
    y = jnp.einsum("gecd,gtec->gtd", expert_outputs, combine)
    routed = jnp.sum(route.dispatch_mask, axis=(2, 3))
    return y, routed

  def _scatter_dispatch_and_combine(self, x, route: routing.RouterIndices, layout, enable_dropout):
    """Scatter dispatch and gather combine (cheaper than one-hot einsums on CPU/GPU)."""
    groups, tokens, d_model = x.shape
    k = route.dispatch_indices.shape[2]
    capacity = layout.slots
    expert_index = route.dispatch_indices[..., 0]  # [groups, tokens, k]
    slot = route.dispatch_indices[..., 1]  # [groups, tokens, k]
    is_routed = slot < capacity  # [groups, tokens, k]
    # Dropped choices point past the buffer, so the scatter drops them.
    slot = jnp.where(is_routed, slot, capacity)
    # [groups, tokens, k, d_model]
    token_copies = jnp.broadcast_to(
      x.astype(self.dtype)[:, :, None, :], (groups, tokens, k, d_model)
    )

    def scatter(e, s, v):  # one group: [tokens, k] indices, [tokens, k, d] values
      buffer = jnp.zeros((self.config.num_experts, capacity, d_model), self.dtype)
      return buffer.at[e, s].add(v, mode="drop")

    # [groups, experts, capacity, d_model]
    expert_inputs = jax.vmap(scatter)(expert_index, slot, token_copies)
    expert_outputs = self._experts(expert_inputs, enable_dropout)

    def gather(e, s, out):
      return out.at[e, s].get(mode="fill", fill_value=0)

    # [groups, tokens, k, d_model]
    gathered = jax.vmap(gather)(expert_index, slot, expert_outputs)
    y = jnp.einsum(
      "gtkd,gtk->gtd", gathered, route.combine_weights.astype(self.config.combine_dtype)
    )
    routed = jnp.sum(is_routed, axis=-1)
    return y, routed

  def _experts(self, expert_inputs: Array, enable_dropout: bool) -> Array:
    """The stacked expert MLPs on their buffers.

    Args:
      expert_inputs: <float>[groups, experts, capacity, d_model], groups sharded over
        ('data', 'expert').

    Returns:
      <float>[groups, experts, capacity, d_model], sharded the same way.
    """
    num_experts, d_model = self.config.num_experts, expert_inputs.shape[-1]
    x = nn.with_logical_constraint(expert_inputs, ("batch", "unmodeled", "length", "embed"))
    # All-to-all: experts move onto the 'expert' mesh axis, groups keep only 'data'.
    # [experts, groups, capacity, d_model]
    x = nn.with_logical_constraint(
      jnp.swapaxes(x, 0, 1), ("expert", "expert_replicas", "length", "embed")
    )

    def kernel(name, shape, axes):
      return jnp.asarray(
        self.param(
          name, nn.with_logical_partitioning(self.kernel_init, axes), shape, self.param_dtype
        ),
        self.dtype,
      )

    in_axes, out_axes = ("expert", "embed", "expert_mlp"), ("expert", "expert_mlp", "embed")
    if len(self.activations) == 1:
      wi = kernel("wi", (num_experts, d_model, self.d_ff), in_axes)
      h = activation_fn(self.activations[0])(jnp.einsum("egcd,edf->egcf", x, wi))
    else:  # gated unit, e.g. GEGLU: gelu(x @ wi_0) * (x @ wi_1)
      h = 1.0
      for i, act in enumerate(self.activations):
        wi = kernel(f"wi_{i}", (num_experts, d_model, self.d_ff), in_axes)
        h = h * activation_fn(act)(jnp.einsum("egcd,edf->egcf", x, wi))
    # [experts, groups, capacity, d_ff]
    h = nn.with_logical_constraint(h, ("expert", "expert_replicas", "length", "expert_mlp"))
    # One dropout mask per expert, shared by its groups and slots (flaxformer).
    h = nn.Dropout(self.dropout_rate, broadcast_dims=(1, 2))(h, deterministic=not enable_dropout)
    wo = kernel("wo", (num_experts, self.d_ff, d_model), out_axes)
    y = jnp.einsum("egcf,efd->egcd", h, wo)
    y = nn.with_logical_constraint(y, ("expert", "expert_replicas", "length", "embed"))
    # All-to-all back: [groups, experts, capacity, d_model]
    return nn.with_logical_constraint(
      jnp.swapaxes(y, 0, 1), ("batch", "unmodeled", "length", "embed")
    )

  def _sow_metrics(self, x, route, routed, router_logits, layout, batch, length, router_cls):
    """Sows flaxformer's five routing metrics plus per-expert token counts and the logits.

    `routed` [groups, tokens] counts the experts that took each token.
    """
    cfg = self.config
    if cfg.ignore_padding_tokens:  # only real (non-zero) tokens count
      num_tokens = jnp.sum(jnp.sum(jnp.abs(x), axis=-1) > 0).astype(jnp.float32)
    else:
      num_tokens = jnp.float32(layout.num_groups * layout.tokens_per_group)
    num_dispatched = jnp.sum(routed).astype(jnp.float32)
    fraction_left_behind = 1.0 - jnp.sum(routed > 0) / num_tokens

    if isinstance(route, routing.RouterIndices):
      combine_total = jnp.sum(route.combine_weights)
      chosen = jnp.where(
        route.dispatch_indices[..., 1] < layout.slots, route.dispatch_indices[..., 0], -1
      )
      tokens_per_expert = jnp.sum(
        jax.nn.one_hot(chosen, cfg.num_experts, dtype=jnp.int32), axis=(0, 1, 2)
      )
    else:
      combine_total = jnp.sum(route.combine_array)
      tokens_per_expert = jnp.sum(route.dispatch_mask, axis=(0, 1, 3), dtype=jnp.int32)

    if router_cls.fills_capacity:
      expert_usage = jnp.float32(1.0)  # experts always fill their buffers
    else:
      expert_usage = num_dispatched / (cfg.num_experts * layout.expert_capacity * layout.num_groups)
    metrics = {
      "auxiliary_loss": route.auxiliary_loss,
      "router_z_loss": route.router_z_loss,
      "fraction_tokens_left_behind": fraction_left_behind,
      "expert_usage": expert_usage,
      "router_confidence": combine_total / num_dispatched,
      "tokens_per_expert": tokens_per_expert,
    }
    for name, value in metrics.items():
      self.sow("intermediates", name, jnp.asarray(value))
    # [batch, length, experts], in the input's layout (padding added for grouping removed).
    logits = router_logits.reshape(layout.padded_batch, layout.padded_length, cfg.num_experts)
    self.sow("intermediates", "router_logits", logits[:batch, :length])
