"""TPU pods checked before they are rented: slices by name, the real train step compiled by
XLA's TPU compiler for a described v5p slice (libtpu, no TPU), and FSDP's equivalence."""

import dataclasses
import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

import switchjax
from switchjax import pod, topologies
from switchjax.sharding import batch_sharding
from switchjax.training import compile_steps, make_train_state, plan_run, state_layout

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
  ("name", "topology", "chips", "hbm_gib"),
  [
    ("v5p-8", "2x2x1", 4, 95),
    ("v5p-32", "2x2x4", 16, 95),
    ("v4-64", "2x4x4", 32, 32),
    ("v5e-16", "4x4", 16, 16),
    ("v6e-256", "16x16", 256, 32),
    ("v5p:2x2x4", "2x2x4", 16, 95),
  ],
)
def test_cloud_names_give_the_slices_topology(name, topology, chips, hbm_gib):
  tpu = topologies.parse_slice(name)
  assert (tpu.topology, tpu.chips, tpu.hbm_bytes) == (topology, chips, hbm_gib * 2**30)


def test_slices_double_in_size_and_keep_their_names():
  names = [s.name for s in topologies.standard_slices("v5p")]
  assert names[:5] == ["v5p-8", "v5p-16", "v5p-32", "v5p-64", "v5p-128"]
  chips = [s.chips for s in topologies.standard_slices("v5p")]
  assert all(b == 2 * a for a, b in zip(chips, chips[1:]))
  assert [s.chips for s in topologies.standard_slices("v6e", min_chips=16)][0] == 16
  assert topologies.parse_slice("v5p-32", num_slices=2).chips == 32


@pytest.mark.parametrize(
  ("name", "words"),
  [
    ("v7-8", "is not a TPU slice"),
    ("v5p-12", "is not a standard v5p slice; use one of v5p-8"),
    ("v5e:2x2x2", "v5e topologies have 2 axes"),
  ],
)
def test_unknown_slices_are_refused_in_one_line(name, words):
  with pytest.raises(ValueError, match=words):
    topologies.parse_slice(name)


@pytest.mark.slow
def test_tiny_compiles_for_a_v5p_slice_with_expert_parallel_all_to_alls():
  """The tiny preset on a 4-chip v5p slice (data 2 x expert 2): XLA's TPU compiler partitions
  the routing groups with all-to-alls (one sparse layer per stack: dispatch and combine,
  forward and backward) and gathers no token-sized activations; the steps fit."""
  config = switchjax.load_config("tiny", ["train.batch_size=32"])
  report = pod.simulate(config, (2, 2, 1), topologies.parse_slice("v5p-8"))
  assert report.device_kind.startswith("TPU v5") and report.platform == "v5p-8"
  assert report.collectives["all-to-all"] >= 2 * 2 * 2
  assert report.token_sized_all_gathers == [] and report.replications == 0
  assert report.fits and 0 < report.total_bytes < report.hbm_bytes
  assert report.eval_total_bytes > 0 and report.flops > 0


def test_a_mesh_that_is_not_the_slice_is_refused():
  config = switchjax.load_config("tiny", ["train.batch_size=32"])
  with pytest.raises(ValueError, match=r"needs 8 devices but the v5p-8 slice has 4"):
    pod.simulate(config, (2, 4, 1), topologies.parse_slice("v5p-8"))


def _losses(config, steps=3) -> list[float]:
  plan = plan_run(config, jax.devices()[:8])
  layout = state_layout(plan.config, plan.mesh)
  state, _ = make_train_state(layout, plan.config)
  run = compile_steps(layout, plan.config.train)
  rng = np.random.default_rng(0)
  losses = []
  for _ in range(steps):
    tokens = rng.integers(2, 600, (config.train.batch_size, 32 + 8)).astype(np.int32)
    batch = switchjax.data.make_batch(tokens[:, :32], tokens[:, 32:])
    state, metrics = run.train(state, jax.device_put(batch, batch_sharding(plan.mesh)))
    losses.append(float(metrics["loss"]))
  return losses


@pytest.mark.slow
def test_fsdp_trains_as_the_replicated_parameters_do():
  """mesh.fsdp splits parameters and optimizer state over 'data'; the updates are the same
  up to the order of float32 sums (different programs: all-reduce vs reduce-scatter)."""
  config = switchjax.load_config("tiny", ["train.batch_size=16", "mesh.data=4", "mesh.expert=2"])
  fsdp = dataclasses.replace(config, mesh=dataclasses.replace(config.mesh, fsdp=True))
  plain, sharded = _losses(config), _losses(fsdp)
  assert plain[-1] < plain[0]  # it trains
  np.testing.assert_allclose(sharded, plain, rtol=1e-5, atol=1e-5)
  plan = plan_run(fsdp, jax.devices()[:8])
  spec = state_layout(plan.config, plan.mesh).params["token_embedder"]["embedding"].sharding.spec
  assert tuple(spec) == ("model", "data")  # [vocab, d_model]: d_model over 'data' too


def test_fsdp_needs_d_model_to_split_over_data():
  config = switchjax.load_config(
    "tiny", ["train.batch_size=24", "mesh.data=3", "mesh.expert=1", "mesh.fsdp=true"]
  )
  with pytest.raises(ValueError, match=r"model.d_model=32 is not divisible by the 3 data"):
    plan_run(config, jax.devices()[:3])


@pytest.mark.slow
def test_fit_presets_finds_the_smallest_slice_and_appends(tmp_path):
  """scripts/fit_presets.py on the tiny preset: the smallest v5p slice (4 chips) holds it at
  once; a second run with --append keeps it without compiling, and the page has its row."""
  out, saved = tmp_path / "fit.md", tmp_path / "fit.json"
  command = [sys.executable, "scripts/fit_presets.py", "tiny", "--out", str(out)]
  command += ["--json", str(saved), "--max_chips", "4"]
  first = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
  assert first.returncode == 0, first.stderr[-2000:]
  assert "tiny on v5p-8" in first.stdout
  found = pod.fit_from_dict(json.loads(saved.read_text())[0])
  assert (found.config, found.report.platform, found.report.fits) == ("tiny", "v5p-8", True)
  assert found.attempts == [
    {"slice": "v5p-8", "mesh": list(found.report.mesh), "model.scan_layers": True, "fits": True}
  ]
  again = subprocess.run([*command, "--append"], cwd=ROOT, capture_output=True, text=True)
  assert again.returncode == 0, again.stderr[-2000:]
  assert "tiny on" not in again.stdout  # nothing compiled again
  assert "| tiny | " in out.read_text() and "--append" in out.read_text()


@pytest.mark.slow
def test_compare_dispatch_reports_each_dispatch_for_a_slice(tmp_path):
  """scripts/compare_dispatch.py on the tiny preset and a 4-chip v5p slice: one row per asked
  dispatch, both expert-parallel (all-to-alls, no token-sized all-gather)."""
  out, saved = tmp_path / "dispatch.md", tmp_path / "dispatch.json"
  command = [sys.executable, "scripts/compare_dispatch.py", "--case", "tiny:v5p-8"]
  command += ["--dispatch", "einsum", "--dispatch", "buffers", "--set", "train.batch_size=32"]
  done = subprocess.run(
    [*command, "--out", str(out), "--json", str(saved)], cwd=ROOT, capture_output=True, text=True
  )
  assert done.returncode == 0, done.stderr[-2000:]
  reports = json.loads(saved.read_text())
  assert [r["settings"]["dispatch"] for r in reports] == ["einsum", "buffers"]
  for r in reports:
    assert r["platform"] == "v5p-8" and r["collectives"]["all-to-all"] > 0, r
    assert r["token_sized_all_gathers"] == [] and r["flops"] > 0
  assert out.read_text().count("| tiny | v5p-8 |") == 2
