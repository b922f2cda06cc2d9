"""A from-scratch run starts as flaxformer/T5X's: initialisation, per-stack routers, mixed
precision and dropout shapes (the parts the forward-pass parity tests do not cover)."""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import switchjax
from switchjax import MoeConfig, MoeLayer, SwitchTransformer
from switchjax.config import ModelConfig
from switchjax.model import init_params

# --------------------------------------------------------------------------------------------
# Initialisation: flaxformer's moe.gin + tokens_choose_base.gin with SCALE = init_scale.


def expected_spreads(cfg: ModelConfig) -> dict[str, tuple[float, str]]:
  """(standard deviation, distribution) of each parameter family under flaxformer's recipe.

  variance_scaling(s, 'fan_in', d) has variance s / fan_in (truncated normals are corrected to
  that variance); 'fan_avg' divides by (fan_in + fan_out) / 2. flaxformer's attention kernels
  are 2-D [d_model, heads * d_kv] (fan-in d_model; the query's further divided by sqrt(d_kv))
  and [heads * d_kv, d_model] for the output; the relative position bias is [heads, buckets].
  """
  s, d, f = cfg.init_scale, cfg.d_model, cfg.d_ff
  h, k, b = cfg.num_heads, cfg.d_kv, cfg.relative_attention_num_buckets
  return {
    "token_embedder": (1.0, "normal"),
    "query": (math.sqrt(s / d) / math.sqrt(k), "normal"),
    "key": (math.sqrt(s / d), "normal"),
    "value": (math.sqrt(s / d), "normal"),
    "out": (math.sqrt(s / (h * k)), "normal"),
    "rel_embedding": (math.sqrt(s / ((h + b) / 2)), "uniform"),
    "mlp/wi": (math.sqrt(s / d), "truncated_normal"),
    "mlp/wo": (math.sqrt(s / f), "truncated_normal"),
    "expert/wi": (math.sqrt(s / d), "normal"),
    "expert/wo": (math.sqrt(s / cfg.expert_mlp_dim), "normal"),
    "router": (0.02, "normal"),
    "logits_dense": (math.sqrt(s / d), "truncated_normal"),
  }


def _families(params) -> dict[str, np.ndarray]:
  """{family: all its values}; expert kernels are the 3-D [experts, in, out] ones."""
  out: dict[str, list] = {}
  for path, value in jax.tree_util.tree_leaves_with_path(params):
    keys = [str(getattr(k, "key", k)) for k in path]
    name = keys[-1]
    if "router" in keys:
      key = "router"
    elif name in ("wi", "wo"):
      key = ("expert/" if value.ndim == 3 else "mlp/") + name
    elif name == "embedding":
      key = "token_embedder"
    elif name in ("query", "key", "value", "out", "rel_embedding", "logits_dense"):
      key = name
    else:
      continue  # norm scales (ones)
    out.setdefault(key, []).append(np.asarray(value).ravel())
  return {key: np.concatenate(values) for key, values in out.items()}


def _preset(name: str, layers: int) -> ModelConfig:
  cfg = switchjax.load_config(name).model
  return dataclasses.replace(
    cfg,
    num_layers=layers,
    num_decoder_layers=layers,
    num_sparse_encoder_layers=1,
    num_sparse_decoder_layers=1,
    tie_embeddings=False,
    dtype="float32",
  )


@pytest.mark.slow
@pytest.mark.parametrize("name,layers", [("small", 2), ("base8", 2)])
def test_initial_spread_of_every_parameter_family_matches_flaxformer(name, layers):
  cfg = _preset(name, layers)
  params = jax.jit(lambda key: nn.unbox(init_params(SwitchTransformer(cfg), key)))(
    jax.random.key(0)
  )
  families = _families(params)
  expected = expected_spreads(cfg)
  assert set(families) == set(expected)
  for key, values in families.items():
    std, distribution = expected[key]
    n = values.size
    if distribution == "uniform":
      # U(-a, a) with a = sqrt(3) std: every value inside, the largest close to the bound.
      bound = math.sqrt(3) * std
      assert np.abs(values).max() <= bound * (1 + 1e-6), key
      assert np.abs(values).max() >= bound * 0.95, key
      se = 0.45 / math.sqrt(n)  # relative standard error of a uniform sample's std
    else:
      se = 1 / math.sqrt(2 * n)
    assert abs(values.std() / std - 1) <= max(0.02, 4 * se), (key, values.std(), std)
    assert abs(values.mean()) <= 4 * std / math.sqrt(n) + 1e-3 * std, key


# --------------------------------------------------------------------------------------------
# A router per stack; the decoder's is causal.


def _tiny(**moe_changes) -> ModelConfig:
  cfg = switchjax.load_config("tiny").model
  moe = dataclasses.replace(
    cfg.moe, max_group_size=64, train_capacity_factor=0.5, min_expert_capacity=1, **moe_changes
  )
  return dataclasses.replace(cfg, moe=moe, dropout_rate=0.0)


DECODER_ROUTERS = [
  dict(router_type="tokens_choose_masked", num_selected_experts=1),
  dict(router_type="tokens_choose_masked", num_selected_experts=2),
  dict(router_type="tokens_choose_scatter", num_selected_experts=1),
  dict(router_type="tokens_choose_scatter", num_selected_experts=2),
]


@pytest.mark.slow
@pytest.mark.parametrize("dispatch", ["buffers", "sorted"])
@pytest.mark.parametrize("router", DECODER_ROUTERS, ids=lambda r: "-".join(map(str, r.values())))
def test_decoder_token_outputs_ignore_later_tokens(router, dispatch):
  """Decoder logits at positions <= t do not change when tokens after t change, in training
  mode with capacity overflow, several sequences per routing group (4 x 8 tokens in one group)
  and every router a decoder accepts. The capacity buffers are bit-causal; sorted runs (what
  dispatch='auto' trains with on one CPU device) are cut into matmuls by each expert's whole
  load, so later tokens may move an earlier output by a rounding error, never its routing (a
  routing leak moves outputs by more than 1e-3: see the next test)."""
  cfg = _tiny()
  decoder_moe = dataclasses.replace(cfg.moe_for("decoder"), **router, dispatch=dispatch)
  cfg = dataclasses.replace(cfg, decoder_moe=decoder_moe)
  model = SwitchTransformer(cfg)
  rng = np.random.default_rng(0)
  inputs = rng.integers(2, cfg.vocab_size, (4, 16))
  decoder_inputs = rng.integers(2, cfg.vocab_size, (4, 8))
  params = init_params(model, jax.random.key(0))

  def logits(tokens):
    out, state = model.apply(
      {"params": params},
      inputs,
      tokens,
      enable_dropout=True,
      mutable=["intermediates"],
      rngs={"dropout": jax.random.key(1), "jitter": jax.random.key(2)},
    )
    dropped = float(
      state["intermediates"]["decoder"]["layers_1"]["mlp"]["fraction_tokens_left_behind"][0]
    )
    return np.asarray(out), dropped

  reference, dropped = logits(decoder_inputs)
  assert dropped > 0.2  # capacity overflows, so the order of service matters
  for t in range(7):
    changed = decoder_inputs.copy()
    changed[:, t + 1 :] = rng.integers(2, cfg.vocab_size, changed[:, t + 1 :].shape)
    earlier = logits(changed)[0][:, : t + 1]
    if dispatch == "buffers":
      np.testing.assert_array_equal(earlier, reference[:, : t + 1])
    else:
      np.testing.assert_allclose(earlier, reference[:, : t + 1], rtol=0, atol=2e-6)


@pytest.mark.slow
def test_encoder_style_routing_would_leak_the_future():
  """The control for the test above: the same layer serving tokens as the encoder does
  (group order, every first choice before any second choice) lets later tokens change earlier
  outputs; the causal order does not."""
  config = MoeConfig(
    num_experts=4,
    num_selected_experts=2,
    max_group_size=64,
    train_capacity_factor=0.5,
    min_expert_capacity=1,
  )
  x = jax.random.normal(jax.random.key(0), (4, 8, 16))
  later = x.at[:, 4:].set(jax.random.normal(jax.random.key(1), (4, 4, 16)))
  leaks = {}
  for causal in (False, True):
    layer = MoeLayer(config, d_ff=32, causal=causal)
    params = layer.init(jax.random.key(2), x)
    y0 = layer.apply(params, x, enable_dropout=True)
    y1 = layer.apply(params, later, enable_dropout=True)
    leaks[causal] = float(jnp.abs(y0[:, :4] - y1[:, :4]).max())
  assert leaks[False] > 1e-3 and leaks[True] == 0.0


def test_decoder_settings_default_to_the_encoders_made_causal():
  cfg = switchjax.load_config("small", ["model.moe.batch_prioritized_routing=true"]).model
  assert cfg.moe.batch_prioritized_routing and not cfg.moe_for("decoder").batch_prioritized_routing
  ec = switchjax.load_config("small", ["model.moe.router_type=experts_choose_masked"]).model
  decoder = ec.moe_for("decoder")
  assert (decoder.router_type, decoder.num_selected_experts) == ("tokens_choose_masked", 2)
  # --set model.decoder_moe.X starts from that default, whatever the order of the flags.
  for flags in (
    ["model.decoder_moe.num_selected_experts=2", "model.moe.num_experts=4"],
    ["model.moe.num_experts=4", "model.decoder_moe.num_selected_experts=2"],
  ):
    cfg = switchjax.load_config("small", flags).model
    assert cfg.decoder_moe == dataclasses.replace(cfg.moe, num_selected_experts=2)


@pytest.mark.parametrize(
  "flag,message",
  [
    (
      "model.decoder_moe.router_type=experts_choose_masked",
      r"model.decoder_moe.router_type='experts_choose_masked' cannot route a decoder: each "
      r"expert picks its tokens from the whole group, so a token's routing depends on later "
      r"tokens; use --set model.decoder_moe.router_type=tokens_choose_masked",
    ),
    (
      "model.decoder_moe.batch_prioritized_routing=true",
      r"model.decoder_moe.batch_prioritized_routing=True cannot route a decoder: .* set "
      r"model.decoder_moe.batch_prioritized_routing=False",
    ),
  ],
)
def test_non_causal_decoder_routers_are_refused(flag, message):
  with pytest.raises(ValueError, match=message):
    switchjax.load_config("small", [flag])


def test_experts_choose_preset_follows_experts_choose_base_gin():
  cfg = switchjax.load_config("ec_base64")
  m = cfg.model
  assert (m.d_model, m.d_ff, m.num_heads, m.num_layers, m.decoder_layers) == (768, 2048, 12, 12, 12)
  assert m.mlp_activations == ("gelu", "linear") and not m.tie_embeddings
  assert (m.moe.router_type, m.moe.num_experts, m.moe.max_group_size) == (
    "experts_choose_masked",
    64,
    4096,
  )
  assert (m.moe.train_capacity_factor, m.moe.eval_capacity_factor) == (1.0, 1.0)
  decoder = m.moe_for("decoder")
  assert (decoder.router_type, decoder.num_selected_experts) == ("tokens_choose_masked", 2)
  assert (m.moe.combine_dtype, decoder.combine_dtype) == ("bfloat16", "float32")
  assert (cfg.train.aux_loss_factor, cfg.train.router_z_loss_factor) == (0.01, 0.0)


# --------------------------------------------------------------------------------------------
# Mixed precision.


def _outputs(cfg: ModelConfig, params, inputs, targets):
  model = SwitchTransformer(cfg)
  logits, state = model.apply(
    {"params": params},
    inputs,
    targets,
    capture_intermediates=True,
    mutable=["intermediates"],
  )
  return logits, state["intermediates"]


def _dtype(tree, *path):
  """dtype of a submodule's output (of the last output for modules returning a tuple)."""
  for key in path:
    tree = tree[key]
  return jax.tree.leaves(tree["__call__"][0])[-1].dtype


@pytest.fixture(scope="module")
def tiny_batch():
  cfg = switchjax.load_config("tiny").model
  rng = np.random.default_rng(0)
  params = nn.unbox(init_params(SwitchTransformer(cfg), jax.random.key(0)))
  return (
    cfg,
    params,
    rng.integers(2, cfg.vocab_size, (4, 32)),
    rng.integers(2, cfg.vocab_size, (4, 8)),
  )


@pytest.mark.slow
def test_bfloat16_model_keeps_the_residual_stream_float32_from_the_first_sparse_layer(tiny_batch):
  cfg, params, inputs, targets = tiny_batch
  bf16 = dataclasses.replace(cfg, dtype="bfloat16")  # tiny: layer 1 of each stack is sparse
  logits, inter = _outputs(bf16, params, inputs, targets)
  assert logits.dtype == jnp.float32
  for stack in ("encoder", "decoder"):
    assert _dtype(inter, stack, "layers_0") == jnp.bfloat16  # dense layer before it
    assert _dtype(inter, stack, "layers_1", "mlp") == jnp.float32  # float32 combine weights
    assert _dtype(inter, stack, "layers_1") == jnp.float32  # the residual stream from here on
    assert _dtype(inter, stack, "layers_1", "mlp", "router") == jnp.float32  # its logits
    assert _dtype(inter, stack, "layers_1", "mlp", "Dropout_0") == jnp.bfloat16  # experts
    assert _dtype(inter, stack, "layers_1", "pre_mlp_layer_norm") == jnp.bfloat16
  # combine_dtype='bfloat16' keeps the stream in bfloat16 (faster, documented).
  fast = dataclasses.replace(bf16, moe=dataclasses.replace(bf16.moe, combine_dtype="bfloat16"))
  _, inter = _outputs(fast, params, inputs, targets)
  for stack in ("encoder", "decoder"):
    assert _dtype(inter, stack, "layers_1", "mlp") == jnp.bfloat16
    assert _dtype(inter, stack, "layers_1") == jnp.bfloat16


# Measured on the tiny preset: max |logits_bf16 - logits_f32| is 2.5% of the float32 logits'
# standard deviation and the argmax agrees at every position
# (python -m pytest tests/test_fidelity.py -k twin -s).
BF16_TOLERANCE = 0.05  # of the float32 logits' standard deviation
BF16_ARGMAX_AGREEMENT = 0.9


@pytest.mark.slow
def test_bfloat16_tiny_model_stays_close_to_its_float32_twin(tiny_batch):
  cfg, params, inputs, targets = tiny_batch
  f32, _ = _outputs(cfg, params, inputs, targets)
  bf16, _ = _outputs(dataclasses.replace(cfg, dtype="bfloat16"), params, inputs, targets)
  f32, bf16 = np.asarray(f32), np.asarray(bf16)
  relative = np.abs(bf16 - f32).max() / f32.std()
  agreement = np.mean(bf16.argmax(-1) == f32.argmax(-1))
  print(f"bf16 vs f32: max diff / std {relative:.4f}, argmax agreement {agreement:.3f}")
  assert relative < BF16_TOLERANCE and agreement >= BF16_ARGMAX_AGREEMENT


@pytest.mark.parametrize("precision", ["default", "highest"])
def test_router_matmul_precision_is_a_setting(precision):
  assert MoeConfig().router_precision == "default"  # flaxformer's RouterWeights default
  layer = MoeLayer(MoeConfig(num_experts=4, max_group_size=16, router_precision=precision), d_ff=16)
  x = jnp.ones((2, 8, 8))
  variables = layer.init(jax.random.key(0), x)
  jaxpr = jax.make_jaxpr(lambda v: layer.apply(v, x))(variables)
  router = [
    e
    for e in jaxpr.jaxpr.eqns
    if e.primitive.name == "dot_general" and e.invars[1].aval.shape == (8, 4)
  ]
  assert [e.params["precision"] for e in router] == [(jax.lax.Precision[precision.upper()],) * 2]


# --------------------------------------------------------------------------------------------
# Dropout shapes.


def _dropout_output(module, variables, *args, name="Dropout_0", **kwargs):
  _, state = module.apply(
    variables,
    *args,
    enable_dropout=True,
    capture_intermediates=True,
    mutable=["intermediates"],
    rngs={"dropout": jax.random.key(3), "jitter": jax.random.key(4)},
    **kwargs,
  )

  def find(tree):
    for key, value in tree.items():
      if key == name:
        return value["__call__"][0]
      if isinstance(value, dict) and (found := find(value)) is not None:
        return found
    return None

  return np.asarray(find(state["intermediates"]))


def test_attention_dropout_shares_its_mask_across_queries():
  attention = switchjax.layers.MultiHeadAttention(num_heads=2, d_kv=4, dropout_rate=0.5)
  x = jax.random.normal(jax.random.key(0), (3, 6, 8))
  variables = attention.init(jax.random.key(1), x, x, None)
  weights = _dropout_output(attention, variables, x, x, None)  # [batch, heads, q, kv]
  dropped = weights == 0
  assert 0.3 < dropped.mean() < 0.7
  assert np.all(dropped == dropped[:, :, :1, :])  # the same mask for every query
  assert not np.all(dropped == dropped[:1])  # but not for every row


def test_expert_dropout_uses_one_mask_per_expert_over_all_its_slots():
  # The capacity buffers' layout, whose slots this test inspects (the sorted dispatch draws the
  # same masks: tests/test_dropless.py).
  config = MoeConfig(num_experts=4, max_group_size=8, train_capacity_factor=2.0, dispatch="buffers")
  layer = MoeLayer(config, d_ff=16, activations=("gelu",), dropout_rate=0.5)
  x = jax.random.normal(jax.random.key(0), (4, 8, 8))  # 4 groups of 8 tokens
  variables = layer.init(jax.random.key(1), x)
  hidden = _dropout_output(layer, variables, x)  # [experts, groups, capacity, d_ff]
  used = _dropout_output(layer.clone(dropout_rate=0.0), variables, x) != 0  # filled slots
  dropped = (hidden == 0) & used
  assert hidden.shape[:2] == (4, 4) and 0.3 < dropped.sum() / used.sum() < 0.7
  masks = []
  for e in range(4):
    # Each hidden unit of an expert is dropped in all of its filled slots or in none.
    per_unit = [dropped[e, ..., f][used[e, ..., f]] for f in range(16)]
    assert all(v.all() or not v.any() for v in per_unit if v.size)
    masks.append([bool(v.all()) for v in per_unit])
  assert len({tuple(m) for m in masks}) > 1  # experts draw their own masks
