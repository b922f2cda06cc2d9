"""Smoke test of scripts/benchmark.py (the repository's benchmarks/): every section runs and reports
sane figures.

Speed itself is never asserted (timings here are noise); the benchmark reports ratios.
"""

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

from benchmarks import machine, moe_layer
from switchjax import huge_pages

ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCHMARK = str(ROOT / "scripts" / "benchmark.py")


def numbers(tree, path="results"):
  """(path, value) of every number in a JSON tree (booleans are not numbers here)."""
  if isinstance(tree, dict):
    for k, v in tree.items():
      yield from numbers(v, f"{path}.{k}")
  elif isinstance(tree, list):
    for i, v in enumerate(tree):
      yield from numbers(v, f"{path}[{i}]")
  elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
    yield path, tree


@pytest.mark.slow
def test_benchmark_quick_reports_every_section(tmp_path):
  out = tmp_path / "benchmark.json"
  # conftest's XLA_FLAGS (8 emulated devices) are inherited: the default 2x4x1 mesh runs.
  proc = subprocess.run(
    [sys.executable, BENCHMARK, "--quick", "--json", str(out)],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stdout + proc.stderr
  for title in ("## MoE layer", "## Train step", "## Greedy generation", "## vs transformers"):
    assert title in proc.stdout, proc.stdout
  results = json.loads(out.read_text())

  assert set(results) == {"env", "moe", "train", "generate", "vs_hf"}
  assert results["env"]["device_count"] >= 8 and results["env"]["jax"]
  assert results["env"]["cpu_count"] >= 1 and results["env"]["torch"]
  assert results["env"]["usable_cores"] == len(os.sched_getaffinity(0))
  assert results["env"]["matmul_peak_tflops"] > 0
  assert results["env"]["load_average_1min"] >= 0
  # restarted once, for the XLA flags and with huge pages where the host grants them
  expected = (huge_pages.environment() or os.environ).get("GLIBC_TUNABLES", "")
  assert results["env"]["glibc_tunables"] == expected
  assert len(results["moe"]) >= 2
  for row in results["moe"]:
    for name in moe_layer.VARIANTS:  # every dispatch timed, with its compiled memory
      assert row[name]["ms"] > 0 and row[name]["memory_bytes"]["temp"] > 0
      assert row[f"{name}_over_dense"] > 0 and row["dense"]["ms"] > 0
    for name in ("buffers", "sorted", "scatter"):
      assert row[f"{name}_over_einsum_time"] > 0
      assert row[f"{name}_over_einsum_total_memory"] > 0
  assert len({row["experts"] for row in results["moe"]}) >= 2
  # The same converted model in transformers: same greedy tokens, both timed.
  (hf,) = results["vs_hf"].values()
  assert hf["generate"]["same_tokens"] is True
  for part in ("generate", "train_step"):
    assert hf[part]["speedup"] > 0 and hf[part]["transformers"]["tokens_per_s"] > 0
  for name in ("transformers", "switchjax"):
    assert 0 < hf["train_step"][name]["mfu"] < 10
  first = hf["train_step"]["first_loss"]
  assert abs(first["transformers"] - first["switchjax"]) < 1e-4 * first["transformers"]
  runs = results["train"]["runs"]
  assert set(runs) == {"1 device", "mesh 2x4x1"}
  assert runs["mesh 2x4x1"]["devices"] == 8
  for run in runs.values():
    assert run["tokens_per_s"] > 0 and run["model_tflops_per_s"] > 0 and run["ms_per_step"] > 0
    assert run["mfu"] > 0
  assert results["train"]["mesh_over_1_device_time"] > 0
  for mode in ("cached", "uncached"):
    assert results["generate"][mode]["tokens_per_s"] > 0
  assert results["generate"]["cache_speedup"] > 0

  found = list(numbers(results))
  assert len(found) > 50
  bad = [(p, v) for p, v in found if not (math.isfinite(v) and v > 0)]
  assert not bad, bad

  # The docs page is rendered from the JSON: every section, the run's own figures.
  page = tmp_path / "benchmarks.md"
  done = subprocess.run(
    [sys.executable, ROOT / "scripts" / "benchmark_report.py", out, "--out", page],
    capture_output=True,
    text=True,
  )
  assert done.returncode == 0, done.stderr
  text = page.read_text()
  for title in ("## MoE layer", "## Train step", "## Greedy generation", "## vs transformers"):
    assert title in text
  assert results["env"]["command"] in text
  assert f"{results['generate']['cache_speedup']:.2f}" in text


def test_a_loaded_machine_is_warned_about(capsys):
  assert machine.warn_if_loaded(1.5, 2) is True
  assert capsys.readouterr().out == (
    "warning: the load average is 1.50 on 2 cores: other jobs are running. Ratios against "
    "transformers are not reliable under load; rerun on a quiet machine.\n"
  )
  assert machine.warn_if_loaded(0.4, 2) is False
  assert capsys.readouterr().out == ""


def test_usable_cores_follow_the_affinity_that_cpu_count_ignores():
  allowed = os.sched_getaffinity(0)
  assert machine.usable_cores() == len(allowed)
  os.sched_setaffinity(0, {min(allowed)})  # as `taskset -c N`, for this thread
  try:
    assert machine.usable_cores() == 1
    assert os.cpu_count() >= len(allowed)
  finally:
    os.sched_setaffinity(0, allowed)


def test_moe_ratios_divide_each_variant_by_dense_einsum_flaxformer_and_the_first_expert_count():
  def run(ms, temp):
    return {"ms": ms, "memory_bytes": {"temp": temp, "total": 2 * temp}}

  times = {8: (120.0, 90.0, 60.0, 96.0, 110.0), 128: (240.0, 180.0, 180.0, 192.0, 330.0)}
  rows = [
    {"experts": e, "dense": run(100.0, 1)}
    | {name: run(ms, t) for name, ms, t in zip(moe_layer.VARIANTS, times[e], (4, 2, 1, 2, 1))}
    for e in times
  ]
  rows[0]["flaxformer"] = run(150.0, 8)
  first, second = moe_layer.moe_ratios(rows)
  assert first["einsum_over_dense"] == 1.2
  assert first["dropless_over_E8"] == 1.0
  assert first["buffers_over_einsum_time"] == 0.75 and first["sorted_over_einsum_time"] == 0.5
  assert first["scatter_over_einsum_total_memory"] == 0.5
  assert first["einsum_over_flaxformer"] == 0.8 and first["flaxformer_over_dense"] == 1.5
  assert first["sorted_over_flaxformer"] == 0.4
  assert second["einsum_over_E8"] == 2.0 and second["sorted_over_E8"] == 3.0
  assert second["dropless_over_E8"] == 3.0
  assert "einsum_over_flaxformer" not in second
