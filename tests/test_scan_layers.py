"""model.scan_layers: the scanned model computes what the unscanned one does (same parameters
through `scan.stack_layers`), converts to and from Hugging Face, generates, trains and resumes.

Tolerance: the scanned and unscanned float32 models run the same operations in another
program, so they agree to float32 rounding (logits within 1e-5, gradients within 1e-5 of
their scale), not bit for bit.
"""

import dataclasses
import json

import hf_utils as U
import jax
import numpy as np
import pytest

from switchjax import checkpoint, decoding, hf, losses, model_loading, optimizers, scan, sharding
from switchjax.config import load_config
from switchjax.config.sparse_layout import layer_period
from switchjax.model import SwitchTransformer, init_params
from switchjax.training import loss_fn, resume_rules, state_layout, train


def tiny_model(**changes):
  """tiny with 4 + 4 layers, MoE in layers 1 and 3: two blocks of (dense, sparse)."""
  cfg = load_config("tiny").model
  four = dict(num_layers=4, num_decoder_layers=4, num_sparse_encoder_layers=2)
  return dataclasses.replace(cfg, **{**four, "num_sparse_decoder_layers": 2, **changes})


def both(**changes):
  """(unscanned model, its params, scanned model, the same params stacked)."""
  cfg = tiny_model(**changes)
  model = SwitchTransformer(cfg)
  params = sharding.unbox(init_params(model, jax.random.key(0)))
  scanned = SwitchTransformer(dataclasses.replace(cfg, scan_layers=True))
  return model, params, scanned, scan.stack_layers(params, scanned.config)


def batch(vocab=640):
  rng = np.random.default_rng(0)
  inputs = rng.integers(2, vocab, (2, 32)).astype(np.int32)
  inputs[1, 20:] = 0
  targets = rng.integers(2, vocab, (2, 8)).astype(np.int32)
  targets[1, 6:] = 0
  return {
    "encoder_input_tokens": inputs,
    "decoder_input_tokens": np.pad(targets[:, :-1], ((0, 0), (1, 0))),
    "decoder_target_tokens": targets,
  }


def assert_trees_close(a, b, rtol=1e-5):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    scale = float(np.abs(np.asarray(x)).max()) + 1e-12
    err = float(np.abs(np.asarray(x) - np.asarray(y)).max())
    assert err <= rtol * scale, (jax.tree_util.keystr(path), err, scale)


# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_scanned_parameters_have_a_leading_layers_axis():
  _, params, scanned, stacked = both()
  boxed = init_params(scanned, jax.random.key(0))
  kernel = boxed["encoder"]["scan_p2"]["layers_1"]["mlp"]["wi"]
  assert kernel.names == ("layers", "expert", "embed", "expert_mlp")
  assert kernel.value.shape == (2, 4, 32, 64)
  assert jax.tree.map(np.shape, sharding.unbox(boxed)) == jax.tree.map(np.shape, stacked)
  # 'layers' is unsharded and a BATCH axis to T5X's Adafactor: per-layer statistics.
  assert sharding.logical_to_spec(("layers", "expert", "embed", "expert_mlp"))[0] is None
  plan = optimizers.factor_plan((2, 32, 2, 16), ("layers", "embed", "heads", "kv"))
  assert plan.averaging_dims == (1, 2, 3) and plan.row_dims == (1,)
  assert plan.col_dims == (2, 3)


def test_stack_then_unstack_is_identity():
  _, params, scanned, stacked = both()
  assert scan.is_scanned(stacked) and not scan.is_scanned(params)
  first = stacked["decoder"]["scan_p2"]["layers_1"]["mlp"]["wo"]
  np.testing.assert_array_equal(first[1], params["decoder"]["layers_3"]["mlp"]["wo"])
  back = scan.unstack_layers(stacked, scanned.config)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(back)))
  again = scan.stack_layers(back, scanned.config)
  assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(stacked), jax.tree.leaves(again)))


@pytest.mark.slow
@pytest.mark.parametrize("remat", ["none", "full"])
def test_scanned_logits_and_gradients_equal_unscanned(remat):
  model, params, scanned, stacked = both(remat=remat)
  b = batch()
  cfg = load_config("tiny").train

  def loss_and_grads(m, p):
    grad_fn = jax.value_and_grad(lambda p: loss_fn(m, p, b, cfg, train=False), has_aux=True)
    (loss, sums), grads = jax.jit(grad_fn)(p)
    return loss, sums, grads

  loss, sums, grads = loss_and_grads(model, params)
  s_loss, s_sums, s_grads = loss_and_grads(scanned, stacked)
  np.testing.assert_allclose(s_loss, loss, rtol=1e-5)
  assert s_sums.keys() == sums.keys()  # per-layer routing metrics keep their layers_{i} names
  assert "layers/encoder/layers_3/mlp/expert_usage" in s_sums
  for name in sums:
    np.testing.assert_allclose(s_sums[name], sums[name], rtol=1e-5, atol=1e-6, err_msg=name)
  assert_trees_close(grads, scan.unstack_layers(s_grads))
  logits = jax.jit(model.apply)({"params": params}, *list(b.values())[:2])
  s_logits = jax.jit(scanned.apply)({"params": stacked}, *list(b.values())[:2])
  np.testing.assert_allclose(s_logits, logits, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["greedy", "beam"])
def test_cached_generation_equals_unscanned(method):
  model, params, scanned, stacked = both()
  inputs = batch()["encoder_input_tokens"]
  kwargs = dict(max_new_tokens=6, method=method, num_beams=3, eos_id=-1)
  expected = decoding.generate(model, params, inputs, **kwargs)
  np.testing.assert_array_equal(decoding.generate(scanned, stacked, inputs, **kwargs), expected)


def test_layout_without_a_period_is_refused_in_one_line():
  with pytest.raises(ValueError) as error:
    load_config(
      "tiny",
      ["model.num_layers=4", "model.num_sparse_encoder_layers=2", "model.sparse_layout=top"]
      + ["model.scan_layers=true"],
    )
  message = str(error.value)
  assert "\n" not in message
  assert "model.scan_layers=True" in message and "sparse_layout='top'" in message
  assert "(2, 3)" in message and "model.scan_layers=False" in message
  assert layer_period(12, (1, 3, 5, 7, 9, 11)) == 2
  assert layer_period(12, (2, 5, 8, 11)) == 3
  assert layer_period(15, tuple(range(15))) == 1


# --------------------------------------------------------------------------------------------
# Hugging Face and checkpoints.


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  directory = tmp_path_factory.mktemp("hf_scan")
  reference = U.build_hf_checkpoint(
    directory,
    num_layers=4,
    num_decoder_layers=4,
    num_sparse_encoder_layers=2,
    num_sparse_decoder_layers=2,
  )
  return directory, reference


@pytest.mark.slow
def test_scanned_model_from_and_to_hf_matches_transformers(hf_dir, tmp_path):
  directory, reference = hf_dir
  model, params = hf.from_hf(directory, scan_layers=True)
  assert model.config.scan_layers and scan.is_scanned(params)
  logits, intermediates = U.jax_forward(model, params)
  expected = U.hf_forward(reference).logits.numpy()
  np.testing.assert_allclose(logits, expected, atol=1e-5)
  z, aux = losses.hf_router_losses(intermediates, "encoder")
  plain, plain_params = hf.from_hf(directory)
  z0, aux0 = losses.hf_router_losses(U.jax_forward(plain, plain_params)[1], "encoder")
  np.testing.assert_allclose([z, aux], [z0, aux0], rtol=1e-6)

  hf.to_hf(model, params, tmp_path / "hf")
  original, written = U.state_dict(directory), U.state_dict(tmp_path / "hf")
  assert all(np.array_equal(original[k], written[k]) for k in original)
  diff = np.abs(U.hf_forward(U.load_hf(tmp_path / "hf")).logits.numpy() - expected).max()
  assert diff == 0.0


@pytest.mark.slow
def test_streaming_conversion_and_restore_in_either_layout(hf_dir, tmp_path):
  directory, _ = hf_dir
  config = hf.convert_from_hf(directory, tmp_path / "ckpt", scan_layers=True)
  assert config.model.scan_layers
  assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["model"]["scan_layers"]
  _, stacked = hf.from_hf(directory, scan_layers=True)
  _, plain = hf.from_hf(directory)
  restored_config, restored = model_loading.load_model(tmp_path / "ckpt")
  assert restored_config.model.scan_layers and checkpoint.params_equal(restored, stacked)
  unscanned_config, unscanned = model_loading.load_model(tmp_path / "ckpt", scan_layers=False)
  assert not unscanned_config.model.scan_layers and checkpoint.params_equal(unscanned, plain)
  # A scanned checkpoint read lazily converts back to HF one layer at a time.
  lazy_config, lazy = checkpoint.lazy_params(tmp_path / "ckpt")
  hf.to_hf(lazy_config, lazy, tmp_path / "hf")
  original, written = U.state_dict(directory), U.state_dict(tmp_path / "hf")
  assert all(np.array_equal(original[k], written[k]) for k in original)


# --------------------------------------------------------------------------------------------
# Training.


def run(workdir, *overrides, devices=None):
  config = load_config(
    "tiny",
    ["model.scan_layers=true", "train.log_every=1", "train.eval_every=15", "train.eval_steps=1"]
    + list(overrides),
  )
  return train(config, workdir, devices=devices, progress=False, log=lambda _: None)


@pytest.mark.slow
def test_scanned_pretraining_learns_and_resumes(tmp_path):
  straight = run(tmp_path / "straight", "train.num_train_steps=30", "train.checkpoint_every=15")
  assert straight.losses[30] < straight.losses[1] - 1.0, straight.losses
  assert straight.eval_metrics["eval/loss"] < straight.losses[1] - 1.0
  first = run(tmp_path / "resumed", "train.num_train_steps=15", "train.checkpoint_every=15")
  second = run(tmp_path / "resumed", "train.num_train_steps=30", "train.checkpoint_every=15")
  assert first.step == 15 and second.step == 30
  assert {**first.losses, **second.losses} == straight.losses  # bit-identical
  _, params = model_loading.load_model(tmp_path / "resumed")
  assert scan.is_scanned(params)
  # A new unscanned run starts from the scanned checkpoint (train.init_from restacks it).
  init = [f"train.init_from={tmp_path / 'straight'}", "train.num_train_steps=1"]
  unscanned = run(tmp_path / "unscanned", "model.scan_layers=false", *init)
  assert unscanned.losses[1] < straight.losses[1] - 1.0
  layout = state_layout(load_config("tiny", ["model.scan_layers=true"]), sharding.make_mesh())
  assert layout.param_axes["encoder"]["scan_p2"]["layers_1"]["mlp"]["wi"][0] == "layers"


@pytest.mark.slow
def test_scanned_run_on_an_eight_device_mesh_matches_one_device(tmp_path):
  settings = ["train.num_train_steps=3", "train.eval_every=0"]
  one = run(tmp_path / "one", *settings, devices=jax.devices()[:1])
  eight = run(tmp_path / "eight", "mesh.data=2", "mesh.expert=4", *settings)
  for step in one.losses:
    np.testing.assert_allclose(eight.losses[step], one.losses[step], atol=1e-5, rtol=0)


def test_layout_may_change_from_init_from_but_not_on_resume():
  assert resume_rules.rule_of("model.scan_layers") == resume_rules.MODEL
  assert resume_rules.rule_of("model.scan_layers", starting_from=True) == resume_rules.FREE
