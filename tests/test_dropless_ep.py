"""Dropless expert parallelism (`switchjax.moe.expert_parallel`): on a mesh with an expert
axis, the dropless layer moves each choice to its expert's device by all-to-all and back.

With buffers large enough it equals the one-device dropless layer (outputs and gradients);
with a small cap, the choices beyond it contribute 0 and are counted in
fraction_choices_capped.
"""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from match import words

from switchjax import load_config, losses, pod, sharding, topologies
from switchjax.activations import activation_fn
from switchjax.config import MeshConfig, MoeConfig
from switchjax.equivalence import run_on_mesh
from switchjax.moe import MoeLayer, expert_parallel
from switchjax.training import resume_rules, train

NUM_EXPERTS, K = 8, 2


def _layer(
  factor: float,
  dispatch: str = "auto",
  router_type: str = "tokens_choose_dropless",
  collective: str = "all_to_all",
):
  """A top-2 GEGLU dropless layer (8 experts, groups of 16), its params, inputs [16, 16, 16]
  and grad_fn(params, x) = (gradients of sum(y * cos(y)), (y, sown intermediates))."""
  config = MoeConfig(
    num_experts=NUM_EXPERTS,
    router_type=router_type,
    num_selected_experts=K,
    max_group_size=16,
    dispatch=dispatch,
    dropless_ep_capacity_factor=factor,
    dropless_ep_collective=collective,
  )
  layer = MoeLayer(config, d_ff=32, activations=("gelu", "linear"))
  x = jax.random.normal(jax.random.key(1), (16, 16, 16))
  boxed = jax.eval_shape(lambda: layer.init(jax.random.key(0), x))["params"]
  params = nn.unbox(layer.init(jax.random.key(0), x))["params"]

  def loss_and_outputs(params, x):
    y, state = layer.apply({"params": params}, x, enable_dropout=True, mutable=["intermediates"])
    return jnp.sum(y * jnp.cos(y)), (y, state["intermediates"])

  return boxed, params, x, jax.grad(loss_and_outputs, has_aux=True)


def _assert_close_trees(got, expected, what):
  for (path, g), e in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(expected)):
    np.testing.assert_allclose(
      np.asarray(g), np.asarray(e), atol=1e-5, err_msg=f"{what} {jax.tree_util.keystr(path)}"
    )


@pytest.mark.slow
@pytest.mark.parametrize("router_type", ["tokens_choose_dropless", "tokens_choose_masked"])
@pytest.mark.parametrize("shape", [(1, 8, 1), (2, 4, 1)])
def test_expert_parallel_dropless_equals_one_device(shape, router_type):
  """The dropless router, and a capacity router's kept choices (dispatch 'sorted'), with
  buffers as large as a device's choices (factor = expert shards: nothing capped)."""
  boxed, params, x, grad_fn = _layer(float(shape[1]), "sorted", router_type)
  ref_grads, (ref_y, ref_sown) = jax.jit(grad_fn)(params, x)
  assert "fraction_choices_capped" not in ref_sown  # one device: the unchanged path
  grads, (y, sown), hlo = run_on_mesh(shape, boxed, params, x, grad_fn)
  np.testing.assert_allclose(np.asarray(y), np.asarray(ref_y), atol=1e-5)
  _assert_close_trees(grads, ref_grads, str(shape))
  assert float(sown["fraction_choices_capped"][0]) == 0.0
  for name in ("fraction_choices_dropped", "load_imbalance", "expert_usage"):
    np.testing.assert_allclose(float(sown[name][0]), float(ref_sown[name][0]), atol=1e-6)
  # Expert weights stay split over the expert axis; tokens travel by all-to-all; no device
  # gathers tokens (or anything else: the program has no all-gather at all).
  assert grads["wo"].sharding.spec[0] == "expert"
  assert pod.count_collectives(hlo)["all-to-all"] >= 2
  assert pod.all_gather_shapes(hlo) == []


def _expected_capped(router_logits, shards: int, cap: int):
  """NumPy reference of the cap: each token shard's choices (token-major) in order, ranked
  within their destination expert shard; ranks >= cap are capped.

  Returns (expert_index [tokens, k], weights [tokens, k], capped <bool>[tokens, k])."""
  logits = np.asarray(router_logits, np.float32).reshape(-1, NUM_EXPERTS)
  probs = np.asarray(jax.nn.softmax(jnp.asarray(logits), axis=-1))
  weights, expert_index = (np.asarray(a) for a in jax.lax.top_k(jnp.asarray(probs), K))
  token_shards = 8  # data x expert devices
  per_shard = expert_index.reshape(token_shards, -1)  # [shards, choices], token-major
  destination = per_shard // (NUM_EXPERTS // shards)
  capped = np.zeros_like(per_shard, bool)
  for s in range(token_shards):
    for d in range(shards):
      mine = np.flatnonzero(destination[s] == d)
      capped[s, mine[cap:]] = True
  return expert_index, weights, capped.reshape(expert_index.shape)


@pytest.mark.slow
def test_capped_choices_are_counted_and_contribute_zero():
  shape, factor = (2, 4, 1), 0.5
  boxed, params, x, grad_fn = _layer(factor)
  _, (_, ref_sown) = jax.jit(grad_fn)(params, x)
  _, (y, sown), _ = run_on_mesh(shape, boxed, params, x, grad_fn)
  choices_per_device = x.shape[0] * x.shape[1] * K // 8
  cap = expert_parallel.send_capacity(choices_per_device, shape[1], factor)
  assert cap == 8  # ceil(0.5 x 64 / 4)
  expert_index, weights, capped = _expected_capped(ref_sown["router_logits"][0], shape[1], cap)
  assert 0 < capped.sum() < capped.size
  np.testing.assert_allclose(
    float(sown["fraction_choices_capped"][0]), capped.sum() / capped.size, rtol=1e-6
  )
  np.testing.assert_allclose(
    float(sown["fraction_choices_dropped"][0]), capped.sum() / capped.size, rtol=1e-6
  )
  # The layer's outputs from the served choices only, computed here expert by expert.
  tokens = np.asarray(x).reshape(-1, x.shape[-1])
  gelu = activation_fn("gelu")
  expected = np.zeros_like(tokens)
  for t in range(tokens.shape[0]):
    for j in range(K):
      if capped[t, j]:
        continue
      e = expert_index[t, j]
      h = gelu(tokens[t] @ params["wi_0"][e]) * (tokens[t] @ params["wi_1"][e])
      expected[t] += weights[t, j] * np.asarray(h @ params["wo"][e])
  np.testing.assert_allclose(np.asarray(y).reshape(tokens.shape), expected, atol=1e-5)
  all_capped = capped.all(axis=-1)
  if all_capped.any():  # tokens whose every choice was capped get exactly 0
    np.testing.assert_array_equal(np.asarray(y).reshape(tokens.shape)[all_capped], 0.0)


def test_send_capacity_and_setting():
  assert expert_parallel.send_capacity(64, 4, 2.0) == 32
  assert expert_parallel.send_capacity(64, 4, 8.0) == 64  # never more than all choices
  assert expert_parallel.send_capacity(3, 8, 0.1) == 1
  assert MoeConfig().dropless_ep_capacity_factor == 2.0
  with pytest.raises(ValueError, match=words("moe.dropless_ep_capacity_factor=0", "> 0")):
    MoeConfig(dropless_ep_capacity_factor=0.0).validate()
  # A cap, like a capacity factor: allowed on resume.
  assert resume_rules.rule_of("model.moe.dropless_ep_capacity_factor") == resume_rules.OPTIMISATION


def test_capped_share_is_logged_per_layer_and_averaged():
  def layer(capped):
    sown = {name: (jnp.float32(0.0),) for name in losses.ROUTING_METRICS}
    return {**sown, "fraction_choices_capped": (jnp.float32(capped),)}

  _, metrics = losses.moe_losses_and_metrics(
    {"encoder": {"mlp": layer(0.25)}, "decoder": {"mlp": layer(0.75)}}, 0.01, 0.0
  )
  assert float(metrics["layers/encoder/mlp/fraction_choices_capped"]) == 0.25
  assert float(metrics["fraction_choices_capped"]) == 0.5


@pytest.mark.slow
def test_dropless_training_on_an_expert_mesh_matches_one_device(tmp_path):
  """The tiny model (scanned layers) trained with the dropless router: the same losses on
  one device and expert-parallel on (2, 4, 1), nothing capped, the capped share logged."""

  def run(workdir, *overrides, devices=None):
    settings = [
      "model.scan_layers=true",
      "model.moe.router_type=tokens_choose_dropless",
      "model.moe.group_multiple=8",  # the same routing groups on both
      "model.moe.dropless_ep_capacity_factor=4.0",  # = expert shards: nothing capped
      "train.num_train_steps=3",
      "train.log_every=1",
      "train.eval_every=0",
    ]
    config = load_config("tiny", settings + list(overrides))
    return train(config, workdir, devices=devices, progress=False, log=lambda _: None)

  one = run(tmp_path / "one", devices=jax.devices()[:1])
  eight = run(tmp_path / "eight", "mesh.data=2", "mesh.expert=4")
  for step in one.losses:
    np.testing.assert_allclose(eight.losses[step], one.losses[step], atol=1e-5, rtol=0)
  records = [json.loads(x) for x in (tmp_path / "eight" / "metrics.jsonl").read_text().splitlines()]
  capped = [r["fraction_choices_capped"] for r in records if "fraction_choices_capped" in r]
  assert capped == [0.0] * 3


@pytest.mark.slow
def test_ragged_collective_compiles_for_a_tpu_slice():
  """moe.dropless_ep_collective='ragged' (XLA:CPU cannot run it) compiles, forward and
  backward, for a v5p-8 slice described by libtpu: the program moves the buffers by
  ragged-all-to-all."""
  boxed, params, x, grad_fn = _layer(2.0, collective="ragged")
  devices = topologies.slice_devices(topologies.parse_slice("v5p-8"))
  mesh = sharding.make_mesh(MeshConfig(1, 4, 1), num_experts=NUM_EXPERTS, devices=devices)
  abstract = lambda tree, shardings: jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings
  )
  param_sharding = sharding.param_shardings(mesh, boxed)
  args = abstract(params, param_sharding), abstract(x, sharding.batch_sharding(mesh))
  with jax.set_mesh(mesh), sharding.axis_rules():
    hlo = jax.jit(grad_fn).lower(*args).compile().as_text()
  assert "ragged-all-to-all" in hlo
  assert pod.all_gather_shapes(hlo) == []


def _emulated_ragged_all_to_all(
  operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *, axis_name
):
  """jax.lax.ragged_all_to_all as its docstring defines it, from a dense all-to-all (which
  XLA:CPU runs): rows [input_offsets[j], + send_sizes[j]) of `operand` land at
  output_offsets[j] of device j's `output`."""
  rows = operand.shape[0]
  r = jnp.arange(rows)
  pieces = operand[jnp.clip(input_offsets[:, None] + r, 0, rows - 1)]  # [devices, rows, ...]
  valid = r < send_sizes[:, None]
  at = jnp.where(valid, output_offsets[:, None] + r, rows)  # rows: nowhere
  move = lambda a: jax.lax.all_to_all(a, axis_name, 0, 0, tiled=True)
  pieces, at = move(pieces), move(at)  # [sources, rows, ...]
  return output.at[at.reshape(-1)].set(pieces.reshape(-1, *operand.shape[1:]), mode="drop")


@pytest.mark.slow
def test_ragged_collective_moves_the_same_rows(monkeypatch):
  """The ragged transport's offsets and sizes, run through an emulation of
  ragged_all_to_all's documented semantics on the CPU mesh, give the fixed buffers' outputs
  and gradients, with choices capped."""
  monkeypatch.setattr(jax.lax, "ragged_all_to_all", _emulated_ragged_all_to_all)
  fixed = _layer(0.5)
  ragged = _layer(0.5, collective="ragged")
  (grads, (y, sown), _), (ref_grads, (ref_y, ref_sown), _) = (
    run_on_mesh((2, 4, 1), *case) for case in (ragged, fixed)
  )
  assert float(ref_sown["fraction_choices_capped"][0]) > 0
  np.testing.assert_allclose(np.asarray(y), np.asarray(ref_y), atol=1e-6)
  _assert_close_trees(grads, ref_grads, "ragged")
  assert float(sown["fraction_choices_capped"][0]) == float(ref_sown["fraction_choices_capped"][0])


@pytest.mark.slow
def test_a_decoding_step_is_never_capped():
  """A cached decoding step (one token per sequence) routes without capacity; on an expert
  mesh its buffers hold all of a device's choices whatever the factor: nothing capped, the
  one-device outputs."""
  config = MoeConfig(
    num_experts=NUM_EXPERTS,
    num_selected_experts=K,
    max_group_size=16,
    dropless_ep_capacity_factor=0.01,
  )
  layer = MoeLayer(config, d_ff=32, activations=("relu",))
  x = jax.random.normal(jax.random.key(3), (16, 1, 16))
  params = nn.unbox(layer.init(jax.random.key(0), x))["params"]
  params["router"]["kernel"] = params["router"]["kernel"] * 100  # confident: many collide

  def step(params, x):
    y, state = layer.apply({"params": params}, x, decode=True, mutable=["intermediates"])
    return y, state["intermediates"]

  ref_y, ref_sown = jax.jit(step)(params, x)
  mesh = sharding.make_mesh(MeshConfig(1, 8, 1), num_experts=NUM_EXPERTS)
  with jax.set_mesh(mesh), sharding.axis_rules():
    y, sown = jax.jit(step)(params, jax.device_put(x, sharding.batch_sharding(mesh)))
  assert float(sown["fraction_choices_capped"][0]) == 0.0
  np.testing.assert_allclose(np.asarray(y), np.asarray(ref_y), atol=1e-5)
