"""MoeLayer: router, dispatch (capacity buffers, sorted runs, or one-hot einsums), stacked
experts, combine, and the routing metrics. The module docstring of `switchjax.moe` describes
the modes."""

from __future__ import annotations

import functools
import operator
from collections.abc import Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from switchjax import routing
from switchjax.activations import activation_fn
from switchjax.config import MoeConfig
from switchjax.gmm import grouped_matmul
from switchjax.layers import MlpBlock
from switchjax.moe import expert_parallel
from switchjax.moe.groups import causal_token_order, group_layout, mesh_group_shards
from switchjax.moe.sorted_layout import dropless_block, sorted_rows

Array = jax.Array
# dispatch='auto' sorts on one CPU device up to this many experts: beyond it the buffers are
# faster there (each sorted expert copies its weights on XLA:CPU, which weighs at many
# experts; `scripts/benchmark.py moe` measures both).
SORTED_MAX_EXPERTS = 16
# dispatch='auto' elsewhere, by backend (docs/routing.md has the measurements behind it).
AUTO_DISPATCH = {"cpu": "buffers", "tpu": "buffers", "gpu": "buffers"}


def expert_kernel_init(scale: float):
  """flaxformer's expert init: variance_scaling(scale, fan_in, normal) per expert (the expert
  axis is a batch axis, not part of the fan-in)."""
  return nn.initializers.variance_scaling(scale, "fan_in", "normal", batch_axis=(0,))


class MoeLayer(nn.Module):
  """Sparse MoE MLP: router, dispatch, stacked experts, combine, metrics.

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
    shared_kernel_init: initialiser of the shared experts' dense kernels (config
      num_shared_experts > 0), as the dense MLPs'.
  """

  config: MoeConfig
  d_ff: int
  activations: Sequence[str] = ("relu",)
  dropout_rate: float = 0.0
  causal: bool = False
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  kernel_init: nn.initializers.Initializer = expert_kernel_init(1.0)
  shared_kernel_init: nn.initializers.Initializer = nn.initializers.variance_scaling(
    1.0, "fan_in", "truncated_normal"
  )

  @nn.compact
  def __call__(self, inputs: Array, *, enable_dropout: bool = False, decode: bool = False) -> Array:
    """Applies the layer.

    Args:
      inputs: <float>[batch, length, d_model].
      enable_dropout: training mode (train capacity factor, jitter, dropout).
      decode: a cached decoding step. With one new token per sequence (length 1) nothing is
        dropped: the step's tokens are routed with a capacity of a whole group and each goes
        to its top-k experts directly (the dropless path, no capacity buffers). Where the
        capacity path would drop nothing (always in Hugging Face mode, where the group is the
        one token) the outputs are the same.

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
    order = causal_token_order(layout) if self.causal else None  # numpy: static
    step = decode and length == 1
    capacity = layout.tokens_per_group if step else layout.slots
    # Named scopes (moe_router, moe_dispatch, moe_experts, moe_combine) name the ops of each
    # stage in HLO metadata and profiles.
    with jax.named_scope("moe_router"):
      route, router_logits = router(
        x,
        capacity,
        apply_jitter=enable_dropout,
        causal=self.causal,
        order=None if order is None else jnp.asarray(order),
      )
    if isinstance(route, routing.RouterIndices):
      dispatch = "sorted" if step else self.dispatch(enable_dropout)
      if dispatch == "sorted":
        route = routing.choices_of(route, capacity)  # the kept choices, run without buffers
      elif dispatch == "einsum":
        route = route.to_mask(cfg.num_experts, capacity)  # flaxformer's one-hot form

    if isinstance(route, routing.RouterChoices):
      y, stats = self._dropless(x, route, enable_dropout, uncapped=step)
    elif isinstance(route, routing.RouterIndices):
      scatter = type(router).combine_by_scatter
      y, stats = self._dispatch_by_slots(x, route, capacity, scatter, enable_dropout)
    else:
      y, stats = self._masked_dispatch_and_combine(x, route, enable_dropout)

    self._sow_metrics(x, route, stats, router_logits, layout, batch, length, router, enable_dropout)
    self._sow_bias_metrics(router)

    y = y.reshape(layout.padded_batch, layout.padded_length, d_model)[:batch, :length]
    if cfg.num_shared_experts:
      y = y + self._shared_experts(inputs, enable_dropout)
    return nn.with_logical_constraint(y, ("batch", "length", "embed"))

  def _shared_experts(self, inputs: Array, enable_dropout: bool) -> Array:
    """DeepSeekMoE's shared experts: dense MLPs every token passes through, beside its routed
    experts. The sum of n MLPs of width w is one MLP of width n * w (their hidden units
    concatenated), so they run as one `MlpBlock`, sharded like the dense MLPs.

    Args:
      inputs: <float>[batch, length, d_model].

    Returns:
      <float>[batch, length, d_model], in the compute dtype.
    """
    cfg = self.config
    width = cfg.num_shared_experts * (cfg.shared_expert_d_ff or self.d_ff)
    mlp = MlpBlock(
      width,
      self.activations,
      self.dropout_rate,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      kernel_init=self.shared_kernel_init,
      name="shared_experts",
    )
    return mlp(inputs.astype(self.dtype), enable_dropout=enable_dropout)

  def dispatch(self, train: bool) -> str:
    """How capacity routing reaches the experts: 'einsum', 'buffers' or 'sorted' (see
    MoeConfig.dispatch); 'auto' picks by backend.

    On one CPU device with few experts, 'auto' sorts, except a decoder's outside training:
    there a token's slot, and so every float operation on it, depends on earlier tokens only,
    while sorted runs are cut into matmuls by the experts' whole loads, so later tokens could
    change earlier outputs in the last bit (scoring a prefix would then differ from decoding
    it). A training step sees every position at once, and sorted runs skip the empty slots
    (8x the work in Hugging Face mode, whose capacity of 64 per sequence exceeds a 29-token
    target). Elsewhere it uses AUTO_DISPATCH's choice for the backend.
    """
    if self.config.dispatch != "auto":
      return self.config.dispatch
    backend = jax.default_backend()
    one_cpu = backend == "cpu" and mesh_group_shards() == 1
    if one_cpu and self.config.num_experts <= SORTED_MAX_EXPERTS and (train or not self.causal):
      return "sorted"
    return AUTO_DISPATCH.get(backend, "buffers")

  # ------------------------------------------------------------------------------------------
  # Dispatch and combine. Each returns outputs [groups, tokens, d_model] (combine dtype) and
  # RouteStats.

  def _dispatch_by_slots(
    self, x, route: routing.RouterIndices, capacity: int, scatter: bool, enable_dropout: bool
  ):
    """Capacity buffers filled by gathering each slot's token and emptied by gathering each
    token's k outputs, or, for a router that declares `combine_by_scatter` (experts choose:
    every expert is a choice of every token, and slots are fewer than choices), by adding each
    slot's weighted output to its token: O(slots * d_model) where flaxformer's one-hot einsums
    cost O(tokens * slots * d_model) per group, with the same results (a slot holds one
    token)."""
    groups, tokens, d_model = x.shape
    num_experts = self.config.num_experts
    buffer = num_experts * capacity
    with jax.named_scope("moe_dispatch"):
      expert_index, slot = route.dispatch_indices[..., 0], route.dispatch_indices[..., 1]
      kept = slot < capacity  # [groups, tokens, k]
      # [groups, tokens * k]: each choice's place in its group's buffer (`buffer`: none).
      place = jnp.where(kept, expert_index * capacity + slot, buffer).reshape(groups, -1)
      token_of_choice = jnp.repeat(jnp.arange(tokens, dtype=jnp.int32), kept.shape[-1])
      weights = route.combine_weights.reshape(groups, -1)

      def slot_tables(place, weights):  # one group: each slot's token (`tokens`: none), weight
        slot_token = jnp.full((buffer + 1,), tokens, jnp.int32).at[place].set(token_of_choice)
        slot_weight = jnp.zeros((buffer + 1,), jnp.float32).at[place].set(weights)
        return slot_token[:buffer], slot_weight[:buffer]

      # [groups, experts * capacity]
      slot_token, slot_weight = jax.vmap(slot_tables)(place, weights)
      x_padded = jnp.pad(x.astype(self.dtype), ((0, 0), (0, 1), (0, 0)))  # token `tokens` = 0
      # [groups, experts, capacity, d_model]
      expert_inputs = jax.vmap(lambda x, t: x[t])(x_padded, slot_token)
    expert_outputs = self._experts(
      expert_inputs.reshape(groups, num_experts, capacity, d_model), enable_dropout
    )
    with jax.named_scope("moe_combine"):
      dtype = jnp.dtype(self.config.combine_dtype)
      outputs = expert_outputs.reshape(groups, buffer, d_model).astype(dtype)
      k = kept.shape[-1]
      if not scatter:  # tokens choose: each token gathers its k outputs
        outputs = jnp.pad(outputs, ((0, 0), (0, 1), (0, 0)))  # place `buffer` = 0
        # [groups, tokens, k, d_model]
        gathered = jax.vmap(lambda o, p: o[p])(outputs, place).reshape(groups, tokens, k, d_model)
        y = jnp.einsum("gtkd,gtk->gtd", gathered, route.combine_weights.astype(dtype))
      else:  # experts-choose (every expert a choice): each slot adds its output to its token

        def combine(values, slot_token):
          return jnp.zeros((tokens + 1, d_model), dtype).at[slot_token].add(values)[:tokens]

        weighted = outputs * slot_weight[..., None].astype(dtype)
        y = jax.vmap(combine)(weighted, slot_token)
    stats = RouteStats(
      routed=jnp.sum(kept, axis=-1),
      tokens_per_expert=_bincount(jnp.where(kept, expert_index, -1), num_experts),
      combine_total=jnp.sum(route.combine_weights),
    )
    return y, stats

  def _masked_dispatch_and_combine(self, x, route: routing.RouterMask, enable_dropout):
    """flaxformer's one-hot einsums, for routers that return a RouterMask."""
    with jax.named_scope("moe_dispatch"):
      dispatch = route.dispatch_mask.astype(self.dtype)
      # [groups, experts, capacity, d_model]
      expert_inputs = jnp.einsum("gtd,gtec->gecd", x.astype(self.dtype), dispatch)
    expert_outputs = self._experts(expert_inputs, enable_dropout)
    with jax.named_scope("moe_combine"):
      # [groups, tokens, d_model], in the combine dtype (float32 by default).
      combine = route.combine_array.astype(self.config.combine_dtype)
      y = jnp.einsum("gecd,gtec->gtd", expert_outputs, combine)
    stats = RouteStats(
      routed=jnp.sum(route.dispatch_mask, axis=(2, 3)),
      tokens_per_expert=jnp.sum(route.dispatch_mask, axis=(0, 1, 3), dtype=jnp.int32),
      combine_total=jnp.sum(route.combine_array),
    )
    return y, stats

  def _dropless(self, x, route: routing.RouterChoices, enable_dropout, uncapped: bool = False):
    """Every choice computed, none dropped: choices sorted by expert into runs (each padded to a
    multiple of a small block), the experts run on their runs by grouped matmuls
    (`switchjax.gmm`: jax.lax.ragged_dot, or blocked loops on CPU), outputs gathered back.

    The sort spans all groups of the call. On a mesh whose 'expert' axis has more than one
    device, the choices travel to their experts' devices and back instead (`_dropless_ep`,
    chosen automatically; no setting turns it off), in buffers that cap nothing when
    `uncapped` (a decoding step: its few tokens are never dropped).
    """
    if expert_parallel.expert_shards() > 1:
      return self._dropless_ep(x, route, enable_dropout, uncapped)
    groups, tokens, d_model = x.shape
    num_experts = self.config.num_experts
    with jax.named_scope("moe_dispatch"):
      choices = route.expert_index.reshape(-1)  # [choices], token-major
      k = route.expert_index.shape[-1]
      block = dropless_block(choices.shape[0], num_experts)
      row, group_sizes, rows = sorted_rows(choices, num_experts, block)
      # [rows]: the token of each buffer row (groups * tokens: none, a zero row).
      num_tokens = groups * tokens
      token_of_choice = jnp.repeat(jnp.arange(num_tokens, dtype=jnp.int32), k)
      row_token = jnp.full((rows + 1,), num_tokens, jnp.int32).at[row].set(token_of_choice)[:rows]
      x_flat = jnp.pad(x.reshape(num_tokens, d_model).astype(self.dtype), ((0, 1), (0, 0)))
      # [rows, d_model]: the experts' inputs, expert by expert.
      expert_inputs = x_flat[row_token]
      row_expert = jnp.zeros((rows + 1,), jnp.int32).at[row].set(jnp.maximum(choices, 0))[:rows]
    expert_outputs = self._grouped_experts(
      expert_inputs, group_sizes, block, row_expert, enable_dropout
    )
    # [choices, d_model] -> [groups, tokens, k, d_model]; unrouted choices read the zero row.
    with jax.named_scope("moe_combine"):
      dtype = jnp.dtype(self.config.combine_dtype)
      outputs = jnp.pad(expert_outputs.astype(dtype), ((0, 1), (0, 0)))[row]
      outputs = outputs.reshape(groups, tokens, k, d_model)
      y = jnp.einsum("gtkd,gtk->gtd", outputs, route.combine_weights.astype(dtype))
    routed = route.expert_index >= 0
    stats = RouteStats(
      routed=jnp.sum(routed, axis=-1),
      tokens_per_expert=_bincount(route.expert_index, num_experts),
      combine_total=jnp.sum(route.combine_weights),
    )
    return y, stats

  def _dropless_ep(self, x, route: routing.RouterChoices, enable_dropout, uncapped: bool):
    """The dropless layer expert-parallel (`switchjax.moe.expert_parallel`): each device sends
    its choices to the devices of their experts by all-to-all, in buffers of a fixed number of
    rows per destination (moe.dropless_ep_capacity_factor x the even share, or all of a
    device's choices when `uncapped`); choices beyond that are capped: they contribute 0, like
    dropped tokens, and are counted in `fraction_choices_capped` (and so in the dropped-choice
    metrics)."""
    num_experts = self.config.num_experts
    shards = expert_parallel.expert_shards()
    factor = float(shards) if uncapped else self.config.dropless_ep_capacity_factor
    wis, wo = self._kernels(x.shape[-1])
    keep = None
    if enable_dropout and self.dropout_rate > 0.0:  # the one-device path's per-expert masks
      ones = jnp.ones((num_experts, 1, 1, self.d_ff), self.dtype)
      keep = self._dropout(ones, enable_dropout)[:, 0, 0] > 0  # [experts, d_ff]
    weights = expert_parallel.ExpertWeights(wis=wis, wo=wo, keep=keep)
    with jax.named_scope("moe_experts"):
      # [groups, tokens, k, d_model], [groups, tokens, k]
      outputs, served = expert_parallel.dropless_all_to_all(
        x.astype(self.dtype),
        route.expert_index,
        weights,
        self._hidden,
        factor=factor,
        dropout=self.dropout_rate,
        ragged=self.config.dropless_ep_collective == "ragged",
      )
    with jax.named_scope("moe_combine"):
      dtype = jnp.dtype(self.config.combine_dtype)
      y = jnp.einsum("gtkd,gtk->gtd", outputs.astype(dtype), route.combine_weights.astype(dtype))
    chosen = route.expert_index >= 0
    stats = RouteStats(
      routed=jnp.sum(served, axis=-1),
      tokens_per_expert=_bincount(jnp.where(served, route.expert_index, -1), num_experts),
      combine_total=jnp.sum(jnp.where(served, route.combine_weights, 0.0)),
      capped=jnp.sum(chosen & ~served) / jnp.maximum(jnp.sum(chosen), 1),
    )
    return y, stats

  # ------------------------------------------------------------------------------------------
  # Experts.

  def _kernels(self, d_model: int) -> tuple[list[Array], Array]:
    """The stacked expert kernels in the compute dtype: [wi] or [wi_0, wi_1] ([E, d, d_ff])
    and wo ([E, d_ff, d])."""
    num_experts = self.config.num_experts

    def kernel(name, shape, axes):
      return jnp.asarray(
        self.param(
          name, nn.with_logical_partitioning(self.kernel_init, axes), shape, self.param_dtype
        ),
        self.dtype,
      )

    in_axes, out_axes = ("expert", "embed", "expert_mlp"), ("expert", "expert_mlp", "embed")
    gated = len(self.activations) > 1
    names = [f"wi_{i}" for i in range(len(self.activations))] if gated else ["wi"]
    wis = [kernel(name, (num_experts, d_model, self.d_ff), in_axes) for name in names]
    return wis, kernel("wo", (num_experts, self.d_ff, d_model), out_axes)

  def _hidden(self, pre_activations: list[Array]) -> Array:
    """act(x @ wi), or the gated product of the activations (GEGLU)."""
    acts = [activation_fn(act)(pre) for act, pre in zip(self.activations, pre_activations)]
    return functools.reduce(operator.mul, acts)

  def _dropout(self, h: Array, enable_dropout: bool) -> Array:
    """Dropout on [experts, groups, capacity, d_ff] hidden activations, one mask per expert
    shared by its groups and slots (flaxformer)."""
    dropout = nn.Dropout(self.dropout_rate, broadcast_dims=(1, 2), name="Dropout_0")
    return dropout(h, deterministic=not enable_dropout)

  @jax.named_scope("moe_experts")
  def _experts(self, expert_inputs: Array, enable_dropout: bool) -> Array:
    """The stacked expert MLPs on their buffers.

    Args:
      expert_inputs: <float>[groups, experts, capacity, d_model], groups sharded over
        ('data', 'expert').

    Returns:
      <float>[groups, experts, capacity, d_model], sharded the same way.
    """
    d_model = expert_inputs.shape[-1]
    x = nn.with_logical_constraint(expert_inputs, ("batch", "unmodeled", "length", "embed"))
    # All-to-all: experts move onto the 'expert' mesh axis, groups keep only 'data'.
    # [experts, groups, capacity, d_model]
    x = nn.with_logical_constraint(
      jnp.swapaxes(x, 0, 1), ("expert", "expert_replicas", "length", "embed")
    )
    wis, wo = self._kernels(d_model)
    h = self._hidden([jnp.einsum("egcd,edf->egcf", x, wi) for wi in wis])
    # [experts, groups, capacity, d_ff]
    h = nn.with_logical_constraint(h, ("expert", "expert_replicas", "length", "expert_mlp"))
    h = self._dropout(h, enable_dropout)
    y = jnp.einsum("egcf,efd->egcd", h, wo)
    y = nn.with_logical_constraint(y, ("expert", "expert_replicas", "length", "embed"))
    # All-to-all back: [groups, experts, capacity, d_model]
    return nn.with_logical_constraint(
      jnp.swapaxes(y, 0, 1), ("batch", "unmodeled", "length", "embed")
    )

  @jax.named_scope("moe_experts")
  def _grouped_experts(self, rows, group_sizes, block, row_expert, enable_dropout):
    """The expert MLPs on expert-sorted rows [rows, d_model] (runs of `group_sizes`)."""
    wis, wo = self._kernels(rows.shape[-1])
    gmm = lambda lhs, rhs: grouped_matmul(lhs, rhs, group_sizes, block=block)
    h = self._hidden([gmm(rows, wi) for wi in wis])  # [rows, d_ff]
    if enable_dropout and self.dropout_rate > 0.0:
      # The buffers' per-expert masks (same module, rng and shape), each row taking its
      # expert's.
      ones = jnp.ones((self.config.num_experts, 1, 1, self.d_ff), self.dtype)
      keep = self._dropout(ones, enable_dropout)[:, 0, 0] > 0  # [experts, d_ff]
      h = jnp.where(keep[row_expert], h / (1.0 - self.dropout_rate), 0.0)
    else:
      h = self._dropout(h, enable_dropout)  # the identity, as in the buffers' path
    return gmm(h.astype(self.dtype), wo)

  # ------------------------------------------------------------------------------------------

  def _sow_metrics(self, x, route, stats, router_logits, layout, batch, length, router, train):
    """Sows flaxformer's five routing metrics, per-expert token counts and the logits, and
    the load metrics of newer routers.

    expert_usage is flaxformer's dispatched / (experts * capacity * groups) (1 for routers
    whose experts fill their buffers); a dropless router has no capacity: its usage is
    dispatched / (experts * the busiest expert's tokens), 1 when perfectly balanced.
    load_imbalance is max / mean of the tokens each expert took (1: balanced, E: one expert
    took all); fraction_choices_dropped the share of the token choices (tokens x experts per
    token; for experts-choose, x capacity factor) that no expert served. Dropless layers run
    expert-parallel also sow fraction_choices_capped: the share of their routed choices beyond
    the all-to-all buffers' cap (served by no expert, so also counted as dropped).
    """
    cfg = self.config
    router_cls = type(router)
    if cfg.ignore_padding_tokens:  # only real (non-zero) tokens count
      num_tokens = jnp.sum(jnp.sum(jnp.abs(x), axis=-1) > 0).astype(jnp.float32)
    else:
      num_tokens = jnp.float32(layout.num_groups * layout.tokens_per_group)
    num_dispatched = jnp.sum(stats.routed).astype(jnp.float32)
    fraction_left_behind = 1.0 - jnp.sum(stats.routed > 0) / num_tokens

    if router_cls.fills_capacity:
      expert_usage = jnp.float32(1.0)  # experts always fill their buffers
    elif router_cls.dropless:
      busiest = jnp.maximum(jnp.max(stats.tokens_per_expert), 1).astype(jnp.float32)
      expert_usage = num_dispatched / (cfg.num_experts * busiest)
    else:
      expert_usage = num_dispatched / (cfg.num_experts * layout.expert_capacity * layout.num_groups)
    load = stats.tokens_per_expert.astype(jnp.float32)
    choices = num_tokens * router_cls.experts_per_token(cfg, train=train)
    metrics = {
      "auxiliary_loss": route.auxiliary_loss,
      "router_z_loss": route.router_z_loss,
      "fraction_tokens_left_behind": fraction_left_behind,
      "expert_usage": expert_usage,
      "router_confidence": stats.combine_total / num_dispatched,
      "tokens_per_expert": stats.tokens_per_expert,
      "load_imbalance": jnp.max(load) / jnp.maximum(jnp.mean(load), 1e-9),
      "fraction_choices_dropped": jnp.maximum(1.0 - num_dispatched / choices, 0.0),
    }
    if stats.capped is not None:
      metrics["fraction_choices_capped"] = stats.capped
    for name, value in metrics.items():
      self.sow("intermediates", name, jnp.asarray(value))
    # [batch, length, experts], in the input's layout (padding added for grouping removed).
    logits = router_logits.reshape(layout.padded_batch, layout.padded_length, cfg.num_experts)
    self.sow("intermediates", "router_logits", logits[:batch, :length])

  def _sow_bias_metrics(self, router) -> None:
    """min, max and mean |.| of the choice bias (auxiliary-loss-free balancing), if any."""
    bias = router.variables.get("params", {}).get(routing.CHOICE_BIAS)
    if bias is None:
      return
    bias = jnp.asarray(nn.unbox(bias), jnp.float32)
    self.sow("intermediates", "choice_bias_min", jnp.min(bias))
    self.sow("intermediates", "choice_bias_max", jnp.max(bias))
    self.sow("intermediates", "choice_bias_abs_mean", jnp.mean(jnp.abs(bias)))


@flax.struct.dataclass
class RouteStats:
  """What the metrics need from a dispatch.

  Attributes:
    routed: <int>[groups, tokens], how many experts took each token.
    tokens_per_expert: <int32>[experts], tokens each expert took.
    combine_total: sum of the combine weights of the kept choices.
    capped: the share of the routed choices that expert-parallel dropless dispatch capped
      (`_dropless_ep`), or None where nothing is capped.
  """

  routed: Array
  tokens_per_expert: Array
  combine_total: Array
  capped: Array | None = None


def _bincount(expert_index: Array, num_experts: int) -> Array:
  """<int32>[experts]: how often each expert occurs in `expert_index` (negatives: never)."""
  index = jnp.where(expert_index >= 0, expert_index, num_experts).reshape(-1)
  return jnp.bincount(index, length=num_experts + 1)[:num_experts].astype(jnp.int32)
