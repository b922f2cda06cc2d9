"""Per-layer routing metrics over a training run, read back from its metrics.jsonl.

Training logs each sparse layer's routing metrics as `layers/{path}/{name}` (switchjax.losses
LAYER_METRICS): load imbalance, dropped and capped choices, and the choice bias of
auxiliary-loss-free balancing. These show how routing settles during training, which one
analysis batch of the final parameters (switchjax.analysis) cannot.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Iterable, Sequence

# What `plot_history` draws by default, with the axis label of each.
PLOTTED = {
  "load_imbalance": "load imbalance (max / mean tokens per expert)",
  "fraction_choices_dropped": "token choices dropped or capped",
  "choice_bias_abs_mean": "mean |choice bias|",
}
LAYER_PREFIX = "layers/"

History = dict[str, dict[str, list[tuple[int, float]]]]  # layer -> metric -> [(step, value)]


def read_history(source: str | pathlib.Path | Iterable[dict]) -> History:
  """{layer path: {metric: [(step, value), ...]}} of the training records (not evaluation) of
  a workdir's metrics.jsonl, or of records already read; steps in logged order."""
  if isinstance(source, (str, pathlib.Path)):
    path = pathlib.Path(source) / "metrics.jsonl"
    if not path.exists():
      raise FileNotFoundError(f"{path} does not exist: point at a training run's workdir.")
    source = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
  history: History = {}
  for record in source:
    for key, value in record.items():
      if key.startswith(LAYER_PREFIX):
        layer, metric = key[len(LAYER_PREFIX) :].rsplit("/", 1)
        history.setdefault(layer, {}).setdefault(metric, []).append((record["step"], value))
  return history


def plot_history(history: History, metrics: Sequence[str] | None = None, axes=None):
  """One panel per metric (default: those of PLOTTED the run logged), a line per layer."""
  import matplotlib.pyplot as plt

  logged = {m for layer in history.values() for m in layer}
  metrics = [m for m in (metrics or PLOTTED) if m in logged]
  if not metrics:
    raise ValueError("the run logged none of these per-layer metrics: is it a sparse model?")
  if axes is None:
    _, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.6), squeeze=False)
    axes = axes[0]
  for ax, metric in zip(axes, metrics):
    for layer, series in history.items():
      if metric in series:
        steps, values = zip(*series[metric])
        ax.plot(steps, values, label=layer)
    ax.set_xlabel("training step")
    ax.set_ylabel(PLOTTED.get(metric, metric))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  return axes[0].figure
