"""Equivalence checks: the flaxformer golden cases (outputs, metrics, gradients) and expert
parallelism on device meshes.

The tests (`tests/test_flaxformer_parity.py`, `tests/test_sharding.py`) bound these figures and
`scripts/equivalence_report.py` prints them; both use this module, so the report measures
exactly what the tests check.

- Golden cases: each `.npz` is one run of the original flaxformer `MoeLayer` (the format is in
  `tests/fixtures/flaxformer_moe/README.md`). `load_golden_case` rebuilds it through switchjax's
  public API (a `MoeLayer` plus its parameters) and `run_golden_case` gives the layer's outputs
  and its five routing metrics, to compare with the expected ones. The repository's cases live
  in `tests/fixtures/flaxformer_moe`; $SWITCHJAX_FLAXFORMER_FIXTURES names a directory of more.
- Their gradients: `layer_gradients` differentiates a layer (flaxformer's or switchjax's) on a
  case; `scripts/make_gradient_cases.py` stored flaxformer's in
  `tests/fixtures/flaxformer_moe_gradients` (`load_gradient_case`), and `golden_gradients` gives
  switchjax's under the same names.
- Meshes: `mesh_test_layer` builds a small MoE layer and its gradient function, and
  `run_on_mesh` runs it on a ('data', 'expert', 'model') mesh of the given shape, returning the
  gradients, the outputs and the compiled program's text (to look for all-to-all ops).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from switchjax import sharding
from switchjax.config import MeshConfig, MoeConfig
from switchjax.moe import MoeLayer

FIXTURES_ENV = "SWITCHJAX_FLAXFORMER_FIXTURES"
METRICS = (
  "auxiliary_loss",
  "router_z_loss",
  "fraction_tokens_left_behind",
  "expert_usage",
  "router_confidence",
)
# (data, expert, model) shapes of 8 devices on which the layer must equal the single-device one.
MESHES = ((1, 8, 1), (2, 4, 1), (4, 2, 1), (2, 2, 2))


# --------------------------------------------------------------------------------------------
# flaxformer golden cases.


@dataclasses.dataclass(frozen=True)
class GoldenCase:
  """One flaxformer run rebuilt as a switchjax layer.

  Attributes:
    path: the .npz file.
    layer: the switchjax MoeLayer with the case's settings.
    params: its parameters (the flaxformer run's router and expert weights).
    inputs: float32 [batch, length, d_model].
    train: whether the layer ran in training mode (train capacity factor, dropout rngs).
    outputs: the expected outputs [batch, length, d_model].
    metrics: the expected routing metrics (the names in METRICS).
    meta: the case's whole meta_json.
  """

  path: pathlib.Path
  layer: MoeLayer
  params: dict[str, Any]
  inputs: np.ndarray
  train: bool
  outputs: np.ndarray
  metrics: dict[str, float]
  meta: dict[str, Any]

  @property
  def name(self) -> str:
    return self.path.stem


def golden_case_paths(default_dir: str | os.PathLike) -> list[pathlib.Path]:
  """The .npz cases of `default_dir`, then those of $SWITCHJAX_FLAXFORMER_FIXTURES if set.

  Each directory's cases are sorted by name; a file found twice counts once.
  """
  directories = [pathlib.Path(default_dir)]
  extra = os.environ.get(FIXTURES_ENV)
  if extra:
    if not pathlib.Path(extra).is_dir():
      raise ValueError(
        f"{FIXTURES_ENV}={extra!r} is not a directory; point it at a directory of flaxformer "
        "golden cases (.npz), or unset it to use the repository's cases only."
      )
    directories.append(pathlib.Path(extra))
  paths: list[pathlib.Path] = []
  for directory in directories:
    for path in sorted(directory.glob("*.npz")):
      if path.resolve() not in {p.resolve() for p in paths}:
        paths.append(path)
  return paths


def load_golden_case(path: str | os.PathLike) -> GoldenCase:
  """Reads one .npz case; a file without the format's arrays is a ValueError naming them."""
  path = pathlib.Path(path)
  data = np.load(path)
  missing = [k for k in ("meta_json", "inputs", "outputs", "router_kernel") if k not in data]
  if missing:
    raise ValueError(
      f"{path} is not a flaxformer golden case: it lacks {', '.join(missing)} (the format is "
      "described in tests/fixtures/flaxformer_moe/README.md)."
    )
  meta = json.loads(bytes(data["meta_json"]))
  config = MoeConfig(
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
  layer = MoeLayer(config, d_ff=meta["F"], activations=acts, dropout_rate=0.0)
  params = {"router": {"kernel": data["router_kernel"]}, "wo": data["expert_wo"]}
  if len(acts) == 1:
    params["wi"] = data["expert_wi"]
  else:
    params.update({f"wi_{i}": data[f"expert_wi_{i}"] for i in range(len(acts))})
  return GoldenCase(
    path=path,
    layer=layer,
    params=params,
    inputs=data["inputs"],
    train=bool(meta["train"]),
    outputs=data["outputs"],
    metrics={name: float(meta["metrics"][name]) for name in METRICS},
    meta=meta,
  )


DISPATCHES = ("einsum", "buffers", "sorted")  # moe.dispatch: each must reproduce flaxformer


def with_dispatch(layer: MoeLayer, dispatch: str | None) -> MoeLayer:
  """`layer` with moe.dispatch set to `dispatch` (None: as it is)."""
  if dispatch is None:
    return layer
  return layer.clone(config=dataclasses.replace(layer.config, dispatch=dispatch))


def run_golden_case(
  case: GoldenCase, dispatch: str | None = None
) -> tuple[np.ndarray, dict[str, float]]:
  """The switchjax layer's outputs and routing metrics (the names in METRICS) on the case,
  through `dispatch` (one of DISPATCHES; None: the case's)."""
  outputs, state = with_dispatch(case.layer, dispatch).apply(
    {"params": case.params},
    case.inputs,
    enable_dropout=case.train,
    mutable=["intermediates"],
    rngs={"dropout": jax.random.key(0), "jitter": jax.random.key(1)},
  )
  sown = state["intermediates"]
  return np.asarray(outputs), {name: float(sown[name][0]) for name in METRICS}


# --------------------------------------------------------------------------------------------
# flaxformer's gradients on the golden cases.

GRADIENT_TERMS = ("outputs", "auxiliary_loss", "router_z_loss")


def layer_gradients(layer, params, inputs, train: bool, cotangent) -> dict[str, dict[str, Any]]:
  """{term: {"params": gradient tree, "inputs": gradient}} of each of GRADIENT_TERMS:
  sum(outputs * cotangent) and the two router losses the layer sows (unweighted). Works for
  flaxformer's MoeLayer and switchjax's alike: both sow these names."""

  def terms(params, x):
    y, state = layer.apply(
      {"params": params},
      x,
      enable_dropout=train,
      mutable=["intermediates"],
      rngs={"dropout": jax.random.key(0), "jitter": jax.random.key(1)},
    )
    sown = state["intermediates"]  # flaxformer sows [1, 1] arrays, switchjax scalars
    return {
      "outputs": jnp.sum(y * cotangent),
      "auxiliary_loss": sown["auxiliary_loss"][0].reshape(()),
      "router_z_loss": sown["router_z_loss"][0].reshape(()),
    }

  jacobian = jax.jit(jax.jacrev(terms, argnums=(0, 1)))(params, inputs)
  return {t: {"params": jacobian[t][0], "inputs": jacobian[t][1]} for t in GRADIENT_TERMS}


def case_arrays(params: dict[str, Any]) -> dict[str, np.ndarray]:
  """A golden case's switchjax parameters (or their gradients) under the case file's names:
  router_kernel, expert_wi (or expert_wi_0, expert_wi_1) and expert_wo."""
  arrays = {"router_kernel": np.asarray(params["router"]["kernel"])}
  arrays.update({f"expert_{k}": np.asarray(v) for k, v in params.items() if k != "router"})
  return arrays


def gradient_arrays(gradients: dict[str, dict[str, Any]], names) -> dict[str, np.ndarray]:
  """`layer_gradients`' result as flat arrays '<term>.<name>' (name: inputs or a case array
  name), `names` mapping a parameter gradient tree to case array names."""
  flat = {}
  for term, grads in gradients.items():
    flat[f"{term}.inputs"] = np.asarray(grads["inputs"])
    flat.update({f"{term}.{k}": v for k, v in names(grads["params"]).items()})
  return flat


def golden_gradients(
  case: GoldenCase, cotangent, dispatch: str | None = None
) -> dict[str, np.ndarray]:
  """switchjax's gradients on a golden case, as `gradient_arrays` names them, through
  `dispatch` (as in `run_golden_case`)."""
  layer = with_dispatch(case.layer, dispatch)
  grads = layer_gradients(layer, case.params, case.inputs, case.train, cotangent)
  return gradient_arrays(grads, case_arrays)


def worst_gradient_error(ours: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> float:
  """max over the arrays of max |ours - expected| / max |expected| (an all-zero expected array:
  the absolute difference)."""
  return max(
    float(np.abs(ours[k] - v).max() / (np.abs(v).max() or 1.0)) for k, v in expected.items()
  )


def load_gradient_case(path: str | os.PathLike) -> tuple[str, np.ndarray, dict[str, np.ndarray]]:
  """(golden case name, cotangent, expected gradients) of a flaxformer gradient file, written
  by scripts/make_gradient_cases.py (the format is in that directory's README)."""
  data = np.load(path)
  expected = {k: data[k] for k in data if k.split(".")[0] in GRADIENT_TERMS}
  missing = [k for k in ("meta_json", "cotangent") if k not in data] + (
    [] if expected else ["gradients"]
  )
  if missing:
    raise ValueError(
      f"{path} is not a flaxformer gradient case: it lacks {', '.join(missing)} (the format is "
      "described in tests/fixtures/flaxformer_moe_gradients/README.md)."
    )
  meta = json.loads(bytes(data["meta_json"]))
  return meta["case"], data["cotangent"], expected


# --------------------------------------------------------------------------------------------
# Expert parallelism on meshes.


def mesh_test_layer(router_type: str, dispatch: str = "auto"):
  """A GEGLU MoE layer (8 experts, groups of 16) and its gradient function, for mesh checks.

  Returns (boxed abstract params, params, inputs [16, 16, 16], grad_fn) where
  grad_fn(params, x) = (gradients of sum(y * cos(y)), y) in training mode (the layer has no
  dropout or jitter, so it needs no rngs).
  """
  config = MoeConfig(
    num_experts=8,
    router_type=router_type,
    num_selected_experts=1,
    max_group_size=16,
    train_capacity_factor=1.25,
    min_expert_capacity=1,
    dispatch=dispatch,
    # Expert-parallel dropless buffers as large as a device's choices: nothing is capped, so
    # the mesh must equal one device (tests/test_dropless_ep.py checks the cap).
    dropless_ep_capacity_factor=8.0,
  )
  layer = MoeLayer(config, d_ff=32, activations=("gelu", "linear"))
  x = jax.random.normal(jax.random.key(1), (16, 16, 16))
  boxed = jax.eval_shape(lambda: layer.init(jax.random.key(0), x))["params"]
  params = nn.unbox(layer.init(jax.random.key(0), x))["params"]

  def loss_and_outputs(params, x):
    y = layer.apply({"params": params}, x, enable_dropout=True)
    return jnp.sum(y * jnp.cos(y)), y

  return boxed, params, x, jax.grad(loss_and_outputs, has_aux=True)


def run_on_mesh(shape: tuple[int, int, int], boxed, params, x, grad_fn):
  """(gradients, outputs, compiled HLO text) of grad_fn on a (data, expert, model) mesh."""
  mesh = sharding.make_mesh(MeshConfig(*shape), num_experts=8)
  param_sharding = sharding.param_shardings(mesh, boxed)
  data_sharding = sharding.batch_sharding(mesh)
  with jax.set_mesh(mesh), sharding.axis_rules():
    step = jax.jit(grad_fn, in_shardings=(param_sharding, data_sharding))
    args = jax.device_put(params, param_sharding), jax.device_put(x, data_sharding)
    compiled = step.lower(*args).compile()  # once: run and read the same program
    grads, y = compiled(*args)
  return grads, y, compiled.as_text()
