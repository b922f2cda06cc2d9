"""Dispatch without capacity buffers: grouped matmuls, the sorted dispatch of capacity routing,
the dropless router and single-token decoding steps.

Each is checked against the capacity buffers (flaxformer's computation, which the golden cases
pin down): equal outputs, gradients and metrics wherever the buffers drop nothing.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import switchjax
from switchjax import gmm, moe, routing
from switchjax.config import MoeConfig
from switchjax.equivalence import mesh_test_layer, run_on_mesh
from switchjax.model import SwitchTransformer, init_params

# --------------------------------------------------------------------------------------------
# Grouped matmul and the sorted layout.


@pytest.mark.parametrize(
  "runs, block",
  [
    ([5, 0, 1, 12, 0, 3], 1),  # empty groups and runs of many chunks
    ([5, 0, 1, 12, 0, 3], 4),
    ([2, 0, 1, 3, 0, 1], 1),  # a decoding step's few rows: one whole-rows matmul per group
  ],
)
def test_grouped_matmul_loops_equal_ragged_dot(runs, block):
  rng = np.random.default_rng(block)
  sizes = np.array(runs) * block
  rows = int(sizes.sum()) + 2 * block
  assert (rows <= gmm.WHOLE_ROWS) == (sum(runs) < 10)  # both of the loops' paths are covered
  lhs = np.zeros((rows, 6), np.float32)
  lhs[: sizes.sum()] = rng.normal(size=(sizes.sum(), 6))
  rhs = rng.normal(size=(len(sizes), 6, 5)).astype(np.float32)

  def run(implementation):
    f = lambda a, b: gmm.grouped_matmul(
      a, b, jnp.asarray(sizes), block=block, implementation=implementation
    )
    out = f(lhs, rhs)
    grads = jax.grad(lambda a, b: jnp.sum(jnp.sin(f(a, b))), argnums=(0, 1))(lhs, rhs)
    return out, grads

  out, grads = run("blocked")
  ref_out, ref_grads = run("ragged_dot")
  np.testing.assert_allclose(out, ref_out, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(out)[sizes.sum() :], 0.0)  # rows after the groups
  for g, ref in zip(grads, ref_grads):
    np.testing.assert_allclose(g, ref, atol=1e-5)
  # d rhs of a group without rows is exactly zero.
  np.testing.assert_array_equal(np.asarray(grads[1])[[1, 4]], 0.0)


def test_sorted_rows_puts_each_choice_once_in_its_experts_run():
  expert_index = jnp.array([2, 0, -1, 2, 2, 1, 0, -1, 2], jnp.int32)
  row, sizes, rows = moe.sorted_rows(expert_index, num_experts=4, block=2)
  row, sizes = np.asarray(row), np.asarray(sizes)
  assert rows == 9 + 4 * 1
  np.testing.assert_array_equal(sizes, [2, 2, 4, 0])  # counts 2, 1, 4, 0 padded to 2
  starts = np.cumsum(sizes) - sizes
  for e in range(4):
    mine = row[np.asarray(expert_index) == e]
    # An expert's choices fill the start of its run, in their original order.
    np.testing.assert_array_equal(mine, starts[e] + np.arange(len(mine)))
  np.testing.assert_array_equal(row[np.asarray(expert_index) < 0], rows)


@pytest.mark.parametrize(
  "router",
  ["tokens_choose_masked", "tokens_choose_scatter", "experts_choose_masked"],
)
def test_compact_routing_fills_each_slot_once_from_the_first(router):
  config = MoeConfig(num_experts=4, router_type=router, num_selected_experts=2)
  x = jax.random.normal(jax.random.key(0), (3, 16, 8))
  module = routing.make_router(config)
  params = module.init(jax.random.key(1), x, 3)
  route, _ = module.apply(params, x, 3)
  assert isinstance(route, routing.RouterIndices)
  expert, slot = np.moveaxis(np.asarray(route.dispatch_indices), -1, 0)
  for g in range(3):
    for e in range(4):
      taken = np.sort(slot[g][(expert[g] == e) & (slot[g] < 3)])
      np.testing.assert_array_equal(taken, np.arange(len(taken)))  # 0, 1, ... each once
  weights = np.asarray(route.combine_weights)
  assert (weights[slot >= 3] == 0).all() and (weights[slot < 3] > 0).all()
  mask = route.to_mask(4, 3)
  assert int(mask.dispatch_mask.sum(axis=1).max()) <= 1  # one token per slot
  np.testing.assert_allclose(mask.combine_array.sum(), weights.sum(), rtol=1e-6)


# --------------------------------------------------------------------------------------------
# The layer: sorted dispatch and dropless routing against the buffers.


def _layer(config, dropout_rate=0.0, activations=("gelu", "linear")):
  layer = switchjax.MoeLayer(config, d_ff=16, activations=activations, dropout_rate=dropout_rate)
  x = jax.random.normal(jax.random.key(1), (4, 16, 8))
  params = nn.unbox(layer.init(jax.random.key(0), x))["params"]
  return layer, params, x


def _run(layer, params, x, train=True, **kwargs):
  """Outputs, the gradients of sum(y * cos(y)) + aux loss, and the sown metrics."""

  def loss(params, x):
    y, state = layer.apply(
      {"params": params},
      x,
      enable_dropout=train,
      mutable=["intermediates"],
      rngs={"dropout": jax.random.key(2), "jitter": jax.random.key(3)},
      **kwargs,
    )
    sown = {k: v[0] for k, v in state["intermediates"].items()}
    return jnp.sum(y * jnp.cos(y)) + sown["auxiliary_loss"], (y, sown)

  grads, (y, sown) = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(params, x)
  return y, grads, sown


METRICS = (  # expert_usage aside: the dropless router defines it by load, not capacity
  "auxiliary_loss",
  "router_z_loss",
  "fraction_tokens_left_behind",
  "router_confidence",
  "tokens_per_expert",
)


def _assert_same(a, b, atol=1e-5, metrics=METRICS):
  (y, grads, sown), (y_ref, grads_ref, sown_ref) = a, b
  np.testing.assert_allclose(y, y_ref, atol=atol)
  for g, ref in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
    np.testing.assert_allclose(g, ref, atol=atol)
  for name in metrics:
    np.testing.assert_allclose(sown[name], sown_ref[name], rtol=1e-6, err_msg=name)


@pytest.mark.parametrize(
  "case",
  [
    dict(router_type="tokens_choose_masked", num_selected_experts=1),
    dict(router_type="tokens_choose_scatter", num_selected_experts=2),
    dict(router_type="experts_choose_masked"),
  ],
  ids=lambda c: "-".join(map(str, c.values())),
)
def test_sorted_dispatch_equals_the_buffers(case):
  """The same routing (capacity overflowing), the kept choices sorted by expert instead of
  capacity buffers: equal outputs, gradients, metrics and dropout masks."""
  config = MoeConfig(
    num_experts=4, max_group_size=16, train_capacity_factor=0.5, min_expert_capacity=1, **case
  )
  buffers, params, x = _layer(dataclasses.replace(config, dispatch="buffers"), dropout_rate=0.3)
  sorted_, _, _ = _layer(dataclasses.replace(config, dispatch="sorted"), dropout_rate=0.3)
  expected = _run(buffers, params, x)
  assert float(expected[2]["fraction_tokens_left_behind"]) > 0.1  # tokens really dropped
  _assert_same(_run(sorted_, params, x), expected, metrics=METRICS + ("expert_usage",))


@pytest.mark.parametrize("k", [1, 2])
def test_dropless_equals_masked_routing_that_drops_nothing(k):
  """Train mode with expert dropout: the same outputs, gradients (experts, router, inputs),
  losses and counts as the masked router whose capacity holds every token."""
  masked = MoeConfig(
    num_experts=4,
    num_selected_experts=k,
    max_group_size=16,
    train_capacity_factor=4.0,
    dispatch="buffers",
  )
  layer, params, x = _layer(masked, dropout_rate=0.3)
  dropless, _, _ = _layer(
    dataclasses.replace(masked, router_type="tokens_choose_dropless"), dropout_rate=0.3
  )
  expected = _run(layer, params, x)
  assert float(expected[2]["fraction_tokens_left_behind"]) == 0.0
  got = _run(dropless, params, x)
  _assert_same(got, expected)
  # Nothing is ever left behind; usage = mean load / busiest expert's load.
  sown = got[2]
  counts = np.asarray(sown["tokens_per_expert"])
  assert counts.sum() == 4 * 16 * k
  np.testing.assert_allclose(float(sown["expert_usage"]), counts.mean() / counts.max(), rtol=1e-6)


def test_dropless_drops_nothing_where_capacity_routing_overflows():
  config = MoeConfig(num_experts=4, router_type="tokens_choose_dropless", max_group_size=64)
  layer, params, x = _layer(config)
  # A router that prefers expert 0 for most tokens.
  params["router"]["kernel"] = params["router"]["kernel"].at[:, 0].add(1.0)
  y, _, sown = _run(layer, params, jnp.abs(x), train=False)
  counts = np.asarray(sown["tokens_per_expert"])
  assert counts.max() > 2.0 * 64 / 4  # more than the eval capacity (cf 2) would hold
  assert float(sown["fraction_tokens_left_behind"]) == 0.0 and counts.sum() == 64
  assert (np.abs(np.asarray(y)).sum(-1) > 0).all()  # every token got an expert's output


def test_dropless_router_settings():
  cls = routing.router_class("tokens_choose_dropless")
  assert cls.dropless and cls.experts_per_token(MoeConfig(num_selected_experts=2)) == 2.0
  with pytest.raises(ValueError, match="batch_prioritized_routing=True orders tokens competing"):
    MoeConfig(router_type="tokens_choose_dropless", batch_prioritized_routing=True).validate()
  config = switchjax.load_config("tiny", ["model.moe.router_type=tokens_choose_dropless"])
  assert config.model.moe_for("decoder").router_type == "tokens_choose_dropless"  # causal
  with pytest.raises(ValueError, match="dropless routing: HF's router drops the tokens"):
    switchjax.hf.config_to_hf(config.model)


@pytest.mark.slow
def test_dropless_on_meshes_equals_single_device():
  """Expert-parallel where the mesh has an expert axis (`tests/test_dropless_ep.py`), and
  correct on every mesh."""
  boxed, params, x, grad_fn = mesh_test_layer("tokens_choose_dropless")
  ref_grads, ref_y = jax.jit(grad_fn)(params, x)
  for shape in ((2, 2, 2),):
    grads, y, _ = run_on_mesh(shape, boxed, params, x, grad_fn)
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref_y), atol=1e-5, err_msg=str(shape))
    for g, g_ref in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
      np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), atol=1e-5, err_msg=str(shape))


@pytest.mark.slow
def test_tiny_dropless_model_equals_masked_with_room_for_every_token():
  """Encoder and (causal) decoder MoE layers, logits and parameter gradients."""
  base = switchjax.load_config("tiny").model
  roomy = dataclasses.replace(
    base.moe, train_capacity_factor=8.0, eval_capacity_factor=8.0, dispatch="buffers"
  )
  masked_cfg = dataclasses.replace(base, moe=roomy)
  dropless_cfg = dataclasses.replace(
    base, moe=dataclasses.replace(roomy, router_type="tokens_choose_dropless")
  )
  rng = np.random.default_rng(0)
  inputs = rng.integers(2, base.vocab_size, (4, 16))
  targets = rng.integers(2, base.vocab_size, (4, 8))
  params = nn.unbox(init_params(SwitchTransformer(masked_cfg), jax.random.key(0)))

  def run(cfg):
    model = SwitchTransformer(cfg)

    def loss(params):
      logits = model.apply({"params": params}, inputs, targets)
      return jnp.sum(jnp.sin(logits)), logits

    return jax.jit(jax.grad(loss, has_aux=True))(params)

  grads, logits = run(dropless_cfg)
  ref_grads, ref_logits = run(masked_cfg)
  np.testing.assert_allclose(logits, ref_logits, atol=1e-5)
  for g, ref in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(g, ref, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Single-token decoding steps.


def test_decoding_step_in_hf_mode_equals_the_capacity_path():
  """One token per sequence = one group per token in HF mode: nothing can drop, and the
  step's direct routing gives the capacity path's outputs and metrics."""
  config = MoeConfig(num_experts=4, expert_capacity=2, dispatch="buffers")
  layer = switchjax.MoeLayer(config, d_ff=16, causal=True)
  x = jax.random.normal(jax.random.key(1), (8, 1, 8))
  params = nn.unbox(layer.init(jax.random.key(0), x))["params"]
  step = _run(layer, params, x, train=False, decode=True)
  full = _run(layer, params, x, train=False)
  _assert_same(step, full, atol=1e-6, metrics=METRICS + ("expert_usage",))


def test_decoding_step_routes_every_token_where_capacity_would_drop():
  """flaxformer mode groups the step's tokens: their capacity path drops tokens, the step
  does not, and equals the dropless router."""
  config = MoeConfig(num_experts=4, eval_capacity_factor=0.5, min_expert_capacity=1)
  layer = switchjax.MoeLayer(config, d_ff=16, causal=True)
  x = jax.random.normal(jax.random.key(1), (16, 1, 8)).at[:, :, 0].add(3.0)
  params = nn.unbox(layer.init(jax.random.key(0), x))["params"]
  _, _, full = _run(layer, params, x, train=False)
  assert float(full["fraction_tokens_left_behind"]) > 0.2
  step = _run(layer, params, x, train=False, decode=True)
  assert float(step[2]["fraction_tokens_left_behind"]) == 0.0
  dropless = layer.clone(config=dataclasses.replace(config, router_type="tokens_choose_dropless"))
  _assert_same(step, _run(dropless, params, x, train=False), atol=1e-6)
