"""Routers and the MoE layer: Hugging Face's loss fixtures, invariants and bad settings."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import switchjax
from switchjax import moe, routing
from switchjax.config import MoeConfig

# --------------------------------------------------------------------------------------------
# Hugging Face's router fixtures (transformers' SwitchTransformers router tests).


def test_load_balancing_loss_hf_fixture():
  router_probs = jnp.array(
    [
      [0.35490513, 0.60419905],
      [0.4275843, 0.23061597],
      [0.32985854, 0.43953657],
      [0.25099766, 0.27730572],
      [0.7678207, 0.71474564],
    ]
  )
  expert_indices = jnp.array([[0], [1], [1], [0], [0]], jnp.int32)
  loss = routing.load_balancing_loss(router_probs, expert_indices)
  np.testing.assert_allclose(float(loss), 0.8741045, atol=1e-6)


def test_router_z_loss_hf_fixture():
  logits = jnp.array(
    [
      [
        [-4.2124424, 3.891939, -3.6481273, 1.8849981],
        [0.32625437, 2.918651, 0.84758997, -4.556842],
        [-3.32062, 4.6977115, -0.15439987, 0.44086337],
        [3.4467149, 4.3436565, -4.7224274, -4.264637],
        [-2.224406, -2.5318158, -1.3832569, 1.1891162],
        [-2.320062, -0.44705987, 4.289819, -0.00662684],
      ],
      [
        [0.99470854, -0.6992364, 0.25503993, 4.2952085],
        [3.5937333, -3.2408535, -4.298278, 4.426601],
        [0.7669008, 2.6588762, 2.4505413, 4.6051874],
        [0.23330331, -3.0845237, 0.6262374, -2.9865491],
        [0.7595146, -2.1099675, -4.155346, -2.8326452],
        [2.3771453, 1.004138, -3.1781673, 0.7581556],
      ],
    ]
  )
  np.testing.assert_allclose(float(routing.router_z_loss(logits)), 13.786719, atol=1e-5)


def test_top1_router_hf_fixture_two_experts_capacity_four():
  # HF's test_equivalency_token_chose_masked_router: 2 sequences (= 2 groups) of 3 tokens.
  tokens = jnp.array(
    [
      [
        [0.6433916, 0.18188512, 0.02240455, 0.563781],
        [0.5526401, 0.0958724, 0.34253013, 0.03644359],
        [0.08744538, 0.7909105, 0.35205448, 0.53364205],
      ],
      [
        [0.02900076, 0.4168595, 0.5802449, 0.91486526],
        [0.27414513, 0.14991808, 0.9383501, 0.5209162],
        [0.51207185, 0.90618336, 0.7309413, 0.95533276],
      ],
    ]
  )
  kernel = jnp.array(
    [
      [0.02008116, 0.00620062],
      [-0.00811031, -0.00031623],
      [-0.03542127, 0.02703803],
      [0.02335377, -0.02971946],
    ]
  )
  router = switchjax.make_router(MoeConfig(num_experts=2))  # tokens-choose top-1
  route, _ = router.apply({"params": {"kernel": kernel}}, tokens, 4)
  np.testing.assert_allclose(float(route.auxiliary_loss), 1.000308, atol=1e-5)
  np.testing.assert_allclose(float(route.router_z_loss), 0.4789799, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Invariants.


def _layer_and_params(
  config, d_model=8, d_ff=16, activations=("relu",), batch=4, length=16, seed=0
):
  layer = switchjax.MoeLayer(config, d_ff=d_ff, activations=activations)
  x = jax.random.normal(jax.random.key(seed + 1), (batch, length, d_model))
  params = nn.unbox(layer.init(jax.random.key(seed), x))["params"]
  return layer, params, x


def _apply(layer, params, x, train=False, seed=0):
  y, state = layer.apply(
    {"params": params},
    x,
    enable_dropout=train,
    mutable=["intermediates"],
    rngs={"dropout": jax.random.key(seed), "jitter": jax.random.key(seed)},
  )
  return y, {name: value[0] for name, value in state["intermediates"].items()}


ROUTER_CASES = [
  dict(router_type="tokens_choose_masked", num_selected_experts=1),
  dict(router_type="tokens_choose_masked", num_selected_experts=2, batch_prioritized_routing=True),
  dict(router_type="tokens_choose_scatter", num_selected_experts=2),
  dict(router_type="experts_choose_masked"),
]


@pytest.mark.parametrize("case", ROUTER_CASES, ids=lambda c: "-".join(map(str, c.values())))
def test_no_expert_exceeds_capacity(case):
  config = MoeConfig(
    num_experts=4, max_group_size=16, eval_capacity_factor=0.5, min_expert_capacity=1, **case
  )
  layer, params, x = _layer_and_params(config)
  _, sown = _apply(layer, params, x)
  layout = moe.group_layout(4, 16, config, train=False)
  assert layout.expert_capacity == 2 and layout.num_groups == 4
  # Per group each expert holds at most `capacity` tokens.
  x_groups = x.reshape(layout.num_groups, layout.tokens_per_group, -1)
  route, _ = routing.make_router(config).apply(
    {"params": params["router"]}, x_groups, layout.expert_capacity
  )
  if isinstance(route, routing.RouterMask):
    per_group_expert = route.dispatch_mask.sum(axis=(1, 3))  # [groups, experts]
    assert int(route.dispatch_mask.sum(axis=1).max()) <= 1  # one token per slot
  else:
    slots = route.dispatch_indices[..., 1]
    routed = slots < layout.expert_capacity
    per_group_expert = jnp.stack(
      [jnp.sum(routed & (route.dispatch_indices[..., 0] == e), axis=(1, 2)) for e in range(4)],
      axis=-1,
    )
  assert int(per_group_expert.max()) <= layout.expert_capacity
  total = layout.num_groups * layout.expert_capacity
  assert int(sown["tokens_per_expert"].max()) <= total
  assert float(sown["expert_usage"]) <= 1.0


@pytest.mark.parametrize("k,bpr", [(1, False), (2, False), (2, True)])
def test_large_capacity_drops_nothing_and_masked_equals_scatter(k, bpr):
  base = MoeConfig(
    num_experts=4,
    num_selected_experts=k,
    batch_prioritized_routing=bpr,
    max_group_size=32,
    eval_capacity_factor=8.0,
  )
  masked, params, x = _layer_and_params(base)
  scatter = switchjax.MoeLayer(
    dataclasses.replace(base, router_type="tokens_choose_scatter"), d_ff=16
  )
  y_masked, sown = _apply(masked, params, x)
  y_scatter, sown_scatter = _apply(scatter, params, x)
  assert float(sown["fraction_tokens_left_behind"]) == 0.0
  assert int(sown["tokens_per_expert"].sum()) == 4 * 16 * k  # every choice of every token
  np.testing.assert_allclose(np.asarray(y_masked), np.asarray(y_scatter), atol=1e-6)
  for name in ("auxiliary_loss", "router_z_loss", "expert_usage", "router_confidence"):
    np.testing.assert_allclose(float(sown[name]), float(sown_scatter[name]), rtol=1e-6)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_top_k_combine_weights_are_router_probabilities(k):
  probs = jax.nn.softmax(jax.random.normal(jax.random.key(k), (2, 8, 4)) * 3, axis=-1)
  route = routing.tokens_choose_masked(probs, None, expert_capacity=64, num_selected_experts=k)
  # Combined weight of each (token, expert) = that expert's probability if chosen, else 0.
  weights = route.combine_array.sum(axis=-1)  # [groups, tokens, experts]
  top_values, top_index = jax.lax.top_k(probs, k)
  chosen = jax.nn.one_hot(top_index, 4).sum(axis=-2)
  np.testing.assert_allclose(np.asarray(weights), np.asarray(probs * chosen), atol=1e-7)
  np.testing.assert_allclose(
    np.asarray(weights.sum(-1)), np.asarray(top_values.sum(-1)), atol=1e-6
  )  # not renormalised
  # The scatter router gives the same weights, ordered by choice.
  scatter = routing.tokens_choose_scatter(probs, None, 64, k)
  np.testing.assert_allclose(np.asarray(scatter.combine_weights), np.asarray(top_values), atol=1e-7)


def test_top_k_helper_matches_lax_top_k_including_ties():
  x = jnp.array([[0.1, 0.5, 0.5, 0.2, 0.5], [0.3, 0.3, 0.3, 0.3, 0.3]])
  for k in (1, 2, 3):
    values, index = routing.top_k(x, k)
    ref_values, ref_index = jax.lax.top_k(x, k)
    np.testing.assert_array_equal(np.asarray(index), np.asarray(ref_index))
    np.testing.assert_array_equal(np.asarray(values), np.asarray(ref_values))


def test_first_choices_outrank_second_choices():
  # Token 0's second choice and token 1's first choice are both expert 0, capacity 1: the
  # first choice wins even though token 0 comes first.
  probs = jnp.array([[[0.3, 0.6, 0.1], [0.8, 0.1, 0.1]]])
  route = routing.tokens_choose_masked(probs, None, expert_capacity=1, num_selected_experts=2)
  assert bool(route.dispatch_mask[0, 1, 0, 0])  # token 1 -> expert 0
  assert not bool(route.dispatch_mask[0, 0, 0].any())  # token 0's second choice dropped
  assert bool(route.dispatch_mask[0, 0, 1, 0])  # token 0 -> expert 1


def test_batch_prioritized_routing_serves_confident_tokens_first():
  probs = jnp.array([[[0.6, 0.4], [0.9, 0.1]]])  # both want expert 0, capacity 1
  plain = routing.tokens_choose_masked(probs, None, 1, 1, batch_prioritized_routing=False)
  bpr = routing.tokens_choose_masked(probs, None, 1, 1, batch_prioritized_routing=True)
  assert bool(plain.dispatch_mask[0, 0, 0, 0]) and not bool(plain.dispatch_mask[0, 1].any())
  assert bool(bpr.dispatch_mask[0, 1, 0, 0]) and not bool(bpr.dispatch_mask[0, 0].any())


def test_padding_tokens_are_not_routed_when_ignored():
  config = MoeConfig(
    num_experts=4, max_group_size=64, eval_capacity_factor=4.0, ignore_padding_tokens=True
  )
  layer, params, x = _layer_and_params(config)
  x = x.at[:, 12:].set(0.0)  # last quarter of every row is padding
  y, sown = _apply(layer, params, x)
  np.testing.assert_array_equal(np.asarray(y[:, 12:]), 0.0)
  assert int(sown["tokens_per_expert"].sum()) == 4 * 12
  assert float(sown["fraction_tokens_left_behind"]) == 0.0  # counted over real tokens only


def test_jitter_changes_nothing_in_eval_and_only_the_router_in_training():
  config = MoeConfig(
    num_experts=4,
    jitter_noise=0.5,
    max_group_size=64,
    train_capacity_factor=8.0,
    eval_capacity_factor=8.0,
  )
  layer, params, x = _layer_and_params(config)
  no_jitter = switchjax.MoeLayer(dataclasses.replace(config, jitter_noise=0.0), d_ff=16)
  y_eval_a, _ = _apply(layer, params, x, train=False, seed=1)
  y_eval_b, _ = _apply(layer, params, x, train=False, seed=2)
  y_ref, _ = _apply(no_jitter, params, x, train=False)
  np.testing.assert_array_equal(np.asarray(y_eval_a), np.asarray(y_eval_b))
  np.testing.assert_array_equal(np.asarray(y_eval_a), np.asarray(y_ref))
  y_train, _ = _apply(layer, params, x, train=True, seed=1)
  assert float(jnp.abs(y_train - y_ref).max()) > 1e-3
  # With one expert the router always gives probability 1, so jitter (which only touches the
  # router's copy of the inputs) cannot change the output.
  one = dataclasses.replace(config, num_experts=1)
  layer1, params1, x1 = _layer_and_params(one)
  y1_train, _ = _apply(layer1, params1, x1, train=True, seed=3)
  y1_eval, _ = _apply(layer1, params1, x1, train=False)
  np.testing.assert_allclose(np.asarray(y1_train), np.asarray(y1_eval), atol=1e-6)


@pytest.mark.parametrize("case", ROUTER_CASES, ids=lambda c: "-".join(map(str, c.values())))
def test_gradients_reach_router_and_experts(case):
  config = MoeConfig(num_experts=4, max_group_size=32, **case)
  layer, params, x = _layer_and_params(config, activations=("gelu", "linear"))

  def loss(p):
    y, sown = _apply(layer, p, x, train=True)
    return jnp.sum(y**2) + sown["auxiliary_loss"] + sown["router_z_loss"]

  grads = jax.grad(loss)(params)
  for name, g in jax.tree_util.tree_leaves_with_path(grads):
    assert float(jnp.abs(g).max()) > 0, f"no gradient for {jax.tree_util.keystr(name)}"


def test_group_layout_rules():
  # flaxformer on one device (NUM_EXPERT_PARTITIONS = E): groups a multiple of E.
  cfg = MoeConfig(
    num_experts=8,
    max_group_size=64,
    eval_capacity_factor=2.0,
    min_expert_capacity=4,
    group_multiple=8,
  )
  assert moe.group_layout(4, 32, cfg, train=False) == moe.GroupLayout(4, 32, 8, 16, 4)
  assert moe.num_groups(80, 8, 8) == 16
  assert moe.num_groups(8192 * 16, 8192, 8) == 16
  # Token counts that the multiple does not divide are padded along the cheaper dimension.
  four = MoeConfig(num_experts=4, max_group_size=64, group_multiple=4)
  padded = moe.group_layout(3, 5, four, train=True)  # +1 row (5 tokens) beats +3 columns (9)
  assert (padded.padded_batch, padded.padded_length) == (4, 5)
  padded = moe.group_layout(2, 7, four, train=True)  # +1 column (2 tokens) beats +2 rows (14)
  assert (padded.padded_batch, padded.padded_length) == (2, 8)
  # HF mode: one group per sequence, fixed capacity; buffers never exceed the group's tokens.
  hf = MoeConfig(num_experts=8, expert_capacity=64)
  assert moe.group_layout(3, 20, hf, train=True) == moe.GroupLayout(3, 20, 3, 20, 64)
  assert moe.group_layout(3, 20, hf, train=True).slots == 20


def test_groups_follow_the_devices_of_the_batch():
  """Default (group_multiple 0): the group count is a multiple of the data x expert devices,
  at least tokens // max_group_size; groups shrink as devices grow (flaxformer's rule with the
  expert partitions actually used)."""
  cfg = MoeConfig(num_experts=8, max_group_size=8192, train_capacity_factor=1.25)
  # 256 x 512 tokens on 1, 16, 32 and 64 devices.
  layouts = [moe.group_layout(256, 512, cfg, train=True, num_shards=n) for n in (1, 16, 32, 64)]
  assert [(g.num_groups, g.tokens_per_group) for g in layouts] == [
    (16, 8192),
    (16, 8192),
    (32, 4096),
    (64, 2048),
  ]
  assert [g.expert_capacity for g in layouts] == [1280, 1280, 640, 320]  # round(1.25 * T / E)
  # One device needs no multiple of E: 8 x 16 tokens with E = 128 make one group of 128
  # tokens (flaxformer: 128 groups of one token, each padding 128 experts x 4 slots).
  wide = MoeConfig(num_experts=128, max_group_size=4096, min_expert_capacity=4)
  assert moe.group_layout(8, 16, wide, train=False) == moe.GroupLayout(8, 16, 1, 128, 4)
  # Buffers never exceed the group's tokens: a group of 2 tokens gets 2 slots per expert.
  assert moe.group_layout(1, 2, wide, train=False).slots == 2
  # Tokens that the devices do not divide are padded, as flaxformer pads for E.
  padded = moe.group_layout(8, 114, cfg, train=True, num_shards=16)
  assert padded.num_groups % 16 == 0 and (padded.padded_batch * padded.padded_length) % 16 == 0


def test_a_fixed_group_multiple_routes_the_same_on_every_mesh_or_is_refused():
  fixed = MoeConfig(num_experts=8, max_group_size=8192, group_multiple=16)
  for shards in (1, 2, 8, 16):
    assert moe.group_layout(256, 512, fixed, train=True, num_shards=shards).num_groups == 16
  with pytest.raises(
    ValueError,
    match=r"moe.group_multiple=16 gives 16 routing groups, which "
    r"do not split over the 32 data x expert devices.*multiple of 32, or to 0",
  ):
    moe.group_layout(256, 512, fixed, train=True, num_shards=32)


def test_odd_token_counts_are_padded_and_sliced_back():
  config = MoeConfig(num_experts=4, max_group_size=8)
  layer, params, x = _layer_and_params(config, batch=3, length=5)
  y, sown = _apply(layer, params, x)
  assert y.shape == (3, 5, 8)
  assert sown["router_logits"].shape == (3, 5, 4)


# --------------------------------------------------------------------------------------------
# Bad settings.


@pytest.mark.parametrize(
  "overrides,message",
  [
    (
      dict(num_selected_experts=5),
      "moe.num_selected_experts=5 must be between 1 and moe.num_experts=4; lower k or add experts",
    ),
    (dict(train_capacity_factor=0.0), "moe.train_capacity_factor=0.0 must be > 0"),
    (dict(eval_capacity_factor=-1.0), "moe.eval_capacity_factor=-1.0 must be > 0"),
    (dict(max_group_size=0), "moe.max_group_size=0 must be >= 1 token"),
    (dict(router_type="top1"), "moe.router_type='top1' is not a router; use one of"),
  ],
)
def test_bad_moe_settings_raise_clear_errors(overrides, message):
  config = MoeConfig(num_experts=4, **overrides)
  layer = switchjax.MoeLayer(config, d_ff=8)
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
    layer.init(jax.random.key(0), jnp.ones((2, 8, 4)))


# --------------------------------------------------------------------------------------------
# A new router is one class.


@switchjax.register_router("test_renormalized_top_k")
class RenormalizedTopKRouter(switchjax.Router):
  """Tokens-choose top-k whose combine weights are renormalised over the experts that took the
  token (as Mixtral-style routers do), defined here, outside the library."""

  @classmethod
  def experts_per_token(cls, config, train=True):
    return float(config.num_selected_experts)

  def route(self, router_probs, padding_mask, expert_capacity, causal, order):
    route = routing.tokens_choose_masked(
      router_probs,
      padding_mask,
      expert_capacity,
      self.config.num_selected_experts,
      order=order,
      choice_major=not causal,
    )
    total = jnp.sum(route.combine_array, axis=(2, 3), keepdims=True)  # [groups, tokens, 1, 1]
    return route.replace(combine_array=route.combine_array / jnp.where(total > 0, total, 1.0))


@pytest.mark.slow
def test_a_router_defined_outside_the_library_trains_through_the_config(tmp_path):
  import json

  from switchjax.training import train, train_flops_per_example

  config = switchjax.load_config(
    "tiny",
    [
      "model.moe.router_type=test_renormalized_top_k",
      "train.num_train_steps=2",
      "train.log_every=1",
      "train.eval_every=0",
    ],
  )
  assert config.model.moe_for("decoder").router_type == "test_renormalized_top_k"
  assert train_flops_per_example(config) == train_flops_per_example(
    switchjax.load_config("tiny")
  )  # the class says one expert per token, as top-1
  result = train(config, tmp_path, progress=False, log=lambda _: None)
  assert result.step == 2 and all(np.isfinite(list(result.losses.values())))
  logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  # Top-1 weights renormalised over the one expert that took each token are exactly 1.
  assert logged[0]["router_confidence"] == pytest.approx(1.0)
  with pytest.raises(
    ValueError, match="test_renormalized_top_k routing: HF has only the tokens-choose top-1 router"
  ):
    switchjax.hf.config_to_hf(config.model)


def test_an_unknown_router_names_the_registered_ones():
  with pytest.raises(
    ValueError,
    match=r"moe.router_type='top9' is not a router; use one of "
    r"tokens_choose_masked, tokens_choose_scatter, experts_choose_masked",
  ):
    switchjax.load_config("tiny", ["model.moe.router_type=top9"])
