"""Routing analysis (switchjax/analysis.py) and the routing notebook (notebooks/routing.ipynb).

The statistics are checked on a tiny random encoder-decoder with 2 experts whose router is
scaled up (confident, unbalanced routing, so that small capacities drop tokens). The notebook's
code cells run in order on random parameters of the tiny preset (SWITCHJAX_NOTEBOOK_TINY=1), so
the notebook cannot rot.

`python tests/test_analysis.py` re-executes the notebook (on runs/small if it exists) and stores
its outputs.
"""

import io
import json
import math
import os
import pathlib
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib
import nbformat
import numpy as np
import pytest
from tiny import tiny_config

matplotlib.use("Agg")  # before pyplot: figures render off-screen
import matplotlib.pyplot as plt  # noqa: E402
from notebook_utils import run_notebook  # noqa: E402

from switchjax import analysis, losses  # noqa: E402
from switchjax.config import ModelConfig  # noqa: E402
from switchjax.model import SwitchEncoder, SwitchTransformer  # noqa: E402

NOTEBOOK = pathlib.Path(__file__).resolve().parents[1] / "notebooks" / "routing.ipynb"
HUGE = 16.0  # an eval capacity factor >= E: every expert could take its whole group
BATCH, INPUTS, TARGETS = 4, 8, 4


# --------------------------------------------------------------------------------------------
# A tiny random model and batch.


def _config(**moe) -> ModelConfig:
  moe = {
    "num_experts": 2,
    "max_group_size": 16,
    "min_expert_capacity": 1,
    "eval_capacity_factor": HUGE,
    **moe,
  }
  return tiny_config(num_layers=1, num_decoder_layers=1, moe=moe)


@pytest.fixture(scope="module")
def batch():
  """Random non-padding tokens; the decoder inputs are the targets shifted right."""
  rng = np.random.default_rng(0)
  targets = rng.integers(3, 64, (BATCH, TARGETS)).astype(np.int32)
  decoder_inputs = np.pad(targets[:, :-1], ((0, 0), (1, 0)))
  return {
    "encoder_input_tokens": rng.integers(3, 64, (BATCH, INPUTS)).astype(np.int32),
    "decoder_input_tokens": decoder_inputs,
    "decoder_target_tokens": targets,
  }


@pytest.fixture(scope="module")
def params(batch):
  """Random parameters with the routers scaled x50 (confident, unbalanced routing)."""
  model = SwitchTransformer(_config())
  params = nn.unbox(
    jax.jit(model.init)(
      jax.random.key(1), batch["encoder_input_tokens"], batch["decoder_input_tokens"]
    )["params"]
  )
  return jax.tree_util.tree_map_with_path(
    lambda path, x: x * 50 if "router" in jax.tree_util.keystr(path) else x, params
  )


@pytest.fixture(scope="module")
def report(batch, params):
  return analysis.routing_report(SwitchTransformer(_config()), params, batch)


# --------------------------------------------------------------------------------------------
# routing_report.


def test_report_has_every_sparse_layer_in_order(report):
  assert list(report) == ["encoder/layers_0/mlp", "decoder/layers_0/mlp"]
  assert report["encoder/layers_0/mlp"].mask.shape == (BATCH, INPUTS)
  assert report["decoder/layers_0/mlp"].mask.shape == (BATCH, TARGETS)


def test_with_huge_capacity_every_token_is_routed_to_its_top1_expert(report):
  for r in report.values():
    num_tokens = r.mask.size  # no padding in this batch
    assert r.mask.all() and r.fraction_dropped == 0.0
    assert r.tokens_per_expert.sum() == num_tokens  # one choice per token, none dropped
    np.testing.assert_array_equal(r.tokens_per_expert, r.top1_load)
    # The layer's confidence (mean combine weight) is then the mean top-1 probability.
    np.testing.assert_allclose(r.router_confidence, r.top1_prob.mean(), rtol=1e-5)
    # usage = routed / (E x capacity x groups).
    assert r.expert_usage == pytest.approx(num_tokens / (2 * r.expert_capacity * r.num_groups))


def test_entropy_probabilities_and_load_statistics_match_the_router_logits(batch, params, report):
  _, layers = analysis.forward(SwitchTransformer(_config()), params, batch)
  for path, r in report.items():
    logits = layers[path]["router_logits"].astype(np.float64)  # [batch, length, experts]
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    np.testing.assert_array_equal(r.top1_expert, probs.argmax(-1))
    np.testing.assert_allclose(r.top1_prob, probs.max(-1), rtol=1e-6)
    np.testing.assert_allclose(r.entropy, np.mean(-np.sum(probs * np.log(probs), -1)), rtol=1e-6)
    assert 0 <= r.entropy <= math.log(2)
    counts = r.tokens_per_expert
    assert r.load_cv == pytest.approx(np.std(counts) / np.mean(counts))
    assert r.max_mean_load == pytest.approx(np.max(counts) / np.mean(counts))
    assert r.auxiliary_loss > 0 and r.router_z_loss > 0


def test_padding_is_excluded_from_the_token_statistics(batch, params):
  padded = dict(batch)
  padded["encoder_input_tokens"] = batch["encoder_input_tokens"].copy()
  padded["encoder_input_tokens"][:, -3:] = 0  # 3 padding tokens per row
  r = analysis.routing_report(SwitchTransformer(_config()), params, padded)["encoder/layers_0/mlp"]
  assert r.mask.sum() == BATCH * (INPUTS - 3)
  assert (r.top1_expert[:, -3:] == -1).all() and (r.top1_prob[:, -3:] == 0).all()
  assert r.top1_load.sum() == BATCH * (INPUTS - 3)
  assert r.tokens_per_expert.sum() == BATCH * INPUTS  # the layer still routes padding


@pytest.mark.parametrize(
  "counts,cv,max_mean",
  [
    ([5, 5, 5, 5], 0.0, 1.0),
    ([8, 0, 0, 0], math.sqrt(3), 4.0),
    ([3, 1], 0.5, 1.5),
    ([0, 0], 0.0, 0.0),
  ],
)
def test_load_balance(counts, cv, max_mean):
  assert analysis.load_balance(np.array(counts)) == pytest.approx((cv, max_mean))


def test_routing_report_of_an_encoder_only_model(batch, params):
  model = SwitchEncoder(_config())
  report = analysis.routing_report(
    model, {"token_embedder": params["token_embedder"], "encoder": params["encoder"]}, batch
  )
  assert list(report) == ["encoder/layers_0/mlp"]
  assert report["encoder/layers_0/mlp"].tokens_per_expert.sum() == BATCH * INPUTS


# --------------------------------------------------------------------------------------------
# Routing variants on the same parameters.


def test_top2_with_two_experts_sends_every_token_to_both(batch, params):
  model = analysis.replace_moe(SwitchTransformer(_config()), num_selected_experts=2)
  for r in analysis.routing_report(model, params, batch).values():
    np.testing.assert_array_equal(r.tokens_per_expert, [r.mask.size, r.mask.size])
    assert r.fraction_dropped == 0 and r.router_confidence == pytest.approx(0.5)


def test_masked_and_scatter_routers_agree(batch, params):
  outputs = {}
  for router in ("tokens_choose_masked", "tokens_choose_scatter"):
    model = analysis.replace_moe(SwitchTransformer(_config()), router_type=router)
    logits, _ = analysis.forward(model, params, batch)
    outputs[router] = logits, analysis.routing_report(model, params, batch)
  (masked, masked_report), (scatter, scatter_report) = outputs.values()
  np.testing.assert_allclose(masked, scatter, atol=1e-5)
  for path in masked_report:
    np.testing.assert_array_equal(
      masked_report[path].tokens_per_expert, scatter_report[path].tokens_per_expert
    )


def test_replace_moe_keeps_the_rest_of_the_config():
  model = analysis.replace_moe(SwitchTransformer(_config()), eval_capacity_factor=0.5)
  assert isinstance(model, SwitchTransformer)
  assert model.config.moe.eval_capacity_factor == 0.5 and model.config.d_model == 16


# --------------------------------------------------------------------------------------------
# Capacity.


def test_capacity_sweep_drops_fewer_tokens_as_capacity_grows(batch, params):
  factors = [0.25, 1.0, HUGE]
  sweep = analysis.capacity_sweep(SwitchTransformer(_config()), params, batch, factors)
  np.testing.assert_array_equal(sweep.factors, factors)
  assert list(sweep.fraction_dropped) == ["encoder/layers_0/mlp", "decoder/layers_0/mlp"]
  for path, dropped in sweep.fraction_dropped.items():
    assert np.all(np.diff(dropped) <= 0), dropped
    assert dropped[0] > 0 and dropped[-1] == 0
    assert np.all(np.diff(sweep.capacity[path]) >= 0)
  # Encoder groups hold 16 tokens: capacity = max(round(cf * 16 / 2), 1).
  np.testing.assert_array_equal(sweep.capacity["encoder/layers_0/mlp"], [2, 8, 128])
  # Unbalanced routing at cf 0.25: 2 experts x 2 slots x 2 groups = 8 of 32 tokens at most.
  assert sweep.fraction_dropped["encoder/layers_0/mlp"][0] >= 1 - 8 / 32
  # Nothing dropped at cf 16: usage = tokens / (E x C x groups) = 1 / cf.
  assert sweep.expert_usage["encoder/layers_0/mlp"][-1] == pytest.approx(1 / HUGE)
  report = analysis.routing_report(
    analysis.replace_moe(SwitchTransformer(_config()), eval_capacity_factor=1.0), params, batch
  )
  assert sweep.fraction_dropped["decoder/layers_0/mlp"][1] == pytest.approx(
    report["decoder/layers_0/mlp"].fraction_dropped
  )
  assert "cf 0.25" in analysis.format_sweep(sweep) and "(C=128)" in analysis.format_sweep(sweep)


def test_capacity_sweep_refuses_fixed_capacity(batch, params):
  with pytest.raises(ValueError, match="expert_capacity"):
    analysis.capacity_sweep(SwitchTransformer(_config(expert_capacity=4)), params, batch, [1.0])


# --------------------------------------------------------------------------------------------
# Which tokens go where.


class _Pieces:
  """A stand-in tokenizer: id 7 is 't7'."""

  def id_to_piece(self, token_id):
    return f"t{token_id}"


def _synthetic_report(top1: np.ndarray, mask: np.ndarray) -> dict[str, analysis.LayerRouting]:
  """A report whose only layer has the given top-1 experts [batch, length] and mask."""
  zero = np.zeros(top1.shape)
  layer = analysis.LayerRouting(
    path="encoder/layers_0/mlp",
    tokens_per_expert=np.zeros(3, np.int64),
    expert_usage=0.0,
    fraction_dropped=0.0,
    router_confidence=0.0,
    auxiliary_loss=0.0,
    router_z_loss=0.0,
    expert_capacity=1,
    num_groups=1,
    mask=mask,
    top1_expert=np.where(mask, top1, -1),
    top1_prob=zero,
    entropy=0.0,
    load_cv=0.0,
    max_mean_load=0.0,
  )
  return {layer.path: layer}


def test_expert_token_affinity_matches_a_hand_count():
  tokens = np.array([[5, 5, 6, 7, 5, 0], [6, 6, 5, 7, 8, 0]])
  top1 = np.array([[0, 0, 1, 2, 1, 0], [1, 1, 0, 2, 2, 0]])
  report = _synthetic_report(top1, tokens > 0)
  affinity = analysis.expert_token_affinity(
    report, {"encoder_input_tokens": tokens}, _Pieces(), "encoder/layers_0/mlp"
  )
  # id 5 occurs 4 times: 3 x expert 0, 1 x expert 1; id 6: 3 x expert 1; 7: 2 x expert 2;
  # 8: 1 x expert 2. Padding (0) counts for nothing.
  assert affinity == {
    0: [("t5", 3, 0.75)],
    1: [("t6", 3, 1.0), ("t5", 1, 0.25)],
    2: [("t7", 2, 1.0), ("t8", 1, 1.0)],
  }
  assert analysis.expert_token_affinity(report, tokens, _Pieces(), "encoder/layers_0/mlp", top=1)[
    1
  ] == [("t6", 3, 1.0)]
  text = analysis.format_affinity(affinity)
  assert text.splitlines()[1] == "expert 1: 't6' x3 (100%)  't5' x1 (25%)"
  # Purity over ids seen >= 2 times (5, 6, 7): (3 + 3 + 2) / (4 + 3 + 2).
  assert analysis.routing_purity(report, tokens, "encoder/layers_0/mlp") == pytest.approx(8 / 9)
  with pytest.raises(ValueError, match="shape"):
    analysis.expert_token_affinity(report, tokens[:, :3], _Pieces(), "encoder/layers_0/mlp")


def test_affinity_of_a_model_counts_every_real_token_once(batch, report):
  for path, r in report.items():
    affinity = analysis.expert_token_affinity(report, batch, _Pieces(), path, top=100)
    counted = [sum(c for _, c, _ in pieces) for pieces in affinity.values()]
    np.testing.assert_array_equal(counted, r.top1_load)
    ids = analysis.layer_tokens(batch, path)[r.mask]
    for e, pieces in affinity.items():
      for piece, count, share in pieces:
        token_id = int(piece[1:])
        assert count == np.sum((ids == token_id) & (r.top1_expert[r.mask] == e))
        assert share == pytest.approx(count / np.sum(ids == token_id))


# --------------------------------------------------------------------------------------------
# Text, plots and the loss.


def test_format_report_has_one_row_per_layer(report):
  lines = analysis.format_report(report).splitlines()
  assert len(lines) == 2 + len(report)
  for line, r in zip(lines[2:], report.values()):
    assert line.startswith(r.path)
    assert " ".join(str(n) for n in r.tokens_per_expert) in line


def test_plots_draw_one_panel_per_layer(report, batch, params):
  sweep = analysis.capacity_sweep(SwitchTransformer(_config()), params, batch, [1.0, HUGE])
  for fig, panels in (
    (analysis.plot_expert_load(report), len(report)),
    (analysis.plot_router_confidence(report), len(report)),
    (analysis.plot_capacity_sweep(sweep), 2),
  ):
    assert len(fig.axes) == panels
    fig.savefig(io.BytesIO(), format="png")
  plt.close("all")


def test_token_cross_entropy_matches_the_training_loss(batch, params):
  logits, _ = analysis.forward(SwitchTransformer(_config()), params, batch)
  targets = batch["decoder_target_tokens"]
  total, _, count = losses.cross_entropy_with_z_loss(
    jnp.asarray(logits), targets, (targets > 0).astype(np.float32)
  )
  assert analysis.token_cross_entropy(logits, batch) == pytest.approx(
    float(total / count), rel=1e-5
  )


# --------------------------------------------------------------------------------------------
# The notebook.


@pytest.mark.slow
def test_notebook_runs_on_the_tiny_preset(tmp_path, monkeypatch):
  monkeypatch.setenv("SWITCHJAX_NOTEBOOK_TINY", "1")
  monkeypatch.setenv("SWITCHJAX_NOTEBOOK_WORKDIR", str(tmp_path / "run"))
  monkeypatch.chdir(tmp_path)
  (tmp_path / "run").mkdir()
  logged = {"load_imbalance": 1.5, "fraction_choices_dropped": 0.25, "choice_bias_abs_mean": 0.5}
  records = [  # what training logs per sparse layer (random parameters here: no training)
    {"step": step, **{f"layers/{layer}/{k}": v / step for k, v in logged.items()}}
    for step in (1, 2)
    for layer in ("encoder/layers_1/mlp", "decoder/layers_1/mlp")
  ]
  (tmp_path / "run" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  nb, ns = run_notebook(NOTEBOOK)
  assert ns["config"].name == "tiny"
  assert list(ns["report"]) == ["encoder/layers_1/mlp", "decoder/layers_1/mlp"]
  assert all(np.all(np.diff(d) <= 0) for d in ns["sweep"].fraction_dropped.values())
  assert ns["max_logit_difference"] < 1e-4  # masked and scatter routers agree
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert all(c.outputs for c in code[1:]), "every cell after the imports shows something"
  assert any("image/png" in o.get("data", {}) for c in code for o in c.outputs)
  assert list(ns["history"]) == ["encoder/layers_1/mlp", "decoder/layers_1/mlp"]
  assert ns["history"]["decoder/layers_1/mlp"]["load_imbalance"] == [(1, 1.5), (2, 0.75)]
  (during_training,) = [c for c in code if "routing_history" in c.source]
  assert sum("image/png" in o.get("data", {}) for o in during_training.outputs) == 1
  assert "imbalance 1.50 at step 1 -> 0.75 at step 2" in during_training.outputs[0].text


def test_stored_notebook_is_executed_and_small():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert [c.execution_count for c in code] == list(range(1, len(code) + 1))
  assert any(c.cell_type == "markdown" for c in nb.cells)
  assert NOTEBOOK.stat().st_size < 1_000_000


if __name__ == "__main__":  # re-execute the notebook and store its outputs
  os.chdir(NOTEBOOK.parent)
  executed, _ = run_notebook(NOTEBOOK)
  nbformat.write(executed, NOTEBOOK)
  print(f"Wrote {NOTEBOOK} ({NOTEBOOK.stat().st_size / 1e3:.0f} kB).", file=sys.stderr)
