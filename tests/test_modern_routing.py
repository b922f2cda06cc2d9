"""Routing beyond Switch (issue 31): shared experts, sigmoid / normalised / scaled gating and
auxiliary-loss-free balancing by a choice bias, with their load metrics, HF refusals and
resume rules. Each is checked against a formula written here."""

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from match import words
from tiny import MOE, tiny_config

from switchjax import checkpoint, losses, model_loading, routing, scan
from switchjax.config import MoeConfig, TrainConfig, load_config
from switchjax.hf.config_map import config_to_hf
from switchjax.model import SwitchTransformer, abstract_params, init_params
from switchjax.moe import MoeLayer
from switchjax.routing import balance
from switchjax.training import make_train_step, resume_rules, train

D_MODEL, D_FF = 16, 32


def _layer(**moe):
  cfg = MoeConfig(**{**MOE, "num_experts": 4, "max_group_size": 64, **moe})
  return MoeLayer(cfg, d_ff=D_FF)


def _inputs(shape=(2, 8, D_MODEL), seed=0):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _init(layer, x):
  return nn.unbox(layer.init(jax.random.key(1), x)["params"])


# --------------------------------------------------------------------------------------------
# Defaults.


def test_defaults_change_nothing():
  moe = MoeConfig()
  assert moe.default_gating
  assert (moe.num_shared_experts, moe.router_bias_update_rate) == (0, 0.0)
  params = _init(_layer(), _inputs())
  assert set(params) == {"router", "wi", "wo"} and set(params["router"]) == {"kernel"}


# --------------------------------------------------------------------------------------------
# Shared experts.


def test_shared_experts_add_a_dense_mlp_per_expert():
  x = _inputs()
  shared = _layer(num_shared_experts=2, shared_expert_d_ff=8)
  params = _init(shared, x)
  wi, wo = params["shared_experts"]["wi"], params["shared_experts"]["wo"]
  assert wi.shape == (D_MODEL, 16) and wo.shape == (16, D_MODEL)
  y = shared.apply({"params": params}, x)
  routed = _layer().apply({"params": {k: v for k, v in params.items() if k != "shared_experts"}}, x)
  # y = routed + sum over shared experts s of relu(x @ wi_s) @ wo_s, each of width 8.
  expected = np.asarray(routed, np.float64)
  xs = np.asarray(x, np.float64)
  for s in range(2):
    cols = slice(8 * s, 8 * (s + 1))
    hidden = np.maximum(xs @ np.asarray(wi, np.float64)[:, cols], 0.0)
    expected = expected + hidden @ np.asarray(wo, np.float64)[cols]
  np.testing.assert_allclose(np.asarray(y), expected, atol=1e-5)


def test_shared_experts_default_width_and_dense_sharding():
  x = _inputs()
  boxed = _layer(num_shared_experts=1).init(jax.random.key(1), x)["params"]
  axes = nn.get_partition_spec(boxed)["shared_experts"]
  assert tuple(axes["wi"]) == ("embed", "mlp") and tuple(axes["wo"]) == ("mlp", "embed")
  assert nn.unbox(boxed)["shared_experts"]["wi"].shape == (D_MODEL, D_FF)  # the experts' width


# --------------------------------------------------------------------------------------------
# Gating: sigmoid scores, top-k normalisation, routed scaling, the choice bias.


def _route(layer_moe, x, bias=None, kernel=None):
  """(route, logits) of a router of `layer_moe` on x [groups, tokens, d], with the given
  choice bias and kernel."""
  router = routing.make_router(MoeConfig(**layer_moe))
  params = nn.unbox(router.init(jax.random.key(2), x, 64)["params"])
  if kernel is not None:
    params["kernel"] = kernel
  if bias is not None:
    params[routing.CHOICE_BIAS] = jnp.asarray(bias, jnp.float32)
  return router.apply({"params": params}, x, 64)


ROUTER = dict(num_experts=4, num_selected_experts=2, max_group_size=64)


def test_sigmoid_normalised_scaled_weights_follow_the_formula():
  x = _inputs((1, 16, D_MODEL))
  moe = dict(ROUTER, router_score="sigmoid", normalize_top_k=True, routed_scaling_factor=2.5)
  route, logits = _route(moe, x)
  scores = 1.0 / (1.0 + np.exp(-np.asarray(logits, np.float64)))  # [1, tokens, experts]
  chosen = np.argsort(-scores, axis=-1, kind="stable")[..., :2]
  gates = np.take_along_axis(scores, chosen, axis=-1)
  expected = 2.5 * gates / gates.sum(-1, keepdims=True)
  np.testing.assert_array_equal(route.dispatch_indices[..., 0], chosen)
  np.testing.assert_allclose(route.combine_weights, expected, rtol=1e-6)


def test_the_bias_chooses_but_never_weighs():
  x = _inputs((1, 16, D_MODEL))
  moe = dict(ROUTER, router_type="tokens_choose_dropless", router_bias_update_rate=0.1)
  plain, logits = _route(moe, x)
  probs = jax.nn.softmax(logits, axis=-1)
  # A bias far below the gaps between scores changes no choice: the weights are bit-identical.
  tiny_bias, _ = _route(moe, x, bias=[1e-9, -1e-9, 2e-9, 0.0])
  np.testing.assert_array_equal(tiny_bias.expert_index, plain.expert_index)
  np.testing.assert_array_equal(tiny_bias.combine_weights, plain.combine_weights)
  # A large bias on expert 3 makes it every token's first choice; its weight stays its
  # unbiased probability (no bias added to the combine weights).
  big, _ = _route(moe, x, bias=[0.0, 0.0, 0.0, 10.0])
  assert np.all(np.asarray(big.expert_index[..., 0]) == 3)
  assert not np.all(np.asarray(plain.expert_index[..., 0]) == 3)
  np.testing.assert_array_equal(big.combine_weights[..., 0], probs[..., 3])
  assert float(jnp.max(big.combine_weights)) < 1.0


def test_bias_update_follows_the_formula():
  bias = np.array([[0.1, -0.2, 0.0, 0.3], [0.0, 0.0, 0.0, 0.0]], np.float32)  # two layers
  load = np.array([[10, 2, 4, 4], [5, 5, 5, 5]], np.int32)
  rate = 0.01
  got = balance.bias_update(jnp.asarray(bias), jnp.asarray(load), rate)
  mean = load.mean(-1, keepdims=True)
  expected = bias + rate * np.sign(mean - load)  # mean 5: [-1, +1, +1, +1]; balanced: 0
  np.testing.assert_array_equal(np.asarray(got), expected.astype(np.float32))
  np.testing.assert_array_equal(np.asarray(got)[1], 0.0)


def test_bias_update_lands_on_the_routers_parameters_only():
  old = {"encoder": {"layers_1": {"mlp": {"router": {"choice_bias": jnp.zeros(4)}, "wi": 1.0}}}}
  new = {"encoder": {"layers_1": {"mlp": {"router": {"choice_bias": jnp.ones(4)}, "wi": 2.0}}}}
  loads = {"encoder": {"layers_1": {"mlp": {"tokens_per_expert": jnp.array([4.0, 0, 0, 0])}}}}
  out = balance.update_choice_biases(old, new, loads, {"encoder": 0.5, "decoder": 0.0})
  mlp = out["encoder"]["layers_1"]["mlp"]
  np.testing.assert_array_equal(mlp["router"]["choice_bias"], [-0.5, 0.5, 0.5, 0.5])  # from old
  assert mlp["wi"] == 2.0  # the optimizer's update of everything else stays


def test_repeated_updates_balance_a_skewed_router():
  x = _inputs((1, 256, D_MODEL), seed=3).at[..., 0].set(1.0)  # feature 0 constant ...
  kernel = 0.5 * jax.random.normal(jax.random.key(4), (D_MODEL, 4))
  kernel = kernel.at[0].set(jnp.array([1.5, 0.0, 0.0, 0.0]))  # ... and favouring expert 0
  moe = dict(ROUTER, num_selected_experts=1, router_type="tokens_choose_dropless")
  moe["router_bias_update_rate"] = 0.01
  bias = jnp.zeros(4)
  imbalance = []
  for _ in range(80):
    route, _ = _route(moe, x, bias=bias, kernel=kernel)
    load = jnp.bincount(route.expert_index.reshape(-1), length=4)
    imbalance.append(float(jnp.max(load) / jnp.mean(load)))
    bias = balance.bias_update(bias, load, 0.01)
  assert imbalance[0] > 2.0  # skewed: expert 0 takes over half of the 256 tokens
  assert all(b <= a for a, b in zip(imbalance[:20], imbalance[1:21]))  # falls step by step
  assert max(imbalance[-10:]) < 1.1
  assert float(bias[0]) < 0 < float(jnp.min(bias[1:]))


# --------------------------------------------------------------------------------------------
# Load metrics.


def test_load_metrics_are_sown_and_reach_the_metrics():
  cfg = tiny_config(
    moe=dict(MOE, num_experts=4, num_selected_experts=2, router_bias_update_rate=0.01)
  )
  model = SwitchTransformer(cfg)
  params = nn.unbox(jax.jit(lambda k: init_params(model, k))(jax.random.key(0)))
  bias = jnp.array([0.3, -0.1, 0.0, -0.4])
  params["encoder"]["layers_1"]["mlp"]["router"]["choice_bias"] = bias
  tokens = jax.random.randint(jax.random.key(5), (4, 8), 1, 64)
  apply = jax.jit(lambda p, t: model.apply({"params": p}, t, t, mutable=["intermediates"]))
  _, state = apply(params, tokens)
  sown = state["intermediates"]["encoder"]["layers_1"]["mlp"]
  counts = np.asarray(sown["tokens_per_expert"][0], np.float64)
  assert float(sown["load_imbalance"][0]) == pytest.approx(counts.max() / counts.mean(), 1e-6)
  dropped = 1.0 - counts.sum() / (4 * 8 * 2)  # choices no expert served (capacity)
  assert float(sown["fraction_choices_dropped"][0]) == pytest.approx(dropped, abs=1e-6)
  assert float(sown["choice_bias_min"][0]) == pytest.approx(-0.4)
  assert float(sown["choice_bias_max"][0]) == pytest.approx(0.3)
  assert float(sown["choice_bias_abs_mean"][0]) == pytest.approx(0.2)
  _, metrics = losses.moe_losses_and_metrics(state["intermediates"], 0.01, 0.0)
  layer = "layers/encoder/layers_1/mlp/"
  assert float(metrics[layer + "load_imbalance"]) == pytest.approx(counts.max() / counts.mean())
  assert float(metrics[layer + "choice_bias_abs_mean"]) == pytest.approx(0.2)
  assert float(metrics["choice_bias_abs_mean"]) == pytest.approx(0.1)  # decoder's bias is 0
  assert "load_imbalance" in metrics and "fraction_choices_dropped" in metrics


# --------------------------------------------------------------------------------------------
# Training: exact resume, one device against a mesh.

BALANCED = ["model.moe.router_bias_update_rate=0.01", "train.aux_loss_factor=0.0"]


def _run(workdir, *overrides, devices=None):
  config = load_config("tiny", [*BALANCED, "train.log_every=1", "train.eval_every=0", *overrides])
  return train(config, workdir, devices=devices, progress=False, log=lambda _: None)


def _biases(workdir):
  _, params = model_loading.load_model(workdir)
  return {
    stack: np.asarray(params[stack]["layers_1"]["mlp"]["router"]["choice_bias"])
    for stack in ("encoder", "decoder")
  }


@pytest.mark.slow
def test_resume_with_the_bias_is_exact(tmp_path):
  settings = ["train.checkpoint_every=3"]
  straight = _run(tmp_path / "straight", "train.num_train_steps=6", *settings)
  first = _run(tmp_path / "resumed", "train.num_train_steps=3", *settings)
  second = _run(tmp_path / "resumed", "train.num_train_steps=6", *settings)
  assert {**first.losses, **second.losses} == straight.losses  # bit-identical
  before, after = _biases(tmp_path / "straight"), _biases(tmp_path / "resumed")
  for stack in before:
    np.testing.assert_array_equal(before[stack], after[stack])
  # 6 steps of +-0.01 (or 0 at an expert of exactly mean load): the bias moved, on the grid.
  steps = before["encoder"] / 0.01
  assert np.abs(before["encoder"]).max() > 0
  np.testing.assert_allclose(steps, np.round(steps), atol=1e-4)
  assert np.abs(steps).max() <= 6 + 1e-4
  _, params = model_loading.load_model(tmp_path / "resumed")
  _, straight_params = model_loading.load_model(tmp_path / "straight")
  assert checkpoint.params_equal(params, straight_params)
  records = [
    json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()
  ]
  trained = [r for r in records if "loss" in r]
  layer = "layers/encoder/layers_1/mlp/"
  for name in ("load_imbalance", "choice_bias_abs_mean", "fraction_choices_dropped"):
    assert all(layer + name in r for r in trained), name
  assert all(r[layer + "load_imbalance"] >= 1.0 for r in trained)
  # The bias logged at step s is the one step s routed with: 0 at the first step.
  assert trained[0][layer + "choice_bias_abs_mean"] == 0.0
  assert trained[-1][layer + "choice_bias_abs_mean"] > 0.0


@pytest.mark.slow
def test_mesh_matches_one_device_with_the_bias(tmp_path):
  assert jax.device_count() == 8
  steps = "train.num_train_steps=4"
  one = _run(tmp_path / "one", steps, "mesh.data=1", devices=jax.devices()[:1])
  eight = _run(tmp_path / "eight", steps, "mesh.data=2", "mesh.expert=4")
  for step in one.losses:
    np.testing.assert_allclose(eight.losses[step], one.losses[step], atol=1e-5, rtol=0)
  b1, b8 = _biases(tmp_path / "one"), _biases(tmp_path / "eight")
  for stack in b1:
    np.testing.assert_array_equal(b8[stack], b1[stack])
  assert np.abs(b1["encoder"]).max() > 0


# --------------------------------------------------------------------------------------------
# Refusals and resume rules.


@pytest.mark.parametrize(
  "field, value",
  [
    ("num_shared_experts", 1),
    ("router_bias_update_rate", 0.001),
    ("router_score", "sigmoid"),
    ("normalize_top_k", True),
    ("routed_scaling_factor", 2.5),
  ],
)
def test_hf_conversion_refuses_each_setting(field, value):
  cfg = tiny_config(d_ff=32, moe=dict(MOE, expert_capacity=4, **{field: value}))
  with pytest.raises(ValueError, match=words(f"model.moe.{field}={value!r}", "HF")):
    config_to_hf(cfg)


def test_hf_conversion_accepts_the_defaults():
  config_to_hf(tiny_config(moe=dict(MOE, expert_capacity=4)))


def test_routers_without_top_k_gating_refuse_the_options():
  moe = MoeConfig(router_type="experts_choose_masked", router_bias_update_rate=0.01)
  with pytest.raises(ValueError, match=words("experts_choose_masked", "tokens_choose_masked")):
    moe.validate()
  moe = MoeConfig(router_type="tokens_choose_renormalized", router_score="sigmoid")
  with pytest.raises(ValueError, match=words("tokens_choose_renormalized", "normalize_top_k")):
    moe.validate()
  with pytest.raises(ValueError, match=words("moe.router_score='tanh'", "softmax, sigmoid")):
    MoeConfig(router_score="tanh").validate()
  with pytest.raises(ValueError, match=words("moe.router_bias_update_rate=-1", ">= 0")):
    MoeConfig(router_bias_update_rate=-1).validate()


def test_resume_rules_list_every_new_setting():
  for name in (
    "num_shared_experts",
    "shared_expert_d_ff",
    "router_score",
    "normalize_top_k",
    "routed_scaling_factor",
  ):
    assert resume_rules.RULES[f"model.moe.{name}"] == resume_rules.MODEL
    assert resume_rules.rule_of(f"model.decoder_moe.{name}") == resume_rules.MODEL
  assert resume_rules.RULES["model.moe.router_bias_update_rate"] == resume_rules.OPTIMISATION


def test_flops_and_parameter_estimate_count_the_shared_experts():
  from switchjax.config.sizes import estimate_parameters
  from switchjax.training.flops import train_flops_per_example

  base = load_config("tiny")
  shared = load_config("tiny", ["model.moe.num_shared_experts=2"])
  d, w = base.model.d_model, base.model.expert_mlp_dim
  sparse_tokens = base.data.inputs_length + base.data.targets_length  # one sparse layer each
  extra = train_flops_per_example(shared) - train_flops_per_example(base)
  assert extra == 3 * 2 * sparse_tokens * 2 * (2 * d * w)
  model = SwitchTransformer(shared.model)
  count = sum(x.size for x in jax.tree.leaves(nn.unbox(abstract_params(model))))
  assert estimate_parameters(shared.model) == count
  assert count - estimate_parameters(base.model) == 2 * (2 * d * 2 * w)


@pytest.mark.slow
def test_scanned_layers_update_the_same_biases():
  moe = dict(MOE, num_experts=4, router_bias_update_rate=0.01)
  cfg = tiny_config(num_layers=4, num_decoder_layers=4, num_sparse_encoder_layers=2, moe=moe)
  cfg = dataclasses.replace(cfg, num_sparse_decoder_layers=2)
  scanned_cfg = dataclasses.replace(cfg, scan_layers=True)
  model, scanned = SwitchTransformer(cfg), SwitchTransformer(scanned_cfg)
  params = nn.unbox(jax.jit(lambda k: init_params(model, k))(jax.random.key(0)))
  tokens = jax.random.randint(jax.random.key(6), (4, 8), 1, 64)
  batch = {
    "encoder_input_tokens": tokens,
    "decoder_input_tokens": tokens,
    "decoder_target_tokens": tokens,
    "decoder_loss_weights": jnp.ones((4, 8)),
  }
  train_cfg = TrainConfig(batch_size=4, aux_loss_factor=0.0)
  tx = optax.sgd(0.1)

  def biases(m, p):
    step = jax.jit(make_train_step(m, tx, train_cfg))
    new, _, _ = step(p, tx.init(p), jnp.int32(0), batch)
    new = scan.unstack_layers(new) if m is scanned else new
    return {
      f"{s}/{i}": np.asarray(new[s][f"layers_{i}"]["mlp"]["router"]["choice_bias"])
      for s in ("encoder", "decoder")
      for i in (1, 3)
    }

  plain, stacked = biases(model, params), biases(scanned, scan.stack_layers(params, scanned_cfg))
  assert plain.keys() == stacked.keys()
  for name in plain:
    np.testing.assert_array_equal(stacked[name], plain[name])
    assert set(np.round(plain[name] / 0.01).tolist()) <= {-1.0, 0.0, 1.0}
  assert any(np.abs(b).max() > 0 for b in plain.values())
