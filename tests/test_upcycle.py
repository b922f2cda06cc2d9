"""Sparse upcycling (switchjax/upcycle.py, scripts/upcycle.py).

A dense tiny model (a switchjax checkpoint, or a random transformers T5 saved in the layouts
found in the wild) is upcycled into a Switch model with 4 experts in layer 1 of each stack, with
capacity for every token at evaluation:

- with the renormalised router the upcycled logits equal the dense model's (and transformers'
  for the T5 directories);
- with Switch's router each MoE output is exactly the router probability times the dense MLP's
  output (checked per layer with random routers, and through the whole model with zero routers,
  where the probability is 1/E);
- a dense model that does not fit the config is a one-line error naming the tensor and field;
- a few training steps from the upcycled checkpoint lower the loss.
"""

import dataclasses
import json
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from switchjax import checkpoint, layers, model_loading, upcycle
from switchjax.config import Config, load_config
from switchjax.model import SwitchTransformer, init_params
from switchjax.moe import MoeLayer
from switchjax.training import train

ROOT = pathlib.Path(__file__).resolve().parents[1]
NUM_EXPERTS = 4
transformers.utils.logging.disable_progress_bar()


def dense_config(*overrides) -> Config:
  return load_config(
    "tiny",
    ["model.num_sparse_encoder_layers=0", "model.num_sparse_decoder_layers=0", *overrides],
  )


def switch_config(*overrides) -> Config:
  """The tiny preset (4 experts in layer 1 of each stack), able to take every token at eval."""
  return load_config("tiny", [f"model.moe.eval_capacity_factor={NUM_EXPERTS}", *overrides])


RENORMALIZED = f"model.moe.router_type={upcycle.RENORMALIZED_ROUTER}"


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory) -> pathlib.Path:
  """A random dense tiny model (init scale 1, so the MLPs matter) saved as a checkpoint."""
  config = dense_config("model.init_scale=1.0")
  init = lambda key: nn.unbox(init_params(SwitchTransformer(config.model), key))
  params = jax.jit(init)(jax.random.key(1))
  directory = tmp_path_factory.mktemp("dense")
  checkpoint.save_model(directory, config, jax.tree.map(np.asarray, jax.device_get(params)))
  (directory / "spiece.model").write_bytes(b"not really a tokenizer")
  return directory


@pytest.fixture(scope="module")
def dense(dense_dir) -> upcycle.DenseModel:
  model = upcycle.read_dense(dense_dir)
  return dataclasses.replace(model, params=jax.tree.map(np.asarray, model.params))


def tokens(vocab: int = 640):
  return upcycle.random_batch(dataclasses.replace(dense_config().model, vocab_size=vocab))


def model_logits(config, params, batch) -> np.ndarray:
  return upcycle.logits(config, jax.tree.map(np.asarray, params), *batch)


# --------------------------------------------------------------------------------------------
# What the upcycled model computes.


@pytest.mark.slow
def test_upcycled_checkpoint_holds_copies_of_the_dense_mlps_and_fresh_routers(dense_dir, tmp_path):
  config = upcycle.upcycle(dense_dir, switch_config(), tmp_path / "out")
  assert (tmp_path / "out" / "spiece.model").read_bytes() == b"not really a tokenizer"
  assert config.data.spm_path == str((tmp_path / "out" / "spiece.model").resolve())
  saved, params = model_loading.load_model(tmp_path / "out")
  assert saved == config and saved.model.moe.num_experts == NUM_EXPERTS
  _, dense = model_loading.load_model(dense_dir)
  for stack in ("encoder", "decoder"):
    sparse, mlp = params[stack]["layers_1"]["mlp"], dense[stack]["layers_1"]["mlp"]
    for name in ("wi", "wo"):
      assert sparse[name].shape == (NUM_EXPERTS, *mlp[name].shape)
      assert all(np.array_equal(sparse[name][e], mlp[name]) for e in range(NUM_EXPERTS))
    router = np.asarray(sparse["router"]["kernel"])
    assert router.shape == (32, NUM_EXPERTS) and 0.015 < router.std() < 0.025  # normal(0.02)
    assert np.array_equal(
      params[stack]["layers_0"]["mlp"]["wi"], dense[stack]["layers_0"]["mlp"]["wi"]
    )
  assert np.array_equal(params["token_embedder"]["embedding"], dense["token_embedder"]["embedding"])
  # The routers are what differs: the same seed gives the same model, another seed another router.
  again = upcycle.upcycle_params(upcycle.read_dense(dense_dir), config.model, seed=0)
  other = upcycle.upcycle_params(upcycle.read_dense(dense_dir), config.model, seed=1)
  router = ("encoder", "layers_1", "mlp", "router", "kernel")
  pick = lambda tree: np.asarray(tree[router[0]][router[1]][router[2]][router[3]][router[4]])
  assert np.array_equal(pick(again), pick(params)) and not np.array_equal(pick(other), pick(params))


@pytest.mark.slow
def test_renormalized_router_gives_the_dense_logits(dense):
  config = switch_config(RENORMALIZED)
  params = upcycle.upcycle_params(dense, config.model)
  batch = tokens()
  reference = model_logits(dense.config, dense.params, batch)
  difference = np.abs(model_logits(config.model, params, batch) - reference).max()
  assert difference < 1e-5, difference
  # Switch's combine weights (the router probability) change the function.
  switch = model_logits(switch_config().model, params, batch)
  assert np.abs(switch - reference).max() > 0.1
  assert upcycle.logit_differences(dense, config.model, params)["renormalized"] < 1e-5


def test_top2_renormalized_also_gives_the_dense_logits(dense):
  config = switch_config(RENORMALIZED, "model.moe.num_selected_experts=2")
  params = upcycle.upcycle_params(dense, config.model)
  batch = tokens()
  difference = np.abs(
    model_logits(config.model, params, batch) - model_logits(dense.config, dense.params, batch)
  )
  assert difference.max() < 1e-5, difference.max()


@pytest.mark.parametrize("router", ["tokens_choose_masked", upcycle.RENORMALIZED_ROUTER])
def test_each_moe_output_is_the_router_probability_times_the_dense_mlp(dense, router):
  """Per layer, with the upcycled experts and a random (confident) router: Switch's combine
  weight makes the output p_top1(x) * dense_mlp(x) exactly; the renormalised one dense_mlp(x)."""
  config = switch_config(f"model.moe.router_type={router}").model
  params = upcycle.upcycle_params(dense, config)
  x = jax.random.normal(jax.random.key(0), (2, 16, 32))
  for stack in ("encoder", "decoder"):
    sparse = jax.tree.map(np.asarray, params[stack]["layers_1"]["mlp"])
    sparse["router"]["kernel"] = 3.0 * np.asarray(
      jax.random.normal(jax.random.key(2), sparse["router"]["kernel"].shape)
    )
    moe = MoeLayer(config.moe_for(stack), d_ff=64, causal=stack == "decoder")
    mlp = layers.MlpBlock(64)
    y = moe.apply({"params": sparse}, x)
    expected = mlp.apply({"params": dense.params[stack]["layers_1"]["mlp"]}, x)
    if router == "tokens_choose_masked":
      probs = jax.nn.softmax(jnp.einsum("btd,de->bte", x, sparse["router"]["kernel"]), axis=-1)
      top1 = np.asarray(probs.max(axis=-1))
      assert top1.min() < 0.6 and top1.max() > 0.9  # the factor varies from token to token
      expected = top1[..., None] * expected
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)


def test_with_zero_routers_the_model_is_the_dense_one_with_mlp_outputs_divided_by_e(dense):
  """Through the whole model: a zero router gives every expert probability 1/E, so the
  upcycled model equals the dense model whose upcycled MLPs have wo / E."""
  config = switch_config()
  params = jax.tree.map(np.array, upcycle.upcycle_params(dense, config.model))
  scaled = jax.tree.map(np.copy, dense.params)
  for stack in ("encoder", "decoder"):
    params[stack]["layers_1"]["mlp"]["router"]["kernel"][:] = 0.0
    scaled[stack]["layers_1"]["mlp"]["wo"] /= NUM_EXPERTS
  batch = tokens()
  upcycled = model_logits(config.model, params, batch)
  reference = model_logits(dense.config, scaled, batch)
  assert np.abs(upcycled - reference).max() < 1e-5
  assert np.abs(upcycled - model_logits(dense.config, dense.params, batch)).max() > 0.1


# --------------------------------------------------------------------------------------------
# Hugging Face T5 directories.

T5 = dict(
  vocab_size=64, d_model=16, d_ff=32, d_kv=4, num_heads=4, num_layers=2, decoder_start_token_id=0
)


def build_t5(directory: pathlib.Path, layout: str) -> transformers.T5ForConditionalGeneration:
  """A random tiny T5 saved in `layout`: 't5' (1.0: relu, tied and scaled logits), 't5_v1_1'
  (gated-gelu saved by transformers 5.x: no lm_head in the file, unscaled logits),
  't5_v1_1_4x' (transformers 4.x files of 1.1: an lm_head of its own, tie_word_embeddings
  false), 'mt5' (MT5ForConditionalGeneration saved by 5.x: gated-gelu, no lm_head,
  tie_word_embeddings true, unscaled logits) or 'mt5_4x' (mT5's 4.x files: an lm_head).
  Returns the model transformers loads from it."""
  mt5 = layout.startswith("mt5")
  kind = (
    transformers.MT5ForConditionalGeneration if mt5 else transformers.T5ForConditionalGeneration
  )
  if mt5:
    hf_config = transformers.MT5Config(**T5)
  elif layout == "t5":
    hf_config = transformers.T5Config(**T5)
  else:
    hf_config = transformers.T5Config(
      **T5, feed_forward_proj="gated-gelu", tie_word_embeddings=False
    )
  torch.manual_seed(0)
  kind(hf_config).save_pretrained(directory)
  if layout.endswith("_4x"):
    weights = load_file(directory / "model.safetensors")
    weights["lm_head.weight"] = (
      np.random.default_rng(0).normal(size=weights["shared.weight"].shape).astype(np.float32)
    )
    weights["encoder.embed_tokens.weight"] = weights["shared.weight"]
    save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})
    hf_config = json.loads((directory / "config.json").read_text())
    hf_config.update(tie_word_embeddings=False)
    hf_config.pop("scale_decoder_outputs", None)
    (directory / "config.json").write_text(json.dumps(hf_config))
  return kind.from_pretrained(directory).eval()


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["t5", "t5_v1_1", "t5_v1_1_4x", "mt5", "mt5_4x"])
def test_hugging_face_t5_upcycles_to_transformers_logits(tmp_path, layout):
  reference_model = build_t5(tmp_path / "hf", layout)
  dense = upcycle.read_dense(tmp_path / "hf")
  gated = layout != "t5"
  assert dense.config.mlp_activations == (("gelu", "linear") if gated else ("relu",))
  assert dense.config.tie_embeddings == (not gated)
  target = dataclasses.replace(
    dense.config,
    sparse_encoder_layers=(1,),
    sparse_decoder_layers=(0,),
    moe=dataclasses.replace(
      dense.config.moe, num_experts=NUM_EXPERTS, router_type=upcycle.RENORMALIZED_ROUTER
    ),
  )
  target = upcycle.without_drops(target)
  config = Config(model=target)
  upcycle.upcycle(tmp_path / "hf", config, tmp_path / "out")
  _, params = model_loading.load_model(tmp_path / "out")
  assert params["encoder"]["layers_1"]["mlp"]["wo"].shape == (NUM_EXPERTS, 32, 16)
  encoder, decoder = upcycle.random_batch(target, inputs=10, targets=6)
  encoder[1, 7:] = 0  # padding
  with torch.no_grad():
    expected = reference_model(
      input_ids=torch.tensor(encoder),
      attention_mask=torch.tensor(encoder != 0),
      decoder_input_ids=torch.tensor(decoder),
    ).logits.numpy()
  ours = model_logits(target, params, (encoder, decoder))
  assert np.abs(ours - expected).max() < 2e-5, np.abs(ours - expected).max()
  dense_logits = model_logits(
    dense.config, jax.tree.map(np.asarray, dense.params), (encoder, decoder)
  )
  assert np.abs(dense_logits - expected).max() < 2e-5


@pytest.mark.parametrize(
  "hf_config",
  [
    {"model_type": "t5"},
    {"model_type": "t5", "num_layers": 3, "d_model": 24},
    {"model_type": "t5", "num_layers": 3, "num_decoder_layers": 5, "feed_forward_proj": "gelu"},
    {"model_type": "mt5"},
    {"model_type": "mt5", "num_layers": 2, "tie_word_embeddings": True},
  ],
)
def test_absent_t5_config_keys_take_the_defaults_of_transformers(hf_config):
  """A config.json that lacks keys means what T5Config / MT5Config make of it: their own
  defaults, and as many decoder layers as encoder layers."""
  kind = transformers.MT5Config if hf_config["model_type"] == "mt5" else transformers.T5Config
  expected = kind(**{k: v for k, v in hf_config.items() if k != "model_type"})
  config = upcycle.t5_config_from_hf(hf_config)
  same_names = (
    "vocab_size",
    "d_model",
    "d_ff",
    "num_heads",
    "d_kv",
    "num_layers",
    "num_decoder_layers",
    "dropout_rate",
    "layer_norm_epsilon",
    "relative_attention_num_buckets",
    "relative_attention_max_distance",
  )
  for name in same_names:  # ModelConfig and T5Config name these fields alike
    assert getattr(config, name) == getattr(expected, name), name
  gated = expected.is_gated_act
  activation = {"relu": "relu", "gelu": "gelu_exact", "gelu_new": "gelu"}[expected.dense_act_fn]
  assert config.mlp_activations == ((activation, "linear") if gated else (activation,))
  assert config.tie_embeddings == getattr(expected, "scale_decoder_outputs", False)


# --------------------------------------------------------------------------------------------
# Bad inputs.


@pytest.mark.parametrize(
  "overrides, message",
  [
    (
      ["model.d_ff=128"],
      "decoder/layers_0/mlp/wi: the dense model has shape (32, 64) but the config (32, 128) "
      "(model.d_ff=128); set model.d_ff=64.",
    ),
    (
      ["model.moe.num_experts=4", "model.expert_d_ff=48"],
      "(model.expert_d_ff=48); set model.expert_d_ff=64.",
    ),
    (["model.d_model=48"], "set model.d_model=32."),
    (["model.vocab_size=700"], "token_embedder/embedding: the dense model has shape (640, 32)"),
    (["model.num_heads=4"], "set model.num_heads=2."),
    (["model.num_layers=3"], "model.num_layers=3 in the config but the dense model has 2"),
    (["model.mlp_activations=gelu"], "set model.mlp_activations=relu."),
    (["model.expert_activations=gelu,linear"], "set model.expert_activations=relu."),
    (["model.tie_embeddings=false"], "set model.tie_embeddings=True."),
    (
      ["model.num_sparse_encoder_layers=0", "model.num_sparse_decoder_layers=0"],
      "the config has no MoE layer to upcycle into",
    ),
  ],
)
def test_a_dense_model_that_does_not_fit_the_config_is_a_one_line_error(
  dense_dir, tmp_path, overrides, message
):
  with pytest.raises(ValueError) as error:
    upcycle.upcycle(dense_dir, switch_config(*overrides), tmp_path / "out")
  assert message in str(error.value) and "\n" not in str(error.value)
  assert not (tmp_path / "out").exists()


def test_bad_sources_and_outputs_are_refused(dense_dir, tmp_path):
  upcycle.upcycle(dense_dir, switch_config(), tmp_path / "sparse")
  cases = [
    (
      tmp_path / "sparse",
      tmp_path / "a",
      "is already a sparse model (encoder layers (1,), decoder",
    ),
    (tmp_path / "missing", tmp_path / "b", "is not a directory"),
    (dense_dir, tmp_path / "sparse", "is not empty"),
    (dense_dir, dense_dir / "inside", "would overlap the input"),
  ]
  hf_dir = tmp_path / "switch_hf"
  hf_dir.mkdir()
  (hf_dir / "config.json").write_text(json.dumps({"model_type": "switch_transformers"}))
  cases.append((hf_dir, tmp_path / "c", "model_type='switch_transformers'"))
  t5_dir = tmp_path / "t5"
  build_t5(t5_dir, "t5")
  weights = load_file(t5_dir / "model.safetensors")
  del weights["encoder.block.1.layer.1.DenseReluDense.wo.weight"]
  save_file(weights, t5_dir / "model.safetensors")
  cases.append(
    (t5_dir, tmp_path / "d", "missing tensors: encoder.block.1.layer.1.DenseReluDense.wo")
  )
  for source, out, message in cases:
    with pytest.raises(ValueError, match=None) as error:
      upcycle.upcycle(source, switch_config(), out)
    assert message in str(error.value), (message, str(error.value))
    assert "\n" not in str(error.value)


# --------------------------------------------------------------------------------------------
# The script, and training from its output.


@pytest.mark.slow
def test_script_writes_a_checkpoint_that_trains(dense_dir, tmp_path):
  out = tmp_path / "upcycled"
  args = [
    sys.executable,
    str(ROOT / "scripts" / "upcycle.py"),
    f"--dense={dense_dir}",
    "--config=tiny",
    f"--output_dir={out}",
    f"--set={RENORMALIZED}",
    "--verify",
  ]
  done = subprocess.run(args, capture_output=True, text=True, cwd=ROOT)
  assert done.returncode == 0, done.stderr[-2000:]
  lines = dict(line.split(": ", 1) for line in done.stdout.splitlines() if ": " in line)
  assert float(lines["max |logits - dense logits|, renormalized combine weights"].split()[0]) < 1e-5
  assert float(lines["max |logits - dense logits|, router probability"].split()[0]) > 0.1
  failed = subprocess.run(args, capture_output=True, text=True, cwd=ROOT)
  assert failed.returncode == 1 and failed.stderr.startswith("error: ")
  assert "is not empty" in failed.stderr and failed.stderr.count("\n") == 1

  # The fixture's spiece.model is not a tokenizer; a run from train.init_from would take it.
  (out / "spiece.model").unlink()
  config = load_config(
    str(out),
    [
      "data.spm_path=none",
      "train.num_train_steps=8",
      "train.log_every=1",
      "train.eval_every=0",
      "mesh.data=1",
    ],
  )
  assert config.train.init_from == str(out.resolve())
  messages = []
  result = train(
    config, tmp_path / "run", devices=jax.devices()[:1], progress=False, log=messages.append
  )
  assert f"Initialised parameters from {out.resolve()}." in messages
  losses = [result.losses[s] for s in range(1, 9)]
  assert np.isfinite(losses).all() and losses[-1] < losses[0] - 0.5, losses
