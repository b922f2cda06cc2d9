"""Parity with the original flaxformer MoeLayer on its golden cases.

Every `.npz` in tests/fixtures/flaxformer_moe (and in $SWITCHJAX_FLAXFORMER_FIXTURES, a directory
of more cases, if set) is one run of flaxformer's layer; the format is described in that
directory's README. The case is rebuilt through switchjax's public API
(`switchjax.equivalence.load_golden_case`) and must give the same outputs (atol 1e-5) and the
same five routing metrics (rtol 1e-5).
"""

import pathlib
import subprocess
import sys

import numpy as np
import pytest
from match import words

from switchjax import equivalence

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures" / "flaxformer_moe"
CASES = equivalence.golden_case_paths(FIXTURES)


def test_fixture_directory_has_cases():
  assert {p.stem for p in CASES} >= {
    "experts_choose",
    "switch_top1_masked_eval",
    "switch_top1_masked_train_overflow",
    "top1_masked_padding_geglu",
    "top1_scatter",
    "top2_masked_bpr",
  }, f"the flaxformer golden cases are missing from {FIXTURES}"


@pytest.mark.parametrize("dispatch", equivalence.DISPATCHES)
@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_moe_layer_matches_flaxformer(path, dispatch):
  case = equivalence.load_golden_case(path)
  outputs, metrics = equivalence.run_golden_case(case, dispatch)
  np.testing.assert_allclose(outputs, case.outputs, atol=1e-5, rtol=0)
  for name in equivalence.METRICS:
    np.testing.assert_allclose(
      metrics[name], case.metrics[name], rtol=1e-5, atol=1e-7, err_msg=name
    )


GRADIENTS = sorted((FIXTURES.parent / "flaxformer_moe_gradients").glob("*.npz"))
GRAD_TOL = 1e-5  # of an array's largest |gradient|; measured <= 2.2e-7


def test_every_case_has_flaxformer_gradients():
  assert {p.stem for p in GRADIENTS} == {p.stem for p in FIXTURES.glob("*.npz")}


@pytest.mark.parametrize("dispatch", equivalence.DISPATCHES)
@pytest.mark.parametrize("path", GRADIENTS, ids=[p.stem for p in GRADIENTS])
def test_gradients_match_flaxformer(path, dispatch):
  """The backward pass: switchjax's gradients of sum(outputs * cotangent), of the auxiliary
  loss and of the router z-loss w.r.t. the inputs and every weight equal flaxformer's
  (scripts/make_gradient_cases.py), through each dispatch of the experts. Where flaxformer's
  gradient is exactly 0 (the router losses do not reach the experts; experts-choose has no
  auxiliary loss), switchjax's is too."""
  name, cotangent, expected = equivalence.load_gradient_case(path)
  case = equivalence.load_golden_case(FIXTURES / f"{name}.npz")
  ours = equivalence.golden_gradients(case, cotangent, dispatch)
  assert set(ours) == set(expected)
  for key, want in expected.items():
    scale = np.abs(want).max()
    if scale == 0:
      assert not np.any(ours[key]), key
    else:
      np.testing.assert_allclose(ours[key], want, rtol=0, atol=GRAD_TOL * scale, err_msg=key)


def test_extra_cases_directory(tmp_path, monkeypatch):
  # $SWITCHJAX_FLAXFORMER_FIXTURES adds cases after the repository's; a bad value is one line.
  monkeypatch.delenv(equivalence.FIXTURES_ENV, raising=False)
  own = equivalence.golden_case_paths(FIXTURES)
  assert own == sorted(FIXTURES.glob("*.npz")) and len(own) == 6
  (tmp_path / "extra_case.npz").write_bytes((FIXTURES / "top1_scatter.npz").read_bytes())
  monkeypatch.setenv(equivalence.FIXTURES_ENV, str(tmp_path))
  assert equivalence.golden_case_paths(FIXTURES) == [*own, tmp_path / "extra_case.npz"]
  monkeypatch.setenv(equivalence.FIXTURES_ENV, str(FIXTURES))  # The same files count once.
  assert equivalence.golden_case_paths(FIXTURES) == own
  monkeypatch.setenv(equivalence.FIXTURES_ENV, str(tmp_path / "nowhere"))
  setting = f"SWITCHJAX_FLAXFORMER_FIXTURES={str(tmp_path / 'nowhere')!r}"
  with pytest.raises(ValueError, match=words(setting, "is not a directory", "or unset it")):
    equivalence.golden_case_paths(FIXTURES)


def test_a_file_that_is_not_a_case_is_named(tmp_path):
  np.savez(tmp_path / "other.npz", inputs=np.zeros(3))
  lacks = "it lacks meta_json, outputs, router_kernel"
  match = words(tmp_path / "other.npz", "is not a flaxformer golden case", lacks, "README.md")
  with pytest.raises(ValueError, match=match):
    equivalence.load_golden_case(tmp_path / "other.npz")


@pytest.mark.slow
def test_equivalence_report_prints_every_case():
  script = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "equivalence_report.py"
  out = subprocess.run(
    [sys.executable, str(script), "fixtures"], capture_output=True, text=True, check=True
  ).stdout
  for path in CASES:
    line = next(row for row in out.splitlines() if row.strip().startswith(path.stem))
    assert float(line.split("outputs")[1].split()[0]) <= 1e-5
  gradients = out.split("Their gradients vs flaxformer's")[1].splitlines()[1:]
  for path in GRADIENTS:
    line = next(row for row in gradients if row.strip().startswith(path.stem))
    assert max(float(line.split(d)[1].split()[0]) for d in ("buffers", "sorted")) <= GRAD_TOL


def test_a_file_that_is_not_a_gradient_case_is_named(tmp_path):
  np.savez(tmp_path / "other.npz", cotangent=np.zeros(3))
  not_a_case = "is not a flaxformer gradient case: it lacks meta_json, gradients"
  match = words(tmp_path / "other.npz", not_a_case, "flaxformer_moe_gradients/README.md")
  with pytest.raises(ValueError, match=match):
    equivalence.load_gradient_case(tmp_path / "other.npz")
