"""Writes flaxformer's gradients on the golden MoE cases: for each case of --cases, the
original flaxformer MoeLayer (from the tarballs in --refs) is rebuilt with the case's settings
and weights, checked to give the case's outputs, and differentiated (switchjax.equivalence.
layer_gradients: sum(outputs * cotangent), the auxiliary loss and the router z-loss, w.r.t.
the inputs and every weight). The files are what tests/test_flaxformer_parity.py compares
switchjax's gradients with; the format is in the output directory's README.

  python scripts/make_gradient_cases.py --refs ../shared/refs \\
      --cases tests/fixtures/flaxformer_moe --out tests/fixtures/flaxformer_moe_gradients
"""

import argparse
import json
import pathlib
import sys
import zlib

import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # the repository's benchmarks/

from benchmarks.flaxformer import (
  flaxformer_arrays,
  flaxformer_layer,
  flaxformer_params,
  load_flaxformer,
)
from switchjax import equivalence


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--refs", required=True, help="directory of flaxformer-*.tgz")
  parser.add_argument("--cases", required=True, help="directory of golden cases (.npz)")
  parser.add_argument("--out", required=True, help="directory to write the gradient files to")
  return parser.parse_args(argv)


def gradient_case(flaxformer, source: str, case: equivalence.GoldenCase) -> dict:
  """The arrays of one gradient file; raises SystemExit if flaxformer's outputs are not the
  case's (then the rebuilt layer is not the one that made the case)."""
  layer = flaxformer_layer(flaxformer, case.layer.config, case.meta["F"], case.meta["acts"])
  params = flaxformer_params(equivalence.case_arrays(case.params))
  outputs = layer.apply({"params": params}, case.inputs, enable_dropout=case.train)
  error = float(np.abs(np.asarray(outputs) - case.outputs).max())
  if error > 1e-6:
    sys.exit(f"{case.path}: flaxformer's outputs differ from the case's by {error:.3g}.")
  rng = np.random.default_rng(zlib.crc32(case.name.encode()))
  cotangent = rng.standard_normal(case.outputs.shape).astype(np.float32)
  grads = equivalence.layer_gradients(layer, params, case.inputs, case.train, cotangent)
  meta = dict(case=case.name, source=f"{source} (jax {jax.__version__})", outputs_error=error)
  return {
    "cotangent": cotangent,
    "meta_json": np.frombuffer(json.dumps(meta).encode(), np.uint8),
    **equivalence.gradient_arrays(grads, flaxformer_arrays),
  }


def main(argv=None):
  args = parse_args(argv)
  flaxformer, source = load_flaxformer(pathlib.Path(args.refs))
  if flaxformer is None:
    sys.exit(f"--refs {args.refs}: {source}.")
  paths = equivalence.golden_case_paths(args.cases)
  if not paths:
    sys.exit(
      f"--cases {args.cases}: no golden cases (.npz) there; point it at a directory of them."
    )
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  for path in paths:
    case = equivalence.load_golden_case(path)
    arrays = gradient_case(flaxformer, pathlib.Path(source).name, case)
    np.savez_compressed(out / f"{case.name}.npz", **arrays)
    _, cotangent, expected = equivalence.load_gradient_case(out / f"{case.name}.npz")
    ours = equivalence.golden_gradients(case, cotangent)
    if any(ours[k].shape != v.shape for k, v in expected.items()):
      sys.exit(f"{case.name}: switchjax's gradients have other shapes than flaxformer's.")
    worst = equivalence.worst_gradient_error(ours, expected)
    print(f"{case.name}: {len(expected)} gradients; switchjax's within {worst:.2g} of the largest")


if __name__ == "__main__":
  main()
