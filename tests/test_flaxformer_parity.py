"""Parity with the original flaxformer MoeLayer on its golden cases.

Every `.npz` in $SWITCHJAX_FLAXFORMER_FIXTURES (default ../shared/fixtures/flaxformer_moe) is one
run of flaxformer's layer; the format is described in that directory's README. The case is
rebuilt through switchjax's public API and must give the same outputs (atol 1e-5) and the same
five routing metrics (rtol 1e-5).
"""

import json
import os
import pathlib

import jax
import numpy as np
import pytest

import switchjax

FIXTURES = pathlib.Path(
  os.environ.get(
    "SWITCHJAX_FLAXFORMER_FIXTURES",
    pathlib.Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "flaxformer_moe",
  )
)
CASES = sorted(FIXTURES.glob("*.npz"))
METRICS = (
  "auxiliary_loss",
  "router_z_loss",
  "fraction_tokens_left_behind",
  "expert_usage",
  "router_confidence",
)


def load_case(path):
  """(layer, params, inputs, train, expected outputs, expected metrics) of one golden case."""
  data = np.load(path)
  meta = json.loads(bytes(data["meta_json"]))
  config = switchjax.MoeConfig(
    num_experts=meta["E"],
    router_type=meta["router"],
    num_selected_experts=meta["k"] if meta.get("k") else 1,
    batch_prioritized_routing=bool(meta.get("bpr", False)),
    ignore_padding_tokens=bool(meta.get("pad", False)),
    max_group_size=meta["group"],
    train_capacity_factor=meta["cf_train"],
    eval_capacity_factor=meta["cf_eval"],
    min_expert_capacity=meta["min_cap"],
    # flaxformer's default NUM_EXPERT_PARTITIONS = E: on one device, groups are a multiple of E.
    group_multiple=meta["E"],
  )
  acts = tuple(meta["acts"])
  layer = switchjax.MoeLayer(config, d_ff=meta["F"], activations=acts, dropout_rate=0.0)
  params = {"router": {"kernel": data["router_kernel"]}, "wo": data["expert_wo"]}
  if len(acts) == 1:
    params["wi"] = data["expert_wi"]
  else:
    params.update({f"wi_{i}": data[f"expert_wi_{i}"] for i in range(len(acts))})
  return layer, params, data["inputs"], bool(meta["train"]), data["outputs"], meta


def test_fixture_directory_has_cases():
  assert CASES, (
    f"no .npz cases in {FIXTURES}; set SWITCHJAX_FLAXFORMER_FIXTURES to the "
    "directory of flaxformer golden cases"
  )


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_moe_layer_matches_flaxformer(path):
  layer, params, inputs, train, expected, meta = load_case(path)
  outputs, state = layer.apply(
    {"params": params},
    inputs,
    enable_dropout=train,
    mutable=["intermediates"],
    rngs={"dropout": jax.random.key(0), "jitter": jax.random.key(1)},
  )
  np.testing.assert_allclose(np.asarray(outputs), expected, atol=1e-5, rtol=0)
  sown = state["intermediates"]
  for name in METRICS:
    np.testing.assert_allclose(
      float(sown[name][0]), meta["metrics"][name], rtol=1e-5, atol=1e-7, err_msg=name
    )


def test_equivalence_report_prints_every_case():
  import subprocess
  import sys

  script = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "equivalence_report.py"
  out = subprocess.run(
    [sys.executable, str(script), "fixtures"], capture_output=True, text=True, check=True
  ).stdout
  for path in CASES:
    line = next(row for row in out.splitlines() if row.strip().startswith(path.stem))
    assert float(line.split("outputs")[1].split()[0]) <= 1e-5
