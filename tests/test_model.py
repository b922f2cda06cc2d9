"""The Switch encoder-decoder: placement rules, presets, masks, losses."""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from tiny import tiny_config
from transformers.models.switch_transformers.modeling_switch_transformers import (
  SwitchTransformersAttention,
)

import switchjax
from switchjax import layers, losses
from switchjax.config import ModelConfig, MoeConfig
from switchjax.config.sparse_layout import sparse_layer_indices
from switchjax.model import SwitchEncoder, SwitchTransformer

# --------------------------------------------------------------------------------------------
# Sparse placement.


@pytest.mark.parametrize(
  "n,s,layout,expected",
  [
    (12, 6, "mixed", (1, 3, 5, 7, 9, 11)),
    (12, 4, "mixed", (2, 5, 8, 11)),
    (12, 3, "bottom", (0, 1, 2)),
    (12, 3, "top", (9, 10, 11)),
    (12, 4, "middle", (4, 5, 6, 7)),
    (15, 15, "mixed", tuple(range(15))),
    (12, 0, "mixed", ()),
    (12, 6, "hf", (1, 3, 5, 7, 9, 11)),
    (12, 4, "hf", (1, 4, 7, 10)),
    (8, 3, "hf", (1, 3, 5, 7)),
    (4, 4, "hf", (0, 1, 2, 3)),
  ],
)
def test_sparse_layer_placement(n, s, layout, expected):
  assert sparse_layer_indices(n, s, layout) == expected


@pytest.mark.slow
def test_explicit_sparse_layers_override_the_layout():
  cfg = ModelConfig(
    num_layers=4,
    num_decoder_layers=3,
    sparse_encoder_layers=(0, 3),
    sparse_decoder_layers=(2,),
    d_model=16,
    d_ff=32,
    num_heads=2,
    d_kv=8,
    vocab_size=64,
    moe=MoeConfig(num_experts=2),
  )
  params = _init(SwitchTransformer(cfg))
  assert {k for k, v in params["encoder"].items() if "router" in v.get("mlp", {})} == {
    "layers_0",
    "layers_3",
  }
  assert {
    k for k, v in params["decoder"].items() if isinstance(v, dict) and "router" in v.get("mlp", {})
  } == {"layers_2"}


# --------------------------------------------------------------------------------------------
# Presets.


def _count(config: ModelConfig) -> int:
  model = SwitchTransformer(config)
  tokens = jnp.ones((1, 8), jnp.int32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens, tokens))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["params"]))


def test_base8_has_the_released_parameter_count():
  assert _count(switchjax.load_config("base8").model) == 619_339_008


@pytest.mark.parametrize(
  "name,d_model,layers,experts,tied",
  [
    ("base256", 768, 12, 256, True),
    ("large128", 1024, 24, 128, True),
    ("xxl128", 4096, 24, 128, False),
    ("c2048", 2080, 15, 2048, False),
  ],
)
def test_released_presets(name, d_model, layers, experts, tied):
  cfg = switchjax.load_config(name)
  assert (
    cfg.model.d_model,
    cfg.model.num_layers,
    cfg.model.moe.num_experts,
    cfg.model.tie_embeddings,
  ) == (d_model, layers, experts, tied)
  assert cfg.train.aux_loss_factor == 0.01 and cfg.train.router_z_loss_factor == 0.0
  assert cfg.model.moe.jitter_noise == 0.0 and cfg.model.init_scale == 0.1
  assert (cfg.data.inputs_length, cfg.data.targets_length, cfg.train.batch_size) == (512, 114, 256)
  if name == "xxl128":
    assert cfg.model.mlp_activations == ("gelu", "linear")
  if name == "c2048":
    assert cfg.model.num_sparse_encoder_layers == 15 and cfg.model.moe.max_group_size == 2048


# --------------------------------------------------------------------------------------------
# Layers.


def test_relative_position_buckets_equal_hugging_face():
  relative = np.arange(-600, 601)[None, :]
  for bidirectional in (True, False):
    ours = layers.relative_position_bucket(relative, bidirectional, 32, 128)
    theirs = SwitchTransformersAttention._relative_position_bucket(
      torch.tensor(relative), bidirectional=bidirectional, num_buckets=32, max_distance=128
    ).numpy()
    np.testing.assert_array_equal(ours, theirs)


def test_rms_norm_is_float32_and_scale_only():
  x = jax.random.normal(jax.random.key(0), (2, 3, 8)).astype(jnp.bfloat16)
  norm = layers.RMSNorm(dtype=jnp.bfloat16)
  params = {"params": {"scale": jnp.full((8,), 2.0)}}
  y = norm.apply(params, x)
  x32 = np.asarray(x, np.float32)
  expected = 2.0 * x32 / np.sqrt((x32**2).mean(-1, keepdims=True) + 1e-6)
  assert y.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y, np.float32), expected, rtol=1e-2)


def test_attention_softmax_is_jax_softmax_with_the_probability_only_derivative():
  k1, k2 = jax.random.split(jax.random.key(0))
  x = 4.0 * jax.random.normal(k1, (2, 3, 5, 7))
  x = x.at[..., -2:].set(layers.NEG_INF)  # masked keys, as attention adds them
  g = jax.random.normal(k2, x.shape)
  y = layers.softmax(x, -1)
  np.testing.assert_array_equal(y, jax.nn.softmax(x, axis=-1))  # the same forward, bit for bit
  (grad,) = jax.vjp(lambda x: layers.softmax(x, -1), x)[1](g)
  y64, g64 = np.asarray(y, np.float64), np.asarray(g, np.float64)
  expected = y64 * (g64 - np.sum(g64 * y64, -1, keepdims=True))  # d softmax, from y alone
  np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-6)  # eps x |y g| ~ 1
  (jax_grad,) = jax.vjp(lambda x: jax.nn.softmax(x, axis=-1), x)[1](g)
  np.testing.assert_allclose(grad, jax_grad, rtol=1e-5, atol=1e-6)
  assert np.all(np.asarray(grad)[..., -2:] == 0.0)


def _init(model, enc_len=8, dec_len=4):
  enc = jnp.ones((2, enc_len), jnp.int32)
  dec = jnp.ones((2, dec_len), jnp.int32)
  args = (enc,) if isinstance(model, SwitchEncoder) else (enc, dec)
  return nn.unbox(model.init(jax.random.key(0), *args))["params"]


@pytest.mark.slow
def test_encoder_only_model_equals_the_encoder_of_the_encoder_decoder():
  cfg = tiny_config()
  full = SwitchTransformer(cfg)
  params = _init(full)
  tokens = jnp.array([[5, 6, 7, 8, 1, 0, 0, 0], [9, 3, 4, 1, 0, 0, 0, 0]])
  encoded = full.apply({"params": params}, tokens, method=full.encode)
  encoder_params = {"token_embedder": params["token_embedder"], "encoder": params["encoder"]}
  alone = SwitchEncoder(cfg).apply({"params": encoder_params}, tokens)
  np.testing.assert_array_equal(np.asarray(alone), np.asarray(encoded))


@pytest.mark.slow
def test_decoder_is_causal_and_padding_does_not_leak():
  cfg = tiny_config()
  model = SwitchTransformer(cfg)
  params = _init(model)
  enc = jnp.array([[5, 6, 7, 8, 1, 0, 0, 0]])
  dec = jnp.array([[0, 11, 12, 13]])
  logits = model.apply({"params": params}, enc, dec)
  # Changing a later decoder token leaves earlier positions alone.
  changed = model.apply({"params": params}, enc, dec.at[0, 3].set(40))
  np.testing.assert_allclose(np.asarray(changed[0, :3]), np.asarray(logits[0, :3]), atol=1e-6)
  # Changing an encoder padding token changes nothing: padding keys are masked and, with
  # mask_padding_activations, padding positions are routed as zeros.
  moved = model.apply({"params": params}, enc.at[0, 6].set(0), dec)
  np.testing.assert_array_equal(np.asarray(moved), np.asarray(logits))


def test_tied_logits_are_scaled_and_untied_logits_have_their_own_kernel():
  tied = _init(SwitchTransformer(tiny_config()))
  untied = _init(SwitchTransformer(tiny_config(tie_embeddings=False)))
  assert "logits_dense" not in tied["decoder"] and untied["decoder"]["logits_dense"].shape == (
    16,
    64,
  )


@pytest.mark.slow
def test_remat_gives_the_same_loss_and_gradients():
  cfg = tiny_config()
  enc = jnp.array([[5, 6, 7, 8, 1, 0, 0, 0], [9, 3, 4, 1, 0, 0, 0, 0]])
  dec = jnp.array([[0, 11, 12, 13], [0, 14, 15, 0]])
  params = _init(SwitchTransformer(cfg))

  def loss(p, model):
    logits = model.apply(
      {"params": p}, enc, dec, enable_dropout=True, rngs={"dropout": jax.random.key(0)}
    )
    return jnp.sum(logits**2)

  plain = jax.value_and_grad(loss)(params, SwitchTransformer(cfg))
  remat = jax.value_and_grad(loss)(
    params, SwitchTransformer(dataclasses.replace(cfg, remat="full"))
  )
  np.testing.assert_allclose(float(remat[0]), float(plain[0]), rtol=1e-6)
  for a, b in zip(jax.tree.leaves(remat[1]), jax.tree.leaves(plain[1])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_every_sparse_layer_sows_its_router_logits_and_metrics():
  cfg = tiny_config(num_sparse_encoder_layers=2, num_sparse_decoder_layers=1)
  model = SwitchTransformer(cfg)
  params = _init(model)
  enc = jnp.ones((2, 8), jnp.int32)
  dec = jnp.ones((2, 4), jnp.int32)
  _, state = model.apply({"params": params}, enc, dec, mutable=["intermediates"])
  found = losses.moe_layer_metrics(state["intermediates"])
  assert sorted(found) == ["decoder/layers_1/mlp", "encoder/layers_0/mlp", "encoder/layers_1/mlp"]
  assert found["encoder/layers_0/mlp"]["router_logits"].shape == (2, 8, 2)
  assert found["decoder/layers_1/mlp"]["tokens_per_expert"].shape == (2,)


# --------------------------------------------------------------------------------------------
# Losses.


def test_cross_entropy_with_label_smoothing_and_z_loss_matches_the_formula():
  rng = np.random.RandomState(0)
  logits = rng.randn(2, 3, 5).astype(np.float32)
  targets = np.array([[1, 2, 0], [4, 0, 0]])
  weights = (targets > 0).astype(np.float32)
  total, z_total, n = losses.cross_entropy_with_z_loss(
    jnp.array(logits), jnp.array(targets), jnp.array(weights), z_loss=1e-4, label_smoothing=0.1
  )
  log_z = np.log(np.exp(logits).sum(-1))
  log_p = logits - log_z[..., None]
  smooth = np.full_like(logits, 0.1 / 4)
  np.put_along_axis(smooth, targets[..., None], 0.9, axis=-1)
  entropy = -(0.9 * math.log(0.9) + 4 * (0.1 / 4) * math.log(0.1 / 4))
  ce = -(smooth * log_p).sum(-1) - entropy
  expected = ((ce + 1e-4 * log_z**2) * weights).sum()
  np.testing.assert_allclose(float(total), expected, rtol=1e-5)
  np.testing.assert_allclose(float(z_total), (1e-4 * log_z**2 * weights).sum(), rtol=1e-5)
  assert float(n) == 3.0


def test_training_loss_adds_layer_means_of_the_moe_losses():
  cfg = tiny_config(num_sparse_encoder_layers=2)
  model = SwitchTransformer(cfg)
  params = _init(model)
  batch = {"decoder_target_tokens": jnp.array([[11, 12, 1, 0], [13, 1, 0, 0]])}
  enc = jnp.array([[5, 6, 7, 8, 1, 0, 0, 0], [9, 3, 4, 1, 0, 0, 0, 0]])
  dec = jnp.array([[0, 11, 12, 1], [0, 13, 1, 0]])
  logits, state = model.apply({"params": params}, enc, dec, mutable=["intermediates"])
  loss, metrics = losses.loss_and_metrics(
    logits,
    batch,
    state["intermediates"],
    z_loss=1e-4,
    aux_loss_factor=0.01,
    router_z_loss_factor=0.001,
  )
  per_layer = losses.moe_layer_metrics(state["intermediates"]).values()
  aux = np.mean([float(m["auxiliary_loss"]) for m in per_layer])
  rz = np.mean([float(m["router_z_loss"]) for m in per_layer])
  total, _, n = losses.cross_entropy_with_z_loss(
    logits, batch["decoder_target_tokens"], batch["decoder_target_tokens"] > 0, 1e-4
  )
  np.testing.assert_allclose(float(loss), float(total / n) + 0.01 * aux + 0.001 * rz, rtol=1e-6)
  assert float(metrics["num_target_tokens"]) == 5.0
