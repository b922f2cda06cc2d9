"""Sparse upcycling (Komatsuzaki et al., 2022; T5X's `sparse_upcycle.gin`): a dense T5 becomes a
Switch model whose experts start as copies of the dense MLP they replace.

The dense model is a switchjax checkpoint without sparse layers (`save_model` layout: a training
workdir or a conversion) or a Hugging Face `T5ForConditionalGeneration` directory (T5 1.0:
relu, tied and scaled logits; T5 1.1 / mT5: gated-gelu `wi_0`/`wi_1`, unscaled logits from
`lm_head`). The Switch model is the one the target config describes: every parameter outside the
MoE layers is the dense model's; in each MoE layer the stacked expert kernels `wi`/`wo` (or
`wi_0`/`wi_1`/`wo`) [E, in, out] are E copies of that layer's dense kernels and the router is
freshly initialised (normal(0.02), flaxformer's router init; a bias, if configured, zero).
T5X does the same: its `UpcycleCheckpointer` broadcasts each dense MLP kernel to the experts
and the gin's assignment map leaves routers and optimizer state to be initialised from scratch.

What the upcycled model computes, with capacity that drops nothing:

- with Switch's router (`tokens_choose_masked`, what T5X's upcycling runs: flaxformer's routers
  unchanged) a token's MoE output is p(x) * expert(x) = p(x) * dense_mlp(x), p the router
  probability of its top-1 expert: the logits differ from the dense model's, and the difference
  is exactly that factor in every upcycled layer (`tests/test_upcycle.py` checks it layer by
  layer, and through the whole model with a zero router, where p = 1/E);
- with `moe.router_type='tokens_choose_renormalized'` (switchjax.routing) the chosen experts'
  combine weights are renormalised to sum to 1 (the paper's "normalised router weights",
  which its authors report helped their vision models, not their language models): each token
  then gets exactly the dense MLP's output and the upcycled logits equal the dense model's.

`upcycle(dense_dir, config, output_dir)` writes the upcycled model as a switchjax checkpoint
directory (config.json + Orbax step 0, plus the dense directory's spiece.model), which
`pretrain.py --config=OUTPUT_DIR` continues training from (`train.init_from`). Dense tensors are
read when written, one expert copy at a time. A dense model that does not fit the config is a
one-line ValueError naming the tensor and the config field to change.
"""

from __future__ import annotations

import dataclasses
import pathlib
import shutil
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from switchjax import checkpoint, hf, routing, sharding
from switchjax.checkpoint import LazyArray
from switchjax.config import Config, ModelConfig
from switchjax.config.sparse_layout import decoder_sparse_layers, encoder_sparse_layers
from switchjax.model import SwitchTransformer, init_params

RENORMALIZED_ROUTER = "tokens_choose_renormalized"


# --------------------------------------------------------------------------------------------
# Dense models.


@dataclasses.dataclass
class DenseModel:
  """A dense model in switchjax's parameter layout.

  Attributes:
    config: its ModelConfig (no sparse layers).
    params: nested dict of arrays (numpy, or lazily read `LazyArray`s).
    source: the directory it was read from.
    kind: 'switchjax checkpoint' or 'Hugging Face T5'.
  """

  config: ModelConfig
  params: dict
  source: pathlib.Path
  kind: str


def read_dense(path) -> DenseModel:
  """The dense model of a switchjax checkpoint directory or a Hugging Face T5 directory."""
  path = pathlib.Path(path)
  if not path.is_dir():
    raise ValueError(
      f"--dense={path} is not a directory: give a switchjax checkpoint directory or a Hugging "
      "Face T5ForConditionalGeneration directory."
    )
  if (path / checkpoint.CHECKPOINTS).is_dir():
    config, params = checkpoint.lazy_params(path)
    layers = [
      f"{stack} layers {indices}"
      for stack, indices in (
        ("encoder", encoder_sparse_layers(config.model)),
        ("decoder", decoder_sparse_layers(config.model)),
      )
      if indices
    ]
    if layers:
      raise ValueError(
        f"{path} is already a sparse model ({', '.join(layers)} are MoE layers): upcycling "
        "starts from a dense model (model.num_sparse_encoder_layers=0 and "
        "model.num_sparse_decoder_layers=0)."
      )
    return DenseModel(config.model, _plain_dict(params), path, "switchjax checkpoint")
  if (path / "config.json").is_file():
    return read_hf_t5(path)
  raise ValueError(
    f"{path} holds neither a switchjax checkpoint (config.json and checkpoints/) nor a Hugging "
    "Face model (config.json and weights)."
  )


def _plain_dict(tree) -> dict:
  return {k: _plain_dict(v) for k, v in tree.items()} if isinstance(tree, dict) else tree


# transformers' T5Config and MT5Config defaults where they differ from Switch's (hf.HF_DEFAULTS);
# an absent num_decoder_layers is num_layers in both.
T5_DEFAULTS = {
  "t5": dict(
    vocab_size=32128, d_model=512, d_ff=2048, num_layers=6, num_heads=8, feed_forward_proj="relu"
  ),
  "mt5": dict(
    vocab_size=250112,
    d_model=512,
    d_ff=1024,
    num_layers=8,
    num_heads=6,
    feed_forward_proj="gated-gelu",
  ),
}


def t5_config_from_hf(hf_config: dict) -> ModelConfig:
  """The dense ModelConfig computing what transformers' T5ForConditionalGeneration computes.

  T5 1.0 (`feed_forward_proj='relu'`, tied embeddings) scales the decoder output by
  d_model**-0.5 before the shared embedding: switchjax's tied logits. T5 1.1 and mT5
  ('gated-gelu', `tie_word_embeddings=False` in transformers 4.x files,
  `scale_decoder_outputs=False` in 5.x ones) do not scale and read `lm_head` (the shared
  embedding when the file has none): switchjax's untied logits. mT5 never scales
  (MT5ForConditionalGeneration of transformers 5.x has no scaling, and 4.x files say
  `tie_word_embeddings=False`).
  """
  kind = hf_config.get("model_type")
  if kind not in ("t5", "mt5"):
    raise ValueError(
      f"config.json has model_type={kind!r}: upcycling reads dense T5 models "
      "(T5ForConditionalGeneration, model_type 't5' or 'mt5'); a Switch Transformers "
      "checkpoint is already sparse."
    )
  c = {**hf.HF_DEFAULTS, **T5_DEFAULTS[kind], **hf_config}
  c["num_decoder_layers"] = hf_config.get("num_decoder_layers") or c["num_layers"]
  proj = str(c["feed_forward_proj"])
  gated, act = proj.startswith("gated-"), proj.split("-")[-1]
  act = "gelu_new" if proj == "gated-gelu" else act  # transformers' special case
  if act not in hf.HF_ACTIVATIONS or proj.count("-") > 1 or (proj.count("-") and not gated):
    raise ValueError(
      f"config.json has feed_forward_proj={proj!r}; supported: relu, gelu, gated-gelu, "
      f"gated-{{{', '.join(hf.HF_ACTIVATIONS)}}}."
    )
  scaled = kind == "t5" and c.get("scale_decoder_outputs", c["tie_word_embeddings"] is not False)
  activations = (hf.HF_ACTIVATIONS[act], "linear") if gated else (hf.HF_ACTIVATIONS[act],)
  return ModelConfig(
    **hf.t5_fields(c),
    num_sparse_encoder_layers=0,
    num_sparse_decoder_layers=0,
    mlp_activations=activations,
    tie_embeddings=bool(scaled),
  )


def t5_tensor_specs(cfg: ModelConfig) -> list[hf.TensorSpec]:
  """Every tensor of a T5ForConditionalGeneration checkpoint of the dense `cfg`: Switch's
  names (`hf.tensor_specs`) with T5's `DenseReluDense` MLPs (`wi_0`/`wi_1` when gated)."""
  specs = []
  for spec in hf.tensor_specs(cfg):
    name = spec.name.replace(".mlp.", ".DenseReluDense.")
    if len(cfg.mlp_activations) == 2 and spec.path[-1] == "wi":
      for i in range(2):
        specs.append(
          dataclasses.replace(
            spec, name=name.replace(".wi.", f".wi_{i}."), path=spec.path[:-1] + (f"wi_{i}",)
          )
        )
    else:
      specs.append(dataclasses.replace(spec, name=name))
  return specs


def read_hf_t5(path) -> DenseModel:
  """A Hugging Face T5ForConditionalGeneration directory as a dense switchjax model whose
  leaves read their tensors on demand; every name and shape is checked first."""
  path = pathlib.Path(path)
  cfg = t5_config_from_hf(hf.read_hf_config(path))
  tensors = hf.read_tensors(path)
  shapes = tensors.shapes
  if "shared.weight" not in shapes and "encoder.embed_tokens.weight" in shapes:
    tensors.aliases["shared.weight"] = "encoder.embed_tokens.weight"
    shapes["shared.weight"] = shapes["encoder.embed_tokens.weight"]
  if not cfg.tie_embeddings and "lm_head.weight" not in shapes and "shared.weight" in shapes:
    tensors.aliases["lm_head.weight"] = "shared.weight"  # transformers 5.x ties it
    shapes["lm_head.weight"] = shapes["shared.weight"]
  try:
    ignored = hf.resolve_tied(cfg, tensors)
    # Some files carry a never-used bias of the first cross-attention (transformers ignores it).
    ignored |= {n for n in shapes if n.endswith("EncDecAttention.relative_attention_bias.weight")}
    specs = t5_tensor_specs(cfg)
    hf.check_names_and_shapes(specs, shapes, ignored)
  except hf.CheckpointError as e:
    raise ValueError(f"{path}: {e}") from None
  params = hf.lazy_params(tensors, specs, np.float32, path)
  return DenseModel(cfg, params, path, "Hugging Face T5")


# --------------------------------------------------------------------------------------------
# Dense -> sparse.

# Logical axis of a parameter -> the config field that sizes it.
AXIS_FIELDS = {
  "vocab": "model.vocab_size",
  "embed": "model.d_model",
  "mlp": "model.d_ff",
  "expert_mlp": "model.expert_d_ff",
  "heads": "model.num_heads",
  "kv": "model.d_kv",
  "relpos_buckets": "model.relative_attention_num_buckets",
}


def check_compatible(dense: ModelConfig, target: ModelConfig) -> None:
  """Refuses (one-line ValueError naming the config field) a target that would not compute
  the dense model's function with its experts copied: other activations, logits, attention
  or norm settings, layer counts, or no MoE layer at all."""
  if not encoder_sparse_layers(target) and not decoder_sparse_layers(target):
    raise ValueError(
      "the config has no MoE layer to upcycle into: set model.num_sparse_encoder_layers / "
      "model.num_sparse_decoder_layers (Switch: every other layer)."
    )
  expert_field = (
    "model.expert_activations" if target.expert_activations is not None else "model.mlp_activations"
  )
  checks = [
    ("model.num_layers", dense.num_layers, target.num_layers),
    ("model.num_decoder_layers", dense.decoder_layers, target.decoder_layers),
    (expert_field, dense.mlp_activations, tuple(target.expert_acts)),
    ("model.tie_embeddings", dense.tie_embeddings, target.tie_embeddings),
    (
      "model.relative_attention_max_distance",
      dense.relative_attention_max_distance,
      target.relative_attention_max_distance,
    ),
    ("model.layer_norm_epsilon", dense.layer_norm_epsilon, target.layer_norm_epsilon),
  ]
  if (
    len(encoder_sparse_layers(target)) < target.num_layers
    or len(decoder_sparse_layers(target)) < target.decoder_layers
  ):  # dense MLPs remain
    checks.append(("model.mlp_activations", dense.mlp_activations, tuple(target.mlp_activations)))
  for field, want, have in checks:
    if want != have:
      value = ",".join(want) if isinstance(want, tuple) else want
      raise ValueError(
        f"{field}={have!r} in the config but the dense model has {want!r}: the upcycled model "
        f"would not compute the dense model's function; set {field}={value}."
      )


def _flatten(tree, prefix=()) -> dict[tuple[str, ...], Any]:
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_flatten(v, prefix + (k,)))
    return out
  return {prefix: tree}


def _unflatten(flat: dict[tuple[str, ...], Any]) -> dict:
  tree: dict = {}
  for path, value in flat.items():
    hf.set_path(tree, path, value)
  return tree


def _target_layout(target: ModelConfig):
  """{path: (ShapeDtypeStruct, logical axis names)} of the target model's parameters."""
  model = SwitchTransformer(target)
  boxed = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
  names = jax.tree.map(
    lambda x: tuple(x.names), boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned)
  )
  shapes = _flatten(sharding.unbox(boxed))
  axes = _flatten(names)
  return {path: (shapes[path], axes[path]) for path in shapes}


def _mismatch(name: str, have, want, axes, target: ModelConfig) -> ValueError:
  """'encoder/layers_0/mlp/wi: the dense model has shape (32, 64), the config (32, 128)
  (model.d_ff=128); set model.d_ff=64.'"""
  for axis, (a, b) in enumerate(zip(have, want)):
    if a != b:
      field = AXIS_FIELDS.get(axes[axis], "")
      if field == "model.expert_d_ff" and target.expert_d_ff is None:
        field = "model.d_ff"  # the experts take the dense width unless expert_d_ff is set
      current = getattr(target, field.split(".")[-1], "?") if field else "?"
      fix = f"; set {field}={a}" if field else ""
      return ValueError(
        f"{name}: the dense model has shape {tuple(have)} but the config {tuple(want)} "
        f"({field}={current}){fix}."
      )
  return ValueError(f"{name}: the dense model has shape {tuple(have)}, the config {tuple(want)}.")


def _cast(leaf, dtype) -> LazyArray:
  """A dense parameter read (and cast) when written."""
  return LazyArray(leaf.shape, dtype, lambda start, stop: np.asarray(leaf).astype(dtype))


def _experts(leaf, num_experts: int, dtype) -> LazyArray:
  """[E, in, out] copies of a dense [in, out] kernel, read one expert at a time."""
  shape = (num_experts, *leaf.shape)
  return LazyArray(
    shape,
    dtype,
    lambda start, stop: np.broadcast_to(
      np.asarray(leaf).astype(dtype), (stop - start, *leaf.shape)
    ),
    axis=0,
    block=1,
  )


def upcycle_params(dense: DenseModel, target: ModelConfig, seed: int = 0) -> dict:
  """The parameters of the Switch model `target` upcycled from `dense`.

  Every parameter of `target` comes from the dense model's parameter of the same name (an
  expert kernel [E, in, out] from the dense MLP kernel [in, out], copied E times), except the
  routers: kernels normal(0.02) from `seed` (one key per layer), biases 0. Leaves are
  `LazyArray`s of the target's parameter dtype (`np.asarray` reads one; `save_model` writes
  them a block at a time). Unused or missing dense parameters and shapes that do not fit are
  one-line ValueErrors naming the tensor and the config field.
  """
  check_compatible(dense.config, target)
  dense_flat = _flatten(dense.params)
  key = jax.random.key(seed)
  out, used = {}, set()
  for index, (path, (shape, axes)) in enumerate(sorted(_target_layout(target).items())):
    name = "/".join(path)
    dtype = np.dtype(shape.dtype)
    if "router" in path:
      if path[-1] == "kernel":
        kernel = routing.default_router_init(jax.random.fold_in(key, index), shape.shape, dtype)
        out[path] = np.array(kernel)  # a writable copy on the host
      else:
        out[path] = np.zeros(shape.shape, dtype)
      continue
    if path not in dense_flat:
      raise ValueError(
        f"{name} is not in the dense model ({dense.kind} {dense.source}): it does not fit the "
        "config; check model.tie_embeddings, model.mlp_activations and the layer counts."
      )
    leaf, used = dense_flat[path], used | {path}
    expert = bool(axes) and axes[0] == "expert"
    want = shape.shape[1:] if expert else shape.shape
    if tuple(leaf.shape) != tuple(want):
      raise _mismatch(name, leaf.shape, want, axes[1:] if expert else axes, target)
    out[path] = _experts(leaf, shape.shape[0], dtype) if expert else _cast(leaf, dtype)
  unused = sorted("/".join(p) for p in set(dense_flat) - used)
  if unused:
    raise ValueError(
      f"the dense model ({dense.kind} {dense.source}) has parameters the config lacks: "
      f"{', '.join(unused[:4])}{' ...' if len(unused) > 4 else ''}; it does not fit the config."
    )
  return _unflatten(out)


def upcycle(dense_dir, config: Config, output_dir, *, seed: int = 0, overwrite: bool = False):
  """Writes the Switch model of `config` upcycled from the dense model in `dense_dir` to
  `output_dir` (config.json + Orbax step 0; the dense directory's spiece.model is copied and
  data.spm_path points at it). Returns the Config written. Refuses (before writing) an
  output directory that is not empty (unless `overwrite`) or overlaps the input."""
  dense_dir, out = pathlib.Path(dense_dir), pathlib.Path(output_dir)
  checkpoint.check_output_dir(out, [dense_dir], overwrite, "--output_dir")
  dense = read_dense(dense_dir)
  params = upcycle_params(dense, config.model, seed)
  config = dataclasses.replace(config, train=dataclasses.replace(config.train, init_from=None))
  spm = dense_dir / hf.SPM
  if spm.is_file():
    data = dataclasses.replace(config.data, spm_path=str((out / hf.SPM).resolve()))
    config = dataclasses.replace(config, data=data)
  with checkpoint.claim_output_dir(out, "--output_dir"):
    checkpoint.clear_output_dir(out, (checkpoint.CONFIG_FILE, checkpoint.CHECKPOINTS, hf.SPM))
    out.mkdir(parents=True, exist_ok=True)
    if spm.is_file():
      shutil.copyfile(spm, out / hf.SPM)
    checkpoint.save_model(out, config.validate(), params)
  return config


# --------------------------------------------------------------------------------------------
# Checking the equality.


def without_drops(model: ModelConfig) -> ModelConfig:
  """The same model with evaluation capacity for every token (eval capacity factor E, or a
  fixed capacity as long as any sequence), so that no token is dropped."""

  def roomy(moe):
    if moe is None:
      return None
    if moe.expert_capacity is not None:
      return dataclasses.replace(moe, expert_capacity=1 << 20)
    return dataclasses.replace(moe, eval_capacity_factor=float(moe.num_experts))

  return dataclasses.replace(model, moe=roomy(model.moe), decoder_moe=roomy(model.decoder_moe))


def with_router(model: ModelConfig, router_type: str) -> ModelConfig:
  """The same model (the same parameters) routed by `router_type` in both stacks."""
  route = lambda moe: None if moe is None else dataclasses.replace(moe, router_type=router_type)
  return dataclasses.replace(model, moe=route(model.moe), decoder_moe=route(model.decoder_moe))


def random_batch(model: ModelConfig, batch: int = 2, inputs: int = 32, targets: int = 8, seed=0):
  """Random non-padding tokens: encoder inputs and decoder inputs (0 first, as T5 decodes)."""
  rng = np.random.default_rng(seed)
  decoder = rng.integers(2, model.vocab_size, (batch, targets)).astype(np.int32)
  decoder[:, 0] = 0
  return rng.integers(2, model.vocab_size, (batch, inputs)).astype(np.int32), decoder


def logits(model: ModelConfig, params, encoder_tokens, decoder_tokens) -> np.ndarray:
  """Float32 logits of a model in evaluation mode."""
  apply = jax.jit(SwitchTransformer(model).apply)
  return np.asarray(apply({"params": params}, encoder_tokens, decoder_tokens))


def logit_differences(dense: DenseModel, target: ModelConfig, params) -> dict[str, float]:
  """max |logits(upcycled) - logits(dense)| on a random batch with nothing dropped, for the
  renormalised router and for the router probability as the combine weight."""
  params = jax.tree.map(np.asarray, params)
  dense_params = jax.tree.map(np.asarray, dense.params)
  dense_model = dataclasses.replace(dense.config, dtype="float32", dropout_rate=0.0)
  tokens = random_batch(target)
  reference = logits(dense_model, dense_params, *tokens)
  out = {}
  for label, router in (
    ("renormalized", RENORMALIZED_ROUTER),
    ("router probability", "tokens_choose_masked"),
  ):
    model = without_drops(with_router(dataclasses.replace(target, dtype="float32"), router))
    out[label] = float(np.max(np.abs(logits(model, params, *tokens) - reference)))
  return out
