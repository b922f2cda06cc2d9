"""The Switch paper's central result, small: more experts at the same FLOPs per token.

A sweep trains a dense T5 and Switch models with E experts (top-1, experts as wide as the dense
MLP, so every model does the same work per token and only the parameters grow with E) for the
same number of steps on the same data, then Switch models of one E with capacity factors
1.0 / 1.25 / 2.0 and top-1 vs top-2 routing (the paper's Figure 1 and Table 1, in spirit).
Every point is run for several seeds (`train.seed`: initialisation, dropout and jitter; the data
order is the same for all). Each run is `switchjax.training.train` in a workdir of its own, so
a sweep resumes where it stopped; its eval losses, step times and routing metrics are read back
from the run's `metrics.jsonl`.

Wall-clock time counts training steps only (the loop's stopwatch leaves evaluation and
checkpoints out); the first logging interval also holds the compilation of the step, so it is
counted at the run's median step time instead.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from collections.abc import Callable, Sequence

import numpy as np

from switchjax import routing_history
from switchjax.config import Config, apply_overrides, estimate_parameters, load_config
from switchjax.training import train, train_flops_per_example

# The sweep's model: the small preset (its corpus, optimizer and schedule: Adafactor at the rsqrt
# schedule's 0.01 for the first 10,000 steps, aux loss 0.01, capacity factors 1.25 / 2.0) made
# small enough for 20 runs of 800 steps on two CPU cores: 2 + 2 layers of width 64 whose layer
# 1 MLP is sparse in each stack (every other layer, as Switch), a 500-piece tokenizer (640
# embedding rows with the sentinels), 16 sequences of 64 + 14 tokens per step.
BASE_PRESET = "small"
BASE_OVERRIDES = (
  "model.d_model=64",
  "model.d_ff=256",
  "model.num_heads=4",
  "model.d_kv=16",
  "model.num_layers=2",
  "model.num_decoder_layers=2",
  "model.num_sparse_encoder_layers=1",
  "model.num_sparse_decoder_layers=1",
  "model.vocab_size=640",
  "data.spm_vocab_size=500",
  "data.inputs_length=64",
  "data.targets_length=14",
  "train.batch_size=16",
)


def base_config(overrides: Sequence[str] = ()) -> Config:
  """The sweep's base config (BASE_PRESET with BASE_OVERRIDES, then `overrides`)."""
  return load_config(BASE_PRESET, [*BASE_OVERRIDES, *overrides])


@dataclasses.dataclass(frozen=True)
class Variant:
  """One point of the sweep.

  Attributes:
    num_experts: E; 0 is the dense model (the sparse MLPs stay dense, as wide as an expert).
    top_k: experts per token.
    capacity_factor: the training capacity factor (evaluation uses the config's, 2.0).
    label: the run's name (default: from E, k and the capacity factor).
    extra: further overrides (routers, shared or narrower experts, balancing).
  """

  num_experts: int
  top_k: int = 1
  capacity_factor: float = 1.25
  label: str = ""
  extra: tuple[str, ...] = ()

  @property
  def name(self) -> str:
    if self.label:
      return self.label
    if not self.num_experts:
      return "dense"
    return f"switch-e{self.num_experts}-top{self.top_k}-cf{self.capacity_factor:g}"

  def overrides(self) -> list[str]:
    if not self.num_experts:
      return ["model.num_sparse_encoder_layers=0", "model.num_sparse_decoder_layers=0"]
    return [
      f"model.moe.num_experts={self.num_experts}",
      f"model.moe.num_selected_experts={self.top_k}",
      f"model.moe.train_capacity_factor={self.capacity_factor}",
      *self.extra,
    ]


def sweep_variants(
  experts: Sequence[int] = (2, 4, 8, 16),
  table_experts: int = 8,
  capacity_factors: Sequence[float] = (1.0, 1.25, 2.0),
  top_ks: Sequence[int] = (1, 2),
  capacity_factor: float = 1.25,
) -> list[Variant]:
  """The dense model, Switch top-1 at `capacity_factor` for each E, then E = table_experts at
  every capacity factor and k (each variant once)."""
  out = [Variant(0)] + [Variant(e, 1, capacity_factor) for e in experts]
  out += [Variant(table_experts, k, cf) for k in top_ks for cf in capacity_factors]
  return list(dict.fromkeys(out))


# Beyond Switch (issue 31): the routing of DeepSeekMoE / DeepSeek-V3 next to Switch's, at the
# FLOPs per token and the parameters of Switch with 8 experts as wide as the dense MLP (d_ff):
# top-2 over 16 experts of d_ff / 2, and DeepSeekMoE's fine-grained split (32 experts of
# d_ff / 4, top-3) with one shared expert of d_ff / 4, so every token passes through d_ff
# hidden units (the shared expert adds d_ff / 4 x 2 x d_model parameters per layer).
def study_variants(d_ff: int = 256, rate: float = 1e-3, ablations: bool = False) -> list[Variant]:
  """The study's variants: dense; Switch top-1 at cf 1.25 with the auxiliary loss, without it
  but balanced by a choice bias updated at `rate` (DeepSeek-V3), and dropless; top-2 over
  narrower experts; shared + fine-grained experts with the auxiliary loss, and the same with
  DeepSeek-V3's sigmoid scores, top-k normalisation and bias instead. `ablations` adds the two
  halves of that combination: the bias alone (softmax scores) and the sigmoid gating alone
  (with the auxiliary loss)."""
  fine, half = d_ff // 4, d_ff // 2
  aux_free = ("train.aux_loss_factor=0.0", f"model.moe.router_bias_update_rate={rate:g}")
  shared_fine = (
    f"model.expert_d_ff={fine}",
    "model.moe.num_shared_experts=1",
    f"model.moe.shared_expert_d_ff={fine}",
    "model.moe.capacity_per_choice=true",
  )
  sigmoid = ("model.moe.router_score=sigmoid", "model.moe.normalize_top_k=true")
  halves = [
    Variant(32, 3, 1.25, "shared-fine-e32-top3-auxfree", shared_fine + aux_free),
    Variant(32, 3, 1.25, "shared-fine-e32-top3-sigmoid", shared_fine + sigmoid),
  ]
  return [
    Variant(0),
    Variant(8, 1, 1.25, "switch-top1"),
    Variant(8, 1, 1.25, "switch-top1-auxfree", aux_free),
    Variant(8, 1, 1.25, "switch-top1-dropless", ("model.moe.router_type=tokens_choose_dropless",)),
    Variant(
      16, 2, 1.25, "top2-e16", (f"model.expert_d_ff={half}", "model.moe.capacity_per_choice=true")
    ),
    Variant(32, 3, 1.25, "shared-fine-e32-top3", shared_fine),
    *(halves if ablations else []),
    Variant(32, 3, 1.25, "shared-fine-e32-top3-auxfree-sigmoid", shared_fine + aux_free + sigmoid),
  ]


def run_config(
  base: Config, variant: Variant, seed: int, steps: int, eval_every: int, eval_steps: int
) -> Config:
  """The config of one run: the base with the variant, the seed and the sweep's schedule
  (training metrics logged every eval_every / 2 steps, one checkpoint at the end)."""
  return apply_overrides(
    base,
    variant.overrides()
    + [
      f"name={variant.name}-seed{seed}",
      f"train.seed={seed}",
      f"train.num_train_steps={steps}",
      f"train.eval_every={eval_every}",
      f"train.eval_steps={eval_steps}",
      f"train.log_every={max(1, eval_every // 2)}",
      f"train.checkpoint_every={steps}",
      "train.keep_checkpoints=1",
    ],
  ).validate()


# --------------------------------------------------------------------------------------------
# Running.


def read_run(workdir) -> dict:
  """What one run logged: eval points [step, loss, cross-entropy, accuracy] and training
  points [step, loss, seconds per step, fraction of tokens dropped, router confidence (the
  mean combine weight of the routed tokens; 0 for a dense model), load imbalance (max / mean
  tokens per expert; 1 for a dense model), fraction of token choices dropped (or capped)],
  and each sparse layer's routing metrics (routing_history.read_history), from metrics.jsonl."""
  lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
  records = [json.loads(line) for line in lines if line.strip()]
  evals = {
    r["step"]: [r["step"], r["eval/loss"], r["eval/cross_entropy"], r["eval/accuracy"]]
    for r in records
    if "eval/loss" in r
  }
  trains = {
    r["step"]: [
      r["step"],
      r["loss"],
      r["seconds_per_step"],
      r.get("fraction_tokens_left_behind", 0.0),
      r.get("router_confidence", 0.0),
      r.get("load_imbalance", 1.0),
      r.get("fraction_choices_dropped", 0.0),
    ]
    for r in records
    if "seconds_per_step" in r
  }
  return {
    "eval": [evals[s] for s in sorted(evals)],
    "train": [trains[s] for s in sorted(trains)],
    "layers": routing_history.read_history(records),
  }


def training_seconds(train_points: list) -> tuple[float, list[tuple[int, float]]]:
  """(median seconds per step, [(step, training seconds up to it)]) of a run's training
  points; the first interval (which holds compilation) is counted at the median step time."""
  steps = [p[0] for p in train_points]
  per_step = [p[2] for p in train_points]
  median = float(np.median(per_step[1:] if len(per_step) > 1 else per_step))
  clock, previous, out = 0.0, 0, []
  for i, (step, seconds) in enumerate(zip(steps, per_step)):
    clock += (step - previous) * (median if i == 0 else seconds)
    previous = step
    out.append((step, clock))
  return median, out


def run_sweep(
  base: Config,
  variants: Sequence[Variant],
  seeds: Sequence[int],
  workdir,
  *,
  steps: int,
  eval_every: int,
  eval_steps: int,
  log: Callable[[str], None] = print,
) -> dict:
  """Trains every variant for every seed (seeds outermost, so that load on a shared machine
  spreads over the variants) in workdir/<variant>/seed<seed> and returns the results: the
  settings, and per run its variant, seed, parameters, FLOPs per step and what it logged.
  Finished runs are read back, not trained again."""
  workdir = pathlib.Path(workdir)
  runs = []
  # Every run's config first: a variant the base cannot take is refused before any trains.
  configs = {
    (seed, variant): run_config(base, variant, seed, steps, eval_every, eval_steps)
    for seed in seeds
    for variant in variants
  }
  for seed in seeds:
    for variant in variants:
      config = configs[seed, variant]
      directory = workdir / variant.name / f"seed{seed}"
      log(f"{variant.name}, seed {seed}: training in {directory}")
      result = train(config, directory, progress=False, log=lambda _: None)
      logged = read_run(directory)
      seconds, clock = training_seconds(logged["train"])
      final = logged["eval"][-1]
      log(
        f"  step {result.step}: eval loss {final[1]:.4f}, {seconds * 1e3:.0f} ms per step, "
        f"{clock[-1][1]:.0f} s of training"
      )
      runs.append(
        {
          **dataclasses.asdict(variant),
          "name": variant.name,
          "seed": seed,
          "parameters": estimate_parameters(config.model),
          "train_flops_per_step": train_flops_per_example(config) * config.train.batch_size,
          "seconds_per_step": seconds,
          "training_seconds": [c for _, c in clock],
          **logged,
        }
      )
  return {
    "base": base.name,
    "base_overrides": list(BASE_OVERRIDES) if base.name == BASE_PRESET else [],
    "steps": steps,
    "eval_every": eval_every,
    "eval_steps": eval_steps,
    "batch_size": base.train.batch_size,
    "tokens_per_step": base.train.batch_size * (base.data.inputs_length + base.data.targets_length),
    "seeds": list(seeds),
    "runs": runs,
  }


# --------------------------------------------------------------------------------------------
# Summaries.


@dataclasses.dataclass(frozen=True)
class Row:
  """One variant over its seeds: mean and sample standard deviation (ddof 1) of the final eval
  loss and the seeds' values, the final eval accuracy, the median step time, the fraction of
  tokens dropped in training (mean over the run), the router confidence at the last logged
  step, the load imbalance (max / mean tokens per expert, mean over the run) and the fraction
  of token choices dropped (mean over the run; runs logged before these were metrics give 1
  and 0), and the steps and seconds of training to first reach the quality threshold (mean
  over seeds; None when a seed never reaches it)."""

  name: str
  num_experts: int
  top_k: int
  capacity_factor: float
  seeds: int
  parameters: int
  gflops_per_step: float
  final_loss: float
  final_loss_std: float
  final_losses: tuple[float, ...]
  final_accuracy: float
  seconds_per_step: float
  dropped: float
  router_confidence: float
  load_imbalance: float
  choices_dropped: float
  steps_to_threshold: float | None
  seconds_to_threshold: float | None


def _crossing(points: list[tuple[float, float]], threshold: float) -> float | None:
  """The first x where the piecewise-linear curve of (x, loss) reaches `threshold`."""
  for (x0, y0), (x1, y1) in zip([(0.0, math.inf)] + points[:-1], points):
    if y1 <= threshold:
      if not math.isfinite(y0) or y0 == y1:
        return x1
      return x0 + (x1 - x0) * (y0 - threshold) / (y0 - y1)
  return None


def _mean_or_none(values) -> float | None:
  return None if any(v is None for v in values) else float(np.mean(values))


def _run_mean(runs: list[dict], index: int, default: float) -> float:
  """The mean over runs of each run's mean of training-point column `index` (`default` for
  points logged before that column existed)."""
  return float(
    np.mean([np.mean([p[index] if len(p) > index else default for p in r["train"]]) for r in runs])
  )


def quality_threshold(results: dict) -> float:
  """The eval loss every run reaches: the worst final eval loss of the sweep (Switch's Table 1
  measures the time to a quality threshold)."""
  return max(run["eval"][-1][1] for run in results["runs"])


def late_losses(results: dict, last: int = 4) -> dict[str, dict[int, float]]:
  """{variant: {seed: mean eval loss of the run's last `last` evaluations}}: the end of a run
  with its step-to-step noise damped, for differences paired by seed."""
  out: dict[str, dict[int, float]] = {}
  for run in results["runs"]:
    out.setdefault(run["name"], {})[run["seed"]] = float(
      np.mean([p[1] for p in run["eval"][-last:]])
    )
  return out


def paired(late: dict[str, dict[int, float]], a: str, b: str) -> str:
  """a - b in `late_losses`, seed by seed, as the study's tables print it: '-0.057 / -0.055'."""
  return " / ".join(f"{late[a][s] - late[b][s]:+.3f}" for s in sorted(late[a]))


def late_slope(results: dict, name: str, steps: int) -> float:
  """How fast `name` still improves at the end: the eval loss's fall per 1,000 steps over the
  last `steps` steps (a least-squares line through those evaluations, mean over seeds)."""
  slopes = []
  for run in (r for r in results["runs"] if r["name"] == name):
    points = [p for p in run["eval"] if p[0] >= run["eval"][-1][0] - steps]
    x, y = np.array([p[0] for p in points]), np.array([p[1] for p in points])
    slopes.append(-np.polyfit(x, y, 1)[0] * 1000)
  return float(np.mean(slopes))


def summarize(results: dict, threshold: float | None = None) -> list[Row]:
  """One Row per variant, in the order the sweep ran them; times to `threshold` (default:
  `quality_threshold`)."""
  by_name: dict[str, list[dict]] = {}
  for run in results["runs"]:
    by_name.setdefault(run["name"], []).append(run)
  threshold = quality_threshold(results) if threshold is None else threshold
  rows = []
  for name, runs in by_name.items():
    finals = tuple(r["eval"][-1][1] for r in runs)
    steps_to, seconds_to = [], []
    for r in runs:
      clock = dict(zip([p[0] for p in r["train"]], r["training_seconds"]))
      curve = [(p[0], p[1]) for p in r["eval"]]
      timed = [(clock[s], loss) for s, loss in curve if s in clock]
      steps_to.append(_crossing(curve, threshold))
      seconds_to.append(_crossing(timed, threshold))
    rows.append(
      Row(
        name=name,
        num_experts=runs[0]["num_experts"],
        top_k=runs[0]["top_k"],
        capacity_factor=runs[0]["capacity_factor"],
        seeds=len(runs),
        parameters=runs[0]["parameters"],
        gflops_per_step=runs[0]["train_flops_per_step"] / 1e9,
        final_loss=float(np.mean(finals)),
        final_loss_std=float(np.std(finals, ddof=1)) if len(finals) > 1 else 0.0,
        final_losses=finals,
        final_accuracy=float(np.mean([r["eval"][-1][3] for r in runs])),
        seconds_per_step=float(np.median([r["seconds_per_step"] for r in runs])),
        dropped=max(0.0, float(np.mean([np.mean([p[3] for p in r["train"]]) for r in runs]))),
        router_confidence=float(np.mean([r["train"][-1][4] for r in runs])),
        load_imbalance=_run_mean(runs, 5, 1.0),
        choices_dropped=max(0.0, _run_mean(runs, 6, 0.0)),
        steps_to_threshold=_mean_or_none(steps_to),
        seconds_to_threshold=_mean_or_none(seconds_to),
      )
    )
  return rows


def _cell(value, fmt: str) -> str:
  return "-" if value is None else format(value, fmt)


def split_rows(rows: list[Row]) -> tuple[list[Row], int | None, list[Row]]:
  """(the experts table: dense and top-1 at the sweep's capacity factor, the E of the routing
  table: the E with the most variants, the routing table: dense and that E's variants)."""
  default_cf = next((r.capacity_factor for r in rows if r.num_experts and r.top_k == 1), 1.25)
  experts = [
    r for r in rows if not r.num_experts or (r.top_k, r.capacity_factor) == (1, default_cf)
  ]
  counts = {e: sum(r.num_experts == e for r in rows) for e in {r.num_experts for r in rows}}
  table_e = max((e for e in counts if e), key=counts.get, default=None)
  table = [r for r in rows if r.num_experts in (0, table_e)]
  return (
    experts,
    table_e,
    sorted(table, key=lambda r: (r.num_experts > 0, r.top_k, r.capacity_factor)),
  )


def format_tables(results: dict) -> str:
  """The sweep's tables (Markdown): quality by number of experts, and capacity factor and top-k
  at the table's E (with the dense model in both); a study of named variants
  (`study_variants`) gets one table of them all instead."""
  rows = summarize(results)
  header = (
    f"{results['steps']} steps of {results['tokens_per_step']:,} tokens; eval loss after "
    f"the last step, mean ± std over seeds {results['seeds']} (then each seed's); 'to q' = "
    f"steps and seconds of training to first reach eval loss q = {quality_threshold(results):.4f}"
    ", the worst final loss of the sweep (mean over seeds); ms/step: median, on a shared "
    "machine; dropped: tokens left behind, and token choices dropped or capped; imbalance: "
    "max / mean tokens per expert (means over the run)."
  )
  if any(run.get("label") for run in results["runs"]):
    return "\n\n".join([header, _table("Variants:", rows, "variant")])
  expert_rows, table_e, table_rows = split_rows(rows)
  default_cf = expert_rows[-1].capacity_factor if expert_rows else 1.25
  return "\n\n".join(
    [
      header,
      _table(f"Experts (top-1, capacity factor {default_cf:g}):", expert_rows, "model"),
      _table(f"Capacity factor and top-k (E={table_e}):", table_rows, "routing"),
    ]
  )


def _label(r: Row, first: str) -> str:
  if first == "variant" or not r.num_experts:
    return r.name
  return f"E={r.num_experts}" if first == "model" else f"top-{r.top_k}, cf {r.capacity_factor:g}"


def _table(title: str, selected: list[Row], first: str) -> str:
  lines = [
    title,
    "",
    f"| {first} | parameters | GFLOPs/step | eval loss | seeds | accuracy | ms/step "
    "| dropped tokens | dropped choices | imbalance | router conf. | steps to q | s to q |",
    "| --- | ---: | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
  ]
  for r in selected:
    values = " / ".join(f"{v:.3f}" for v in r.final_losses)
    lines.append(
      f"| {_label(r, first)} | {r.parameters:,} | {r.gflops_per_step:.3f} | "
      f"{r.final_loss:.4f} ± {r.final_loss_std:.4f} | {values} | {r.final_accuracy:.3f} | "
      f"{r.seconds_per_step * 1e3:.0f} | {r.dropped:.3f} | {r.choices_dropped:.3f} | "
      f"{r.load_imbalance:.2f} | {r.router_confidence:.3f} | "
      f"{_cell(r.steps_to_threshold, '.0f')} | {_cell(r.seconds_to_threshold, '.1f')} |"
    )
  return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Plots.


def plot_eval_curves(
  results: dict,
  x: str = "step",
  names: Sequence[str] | None = None,
  ax=None,
  from_step: int = 0,
):
  """Eval loss against training steps (x='step') or training seconds (x='seconds') from
  `from_step` on: each variant's mean over seeds, with the seeds' range shaded."""
  import matplotlib.pyplot as plt

  if ax is None:
    _, ax = plt.subplots(figsize=(6, 4))
  by_name: dict[str, list[dict]] = {}
  for run in results["runs"]:
    if names is None or run["name"] in names:
      by_name.setdefault(run["name"], []).append(run)
  for name, runs in by_name.items():
    keep = [i for i, p in enumerate(runs[0]["eval"]) if p[0] >= from_step]
    steps = [runs[0]["eval"][i][0] for i in keep]
    losses = np.array([[r["eval"][i][1] for i in keep] for r in runs])
    if x == "seconds":
      xs = np.mean(
        [np.interp(steps, [p[0] for p in r["train"]], r["training_seconds"]) for r in runs],
        axis=0,
      )
    else:
      xs = np.array(steps, dtype=float)
    label = "dense" if name == "dense" else name.replace("switch-", "").replace("-", " ")
    (line,) = ax.plot(xs, losses.mean(axis=0), marker="o", markersize=3, label=label)
    ax.fill_between(xs, losses.min(axis=0), losses.max(axis=0), color=line.get_color(), alpha=0.2)
  ax.set_xlabel("training steps" if x == "step" else "training time (s, compilation excluded)")
  ax.set_ylabel("eval loss")
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  return ax.figure


# The training points' columns (read_run) that plot_train_curves draws, with axis labels.
TRAIN_COLUMNS = {
  "loss": (1, "training loss"),
  "dropped_tokens": (3, "tokens dropped"),
  "router_confidence": (4, "router confidence"),
  "load_imbalance": (5, "load imbalance (max / mean tokens per expert)"),
  "dropped_choices": (6, "token choices dropped or capped"),
}


def plot_train_curves(results: dict, column: str, names: Sequence[str] | None = None, ax=None):
  """A training metric (a key of TRAIN_COLUMNS) against steps: each variant's mean over seeds
  (all variants, or `names`), the dense model left out of routing metrics."""
  import matplotlib.pyplot as plt

  index, ylabel = TRAIN_COLUMNS[column]
  if ax is None:
    _, ax = plt.subplots(figsize=(6, 4))
  by_name: dict[str, list[dict]] = {}
  for run in results["runs"]:
    if (names is None or run["name"] in names) and (run["num_experts"] or column == "loss"):
      by_name.setdefault(run["name"], []).append(run)
  for name, runs in by_name.items():
    steps = [p[0] for p in runs[0]["train"]]
    values = np.mean([[p[index] for p in r["train"]] for r in runs], axis=0)
    ax.plot(steps, values, label=name)
  ax.set_xlabel("training steps")
  ax.set_ylabel(ylabel)
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  return ax.figure
