"""Routing analysis: what the routers of a Switch model do on a batch, as NumPy statistics.

One eval-mode forward pass (`model.apply(..., mutable=["intermediates"])`) gives, per sparse
layer, the metrics the MoE layer sows (see `switchjax.moe`) and its router logits. From them:

  forward(model, params, batch)             outputs and the sown metrics of every sparse layer
  routing_report(model, params, batch)      {layer path: LayerRouting}: load, drops,
                                            confidence, entropy, losses, top-1 expert per token
  expert_token_affinity(report, tokens, tokenizer, layer)
                                            the token pieces each expert receives most
  routing_purity(report, tokens, layer)     how much the token id alone decides the expert
  capacity_sweep(model, params, batch, factors)
                                            drops and expert usage as the eval capacity varies
  replace_moe(model, **changes)             the model with other routing settings (k, router,
                                            capacity) for the same parameters
  format_report, format_affinity, format_sweep    text tables
  plot_expert_load, plot_router_confidence, plot_capacity_sweep    matplotlib figures
  token_cross_entropy(logits, batch)        compares routing variants by their loss

Counting conventions (the MoE layer's own):
- `tokens_per_expert`, `fraction_dropped`, `expert_usage` and `router_confidence` come from the
  layer and count every routed position, padding included (unless `moe.ignore_padding_tokens`):
  that is what occupies expert capacity.
- `top1_expert`, `top1_prob`, `entropy` and `top1_load` are computed here from the router
  logits over real tokens only (encoder: token != 0; decoder: the model's logit mask). The top-1
  expert is the router's first preference, before capacity: it may have been dropped (and
  experts-choose routers do not route by it at all).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from switchjax import losses
from switchjax.model import SwitchEncoder, decoder_logit_mask
from switchjax.moe import group_layout

# --------------------------------------------------------------------------------------------
# The forward pass.


@functools.partial(jax.jit, static_argnums=0)
def _apply(model, params, encoder_tokens, decoder_inputs, decoder_targets):
  """Eval-mode logits and the 'intermediates' collection (compiled once per model config)."""
  if isinstance(model, SwitchEncoder):
    return model.apply(
      {"params": params}, encoder_tokens, enable_dropout=False, mutable=["intermediates"]
    )
  return model.apply(
    {"params": params},
    encoder_tokens,
    decoder_inputs,
    decoder_targets,
    enable_dropout=False,
    mutable=["intermediates"],
  )


def forward(model, params, batch: dict) -> tuple[np.ndarray, dict[str, dict[str, np.ndarray]]]:
  """Runs the model once in eval mode (eval capacity factor, no jitter, no dropout).

  Args:
    model: a SwitchTransformer or SwitchEncoder.
    params: its parameters.
    batch: encoder_input_tokens [batch, input_length] and, for the encoder-decoder,
      decoder_input_tokens and decoder_target_tokens [batch, target_length].

  Returns:
    (outputs as NumPy: logits [batch, target_length, vocab] or encodings, {layer path like
    'encoder/layers_1/mlp': {metric name: NumPy value}}).
  """
  encoder = np.asarray(batch["encoder_input_tokens"], np.int32)
  decoder_inputs = decoder_targets = None
  if not isinstance(model, SwitchEncoder):
    decoder_inputs = np.asarray(batch["decoder_input_tokens"], np.int32)
    decoder_targets = np.asarray(batch["decoder_target_tokens"], np.int32)
  outputs, state = _apply(model, params, encoder, decoder_inputs, decoder_targets)
  layers = losses.moe_layer_metrics(state["intermediates"])
  return np.asarray(outputs), jax.tree.map(np.asarray, jax.device_get(layers))


def real_token_mask(batch: dict, layer: str) -> np.ndarray:
  """<bool>[batch, length]: the real (non-padding) tokens the sparse layer `layer` sees.

  Encoder layers see encoder_input_tokens (padding is id 0); decoder layers see
  decoder_input_tokens, whose leading 0 is the start token, not padding (the model's mask).
  """
  if layer.startswith("decoder"):
    return np.asarray(decoder_logit_mask(np.asarray(batch["decoder_input_tokens"])))[..., 0]
  return np.asarray(batch["encoder_input_tokens"]) > 0


def layer_tokens(batch: dict, layer: str) -> np.ndarray:
  """<int>[batch, length]: the token ids at the positions the sparse layer `layer` routes."""
  key = "decoder_input_tokens" if layer.startswith("decoder") else "encoder_input_tokens"
  return np.asarray(batch[key])


# --------------------------------------------------------------------------------------------
# Per-layer statistics.


@dataclasses.dataclass
class LayerRouting:
  """The routing of one sparse layer on one batch.

  Attributes:
    path: the layer, e.g. 'encoder/layers_1/mlp'.
    tokens_per_expert: <int>[experts] token choices each expert processed (after capacity).
    expert_usage: filled share of all expert slots.
    fraction_dropped: share of routed positions that no expert took (the layer passes them
      through the residual unchanged).
    router_confidence: mean router probability of the dispatched choices.
    auxiliary_loss, router_z_loss: the layer's load-balancing and z losses.
    expert_capacity: slots per expert per routing group; num_groups: routing groups.
    mask: <bool>[batch, length] real tokens.
    top1_expert: <int>[batch, length] argmax of the router logits; -1 at padding.
    top1_prob: <float>[batch, length] its router probability; 0 at padding.
    entropy: mean entropy (nats) of the router distribution over real tokens; log(E) is
      uniform, 0 is a one-hot router.
    load_cv: coefficient of variation (std / mean) of tokens_per_expert; 0 is perfect balance.
    max_mean_load: max / mean of tokens_per_expert: how much the busiest expert exceeds the
      average. Of the demand (`load_balance(top1_load)`), it is the capacity factor below
      which the busiest expert must drop tokens (at least; capacity is per group).
  """

  path: str
  tokens_per_expert: np.ndarray
  expert_usage: float
  fraction_dropped: float
  router_confidence: float
  auxiliary_loss: float
  router_z_loss: float
  expert_capacity: int
  num_groups: int
  mask: np.ndarray
  top1_expert: np.ndarray
  top1_prob: np.ndarray
  entropy: float
  load_cv: float
  max_mean_load: float

  @property
  def num_experts(self) -> int:
    return len(self.tokens_per_expert)

  @property
  def top1_load(self) -> np.ndarray:
    """<int>[experts]: real tokens whose first preference is each expert (before capacity)."""
    return np.bincount(self.top1_expert[self.mask], minlength=self.num_experts)


def load_balance(counts: np.ndarray) -> tuple[float, float]:
  """(coefficient of variation, max / mean) of per-expert token counts [experts].

  Both are 0 and 1 for a perfectly balanced layer; a layer that sends everything to one of E
  experts has sqrt(E - 1) and E.
  """
  counts = np.asarray(counts, np.float64)
  mean = counts.mean()
  if mean == 0:
    return 0.0, 0.0
  return float(counts.std() / mean), float(counts.max() / mean)


def _softmax(logits: np.ndarray) -> np.ndarray:
  """Router probabilities in float64 [..., experts]."""
  z = logits.astype(np.float64)
  z = np.exp(z - z.max(axis=-1, keepdims=True))
  return z / z.sum(axis=-1, keepdims=True)


def _layer_routing(
  path: str, metrics: dict[str, np.ndarray], mask: np.ndarray, layout
) -> LayerRouting:
  """A LayerRouting from one layer's sown metrics and its real-token mask [batch, length]."""
  probs = _softmax(metrics["router_logits"])  # [batch, length, experts]
  top1 = np.argmax(probs, axis=-1)  # [batch, length]
  top1_prob = np.take_along_axis(probs, top1[..., None], axis=-1)[..., 0]
  entropy = -np.sum(probs * np.log(np.maximum(probs, 1e-30)), axis=-1)  # [batch, length]
  tokens_per_expert = metrics["tokens_per_expert"].astype(np.int64)
  cv, max_mean = load_balance(tokens_per_expert)
  return LayerRouting(
    path=path,
    tokens_per_expert=tokens_per_expert,
    expert_usage=float(metrics["expert_usage"]),
    fraction_dropped=float(metrics["fraction_tokens_left_behind"]),
    router_confidence=float(metrics["router_confidence"]),
    auxiliary_loss=float(metrics["auxiliary_loss"]),
    router_z_loss=float(metrics["router_z_loss"]),
    expert_capacity=layout.expert_capacity,
    num_groups=layout.num_groups,
    mask=mask,
    top1_expert=np.where(mask, top1, -1),
    top1_prob=np.where(mask, top1_prob, 0.0),
    entropy=float(entropy[mask].mean()) if mask.any() else float("nan"),
    load_cv=cv,
    max_mean_load=max_mean,
  )


def routing_report(model, params, batch: dict) -> dict[str, LayerRouting]:
  """{layer path: LayerRouting} for every sparse layer, from one eval-mode forward pass.

  Layers are ordered encoder first, then by depth.
  """
  _, layers = forward(model, params, batch)
  report = {}
  for path in sorted(layers, key=_layer_order):
    mask = real_token_mask(batch, path)
    moe_cfg = model.config.moe_for(path.split("/")[0])
    layout = group_layout(*mask.shape, moe_cfg, train=False)
    report[path] = _layer_routing(path, layers[path], mask, layout)
  return report


def _layer_order(path: str) -> tuple[int, int]:
  """Sort key: encoder before decoder, then layer index."""
  stack = 0 if path.startswith("encoder") else 1
  index = next((int(p.split("_")[1]) for p in path.split("/") if p.startswith("layers_")), 0)
  return stack, index


# --------------------------------------------------------------------------------------------
# Which tokens go where.


def _real_ids_and_experts(
  report: dict[str, LayerRouting], tokens, layer: str
) -> tuple[np.ndarray, np.ndarray]:
  """(token ids, top-1 experts), both <int>[real tokens], of one layer of a report."""
  routing = report[layer]
  ids = layer_tokens(tokens, layer) if isinstance(tokens, dict) else np.asarray(tokens)
  if ids.shape != routing.mask.shape:
    raise ValueError(
      f"tokens have shape {ids.shape} but {layer} routed a batch of shape "
      f"{routing.mask.shape}; pass the batch the report was made from."
    )
  return ids[routing.mask], routing.top1_expert[routing.mask]


def expert_token_affinity(
  report: dict[str, LayerRouting], tokens, tokenizer, layer: str, top: int = 10
) -> dict[int, list[tuple[str, int, float]]]:
  """The token pieces each expert of `layer` is the first choice of, most frequent first.

  Args:
    report: from `routing_report` on the same batch.
    tokens: the batch dict (the layer's stack's tokens are used) or <int>[batch, length] ids.
    tokenizer: anything with `id_to_piece(id) -> str` (switchjax.data.Tokenizer).
    layer: a path of the report, e.g. 'encoder/layers_1/mlp'.
    top: pieces kept per expert.

  Returns:
    {expert: [(piece, count, share), ...]} where count is how many real tokens with that id
    chose the expert and share = count / occurrences of the id in the batch: a share near 1
    for a frequent piece is specialisation, not just frequency.
  """
  ids, experts = _real_ids_and_experts(report, tokens, layer)  # [real tokens] each
  occurrences = collections.Counter(ids.tolist())
  affinity = {}
  for e in range(report[layer].num_experts):
    counts = collections.Counter(ids[experts == e].tolist())
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
    affinity[e] = [(tokenizer.id_to_piece(i), c, c / occurrences[i]) for i, c in ranked]
  return affinity


def routing_purity(
  report: dict[str, LayerRouting], tokens, layer: str, min_count: int = 2
) -> float:
  """How much the token id alone decides the top-1 expert of `layer`.

  The share of real tokens that go to the most common expert of their id, over the ids seen at
  least `min_count` times: 1.0 means routing is a lookup table of token ids (typical of the
  first sparse layer, whose input is mostly the embedding); about 1/E means it ignores them.
  """
  ids, experts = _real_ids_and_experts(report, tokens, layer)
  pairs = collections.Counter(zip(ids.tolist(), experts.tolist()))  # (id, expert) -> count
  majority, total = collections.Counter(), collections.Counter(ids.tolist())
  for (i, _), c in pairs.items():
    majority[i] = max(majority[i], c)
  kept = [i for i, n in total.items() if n >= min_count]
  if not kept:
    return float("nan")
  return sum(majority[i] for i in kept) / sum(total[i] for i in kept)


def format_affinity(affinity: dict[int, list[tuple[str, int, float]]]) -> str:
  """One line per expert: piece xcount (share of the piece's occurrences)."""
  lines = []
  for e, pieces in affinity.items():
    items = "  ".join(f"{piece!r} x{count} ({share:.0%})" for piece, count, share in pieces)
    lines.append(f"expert {e}: {items or '-'}")
  return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Capacity.


def replace_moe(model, **changes):
  """The same model class with the MoE fields of both stacks replaced (routing, capacity,
  k, ...); the parameters stay valid as long as the number of experts and router bias do not
  change."""
  cfg = model.config
  moe = dataclasses.replace(cfg.moe, **changes)
  decoder = None if cfg.decoder_moe is None else dataclasses.replace(cfg.decoder_moe, **changes)
  return type(model)(dataclasses.replace(cfg, moe=moe, decoder_moe=decoder))


@dataclasses.dataclass
class CapacitySweep:
  """Routing as the eval capacity factor varies (same parameters and batch).

  Attributes:
    factors: <float>[F] eval capacity factors.
    fraction_dropped, expert_usage: {layer path: <float>[F]}.
    capacity: {layer path: <int>[F]} slots per expert per group at each factor.
  """

  factors: np.ndarray
  fraction_dropped: dict[str, np.ndarray]
  expert_usage: dict[str, np.ndarray]
  capacity: dict[str, np.ndarray]


def capacity_sweep(model, params, batch: dict, factors: Sequence[float]) -> CapacitySweep:
  """Drops and expert usage per layer at each eval capacity factor.

  The capacity is max(round(cf * tokens_per_group / E), moe.min_expert_capacity), so at small
  factors the floor, not the factor, sets it (see `CapacitySweep.capacity`).
  """
  if any(model.config.moe_for(s).expert_capacity is not None for s in ("encoder", "decoder")):
    raise ValueError(
      "moe.expert_capacity is set (Hugging Face mode): capacity factors are "
      "unused; sweep moe.expert_capacity with replace_moe instead."
    )
  reports = [
    routing_report(replace_moe(model, eval_capacity_factor=float(f)), params, batch)
    for f in factors
  ]
  paths = list(reports[0])

  def collect(field):
    return {p: np.array([getattr(r[p], field) for r in reports]) for p in paths}

  return CapacitySweep(
    np.asarray(factors, np.float64),
    collect("fraction_dropped"),
    collect("expert_usage"),
    collect("expert_capacity"),
  )


# --------------------------------------------------------------------------------------------
# Text.


def format_report(report: dict[str, LayerRouting]) -> str:
  """A text table: one row per sparse layer."""
  loads = {p: " ".join(str(int(n)) for n in r.tokens_per_expert) for p, r in report.items()}
  w_path = max([len("layer"), *map(len, report)])
  w_load = max([len("tokens per expert"), *map(len, loads.values())])
  header = (
    f"{'layer':<{w_path}}  {'tokens per expert':<{w_load}} {'cap':>4} {'usage':>6} "
    f"{'dropped':>8} {'conf':>6} {'top1 p':>7} {'entropy':>8} {'cv':>6} "
    f"{'max/mean':>8} {'aux':>6} {'z':>7}"
  )
  rows = [header, "-" * len(header)]
  for path, r in report.items():
    top1_p = float(r.top1_prob[r.mask].mean()) if r.mask.any() else float("nan")
    rows.append(
      f"{path:<{w_path}}  {loads[path]:<{w_load}} {r.expert_capacity:>4} "
      f"{r.expert_usage:>6.3f} {r.fraction_dropped:>8.3f} {r.router_confidence:>6.3f} "
      f"{top1_p:>7.3f} {r.entropy:>8.3f} {r.load_cv:>6.3f} {r.max_mean_load:>8.2f} "
      f"{r.auxiliary_loss:>6.3f} {r.router_z_loss:>7.3f}"
    )
  return "\n".join(rows)


def format_sweep(sweep: CapacitySweep) -> str:
  """A text table: fraction dropped (and capacity C) per layer and factor."""
  cells = {
    p: [f"{d:.3f} (C={c})" for d, c in zip(dropped, sweep.capacity[p])]
    for p, dropped in sweep.fraction_dropped.items()
  }
  names = [f"cf {f:g}" for f in sweep.factors]
  w_path = max([len("layer"), *map(len, cells)])
  w = max(map(len, names + [c for row in cells.values() for c in row]))
  header = f"{'layer':<{w_path}}  " + " ".join(f"{n:>{w}}" for n in names)
  rows = [header, "-" * len(header)]
  for path, row in cells.items():
    rows.append(f"{path:<{w_path}}  " + " ".join(f"{c:>{w}}" for c in row))
  return "\n".join(rows)


# --------------------------------------------------------------------------------------------
# Plots (matplotlib is imported only when plotting).


def plot_expert_load(report: dict[str, LayerRouting]):
  """Bars of tokens per expert for each layer, with the mean load and the most an expert can
  take over the whole batch (capacity x groups; drops happen per group, so a layer can drop
  tokens with every bar below it). Returns the matplotlib Figure."""
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, len(report), figsize=(3.2 * len(report), 2.8), squeeze=False)
  for ax, r in zip(axes[0], report.values()):
    ax.bar(np.arange(r.num_experts), r.tokens_per_expert, color="tab:blue")
    ax.axhline(r.tokens_per_expert.mean(), color="k", linestyle=":", label="mean")
    ax.axhline(r.expert_capacity * r.num_groups, color="tab:red", linestyle="--", label="capacity")
    ax.set_title(f"{r.path}\ndropped {r.fraction_dropped:.1%}", fontsize=9)
    ax.set_xlabel("expert")
    ax.set_xticks(np.arange(r.num_experts))
  axes[0, 0].set_ylabel("tokens processed")
  axes[0, 0].legend(fontsize=8)
  fig.tight_layout()
  return fig


def plot_router_confidence(report: dict[str, LayerRouting], bins: int = 30):
  """Histograms of the top-1 router probability of real tokens, one per layer, with the
  uniform router's 1/E marked. Returns the matplotlib Figure."""
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, len(report), figsize=(3.2 * len(report), 2.6), squeeze=False)
  for ax, r in zip(axes[0], report.values()):
    ax.hist(r.top1_prob[r.mask], bins=bins, range=(0, 1), color="tab:green")
    ax.axvline(1 / r.num_experts, color="k", linestyle=":", label="1/E")
    ax.set_title(r.path, fontsize=9)
    ax.set_xlabel("top-1 probability")
  axes[0, 0].set_ylabel("real tokens")
  axes[0, 0].legend(fontsize=8)
  fig.tight_layout()
  return fig


def plot_capacity_sweep(sweep: CapacitySweep):
  """Fraction dropped and expert usage against the eval capacity factor, a line per layer.
  Returns the matplotlib Figure."""
  import matplotlib.pyplot as plt

  fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
  for path in sweep.fraction_dropped:
    left.plot(sweep.factors, sweep.fraction_dropped[path], marker="o", label=path)
    right.plot(sweep.factors, sweep.expert_usage[path], marker="o", label=path)
  for ax, name in ((left, "fraction of tokens dropped"), (right, "expert usage")):
    ax.set_xscale("log", base=2)
    ax.set_xlabel("eval capacity factor")
    ax.set_ylabel(name)
    ax.grid(alpha=0.3)
  left.legend(fontsize=8)
  fig.tight_layout()
  return fig


# --------------------------------------------------------------------------------------------
# Quality of a forward pass.


def token_cross_entropy(logits: np.ndarray, batch: dict) -> float:
  """Mean cross-entropy (nats) over real target tokens (decoder_target_tokens != 0): compares
  routing variants on the same parameters (the training loss's cross-entropy, without z-loss)."""
  targets = jnp.asarray(batch["decoder_target_tokens"])  # [batch, length]
  total, _, count = losses.cross_entropy_with_z_loss(
    jnp.asarray(logits, jnp.float32), targets, (targets > 0).astype(jnp.float32)
  )
  return float(total / jnp.maximum(count, 1.0))
