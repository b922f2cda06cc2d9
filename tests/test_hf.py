"""The Hugging Face converter against transformers' SwitchTransformersForConditionalGeneration.

Tiny random transformers models (hf_utils) are converted with `from_hf` and must give the same
logits (max abs difference <= 1e-4 in float32), router logits, pooled router losses,
cross-entropy and gradient of transformers' training loss w.r.t. every tensor; `to_hf`, Orbax,
the other weight layouts (sharded, torch .bin, 4.x config, bfloat16) and scripts/convert_hf.py
must round-trip exactly; broken checkpoints and models HF cannot express must fail with
messages that name the problem. Run with `-s` to see the measured differences.
"""

import dataclasses
import json
import pathlib
import subprocess
import sys

import hf_utils as U
import jax
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import save_file

from switchjax import checkpoint, hf, losses, model_loading
from switchjax import config as config_lib
from switchjax.config.sparse_layout import sparse_layer_indices

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOL = 1e-4
# Two transformers models loaded separately from equal weights: PyTorch promises no bit-equal
# forward passes across model instances (oneDNN picks kernels per machine; an AMD EPYC gave
# 6.6e-7), so the logits agree to float32 rounding of the tiny models' |logits| (~1-10).
SEPARATE_TORCH_MODELS_TOL = 1e-5
# name -> SwitchTransformersConfig overrides (on top of hf_utils.TINY: d_model 16, 4 heads of
# 4, 4 experts, expert_capacity 3, so tokens get dropped).
CONFIGS = {
  "base": dict(
    num_layers=4, num_decoder_layers=3, num_sparse_encoder_layers=2, num_sparse_decoder_layers=1
  ),
  "untied_gelu_bias": dict(
    num_layers=4,
    num_decoder_layers=4,
    num_sparse_encoder_layers=2,
    num_sparse_decoder_layers=2,
    tie_word_embeddings=False,
    dense_act_fn="gelu",
    router_bias=True,
  ),
  "hf_placement_12_4_8_3": dict(
    num_layers=12,
    num_decoder_layers=8,
    num_sparse_encoder_layers=4,
    num_sparse_decoder_layers=3,
    dense_act_fn="gelu_new",
  ),
  "all_sparse": dict(
    num_layers=3,
    num_decoder_layers=2,
    num_sparse_encoder_layers=3,
    num_sparse_decoder_layers=2,
    expert_capacity=2,
  ),
}


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
  """{config name: (checkpoint dir, reloaded transformers model)}, each built once."""
  root = tmp_path_factory.mktemp("hf")
  return {
    name: (root / name, U.build_hf_checkpoint(root / name, seed=i, **overrides))
    for i, (name, overrides) in enumerate(CONFIGS.items())
  }


@pytest.fixture(scope="module")
def outputs(hf_dirs):
  """outputs(name): both models' outputs for one config (computed once)."""
  cache = {}

  def get(name):
    if name not in cache:
      directory, reference = hf_dirs[name]
      model, params = hf.from_hf(directory)
      logits, intermediates = U.jax_forward(model, params)
      cache[name] = dict(
        name=name,
        model=model,
        params=params,
        logits=logits,
        intermediates=intermediates,
        reference=reference,
        hf=U.hf_forward(reference),
        hf_loss=U.hf_forward(reference, output_router_logits=False, labels=True).loss,
        hf_total=U.hf_forward(reference, labels=True).loss,
      )
    return cache[name]

  return get


@pytest.fixture(params=list(CONFIGS))
def parity(request, outputs):
  return outputs(request.param)


# --------------------------------------------------------------------------------------------
# Parity.


def test_logits_match_transformers(parity):
  diff = np.abs(parity["logits"] - parity["hf"].logits.numpy()).max()
  print(
    f"\n[{parity['name']}] max |logits - HF logits| = {diff:.3g} (max |logit| "
    f"{np.abs(parity['logits']).max():.3g})"
  )
  assert diff <= TOL


def test_router_logits_match_transformers(parity):
  for stack in ("encoder", "decoder"):
    ours = U.router_logits(parity["intermediates"], stack)
    theirs = [t.numpy() for t in getattr(parity["hf"], f"{stack}_router_logits")]
    assert (
      len(ours) == len(theirs) == len(getattr(parity["model"].config, f"sparse_{stack}_layers"))
    )
    diff = max(np.abs(a - b).max() for a, b in zip(ours, theirs))
    print(
      f"\n[{parity['name']}] {stack}: {len(ours)} sparse layers, max |router logits "
      f"diff| = {diff:.3g}"
    )
    assert diff <= TOL


def test_router_losses_and_cross_entropy_match_transformers(parity):
  out, cfg = parity["hf"], parity["model"].config
  diffs = {}
  for stack, n, sparse in (
    ("encoder", cfg.num_layers, cfg.sparse_encoder_layers),
    ("decoder", cfg.decoder_layers, cfg.sparse_decoder_layers),
  ):
    z, aux = jax.jit(losses.hf_router_losses, static_argnums=1)(parity["intermediates"], stack)
    if len(sparse) == n:  # HF reports 0 when every block is sparse (its step is 1)
      z, aux = 0.0, 0.0
    diffs[f"{stack}_z"] = abs(float(z) - float(getattr(out, f"{stack}_z_loss")))
    diffs[f"{stack}_aux"] = abs(float(aux) - float(getattr(out, f"{stack}_aux_loss")))
  b = U.batch()
  total, _, count = losses.cross_entropy_with_z_loss(parity["logits"], b["targets"], b["weights"])
  ce = float(total / count)
  diffs["cross_entropy"] = abs(ce - parity["hf_loss"].item())
  ref = parity["reference"].config
  hf_total = (
    ce
    + ref.router_z_loss_coef * (float(out.encoder_z_loss) + float(out.decoder_z_loss))
    + ref.router_aux_loss_coef * (float(out.encoder_aux_loss) + float(out.decoder_aux_loss))
  )
  diffs["total_loss"] = abs(hf_total - parity["hf_total"].item())
  print(
    f"\n[{parity['name']}] loss differences: " + ", ".join(f"{k} {v:.3g}" for k, v in diffs.items())
  )
  assert max(diffs.values()) <= TOL


GRAD_TOL = 2e-5  # of a tensor's largest |gradient|; measured <= 3.5e-6


@pytest.mark.slow
@pytest.mark.parametrize("dispatch", ["buffers", "sorted"])
def test_gradients_match_transformers(parity, dispatch):
  """The backward pass: transformers' gradient of its training loss (U.hf_gradients) w.r.t.
  every HF tensor equals switchjax's gradient of `losses.hf_loss`, mapped to HF names and
  layouts by `hf.hf_arrays`, through either dispatch of the experts. Experts that receive no
  token have no torch gradient and exactly 0 here. switchjax's one token embedding gets the sum
  of the gradients of HF's copies (shared, embed_tokens untied in 5.x, lm_head when tied)."""
  cfg = parity["model"].config
  cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, dispatch=dispatch))
  model, b = parity["model"].clone(config=cfg), U.batch()
  hf_loss, hf_grads = U.hf_gradients(parity["reference"])
  coefficients = (
    parity["reference"].config.router_z_loss_coef,
    parity["reference"].config.router_aux_loss_coef,
  )

  def loss_fn(params):
    logits, state = model.apply(
      {"params": params}, b["input_ids"], b["decoder_input_ids"], mutable=["intermediates"]
    )
    inter = state["intermediates"]
    return losses.hf_loss(logits, inter, b["targets"], b["weights"], cfg, *coefficients)

  loss, grads = jax.jit(jax.value_and_grad(loss_fn))(parity["params"])
  ours = hf.hf_arrays(grads, cfg)
  embedding_copies = {"shared.weight", *hf.TIED_EMBEDDINGS} | (
    {"lm_head.weight"} if cfg.tie_embeddings else set()
  )
  hf_grads["shared.weight"] = sum(
    g for name, g in hf_grads.items() if name in embedding_copies and g is not None
  )
  assert set(ours) <= set(hf_grads)
  worst = 0.0
  for name, g in ours.items():
    if hf_grads[name] is None:
      assert not np.any(g), name
      continue
    scale = np.abs(hf_grads[name]).max()
    worst = max(worst, np.abs(g - hf_grads[name]).max() / scale)
    assert np.abs(g - hf_grads[name]).max() <= GRAD_TOL * scale, name
  unused = sorted(n for n, g in hf_grads.items() if g is None)
  print(
    f"\n[{parity['name']}, {dispatch}] loss {float(loss):.7f} (HF {hf_loss:.7f}); {len(ours)} "
    f"tensors, worst |grad diff| / max |grad| {worst:.2g}; no HF gradient: {len(unused)}"
  )
  assert abs(float(loss) - hf_loss) <= TOL


def test_tokens_are_dropped(parity):
  """The capacity is small enough that every config drops tokens somewhere."""
  left_behind = {
    path: round(float(m["fraction_tokens_left_behind"]), 3)
    for path, m in losses.moe_layer_metrics(parity["intermediates"]).items()
  }
  print(f"\n[{parity['name']}] fraction_tokens_left_behind: {left_behind}")
  assert max(left_behind.values()) > 0


def test_hf_placement_kept_where_it_differs_from_mixed(hf_dirs):
  cfg = hf.from_hf(hf_dirs["hf_placement_12_4_8_3"][0])[0].config
  assert cfg.sparse_encoder_layers == (1, 4, 7, 10)
  assert sparse_layer_indices(12, 4, "mixed") == (2, 5, 8, 11)
  assert cfg.sparse_decoder_layers == (1, 3, 5, 7)


@pytest.mark.parametrize("n", [1, 2, 3, 8, 12])
def test_sparse_rule_matches_the_blocks_transformers_builds(n):
  """hf_sparse_layers gives the blocks transformers makes sparse, with and without a stored
  *_sparse_step, and hf_sparse_count finds a count that reproduces each placement."""
  stack_cls = (
    transformers.models.switch_transformers.modeling_switch_transformers.SwitchTransformersStack
  )
  for s in range(n + 1):
    for step in (None, 0, 2):
      config = transformers.SwitchTransformersConfig(
        vocab_size=8,
        d_model=4,
        d_ff=4,
        d_kv=2,
        num_heads=2,
        num_experts=2,
        num_layers=n,
        num_sparse_encoder_layers=s,
        decoder_start_token_id=0,
        **({} if step is None else {"encoder_sparse_step": step}),
      )
      built = tuple(i for i, block in enumerate(stack_cls(config).block) if block.is_sparse)
      assert hf.hf_sparse_layers(n, s, step) == built, (n, s, step)
      if built:
        count, step_out = hf.hf_sparse_count(n, built, "encoder")
        assert hf.hf_sparse_layers(n, count) == built
  assert hf.hf_sparse_count(n, (), "decoder") == (0, 0)


def test_switch_base_8_config_maps_to_its_parameter_count():
  """google/switch-base-8's (4.x) config.json: HF's placement and its 619,339,008 parameters."""
  switch_base_8 = dict(
    model_type="switch_transformers",
    d_ff=3072,
    d_kv=64,
    d_model=768,
    num_layers=12,
    num_decoder_layers=12,
    num_heads=12,
    num_experts=8,
    num_sparse_encoder_layers=6,
    num_sparse_decoder_layers=6,
    encoder_sparse_step=2,
    decoder_sparse_step=2,
    expert_capacity=64,
    vocab_size=32128,
    dense_act_fn="relu",
    feed_forward_proj="relu",
    is_gated_act=False,
    torch_dtype="float32",
    router_type="tokens_masked",
  )
  cfg = hf.config_from_hf(switch_base_8)
  assert cfg.sparse_encoder_layers == cfg.sparse_decoder_layers == (1, 3, 5, 7, 9, 11)
  assert sum(int(np.prod(s.hf_shape)) for s in hf.tensor_specs(cfg)) == 619_339_008


# --------------------------------------------------------------------------------------------
# Round trips and layouts.


@pytest.mark.parametrize("name", list(CONFIGS))
def test_to_hf_round_trip(hf_dirs, tmp_path, name):
  directory, reference = hf_dirs[name]
  model, params = hf.from_hf(directory)
  hf.to_hf(model, params, tmp_path)
  original, written = U.state_dict(directory), U.state_dict(tmp_path)
  assert set(original) <= set(written)
  assert all(np.array_equal(original[k], written[k]) for k in original)
  diff = np.abs(
    U.hf_forward(U.load_hf(tmp_path)).logits.numpy() - U.hf_forward(reference).logits.numpy()
  ).max()
  print(f"\n[{name}] HF -> switchjax -> to_hf -> transformers: max logits diff {diff:.3g}")
  assert diff <= SEPARATE_TORCH_MODELS_TOL  # the weights themselves are equal, asserted above
  assert hf.from_hf(tmp_path)[0].config == model.config


def test_orbax_round_trip(hf_dirs, tmp_path):
  model, params = hf.from_hf(hf_dirs["base"][0])
  checkpoint.save_model(tmp_path, config_lib.Config(name="hf", model=model.config), params)
  config, restored = model_loading.load_model(tmp_path)
  assert config.model == model.config
  assert checkpoint.params_equal(params, restored)


def _sharded_safetensors(source, target):
  U.load_hf(source).save_pretrained(target, max_shard_size="20KB")
  assert len(list(target.glob("model-*.safetensors"))) > 1


def _torch_bin(source, target):
  target.mkdir()
  torch.save(U.full_torch_state(source), target / "pytorch_model.bin")
  (target / "config.json").write_text((source / "config.json").read_text())


def _sharded_torch_bin(source, target):
  target.mkdir()
  state = U.full_torch_state(source)
  names = sorted(state)
  weight_map = {}
  for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :])):
    file = f"pytorch_model-{i + 1:05d}-of-00002.bin"
    torch.save({k: state[k] for k in part}, target / file)
    weight_map.update({k: file for k in part})
  (target / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
  (target / "config.json").write_text((source / "config.json").read_text())


def _v4_layout(source, target):
  """A transformers 4.x checkpoint: tied tensors in pytorch_model.bin, 4.x config keys."""
  _torch_bin(source, target)
  U.edit_config(
    target,
    dtype=None,
    add_cross_attention=None,
    is_decoder=None,
    bos_token_id=None,
    torch_dtype="float32",
    transformers_version="4.36.2",
    feed_forward_proj="relu",
    is_gated_act=False,
    router_type="tokens_masked",
    batch_prioritized_routing=False,
  )


@pytest.mark.parametrize(
  "layout",
  [_sharded_safetensors, _torch_bin, _sharded_torch_bin, _v4_layout],
  ids=lambda f: f.__name__.strip("_"),
)
def test_weight_layouts_load_identically(hf_dirs, tmp_path, layout):
  source = hf_dirs["base"][0]
  model, params = hf.from_hf(source)
  layout(source, tmp_path / "ckpt")
  other_model, other_params = hf.from_hf(tmp_path / "ckpt")
  assert other_model.config == model.config
  assert checkpoint.params_equal(params, other_params)


def test_bfloat16_checkpoint_converts_to_float32(hf_dirs, tmp_path):
  source = hf_dirs["untied_gelu_bias"][0]
  U.load_hf(source).to(torch.bfloat16).save_pretrained(tmp_path)
  _, params = hf.from_hf(source)
  _, bf16_params = hf.from_hf(tmp_path)
  rounded = jax.tree.map(lambda x: torch.from_numpy(x).to(torch.bfloat16).float().numpy(), params)
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(bf16_params))
  assert checkpoint.params_equal(rounded, bf16_params)


# --------------------------------------------------------------------------------------------
# Errors.


def _damage(source, target, kind):
  """A copy of `source` broken in one way."""
  target = U.copy_checkpoint(source, target)
  state = U.state_dict(target)
  weights = target / "model.safetensors"
  if kind == "missing":
    del state["encoder.block.1.layer.0.SelfAttention.q.weight"]
    del state["decoder.final_layer_norm.weight"]
  elif kind == "unexpected":
    state["encoder.block.9.layer.0.extra.weight"] = np.zeros((2, 2), np.float32)
  elif kind == "shape":
    state["encoder.block.2.layer.1.mlp.wi.weight"] = np.zeros((31, 16), np.float32)
  elif kind == "tied_differ":
    state["encoder.embed_tokens.weight"] = state["shared.weight"] + 1.0
  elif kind == "sparse":
    U.edit_config(target, num_sparse_encoder_layers=4, encoder_sparse_step=None)
  elif kind == "corrupt_safetensors":
    weights.write_bytes(weights.read_bytes()[:1000])
    return target
  elif kind == "garbage_safetensors":
    weights.write_bytes(b"\xff" * 64)
    return target
  elif kind == "corrupt_bin":
    weights.unlink()
    (target / "pytorch_model.bin").write_bytes(b"not a torch file")
    return target
  elif kind == "no_weights":
    weights.unlink()
    return target
  elif kind == "missing_shard":
    weights.unlink()
    (target / "model.safetensors.index.json").write_text(
      json.dumps({"weight_map": {"shared.weight": "model-00001-of-00002.safetensors"}})
    )
    return target
  elif kind == "other_model":
    U.edit_config(target, model_type="t5")
  elif kind == "gated":
    U.edit_config(target, dense_act_fn="gated-gelu")
  elif kind == "bad_json":
    (target / "config.json").write_text("{not json")
  elif kind == "no_config":
    (target / "config.json").unlink()
  save_file(state, str(weights), metadata={"format": "pt"})
  return target


ERRORS = {
  "missing": [
    "missing tensors",
    "encoder.block.1.layer.0.SelfAttention.q.weight",
    "decoder.final_layer_norm.weight",
  ],
  "unexpected": ["unexpected tensors: encoder.block.9.layer.0.extra.weight"],
  "shape": [
    "shape mismatch: encoder.block.2.layer.1.mlp.wi.weight expected (32, 16), found (31, 16)"
  ],
  "tied_differ": ["encoder.embed_tokens.weight differ from shared.weight"],
  "sparse": ["config makes encoder blocks (0, 1, 2, 3) sparse", "routers in encoder blocks (1, 3)"],
  "corrupt_safetensors": ["not a readable safetensors file"],
  "garbage_safetensors": ["not a readable safetensors file"],
  "corrupt_bin": ["could not be read by torch.load"],
  "no_weights": ["has no weights", "model.safetensors"],
  "missing_shard": ["shard files that are missing: model-00001-of-00002.safetensors"],
  "other_model": ["model_type='t5'", "Switch Transformers"],
  "gated": ["gated", "gated-gelu"],
  "bad_json": ["not valid JSON"],
  "no_config": ["has no config.json"],
}


@pytest.mark.parametrize("kind", list(ERRORS))
def test_broken_checkpoints_fail_clearly(hf_dirs, tmp_path, kind):
  target = _damage(hf_dirs["base"][0], tmp_path / "ckpt", kind)
  with pytest.raises(hf.CheckpointError) as error:
    hf.from_hf(target)
  for fragment in ERRORS[kind]:
    assert fragment in str(error.value)
  assert isinstance(error.value, ValueError)


def test_bad_paths_fail_clearly(tmp_path):
  with pytest.raises(hf.CheckpointError, match="does not exist"):
    hf.from_hf(tmp_path / "nowhere")
  (tmp_path / "file").write_text("x")
  with pytest.raises(hf.CheckpointError, match="is not a directory"):
    hf.from_hf(tmp_path / "file")
  (tmp_path / "empty").mkdir()
  with pytest.raises(hf.CheckpointError, match="is empty"):
    hf.from_hf(tmp_path / "empty")


REFUSALS = {
  "gated": (dict(mlp_activations=("gelu", "linear")), "gated MLPs"),
  "gated_experts": (dict(expert_activations=("gelu", "linear")), "gated MLPs"),
  "expert_activation": (dict(expert_activations=("gelu",)), "one dense_act_fn for both"),
  "expert_d_ff": (dict(expert_d_ff=64), "set model.expert_d_ff=None"),
  "capacity_factor": (dict(moe=dict(expert_capacity=None)), "set model.moe.expert_capacity"),
  "top2": (dict(moe=dict(num_selected_experts=2)), "set model.moe.num_selected_experts=1"),
  "experts_choose": (dict(moe=dict(router_type="experts_choose_masked")), "experts-choose routing"),
  "bpr": (dict(moe=dict(batch_prioritized_routing=True)), "batch-prioritized routing"),
  "ignore_padding": (dict(moe=dict(ignore_padding_tokens=True)), "ignore_padding_tokens"),
  "placement": (dict(sparse_encoder_layers=(0, 1)), "encoder's sparse layers (0, 1) cannot"),
}


def _replace(cfg, changes):
  moe = dataclasses.replace(cfg.moe, **changes.pop("moe", {}))
  return dataclasses.replace(cfg, moe=moe, **changes)


@pytest.mark.parametrize("kind", list(REFUSALS))
def test_to_hf_refuses_what_hf_cannot_express(hf_dirs, tmp_path, kind):
  model, params = hf.from_hf(hf_dirs["base"][0])
  changes, fragment = REFUSALS[kind]
  with pytest.raises(ValueError, match="Cannot write this model") as error:
    hf.to_hf(_replace(model.config, dict(changes)), params, tmp_path / "out")
  assert fragment in str(error.value)
  assert not (tmp_path / "out").exists()


def test_to_hf_accepts_padding_masking_with_equal_logits(hf_dirs, tmp_path):
  """flaxformer's zeroing of padding activations leaves HF's real-position logits unchanged
  (one group per sequence, padding at the end)."""
  directory, reference = hf_dirs["base"]
  model, params = hf.from_hf(directory)
  masked = model.clone(config=dataclasses.replace(model.config, mask_padding_activations=True))
  hf.to_hf(masked, params, tmp_path)
  logits, _ = U.jax_forward(masked, params)
  real = U.batch()["weights"] > 0
  theirs = U.hf_forward(U.load_hf(tmp_path)).logits.numpy()
  assert np.abs(logits - theirs)[real].max() <= TOL


# --------------------------------------------------------------------------------------------
# scripts/convert_hf.py


def _run(*args):
  return subprocess.run(
    [sys.executable, str(ROOT / "scripts" / "convert_hf.py"), *map(str, args)],
    capture_output=True,
    text=True,
    cwd=ROOT,
    timeout=300,
  )


@pytest.mark.slow
def test_convert_script_both_directions(hf_dirs, tmp_path):
  source = U.copy_checkpoint(hf_dirs["untied_gelu_bias"][0], tmp_path / "hf_in")
  (source / "spiece.model").write_bytes(b"sentencepiece stand-in")
  (source / "tokenizer_config.json").write_text('{"extra_ids": 60}')  # the model's sentinels
  done = _run("--hf_dir", source, "--output_dir", tmp_path / "converted")
  assert done.returncode == 0, done.stderr
  config = checkpoint.read_checkpoint_config(tmp_path / "converted")
  assert pathlib.Path(config.data.spm_path) == (tmp_path / "converted" / "spiece.model").resolve()
  assert config.data.extra_ids == 60
  assert (tmp_path / "converted" / "spiece.model").read_bytes() == b"sentencepiece stand-in"
  done = _run("--checkpoint", tmp_path / "converted", "--hf_output_dir", tmp_path / "hf_out")
  assert done.returncode == 0, done.stderr
  assert (tmp_path / "hf_out" / "spiece.model").read_bytes() == b"sentencepiece stand-in"
  tokenizer = json.loads((tmp_path / "hf_out" / "tokenizer_config.json").read_text())
  assert tokenizer == {"tokenizer_class": "T5Tokenizer", "extra_ids": 60}
  diff = np.abs(
    U.hf_forward(U.load_hf(tmp_path / "hf_out")).logits.numpy()
    - U.hf_forward(hf_dirs["untied_gelu_bias"][1]).logits.numpy()
  ).max()
  assert diff <= SEPARATE_TORCH_MODELS_TOL  # the state dicts are compared exactly elsewhere
  done = _run(
    "--checkpoint",
    tmp_path / "converted",
    "--hf_output_dir",
    tmp_path / "hf_cf",
    "--set",
    "model.moe.expert_capacity=None",
  )
  assert done.returncode == 1 and "Traceback" not in done.stderr
  assert "set model.moe.expert_capacity" in done.stderr


def test_convert_script_errors_are_one_line(tmp_path):
  done = _run("--hf_dir", tmp_path / "nowhere", "--output_dir", tmp_path / "out")
  assert done.returncode == 1
  assert "does not exist" in done.stderr and "Traceback" not in done.stderr
  assert len(done.stderr.strip().splitlines()) == 1


def test_sentinel_count_of_hf_tokenizers(tmp_path):
  assert hf.read_extra_ids(tmp_path) == 100  # T5's, when nothing says otherwise
  (tmp_path / "tokenizer_config.json").write_text(
    json.dumps({"additional_special_tokens": [f"<extra_id_{i}>" for i in range(7)]})
  )
  assert hf.read_extra_ids(tmp_path) == 7
  (tmp_path / "tokenizer_config.json").write_text('{"extra_ids": 40}')
  assert hf.read_extra_ids(tmp_path) == 40
