"""MoeLayer forward + backward against a dense MLP and flaxformer's MoeLayer, over expert counts.

Per batch, a dense `MlpBlock` of the same d_ff and, for each expert count E, switchjax's
MoeLayer in each VARIANT (Switch's top-1 router through the three dispatches of
`model.moe.dispatch`, the scatter router and the dropless router, all sharing their parameters)
and flaxformer's MoeLayer (masked routing, its one-device groups) when its source is found: all
compiled first, then timed interleaved, so the ratios between dispatches, to the dense MLP and
between expert counts of one batch are measured side by side.
"""

import dataclasses
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp

from benchmarks.flaxformer import flaxformer_layer, load_flaxformer
from benchmarks.timing import memory, mib, milliseconds, time_interleaved
from switchjax.config import MoeConfig
from switchjax.layers import MlpBlock
from switchjax.moe import MoeLayer, group_layout
from switchjax.pod import format_table

# (batch, length, d_model, d_ff, train capacity factor) and the sweep: per batch (None: the
# shape's), (experts, with flaxformer) timed together. Default MoeConfig otherwise (groups of
# <= 8192 tokens following the devices: one group here; top-1).
SHAPE = (8, 512, 768, 3072, 1.25)
SWEEP = {None: [(8, True), (32, True), (128, True)], 32: [(8, False), (128, False)]}
SHAPE_QUICK = (2, 64, 32, 128, 1.25)
SWEEP_QUICK = {None: [(4, True), (8, True)]}
# name -> (moe.router_type, moe.dispatch): the top-1 router through each dispatch, then the
# scatter router (buffers combined by scatter) and the dropless router (sorted, no capacity).
VARIANTS = {
  "einsum": ("tokens_choose_masked", "einsum"),
  "buffers": ("tokens_choose_masked", "buffers"),
  "sorted": ("tokens_choose_masked", "sorted"),
  "scatter": ("tokens_choose_scatter", "buffers"),
  "dropless": ("tokens_choose_dropless", "auto"),
}


def compile_fwd_bwd(layer, x, params=None, **apply_kwargs):
  """(blocking call, compiled program) of d/d(params, x) sum(layer(x)^2)."""
  if params is None:
    kwargs = {k: v for k, v in apply_kwargs.items() if k != "rngs"}
    params = nn.unbox(jax.jit(lambda key: layer.init(key, x, **kwargs))(jax.random.key(0)))
    params = params["params"]

  def loss(params, x):
    return jnp.sum(layer.apply({"params": params}, x, **apply_kwargs) ** 2)

  fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(params, x).compile()
  return (lambda: jax.block_until_ready(fn(params, x))), fn


def _compile_experts(x, experts: int, shape, flaxformer, fns: dict, compiled: dict) -> dict:
  """Compiles the VARIANTS (and flaxformer's layer, when given) at E = `experts` into
  fns/compiled under (experts, name); returns the row that describes their routing groups."""
  batch_size, length, d_model = x.shape
  _, _, _, d_ff, cf = shape
  config = MoeConfig(num_experts=experts, train_capacity_factor=cf)
  layers = {
    name: MoeLayer(dataclasses.replace(config, router_type=r, dispatch=d), d_ff=d_ff)
    for name, (r, d) in VARIANTS.items()
  }
  params = nn.unbox(jax.jit(layers["einsum"].init)(jax.random.key(0), x))["params"]
  for name, layer in layers.items():  # the variants share the parameters
    fns[(experts, name)], compiled[(experts, name)] = compile_fwd_bwd(
      layer, x, params=params, enable_dropout=True
    )
  if flaxformer:
    layer = flaxformer_layer(flaxformer, config, d_ff)
    fns[(experts, "flaxformer")], compiled[(experts, "flaxformer")] = compile_fwd_bwd(
      layer, x, enable_dropout=True, rngs={"dropout": jax.random.key(0)}
    )
  layout = group_layout(batch_size, length, config, train=True)
  return {
    "experts": experts,
    "batch": batch_size,
    "length": length,
    "tokens": batch_size * length,
    "d_model": d_model,
    "d_ff": d_ff,
    "capacity_factor": cf,
    "num_groups": layout.num_groups,
    "tokens_per_group": layout.tokens_per_group,
    "capacity": layout.expert_capacity,
  }


def bench_moe(*, quick: bool, reps: int, warmup: int, flaxformer_refs: pathlib.Path) -> list:
  """One row per (batch, E): each variant's median time, raw times and compiled memory, and
  the ratios of `moe_ratios`; prints the table."""
  flaxformer, where = load_flaxformer(flaxformer_refs)
  shape = SHAPE_QUICK if quick else SHAPE
  batch, length, d_model, d_ff, _ = shape
  out = []
  for batch_size, sweep in (SWEEP_QUICK if quick else SWEEP).items():
    batch_size = batch_size or batch
    x = jax.random.normal(jax.random.key(1), (batch_size, length, d_model), jnp.float32)
    print(f"MoE layer: compiling batch {batch_size}, E in {[e for e, _ in sweep]}", flush=True)
    fns, compiled = {}, {}
    fns["dense"], compiled["dense"] = compile_fwd_bwd(MlpBlock(d_ff), x, enable_dropout=True)
    rows = [
      _compile_experts(x, e, shape, flaxformer if ff else None, fns, compiled) for e, ff in sweep
    ]
    row_reps = reps if batch_size == batch else max(1, reps // 2)
    timed = time_interleaved(fns, row_reps, warmup)
    for row in rows:
      row["reps"] = row_reps
      for key, (median, times) in timed.items():
        if key == "dense" or key[0] == row["experts"]:
          name = key if key == "dense" else key[1]
          row[name] = {"ms": median * 1e3, "times_s": times, "memory_bytes": memory(compiled[key])}
    out.extend(moe_ratios(rows))
  print_moe(out, shape[2:], where if flaxformer else "skipped, " + where)
  return out


def moe_ratios(rows: list) -> list:
  """Adds each row's ratios: each variant to the dense MLP and to the first expert count of the
  same batch, the other dispatches' time and memory to the one-hot einsums', and to flaxformer."""
  first = rows[0]
  for r in rows:
    dense, einsum = r["dense"]["ms"], r["einsum"]
    for name in VARIANTS:
      r[f"{name}_over_dense"] = r[name]["ms"] / dense
      r[f"{name}_over_E{first['experts']}"] = r[name]["ms"] / first[name]["ms"]
    for name in ("buffers", "sorted", "scatter"):
      r[f"{name}_over_einsum_time"] = r[name]["ms"] / einsum["ms"]
      if einsum["memory_bytes"] and r[name]["memory_bytes"]:
        total = r[name]["memory_bytes"]["total"] / einsum["memory_bytes"]["total"]
        r[f"{name}_over_einsum_total_memory"] = total
    if "flaxformer" in r:
      r["flaxformer_over_dense"] = r["flaxformer"]["ms"] / dense
      for name in ("einsum", "buffers", "sorted", "dropless"):
        r[f"{name}_over_flaxformer"] = r[name]["ms"] / r["flaxformer"]["ms"]
  return rows


HEADERS = [
  "E",
  "batch",
  "groups",
  "capacity",
  "dense ms",
  "einsum ms (x dense)",
  "buffers ms",
  "sorted ms",
  "scatter ms",
  "dropless ms",
  "flaxformer ms",
  "einsum/flaxformer",
  "einsum per token",
  "einsum temp MiB",
  "buffers temp MiB",
  "sorted temp MiB",
]


def _cell(r: dict, name: str) -> str:
  """'ms (x dense)' of one variant, or '-' where it was not run."""
  if name not in r:
    return "-"
  return f"{milliseconds(r[name]['ms'])} ({r[name]['ms'] / r['dense']['ms']:.2f}x)"


def print_moe(out: list, shape, flaxformer: str) -> None:
  """The section's table: one line per (E, batch)."""
  d_model, d_ff, cf = shape
  rows = []
  for r in out:
    first_e = next(f["experts"] for f in out if f["batch"] == r["batch"])
    rows.append(
      [
        r["experts"],
        f"{r['batch']}x{r['length']}",
        f"{r['num_groups']}x{r['tokens_per_group']}",
        r["capacity"],
        milliseconds(r["dense"]["ms"]),
        *(_cell(r, name) for name in (*VARIANTS, "flaxformer")),
        f"{r['einsum_over_flaxformer']:.2f}" if "einsum_over_flaxformer" in r else "-",
        f"{r[f'einsum_over_E{first_e}']:.2f} (E={first_e})",
        *(mib(r[name]["memory_bytes"], "temp") for name in ("einsum", "buffers", "sorted")),
      ]
    )
  print(
    f"\n## MoE layer forward + backward vs a dense MLP: d_model {d_model}, d_ff {d_ff}, "
    f"capacity factor {cf}, float32, 1 device\n"
  )
  print(format_table(HEADERS, rows))
  print(
    "(einsum, buffers, sorted: Switch's top-1 router with that moe.dispatch; scatter: "
    "tokens_choose_scatter; dropless: tokens_choose_dropless; dense = "
    f"MlpBlock(d_ff); flaxformer: {flaxformer}; einsum per token: the time relative to the "
    "first expert count of the same batch (timed interleaved with it); the larger batch, "
    "without flaxformer (which pads E=128 16x), shows the cost per token when more tokens "
    "share the experts' weights, with half the repetitions)"
  )
