"""Per-layer routing metrics over training (switchjax/routing_history.py): read back from
metrics.jsonl exactly as logged, and plotted one panel per metric, a line per layer."""

import json

import matplotlib
import pytest
from match import words

from switchjax import routing_history

matplotlib.use("Agg")

RECORDS = [
  {
    "step": 10,
    "loss": 5.0,
    "layers/encoder/layers_1/mlp/load_imbalance": 2.5,
    "layers/encoder/layers_1/mlp/choice_bias_abs_mean": 0.01,
    "layers/decoder/layers_1/mlp/load_imbalance": 3.0,
  },
  {"step": 10, "eval/loss": 4.9, "eval/load_imbalance": 2.0},  # evaluation: not training
  {
    "step": 20,
    "loss": 4.0,
    "layers/encoder/layers_1/mlp/load_imbalance": 1.5,
    "layers/encoder/layers_1/mlp/choice_bias_abs_mean": 0.02,
    "layers/decoder/layers_1/mlp/load_imbalance": 1.25,
  },
]


def test_history_is_what_each_layer_logged_per_step(tmp_path):
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
  history = routing_history.read_history(tmp_path)
  assert history == routing_history.read_history(RECORDS)
  assert history == {
    "encoder/layers_1/mlp": {
      "load_imbalance": [(10, 2.5), (20, 1.5)],
      "choice_bias_abs_mean": [(10, 0.01), (20, 0.02)],
    },
    "decoder/layers_1/mlp": {"load_imbalance": [(10, 3.0), (20, 1.25)]},
  }
  with pytest.raises(FileNotFoundError, match=words("metrics.jsonl does not exist", "workdir")):
    routing_history.read_history(tmp_path / "nowhere")


def test_plot_has_a_panel_per_logged_metric_and_a_line_per_layer():
  history = routing_history.read_history(RECORDS)
  figure = routing_history.plot_history(history)
  imbalance, bias = figure.axes  # fraction_choices_dropped was not logged: no panel
  assert [line.get_label() for line in imbalance.lines] == list(history)
  assert list(imbalance.lines[1].get_ydata()) == [3.0, 1.25]
  assert [line.get_label() for line in bias.lines] == ["encoder/layers_1/mlp"]
  with pytest.raises(ValueError, match=words("logged none of these", "sparse model")):
    routing_history.plot_history({"encoder/layers_1/mlp": {"expert_usage": [(1, 0.5)]}})
