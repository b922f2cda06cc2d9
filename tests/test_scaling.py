"""The expert-scaling sweep (switchjax/scaling.py, scripts/scaling.py) and its notebook
(notebooks/expert_scaling.ipynb).

The summaries are checked on hand-made results; the script runs a shrunken sweep (the tiny
preset, 4 steps, dense / E=2 top-1 / E=2 top-2, two seeds) whose JSON the notebook then plots.

`python tests/test_scaling.py` re-executes the notebook on its stored results and stores its
outputs.
"""

import json
import os
import pathlib
import subprocess
import sys

import nbformat
import numpy as np
import pytest
from notebook_utils import run_notebook

from switchjax import scaling
from switchjax.config import estimate_parameters
from switchjax.training import train_flops_per_example

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "expert_scaling.ipynb"
STORED = ROOT / "notebooks" / "expert_scaling.json"
STORED_LONG = ROOT / "notebooks" / "expert_scaling_long.json"
STUDY_NOTEBOOK = ROOT / "notebooks" / "beyond_switch.ipynb"
STUDY = ROOT / "notebooks" / "beyond_switch.json"


def test_sweep_variants_are_the_experts_then_the_capacity_table():
  names = [v.name for v in scaling.sweep_variants()]
  assert names == [
    "dense",
    "switch-e2-top1-cf1.25",
    "switch-e4-top1-cf1.25",
    "switch-e8-top1-cf1.25",
    "switch-e16-top1-cf1.25",
    "switch-e8-top1-cf1",
    "switch-e8-top1-cf2",
    "switch-e8-top2-cf1",
    "switch-e8-top2-cf1.25",
    "switch-e8-top2-cf2",
  ]


def test_switch_models_have_the_dense_flops_per_token_and_more_parameters():
  base = scaling.base_config()
  configs = {
    v: scaling.run_config(base, v, seed=3, steps=600, eval_every=50, eval_steps=8)
    for v in scaling.sweep_variants()
  }
  dense = configs[scaling.Variant(0)]
  assert dense.model.num_sparse_encoder_layers == dense.model.num_sparse_decoder_layers == 0
  assert dense.train.seed == 3 and dense.train.num_train_steps == 600
  assert dense.train.log_every == 25 and dense.train.eval_every == 50
  flops = train_flops_per_example(dense)
  parameters = []
  for variant, config in configs.items():
    if variant.num_experts and variant.top_k == 1:
      assert config.model.moe.num_experts == variant.num_experts
      assert config.model.expert_mlp_dim == dense.model.d_ff
      ratio = train_flops_per_example(config) / flops
      assert 1.0 < ratio < 1.01, (variant, ratio)  # only the router's E x d_model per token
    if variant.capacity_factor == 1.25 and variant.top_k == 1:
      parameters.append(estimate_parameters(config.model))
  assert parameters == sorted(parameters) and len(set(parameters)) == 5
  top2 = configs[scaling.Variant(8, 2, 1.25)]
  assert train_flops_per_example(top2) > 1.1 * flops


def test_study_variants_have_switch_flops_and_parameters():
  """The beyond-Switch study: every routed variant at Switch top-1's FLOPs per token (the
  expert widths x k, plus the shared expert, add up to d_ff) and its routed parameters; the
  auxiliary-loss-free variants turn the loss off and the bias update on, and nothing else."""
  base = scaling.base_config()
  variants = scaling.study_variants(base.model.d_ff, rate=0.002)
  configs = {
    v.name: scaling.run_config(base, v, seed=0, steps=100, eval_every=50, eval_steps=2)
    for v in variants
  }
  assert list(configs) == [
    "dense",
    "switch-top1",
    "switch-top1-auxfree",
    "switch-top1-dropless",
    "top2-e16",
    "shared-fine-e32-top3",
    "shared-fine-e32-top3-auxfree-sigmoid",
  ]
  d, d_ff = base.model.d_model, base.model.d_ff
  switch = configs["switch-top1"]
  flops = train_flops_per_example(switch)
  for name, config in configs.items():
    m, moe = config.model, config.model.moe
    if name == "dense":
      continue
    active = moe.num_selected_experts * m.expert_mlp_dim + moe.num_shared_experts * (
      moe.shared_expert_d_ff or 0
    )
    assert active == d_ff, name
    assert moe.num_experts * m.expert_mlp_dim == 8 * d_ff, name  # Switch E=8's routed width
    # Only the wider routers differ: (E - 8) x d MACs per token of the one sparse layer per
    # stack, x 2 FLOPs, x 3 for the backward pass.
    tokens = config.data.inputs_length + config.data.targets_length
    assert train_flops_per_example(config) - flops == (moe.num_experts - 8) * d * 2 * 3 * tokens
    assert moe.capacity_per_choice == (moe.num_selected_experts > 1), name
    auxfree = "auxfree" in name
    assert config.train.aux_loss_factor == (0.0 if auxfree else 0.01), name
    assert moe.router_bias_update_rate == (0.002 if auxfree else 0.0), name
  sigmoid = configs["shared-fine-e32-top3-auxfree-sigmoid"].model.moe
  assert (sigmoid.router_score, sigmoid.normalize_top_k) == ("sigmoid", True)
  # The ablations: each half of DeepSeek-V3's combination alone, else the same experts.
  halves = scaling.study_variants(base.model.d_ff, rate=0.002, ablations=True)
  assert [v.name for v in halves] == [*configs][:6] + [
    "shared-fine-e32-top3-auxfree",
    "shared-fine-e32-top3-sigmoid",
    "shared-fine-e32-top3-auxfree-sigmoid",
  ]
  extra = {v.name: set(v.extra) for v in halves}
  both = extra["shared-fine-e32-top3-auxfree-sigmoid"] - extra["shared-fine-e32-top3"]
  bias = extra["shared-fine-e32-top3-auxfree"] - extra["shared-fine-e32-top3"]
  gating = extra["shared-fine-e32-top3-sigmoid"] - extra["shared-fine-e32-top3"]
  assert bias == {"train.aux_loss_factor=0.0", "model.moe.router_bias_update_rate=0.002"}
  assert gating == {"model.moe.router_score=sigmoid", "model.moe.normalize_top_k=true"}
  assert both == bias | gating
  assert configs["switch-top1-dropless"].model.moe.router_type == "tokens_choose_dropless"
  fine = configs["shared-fine-e32-top3"].model
  extra = estimate_parameters(fine) - estimate_parameters(switch.model)
  # Per sparse layer: the shared expert's input and output matrices, and the wider router.
  matrices = len(fine.expert_acts) + 1
  shared = 2 * (matrices * d * (d_ff // 4) + (32 - 8) * d)
  assert extra == shared


def _run(name, seed, eval_losses, seconds, num_experts=2, top_k=1, cf=1.25):
  """A hand-made run: eval every 10 steps, training logged every 5 steps."""
  steps = [10 * (i + 1) for i in range(len(eval_losses))]
  train_steps = list(range(5, steps[-1] + 1, 5))
  train = [[s, 0.0, seconds[i], 0.1, 0.6] for i, s in enumerate(train_steps)]
  _, clock = scaling.training_seconds(train)
  return {
    "name": name,
    "num_experts": num_experts,
    "top_k": top_k,
    "capacity_factor": cf,
    "seed": seed,
    "parameters": 100 * (num_experts + 1),
    "train_flops_per_step": 2e9,
    "seconds_per_step": scaling.training_seconds(train)[0],
    "training_seconds": [c for _, c in clock],
    "eval": [[s, loss, loss, 0.5] for s, loss in zip(steps, eval_losses)],
    "train": train,
  }


def test_summaries_and_tables_of_hand_made_results():
  # The first interval (compilation) took 10 s per step: it counts at the median, 1 s.
  median, clock = scaling.training_seconds([[5, 0, 10.0, 0], [10, 0, 1.0, 0], [15, 0, 3.0, 0]])
  assert median == 2.0 and clock == [(5, 10.0), (10, 15.0), (15, 30.0)]
  results = {
    "steps": 20,
    "tokens_per_step": 100,
    "seeds": [0, 1],
    "runs": [
      _run("dense", 0, [4.0, 3.0], [9.0, 1.0, 1.0, 1.0], num_experts=0),
      _run("switch-e2-top1-cf1.25", 0, [3.5, 2.5], [9.0, 2.0, 2.0, 2.0]),
      _run("dense", 1, [4.2, 3.2], [9.0, 1.0, 1.0, 1.0], num_experts=0),
      _run("switch-e2-top1-cf1.25", 1, [3.7, 2.9], [9.0, 2.0, 2.0, 2.0]),
    ],
  }
  dense, switch = scaling.summarize(results)
  assert dense.name == "dense" and dense.seeds == 2
  assert dense.final_loss == pytest.approx(3.1)
  assert dense.final_loss_std == pytest.approx(np.std([3.0, 3.2], ddof=1))
  assert switch.final_losses == (2.5, 2.9) and switch.seconds_per_step == 2.0
  # The quality threshold is the worst final loss, 3.2 (dense seed 1): dense seed 0 reaches it
  # at 10 + 10 * 0.8 / 1.0 = 18 steps, seed 1 at 20; Switch seed 0 at 10 + 10 * 0.3 / 1.0 = 13,
  # seed 1 at 10 + 10 * 0.5 / 0.8 = 16.25. Dense steps take 1 s (the first interval counts at
  # the median), Switch steps 2 s.
  assert scaling.quality_threshold(results) == 3.2
  assert dense.steps_to_threshold == pytest.approx(19) == dense.seconds_to_threshold
  assert switch.steps_to_threshold == pytest.approx((13 + 16.25) / 2)
  assert switch.seconds_to_threshold == pytest.approx(13 + 16.25)
  assert switch.router_confidence == 0.6 and switch.dropped == pytest.approx(0.1)
  # At the dense model's mean final loss, 3.1, dense seed 1 never arrives.
  dense, switch = scaling.summarize(results, threshold=3.1)
  assert dense.steps_to_threshold is None and dense.seconds_to_threshold is None
  assert switch.steps_to_threshold == pytest.approx((14 + 17.5) / 2)
  text = scaling.format_tables(results)
  assert "| E=2 | 300 | 2.000 | 2.7000 ± 0.2828 | 2.500 / 2.900 |" in text
  assert "| dense | 100 | 2.000 | 3.1000 ± 0.1414 | 3.000 / 3.200 | 0.500 | 1000 | 0.100 |" in text
  assert "q = 3.2000" in text and "| 15 | 29.2 |" in text


def test_late_losses_and_slope_of_hand_made_results():
  """The end of a run: the mean of its last evaluations, and the fall of a least-squares line
  through the evaluations of its last steps, per 1,000 steps."""
  results = {
    "runs": [
      _run("dense", 0, [5.0, 4.0, 3.0, 2.5], [1.0] * 8, num_experts=0),
      _run("dense", 1, [5.0, 4.2, 3.2, 2.6], [1.0] * 8, num_experts=0),
      _run("switch", 0, [5.0, 4.0, 3.5, 3.5], [1.0] * 8),
    ]
  }
  late = scaling.late_losses(results, last=2)
  assert late == {"dense": {0: 2.75, 1: pytest.approx(2.9)}, "switch": {0: 3.5}}
  # Evaluations at steps 10, 20, 30, 40: over the last 10 steps the line through (30, 3.0) and
  # (40, 2.5) falls 0.05 per step for seed 0, through (30, 3.2), (40, 2.6) 0.06.
  assert scaling.late_slope(results, "dense", 10) == pytest.approx((50 + 60) / 2)
  assert scaling.late_slope(results, "switch", 10) == pytest.approx(0, abs=1e-9)
  # Over the last 30 steps: four points of seed 0, slope -0.085 per step by least squares.
  x, y = np.array([10, 20, 30, 40]), np.array([5.0, 4.0, 3.0, 2.5])
  expected = -np.sum((x - x.mean()) * (y - y.mean())) / np.sum((x - x.mean()) ** 2) * 1000
  assert scaling.late_slope({"runs": results["runs"][:1]}, "dense", 30) == pytest.approx(expected)


@pytest.fixture(scope="module")
def shrunken_sweep(tmp_path_factory) -> tuple[pathlib.Path, str]:
  """The script on the tiny preset: 4 steps, dense / E=2 top-1 / E=2 top-2, seeds 0 and 1."""
  workdir = tmp_path_factory.mktemp("scaling")
  done = subprocess.run(
    [
      sys.executable,
      str(ROOT / "scripts" / "scaling.py"),
      f"--workdir={workdir}",
      "--config=tiny",
      "--steps=4",
      "--eval_every=2",
      "--eval_steps=1",
      "--experts=2",
      "--table_experts=2",
      "--capacity_factors=1.25",
      "--top_k=1,2",
      "--seeds=0,1",
    ],
    capture_output=True,
    text=True,
    cwd=ROOT,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  return workdir / "results.json", done.stdout


@pytest.mark.slow
def test_script_runs_every_variant_and_seed_and_prints_the_tables(shrunken_sweep):
  path, stdout = shrunken_sweep
  results = json.loads(path.read_text())
  runs = {(r["name"], r["seed"]): r for r in results["runs"]}
  assert sorted(runs) == [
    (name, seed)
    for name in ("dense", "switch-e2-top1-cf1.25", "switch-e2-top2-cf1.25")
    for seed in (0, 1)
  ]
  for run in runs.values():
    assert [p[0] for p in run["eval"]] == [2, 4] and [p[0] for p in run["train"]] == [1, 2, 3, 4]
    assert all(np.isfinite(p[1]) for p in run["eval"]) and run["seconds_per_step"] > 0
    assert run["training_seconds"] == sorted(run["training_seconds"])
  a, b = runs["switch-e2-top1-cf1.25", 0], runs["switch-e2-top1-cf1.25", 1]
  assert a["eval"] != b["eval"]  # the seeds differ
  assert a["parameters"] > runs["dense", 0]["parameters"]
  assert runs["dense", 0]["layers"] == {} and [p[5] for p in runs["dense", 0]["train"]] == [1] * 4
  for layer in a["layers"].values():  # each sparse layer's metrics at every logged step
    assert [step for step, _ in layer["load_imbalance"]] == [1, 2, 3, 4]
    assert all(1 <= value <= 2 for _, value in layer["load_imbalance"])  # E = 2
  assert len(a["layers"]) == 2  # the tiny preset's sparse layers
  assert "| E=2 |" in stdout and "| top-2, cf 1.25 |" in stdout and "Wrote " in stdout


@pytest.mark.slow
def test_study_script_trains_the_chosen_variant(tmp_path, capsys):
  """--study --only: one study variant (shared + fine-grained experts, sigmoid scores and the
  choice bias) trained on the tiny preset, its table row printed; an unknown name is refused
  before anything trains."""
  sys.path.insert(0, str(ROOT / "scripts"))
  try:
    import scaling as script
  finally:
    sys.path.pop(0)
  name = "shared-fine-e32-top3-auxfree-sigmoid"
  common = ["--study", "--config=tiny", "--steps=2", "--eval_every=2", "--eval_steps=1"]
  common += ["--seeds=0", "--set=model.d_ff=64"]  # d_ff / 4 = 16 wide experts
  assert script.main([*common, f"--workdir={tmp_path / 'a'}", "--only=top3"]) == 1
  err = capsys.readouterr().err
  assert err.startswith("error: --only=top3: no such variant; choose from dense, switch-top1,")
  assert not (tmp_path / "a").exists()
  assert script.main([*common[1:], f"--workdir={tmp_path / 'a'}", "--ablations"]) == 1
  assert capsys.readouterr().err == "error: --ablations belongs to --study; add --study.\n"
  assert (
    script.main([*common, f"--workdir={tmp_path / 'a'}", "--only=shared-fine-e32-top3-auxfree"])
    == 1
  )
  assert "shared-fine-e32-top3-auxfree: no such variant" in capsys.readouterr().err
  assert not (tmp_path / "a").exists()
  assert script.main([*common, f"--workdir={tmp_path / 'b'}", f"--only={name}"]) == 0
  (run,) = json.loads((tmp_path / "b" / "results.json").read_text())["runs"]
  assert run["name"] == name and run["label"] == name and run["top_k"] == 3
  assert run["extra"][-2:] == ["model.moe.router_score=sigmoid", "model.moe.normalize_top_k=true"]
  for layer in run["layers"].values():  # the bias each step routed with: 0, then one update
    (_, before), (_, after) = layer["choice_bias_abs_mean"]  # of +-0.001 (0 at the mean load)
    assert before == 0.0 and 0.0009 < after <= 0.001 + 1e-9
  assert f"| {name} |" in capsys.readouterr().out


@pytest.mark.slow
def test_notebook_plots_the_sweep(shrunken_sweep, monkeypatch):
  path, _ = shrunken_sweep
  monkeypatch.setenv("SWITCHJAX_SCALING_RESULTS", str(path))
  monkeypatch.setenv("SWITCHJAX_SCALING_LONG_RESULTS", str(path))
  nb, ns = run_notebook(NOTEBOOK)
  assert [r.name for r in ns["rows"]] == [
    "dense",
    "switch-e2-top1-cf1.25",
    "switch-e2-top2-cf1.25",
  ]
  code = [c for c in nb.cells if c.cell_type == "code"]
  pngs = sum("image/png" in o.get("data", {}) for c in code for o in c.outputs)
  assert pngs == 3 and all(c.outputs for c in code[1:])


def test_stored_notebook_and_results_are_the_full_sweep():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert [c.execution_count for c in code] == list(range(1, len(code) + 1))
  assert all(c.outputs for c in code[1:]) and NOTEBOOK.stat().st_size < 1_000_000
  results = json.loads(STORED.read_text())
  rows = scaling.summarize(results)
  assert {r.num_experts for r in rows} == {0, 2, 4, 8, 16}
  assert {(r.top_k, r.capacity_factor) for r in rows if r.num_experts == 8} == {
    (k, cf) for k in (1, 2) for cf in (1.0, 1.25, 2.0)
  }
  assert all(r.seeds >= 2 for r in rows)
  assert all(len(r["eval"]) == results["steps"] // results["eval_every"] for r in results["runs"])


def _assert_every_run_whole(results: dict, names: list[str], steps: int) -> list:
  """A stored study: `names` in order, two seeds each, `steps` steps with every evaluation."""
  rows = scaling.summarize(results)
  assert [r.name for r in rows] == names
  assert all(r.seeds == 2 for r in rows) and results["steps"] == steps
  assert all(len(r["eval"]) == results["steps"] // results["eval_every"] for r in results["runs"])
  return rows


def test_stored_study_is_every_variant_for_two_seeds_on_unseen_text():
  results = json.loads(STUDY.read_text())
  rows = _assert_every_run_whole(results, [v.name for v in scaling.study_variants()], 8000)
  dense = rows[0].gflops_per_step
  assert all(1.0 <= r.gflops_per_step / dense < 1.02 for r in rows)  # routers' FLOPs only
  # The kernel documentation holds 137,431 training chunks of 70 tokens (64 + 14 after span
  # corruption): 8,000 steps of 16 read 128,000 of them, each once.
  assert results["steps"] * results["batch_size"] <= 137_431
  nb = nbformat.read(STUDY_NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert [c.execution_count for c in code] == list(range(1, len(code) + 1))
  assert all(c.outputs for c in code[1:]) and STUDY_NOTEBOOK.stat().st_size < 1_500_000


def test_study_notebook_plots_the_stored_study(monkeypatch):
  monkeypatch.chdir(STUDY_NOTEBOOK.parent)
  nb, ns = run_notebook(STUDY_NOTEBOOK)
  assert [r.name for r in ns["rows"]] == [v.name for v in scaling.study_variants()]
  code = [c for c in nb.cells if c.cell_type == "code"]
  pngs = sum("image/png" in o.get("data", {}) for c in code for o in c.outputs)
  assert pngs == 5 and "| switch-top1-auxfree |" in code[1].outputs[0].text
  assert "| shared-fine-e32-top3-auxfree-sigmoid |" in code[-4].outputs[0].text
  ablation = code[-2].outputs[0].text
  assert "| shared-fine-e32-top3-sigmoid |" in ablation
  assert "the bias instead of the auxiliary loss:" in ablation and "with the bias" in ablation


LONG_STUDY = ROOT / "notebooks" / "beyond_switch_16k.json"
LONG_VARIANTS = [
  "dense",
  "switch-top1",
  "shared-fine-e32-top3",
  "shared-fine-e32-top3-auxfree-sigmoid",
]


def test_stored_long_study_is_four_variants_for_two_seeds_on_unseen_text():
  results = json.loads(LONG_STUDY.read_text())
  _assert_every_run_whole(results, LONG_VARIANTS, 16000)
  # 48.6 MB of documentation hold 325,798 training chunks: 16,000 steps of 16 read 256,000 of
  # them, each once.
  assert results["steps"] * results["batch_size"] <= 325_798


ABLATIONS = ROOT / "notebooks" / "beyond_switch_16k_ablations.json"


def test_stored_ablations_are_a_two_by_two_for_two_seeds():
  """The halves of DeepSeek-V3's combination: every run is the shared + fine-grained experts
  with the bias, the sigmoid gating, both or neither, as study_variants(ablations=True) makes
  them, for 16,000 steps and two seeds."""
  results = json.loads(ABLATIONS.read_text())
  halves = [v for v in scaling.study_variants(ablations=True) if "shared" in v.name]
  _assert_every_run_whole(results, [v.name for v in halves], 16000)
  extras = {v.name: list(v.extra) for v in halves}
  assert all(run["extra"] == extras[run["name"]] for run in results["runs"])
  assert results["steps"] * results["batch_size"] <= 325_798  # each chunk read once


if __name__ == "__main__":  # re-execute the notebook on the stored results and store its outputs
  os.chdir(NOTEBOOK.parent)
  executed, _ = run_notebook(NOTEBOOK)
  nbformat.write(executed, NOTEBOOK)
  print(f"Wrote {NOTEBOOK} ({NOTEBOOK.stat().st_size / 1e3:.0f} kB).", file=sys.stderr)
