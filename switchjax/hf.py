"""Hugging Face `google/switch-*` checkpoints <-> switchjax.

`from_hf(path)` reads `config.json` (transformers 4.x or 5.x layout) and the weights
(`model.safetensors`, sharded safetensors, `pytorch_model.bin` or sharded bins; float32, float16
or bfloat16), checks every tensor name and shape against the config, transposes torch's
(out, in) Linear weights and stacks the experts into [E, in, out] kernels. The ModelConfig it
builds computes what transformers computes: each sequence is one routing group with a fixed
`expert_capacity`, HF's sparse-layer placement, padding routed like any token (no
`mask_padding_activations`), tied or untied logits.

`to_hf(model_or_config, params, out_dir)` writes `config.json` (5.x layout) and safetensors
(`model.safetensors`, or shards with their index) for
`SwitchTransformersForConditionalGeneration.from_pretrained`, and refuses (ValueError) what that
model cannot express: gated MLPs, capacity-factor routing, k > 1, experts-choose or
batch-prioritized routing, ignored padding tokens, expert widths or activations that differ from
the dense ones, sparse placements HF's rule cannot produce.

Both directions stream for checkpoints bigger than memory: `lazy_from_hf` checks everything and
returns `checkpoint.LazyArray` leaves that read their HF tensors a block (one expert, or a few
MiB of rows) at a time, which `convert_from_hf` writes into an Orbax checkpoint block by block;
`to_hf` takes lazily read leaves (`checkpoint.lazy_params`) and writes each tensor in row blocks.

Notes on transformers 5.x: `save_pretrained` omits tied tensors (4.x files contain them); with
`tie_word_embeddings=False` it does not tie `encoder/decoder.embed_tokens` to `shared` either, so
`to_hf` writes those copies for untied models and `from_hf` refuses copies that differ.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
import shutil
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np

from switchjax import checkpoint, scan
from switchjax.checkpoint import LazyArray
from switchjax.config import Config, DataConfig, ModelConfig, MoeConfig
from switchjax.model import (
  SwitchTransformer,
  decoder_sparse_layers,
  encoder_sparse_layers,
  hf_sparse_blocks,
  sparse_layer_indices,
)

# HF `dense_act_fn` -> switchjax activation. HF's 'gelu' is the exact (erf) form, 'gelu_new'
# and friends the tanh approximation (switchjax's 'gelu').
HF_ACTIVATIONS = {
  "relu": "relu",
  "gelu": "gelu_exact",
  "gelu_new": "gelu",
  "gelu_pytorch_tanh": "gelu",
  "gelu_fast": "gelu",
  "silu": "silu",
  "swish": "silu",
  "linear": "linear",
}
# switchjax activation -> HF `dense_act_fn`.
TO_HF_ACTIVATIONS = {
  "relu": "relu",
  "gelu_exact": "gelu",
  "gelu": "gelu_new",
  "gelu_new": "gelu_new",
  "silu": "silu",
  "linear": "linear",
}
WEIGHT_FILES = (
  "model.safetensors",
  "model.safetensors.index.json",
  "pytorch_model.bin",
  "pytorch_model.bin.index.json",
)
SPM = "spiece.model"
TIED_EMBEDDINGS = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
HF_DEFAULTS = {
  "vocab_size": 32128,
  "d_model": 768,
  "d_kv": 64,
  "d_ff": 2048,
  "num_layers": 12,
  "num_decoder_layers": 12,
  "num_heads": 12,
  "num_sparse_encoder_layers": 3,
  "num_sparse_decoder_layers": 3,
  "num_experts": 8,
  "expert_capacity": 64,
  "router_bias": False,
  "router_jitter_noise": 0.01,
  "dropout_rate": 0.1,
  "relative_attention_num_buckets": 32,
  "relative_attention_max_distance": 128,
  "layer_norm_epsilon": 1e-6,
  "tie_word_embeddings": True,
  "dense_act_fn": "relu",
}


class CheckpointError(ValueError):
  """A checkpoint directory that cannot be converted; the message names the problem."""


# --------------------------------------------------------------------------------------------
# Sparse layer placement.


def hf_sparse_layers(num_layers: int, num_sparse: int, step: int | None = None) -> tuple[int, ...]:
  """The sparse blocks transformers builds: step = the stored `*_sparse_step` if the config
  has one, else num_layers // num_sparse (num_layers when 0); block i is sparse when
  i % step == 1, or every block when step == 1; a step of 0 gives none.

  Note that 0 sparse layers without a stored step still makes block 1 sparse (HF's rule).
  """
  if step is None:
    return sparse_layer_indices(num_layers, num_sparse, "hf")
  return hf_sparse_blocks(num_layers, step)


def hf_sparse_count(num_layers: int, layers: tuple[int, ...], stack: str) -> tuple[int, int]:
  """(num_sparse, sparse_step) that make transformers build exactly `layers` sparse.

  Tries len(layers) first, then every other count; no sparse layer is written as step 0.
  Raises ValueError when no count reproduces the placement.
  """
  layers = tuple(sorted(layers))
  if not layers:
    return 0, 0
  for count in [len(layers)] + list(range(1, num_layers + 1)):
    if hf_sparse_layers(num_layers, count) == layers:
      return count, num_layers // count
  options = sorted({hf_sparse_layers(num_layers, s) for s in range(1, num_layers + 1)})
  raise ValueError(
    f"The {stack}'s sparse layers {layers} cannot be expressed in Hugging Face: with "
    f"{num_layers} layers its rule (step = layers // sparse count, block i sparse when "
    f"i % step == 1) only produces {', '.join(map(str, options))}. The placement is part "
    f"of the weights: configure new models with model.sparse_layout='hf' (or "
    f"model.sparse_{stack}_layers set to one of these) to be able to export them."
  )


# --------------------------------------------------------------------------------------------
# Config.


def config_from_hf(hf: dict) -> ModelConfig:
  """ModelConfig equivalent to a Hugging Face SwitchTransformersConfig dict (4.x or 5.x)."""
  if hf.get("model_type") != "switch_transformers":
    raise CheckpointError(
      f"config.json has model_type={hf.get('model_type')!r}, not 'switch_transformers': this "
      "is another kind of model. from_hf converts Switch Transformers checkpoints "
      "(SwitchTransformersForConditionalGeneration, e.g. google/switch-base-8) only."
    )
  hf = {**HF_DEFAULTS, **hf}  # transformers' defaults for absent keys
  act = hf["dense_act_fn"]
  if (
    str(act).startswith("gated-")
    or hf.get("is_gated_act")
    or str(hf.get("feed_forward_proj", "")).startswith("gated-")
  ):
    raise CheckpointError(
      f"config.json asks for a gated feed-forward (dense_act_fn={act!r}, "
      f"is_gated_act={hf.get('is_gated_act')}, feed_forward_proj={hf.get('feed_forward_proj')!r})"
      ": transformers' SwitchTransformers has no gated MLP (it raises for 'gated-gelu'), so "
      "there is no reference to convert against; use a checkpoint with dense_act_fn 'relu'."
    )
  if act not in HF_ACTIVATIONS:
    raise CheckpointError(
      f"config.json has dense_act_fn={act!r}, which switchjax does not "
      f"implement; supported: {', '.join(HF_ACTIVATIONS)}."
    )
  num_layers = hf["num_layers"]
  num_decoder_layers = hf["num_decoder_layers"] or num_layers
  enc = hf_sparse_layers(num_layers, hf["num_sparse_encoder_layers"], hf.get("encoder_sparse_step"))
  dec = hf_sparse_layers(
    num_decoder_layers, hf["num_sparse_decoder_layers"], hf.get("decoder_sparse_step")
  )
  return ModelConfig(
    vocab_size=hf["vocab_size"],
    d_model=hf["d_model"],
    d_ff=hf["d_ff"],
    num_heads=hf["num_heads"],
    d_kv=hf["d_kv"],
    num_layers=num_layers,
    num_decoder_layers=num_decoder_layers,
    num_sparse_encoder_layers=len(enc),
    num_sparse_decoder_layers=len(dec),
    sparse_layout="hf",
    sparse_encoder_layers=enc,
    sparse_decoder_layers=dec,
    mlp_activations=(HF_ACTIVATIONS[act],),
    dropout_rate=hf["dropout_rate"],
    relative_attention_num_buckets=hf["relative_attention_num_buckets"],
    relative_attention_max_distance=hf["relative_attention_max_distance"],
    tie_embeddings=hf["tie_word_embeddings"],
    layer_norm_epsilon=hf["layer_norm_epsilon"],
    dtype="float32",
    param_dtype="float32",
    init_scale=1.0,
    mask_padding_activations=False,
    moe=MoeConfig(
      num_experts=hf["num_experts"],
      router_type="tokens_choose_masked",
      num_selected_experts=1,
      jitter_noise=hf["router_jitter_noise"],
      router_bias=hf["router_bias"],
      expert_capacity=hf["expert_capacity"],
    ),
  )


def config_to_hf(cfg: ModelConfig) -> dict:
  """The config.json (transformers 5.x layout) of a model HF can express; else ValueError
  saying why and what to change.

  `mask_padding_activations=True` is accepted: with one routing group per sequence, tokens
  filling the capacity in position order and padding at the end, zeroing padding activations
  does not change the logits of real positions (only the router losses, which HF computes over
  padding too).
  """
  cfg.validate()
  moe = cfg.moe
  refusals = _hf_refusals(cfg)
  layouts = {}
  for stack, n, layers in (
    ("encoder", cfg.num_layers, encoder_sparse_layers(cfg)),
    ("decoder", cfg.decoder_layers, decoder_sparse_layers(cfg)),
  ):
    try:
      layouts[stack] = hf_sparse_count(n, layers, stack)
    except ValueError as e:
      refusals.append(str(e).rstrip("."))
  if refusals:
    raise ValueError(
      "Cannot write this model as a Hugging Face checkpoint: " + "; ".join(refusals) + "."
    )
  return {
    "architectures": ["SwitchTransformersForConditionalGeneration"],
    "model_type": "switch_transformers",
    "vocab_size": cfg.vocab_size,
    "d_model": cfg.d_model,
    "d_kv": cfg.d_kv,
    "d_ff": cfg.d_ff,
    "num_heads": cfg.num_heads,
    "num_layers": cfg.num_layers,
    "num_decoder_layers": cfg.decoder_layers,
    "num_sparse_encoder_layers": layouts["encoder"][0],
    "num_sparse_decoder_layers": layouts["decoder"][0],
    "encoder_sparse_step": layouts["encoder"][1],
    "decoder_sparse_step": layouts["decoder"][1],
    "num_experts": moe.num_experts,
    "expert_capacity": moe.expert_capacity,
    "router_bias": moe.router_bias,
    "router_jitter_noise": moe.jitter_noise,
    "router_dtype": "float32",
    "router_ignore_padding_tokens": False,
    "router_z_loss_coef": 0.001,
    "router_aux_loss_coef": 0.001,
    "relative_attention_num_buckets": cfg.relative_attention_num_buckets,
    "relative_attention_max_distance": cfg.relative_attention_max_distance,
    "dropout_rate": cfg.dropout_rate,
    "layer_norm_epsilon": cfg.layer_norm_epsilon,
    "initializer_factor": 1.0,
    "dense_act_fn": TO_HF_ACTIVATIONS[cfg.mlp_activations[0]],
    "tie_word_embeddings": cfg.tie_embeddings,
    "is_encoder_decoder": True,
    "use_cache": True,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "decoder_start_token_id": 0,
    "dtype": "float32",
  }


def _hf_refusals(cfg: ModelConfig) -> list[str]:
  """What HF's SwitchTransformers cannot express in `cfg` (besides the sparse layout), each
  with the setting to change."""
  moe = cfg.moe
  refusals = []
  if len(cfg.mlp_activations) != 1 or len(cfg.expert_acts) != 1:
    refusals.append(
      f"gated MLPs (mlp_activations={cfg.mlp_activations}, expert_activations="
      f"{cfg.expert_acts}): HF's SwitchTransformers has only act(x @ wi) @ wo; use one "
      "activation, e.g. ('relu',)"
    )
  elif cfg.mlp_activations != cfg.expert_acts:
    refusals.append(
      f"expert_activations={cfg.expert_acts} differ from mlp_activations="
      f"{cfg.mlp_activations}: HF has one dense_act_fn for both"
    )
  elif cfg.mlp_activations[0] not in TO_HF_ACTIVATIONS:
    refusals.append(
      f"activation {cfg.mlp_activations[0]!r} has no HF dense_act_fn; use one "
      f"of {', '.join(TO_HF_ACTIVATIONS)}"
    )
  if cfg.expert_mlp_dim != cfg.d_ff:
    refusals.append(
      f"expert_d_ff={cfg.expert_d_ff} differs from d_ff={cfg.d_ff}: HF's experts "
      "have the dense width; set model.expert_d_ff=None"
    )
  if moe.expert_capacity is None:
    refusals.append(
      "capacity-factor routing (moe.expert_capacity=None): HF routes each "
      "sequence with a fixed number of slots per expert; set "
      "model.moe.expert_capacity (switch-base-*: 64)"
    )
  if router_problem := moe.router().hf_problem(moe):
    refusals.append(router_problem)
  if cfg.decoder_moe is not None and cfg.decoder_moe != moe:
    refusals.append(
      "the decoder has its own MoE settings (model.decoder_moe): HF routes both stacks with "
      "one router configuration; unset model.decoder_moe"
    )
  if moe.ignore_padding_tokens:
    refusals.append(
      "moe.ignore_padding_tokens=True: HF routes padding like any token; set it to False"
    )
  return refusals


# --------------------------------------------------------------------------------------------
# The tensor map: one entry per HF tensor.


@dataclasses.dataclass(frozen=True)
class TensorSpec:
  """One Hugging Face tensor and where it lives in the switchjax params.

  Attributes:
    name: HF state-dict name.
    path: keys of the switchjax parameter.
    expert: index into the leading expert axis of a stacked expert kernel, else None.
    hf_shape: the torch shape.
    jax_shape: the shape of params[path] (of one expert's slice for experts).
    transpose: torch keeps Linear weights (out, in): switchjax = hf.T.reshape(jax_shape).
  """

  name: str
  path: tuple[str, ...]
  expert: int | None
  hf_shape: tuple[int, ...]
  jax_shape: tuple[int, ...]
  transpose: bool


def tensor_specs(cfg: ModelConfig) -> list[TensorSpec]:
  """Every tensor of the HF checkpoint of `cfg` (without the tied copies of shared.weight)."""
  d, h, k, f, e = cfg.d_model, cfg.num_heads, cfg.d_kv, cfg.d_ff, cfg.moe.num_experts
  specs = []

  def add(name, path, hf_shape, jax_shape=None, transpose=True, expert=None):
    jax_shape = jax_shape or (hf_shape[::-1] if transpose else hf_shape)
    specs.append(
      TensorSpec(name, tuple(path), expert, tuple(hf_shape), tuple(jax_shape), transpose)
    )

  def norm(name, path):
    add(name, path + ["scale"], (d,), transpose=False)

  def attention(prefix, path):
    for hf_name, ours in (("q", "query"), ("k", "key"), ("v", "value")):
      add(f"{prefix}.{hf_name}.weight", path + [ours], (h * k, d), (d, h, k))
    add(f"{prefix}.o.weight", path + ["out"], (d, h * k), (h, k, d))

  def mlp(prefix, path, sparse):
    if not sparse:
      add(f"{prefix}.wi.weight", path + ["wi"], (f, d))
      add(f"{prefix}.wo.weight", path + ["wo"], (d, f))
      return
    add(f"{prefix}.router.classifier.weight", path + ["router", "kernel"], (e, d))
    if cfg.moe.router_bias:
      add(f"{prefix}.router.classifier.bias", path + ["router", "bias"], (e,), transpose=False)
    for i in range(e):
      add(f"{prefix}.experts.expert_{i}.wi.weight", path + ["wi"], (f, d), expert=i)
      add(f"{prefix}.experts.expert_{i}.wo.weight", path + ["wo"], (d, f), expert=i)

  add("shared.weight", ["token_embedder", "embedding"], (cfg.vocab_size, d), transpose=False)
  buckets = cfg.relative_attention_num_buckets
  enc_sparse, dec_sparse = set(encoder_sparse_layers(cfg)), set(decoder_sparse_layers(cfg))
  add(
    "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
    ["encoder", "relpos_bias", "rel_embedding"],
    (buckets, h),
  )
  for i in range(cfg.num_layers):
    b, p = f"encoder.block.{i}.layer", ["encoder", f"layers_{i}"]
    norm(f"{b}.0.layer_norm.weight", p + ["pre_attention_layer_norm"])
    attention(f"{b}.0.SelfAttention", p + ["attention"])
    norm(f"{b}.1.layer_norm.weight", p + ["pre_mlp_layer_norm"])
    mlp(f"{b}.1.mlp", p + ["mlp"], i in enc_sparse)
  norm("encoder.final_layer_norm.weight", ["encoder", "encoder_norm"])
  add(
    "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
    ["decoder", "relpos_bias", "rel_embedding"],
    (buckets, h),
  )
  for i in range(cfg.decoder_layers):
    b, p = f"decoder.block.{i}.layer", ["decoder", f"layers_{i}"]
    norm(f"{b}.0.layer_norm.weight", p + ["pre_self_attention_layer_norm"])
    attention(f"{b}.0.SelfAttention", p + ["self_attention"])
    norm(f"{b}.1.layer_norm.weight", p + ["pre_cross_attention_layer_norm"])
    attention(f"{b}.1.EncDecAttention", p + ["encoder_decoder_attention"])
    norm(f"{b}.2.layer_norm.weight", p + ["pre_mlp_layer_norm"])
    mlp(f"{b}.2.mlp", p + ["mlp"], i in dec_sparse)
  norm("decoder.final_layer_norm.weight", ["decoder", "decoder_norm"])
  if not cfg.tie_embeddings:
    add("lm_head.weight", ["decoder", "logits_dense"], (cfg.vocab_size, d))
  return specs


# --------------------------------------------------------------------------------------------
# Reading weight files.


class Tensors:
  """The tensors of a checkpoint: names, shapes and dtypes first (so that everything is checked
  before anything is loaded), then rows read on demand, so that nothing is held longer than
  it is used.

  Attributes:
    shapes, dtypes: of every tensor, by name.
    aliases: names read from another tensor (shared.weight from a tied copy).
  """

  def __init__(self, shapes: dict, dtypes: dict, read_rows: Callable[[str, int, int], np.ndarray]):
    self.shapes, self.dtypes, self._read_rows = shapes, dtypes, read_rows
    self.aliases: dict[str, str] = {}

  def rows(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Rows [start, stop) along the first axis (all of a 0-d tensor), in the stored dtype."""
    name = self.aliases.get(name, name)
    shape = self.shapes[name]
    if not shape:
      return self._read_rows(name, 0, 1).reshape(())
    return self._read_rows(name, start, shape[0] if stop is None else min(stop, shape[0]))


def _safetensors_dtypes() -> dict:
  import ml_dtypes  # comes with jax; numpy itself has no bfloat16

  return {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
  }


def _safetensors_header(file: pathlib.Path) -> tuple[dict, int]:
  """(tensor entries, byte offset of the data) of a .safetensors file, validated.

  Reads the format directly (8-byte header length, JSON header, raw little-endian data)
  because safetensors' numpy loader cannot return bfloat16.
  """
  dtypes = _safetensors_dtypes()
  try:
    size = file.stat().st_size
    with open(file, "rb") as fh:
      length = int.from_bytes(fh.read(8), "little")
      if size < 8 or length > size - 8:
        raise ValueError(f"header length {length} does not fit in a {size}-byte file")
      header = json.loads(fh.read(length))
    if not isinstance(header, dict):
      raise ValueError("the header is not a JSON object")
    header.pop("__metadata__", None)
    data_size = size - 8 - length
    for name, entry in header.items():
      if entry.get("dtype") not in dtypes:
        raise ValueError(
          f"tensor {name!r} has dtype {entry.get('dtype')!r}; expected one of {', '.join(dtypes)}"
        )
      begin, end = entry["data_offsets"]
      nbytes = int(np.prod(entry["shape"], dtype=np.int64)) * dtypes[entry["dtype"]].itemsize
      if not 0 <= begin <= end <= data_size or end - begin != nbytes:
        raise ValueError(
          f"tensor {name!r} has byte range {begin}..{end}, which does not fit "
          f"its shape {entry['shape']} or the file"
        )
  except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
    raise CheckpointError(
      f"{file} is not a readable safetensors file ({e}); the file is "
      "corrupt or truncated: download or save it again."
    ) from None
  return header, 8 + length


def _read_safetensors(files: list[pathlib.Path]) -> Tensors:
  """Tensors of one or more .safetensors files; rows are read straight from the file (no
  memory map, whose touched pages would stay resident)."""
  dtypes = _safetensors_dtypes()
  where: dict[str, tuple[pathlib.Path, dict, int]] = {}
  for file in files:
    header, start = _safetensors_header(file)
    for name, entry in header.items():
      where[name] = (file, entry, start)

  def read_rows(name: str, first: int, stop: int) -> np.ndarray:
    file, entry, start = where[name]
    shape, dtype = entry["shape"], dtypes[entry["dtype"]]
    row = int(np.prod(shape[1:], dtype=np.int64))
    offset = start + entry["data_offsets"][0] + first * row * dtype.itemsize
    count = (stop - first) * row
    data = np.fromfile(file, dtype, count, offset=offset) if count else np.zeros(0, dtype)
    return data.reshape([stop - first, *shape[1:]])

  return Tensors(
    {name: tuple(e["shape"]) for name, (_, e, _) in where.items()},
    {name: dtypes[e["dtype"]] for name, (_, e, _) in where.items()},
    read_rows,
  )


def _torch_load(file: pathlib.Path, mmap: bool) -> dict:
  """A state dict of tensors (memory-mapped when `mmap`), or CheckpointError."""
  import torch  # only for .bin checkpoints

  try:
    part = torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
  except Exception as e:  # noqa: BLE001  (torch raises many kinds for a bad file)
    if mmap and "mmap" in str(e):  # the legacy (pre-zip) format: loaded whole
      return _torch_load(file, mmap=False)
    raise CheckpointError(
      f"{file} could not be read by torch.load ({type(e).__name__}: "
      f"{str(e)[:200]}); the file is corrupt or not a state dict."
    ) from None
  if not isinstance(part, dict) or not all(isinstance(v, torch.Tensor) for v in part.values()):
    raise CheckpointError(f"{file} does not hold a state dict of tensors.")
  return part


def _torch_numpy(tensor) -> np.ndarray:
  """A torch tensor as numpy in the same dtype (bfloat16 through its bits)."""
  import ml_dtypes
  import torch

  if tensor.dtype == torch.bfloat16:
    return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return tensor.numpy()


def _read_torch(files: list[pathlib.Path]) -> Tensors:
  """Tensors of pytorch_model.bin files (torch.load with weights_only=True), one shard open
  (memory-mapped) at a time, so that at most one shard's pages are resident."""
  where, shapes, dtypes = {}, {}, {}
  for file in files:
    for name, t in _torch_load(file, mmap=True).items():
      where[name], shapes[name] = file, tuple(t.shape)
      dtypes[name] = _torch_numpy(t.reshape(-1)[:0]).dtype
  current: dict[pathlib.Path, dict] = {}

  def read_rows(name: str, start: int, stop: int) -> np.ndarray:
    if where[name] not in current:
      current.clear()  # drops the previous shard's mapping first
      current[where[name]] = _torch_load(where[name], mmap=True)
    tensor = current[where[name]][name]
    return _torch_numpy(tensor.reshape(-1) if tensor.dim() == 0 else tensor)[start:stop].copy()

  return Tensors(shapes, dtypes, read_rows)


def _shard_files(index_file: pathlib.Path) -> list[pathlib.Path]:
  """The shard files named by a *.index.json weight map (which must all exist)."""
  try:
    weight_map = json.loads(index_file.read_text())["weight_map"]
    names = sorted(set(weight_map.values()))
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    raise CheckpointError(f"{index_file} is not a readable shard index ({e}).") from None
  missing = [n for n in names if not (index_file.parent / n).is_file()]
  if missing:
    raise CheckpointError(f"{index_file} names shard files that are missing: {', '.join(missing)}.")
  return [index_file.parent / n for n in names]


def read_tensors(path: pathlib.Path) -> Tensors:
  """The tensors of a checkpoint directory, from the first of WEIGHT_FILES it holds."""
  single, sharded, torch_single, torch_sharded = (path / n for n in WEIGHT_FILES)
  if single.is_file():
    return _read_safetensors([single])
  if sharded.is_file():
    return _read_safetensors(_shard_files(sharded))
  if torch_single.is_file():
    return _read_torch([torch_single])
  if torch_sharded.is_file():
    return _read_torch(_shard_files(torch_sharded))
  raise CheckpointError(
    f"{path} has no weights: expected one of {', '.join(WEIGHT_FILES)} "
    f"(found {', '.join(sorted(p.name for p in path.iterdir()))})."
  )


# --------------------------------------------------------------------------------------------
# Checks.


def _names(names, limit: int = 20) -> str:
  names = sorted(names)
  more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
  return ", ".join(names[:limit]) + more


def _check_sparse_layers(cfg: ModelConfig, shapes: dict) -> None:
  """The sparse blocks of the config must be the blocks holding a router in the file."""
  pattern = re.compile(
    r"^(encoder|decoder)\.block\.(\d+)\.layer\.\d+\.mlp\.router\."
    r"classifier\.weight$"
  )
  found = {"encoder": set(), "decoder": set()}
  for name in shapes:
    if m := pattern.match(name):
      found[m.group(1)].add(int(m.group(2)))
  problems = []
  for stack, expected in (
    ("encoder", encoder_sparse_layers(cfg)),
    ("decoder", decoder_sparse_layers(cfg)),
  ):
    if set(expected) != found[stack]:
      problems.append(
        f"the config makes {stack} blocks {tuple(expected)} sparse but the "
        f"weights have routers in {stack} blocks {tuple(sorted(found[stack]))}"
      )
  if problems:
    raise CheckpointError(
      "Sparse layers do not match: " + "; ".join(problems) + ". (HF's rule: step = "
      "*_sparse_step or num_layers // num_sparse_*_layers, block i sparse when i % step == "
      "1.) Fix num_sparse_encoder_layers / num_sparse_decoder_layers (or the *_sparse_step "
      "entries) in config.json."
    )


def _equal_rows(tensors: Tensors, a: str, b: str) -> bool:
  """Whether two tensors are equal, compared a block of rows at a time."""
  if tensors.shapes[a] != tensors.shapes[b]:
    return False
  rows = _rows_per_block(tensors.shapes[a], 4)
  length = tensors.shapes[a][0] if tensors.shapes[a] else 1
  return all(
    np.array_equal(
      tensors.rows(a, i, i + rows).astype(np.float32),
      tensors.rows(b, i, i + rows).astype(np.float32),
    )
    for i in range(0, length, rows)
  )


def _resolve_tied(cfg: ModelConfig, tensors: Tensors) -> set[str]:
  """Checks the copies of shared.weight that transformers ties, and returns their names (to
  be ignored). A file without shared.weight but with a copy gets the copy as shared.weight."""
  shapes = tensors.shapes
  copies = [n for n in TIED_EMBEDDINGS if n in shapes]
  if cfg.tie_embeddings and "lm_head.weight" in shapes:
    copies.append("lm_head.weight")
  if "shared.weight" not in shapes and copies:
    source = copies.pop(0)
    shapes["shared.weight"] = shapes[source]
    tensors.dtypes["shared.weight"] = tensors.dtypes[source]
    tensors.aliases["shared.weight"] = source
  if not copies or "shared.weight" not in shapes:
    return set(copies)
  differ = [n for n in copies if not _equal_rows(tensors, n, "shared.weight")]
  if differ:
    raise CheckpointError(
      f"{_names(differ)} differ from shared.weight: switchjax has one token embedding "
      "shared by the encoder, the decoder and (when tied) the logits. (transformers 5.x "
      "does not tie encoder/decoder.embed_tokens when tie_word_embeddings=False; copy "
      "shared.weight into them before saving.)"
    )
  return set(copies)


def _check_names_and_shapes(specs: list[TensorSpec], shapes: dict, ignored: set[str]) -> None:
  """Missing, unexpected and wrongly shaped tensors, all reported in one error."""
  expected = {s.name: s.hf_shape for s in specs}
  missing = set(expected) - set(shapes)
  unexpected = set(shapes) - set(expected) - ignored
  wrong = [
    f"{n} expected {expected[n]}, found {tuple(shapes[n])}"
    for n in sorted(set(expected) & set(shapes))
    if tuple(shapes[n]) != expected[n]
  ]
  problems = []
  if missing:
    problems.append(f"missing tensors: {_names(missing)}")
  if unexpected:
    problems.append(f"unexpected tensors: {_names(unexpected)}")
  if wrong:
    problems.append(f"shape mismatch: {'; '.join(wrong[:20])}")
  if problems:
    raise CheckpointError("The weights do not match config.json: " + ". ".join(problems) + ".")


# --------------------------------------------------------------------------------------------
# Conversion.


def _set(tree: dict, path: tuple[str, ...], value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _get(tree, path: tuple[str, ...]):
  for key in path:
    if not hasattr(tree, "__getitem__") or key not in tree:
      raise ValueError(
        f"params have no entry {'/'.join(path)}: they do not belong to this model config."
      )
    tree = tree[key]
  return tree


# Big dense tensors (the embedding, the logits) are converted and written a block of rows of
# this size at a time; the experts of a layer one expert at a time.
BLOCK_BYTES = 4 << 20
DTYPES = ("float32", "bfloat16", "float16")


def _rows_per_block(shape: tuple[int, ...], itemsize: int) -> int:
  row = int(np.prod(shape[1:], dtype=np.int64)) * itemsize
  return max(1, BLOCK_BYTES // max(row, 1))


def _jax_layout(spec: TensorSpec, x: np.ndarray) -> np.ndarray:
  """One HF tensor in switchjax's layout: torch's (out, in) transposed and reshaped (a view
  where numpy can make one: the writer and LazyArray.__array__ copy it once anyway)."""
  return x.T.reshape(spec.jax_shape) if spec.transpose else x


def _lazy_leaf(tensors: Tensors, specs: list[TensorSpec], dtype: np.dtype, source) -> LazyArray:
  """One switchjax parameter read from its HF tensors on demand: a layer's experts stacked one
  expert per block, big 2-D tensors a block of HF rows at a time, anything else whole."""
  spec = specs[0]

  def rows(name, start=0, stop=None):
    return tensors.rows(name, start, stop).astype(dtype, copy=False)

  if spec.expert is not None:
    experts = sorted(specs, key=lambda s: s.expert)

    def read_experts(start, stop):  # [stop - start, in, out]
      if stop - start == 1:  # the usual block: a view, no copy
        return _jax_layout(experts[start], rows(experts[start].name))[None]
      return np.stack([_jax_layout(s, rows(s.name)) for s in experts[start:stop]])

    shape = (len(experts), *spec.jax_shape)
    return LazyArray(shape, dtype, read_experts, axis=0, block=1, source=source)
  block = _rows_per_block(spec.hf_shape, dtype.itemsize)
  if not spec.transpose:  # leaf rows = HF rows
    read, axis = (lambda a, b: rows(spec.name, a, b)), 0
  elif len(spec.hf_shape) == 2 and spec.jax_shape == spec.hf_shape[::-1]:  # columns = HF rows
    read, axis = (lambda a, b: rows(spec.name, a, b).T), 1
  else:  # whole
    read, axis, block = (lambda a, b: _jax_layout(spec, rows(spec.name))), 0, None
  return LazyArray(spec.jax_shape, dtype, read, axis=axis, block=block, source=source)


def _leaf_specs(cfg: ModelConfig) -> dict[tuple[str, ...], list[TensorSpec]]:
  """The HF tensors of each switchjax parameter (several for stacked experts), in order."""
  groups: dict[tuple[str, ...], list[TensorSpec]] = {}
  for spec in tensor_specs(cfg):
    groups.setdefault(spec.path, []).append(spec)
  return groups


def lazy_params_from_tensors(tensors: Tensors, cfg: ModelConfig, dtype, source=None) -> dict:
  """switchjax params whose leaves are LazyArrays of `dtype` over checked HF tensors (of the
  directory `source`)."""
  params: dict[str, Any] = {}
  for path, specs in _leaf_specs(cfg).items():
    _set(params, path, _lazy_leaf(tensors, specs, np.dtype(dtype), source))
  return params


def _stored_dtype(tensors: Tensors, cfg: ModelConfig) -> str:
  """The checkpoint's dtype when all its tensors share one switchjax supports; else float32
  (mixed float16/bfloat16, or float64)."""
  names = {tensors.aliases.get(s.name, s.name) for s in tensor_specs(cfg)}
  found = {np.dtype(tensors.dtypes[n]).name for n in names}
  return found.pop() if len(found) == 1 and found <= set(DTYPES) else "float32"


def _numpy_dtype(dtype) -> np.dtype:
  """np.dtype of 'float32', 'bfloat16' or 'float16' (any spelling); else ValueError."""
  import ml_dtypes

  name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
  if name not in DTYPES:
    raise ValueError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}.")
  return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def _checkpoint_dir(path) -> pathlib.Path:
  """The directory, with clear errors for a missing, non-directory or empty path."""
  path = pathlib.Path(path)
  if not path.exists():
    raise CheckpointError(
      f"{path} does not exist: give a Hugging Face checkpoint directory (config.json plus weights)."
    )
  if not path.is_dir():
    raise CheckpointError(
      f"{path} is not a directory: give the Hugging Face checkpoint "
      "directory holding config.json and the weights."
    )
  files = sorted(p.name for p in path.iterdir())
  if not files:
    raise CheckpointError(
      f"{path} is empty: expected config.json and model.safetensors (or pytorch_model.bin)."
    )
  if "config.json" not in files:
    raise CheckpointError(
      f"{path} has no config.json (found {', '.join(files[:10])}); a "
      "Hugging Face checkpoint directory needs it."
    )
  return path


def read_hf_config(path) -> dict:
  """config.json of a checkpoint directory as a dict."""
  path = _checkpoint_dir(path)
  try:
    hf = json.loads((path / "config.json").read_text())
  except (OSError, ValueError) as e:
    raise CheckpointError(f"{path / 'config.json'} is not valid JSON ({e}).") from None
  if not isinstance(hf, dict):
    raise CheckpointError(f"{path / 'config.json'} does not hold a JSON object.")
  return hf


def lazy_from_hf(path, dtype=None, scan_layers: bool = False) -> tuple[SwitchTransformer, dict]:
  """(model, params) of a Hugging Face checkpoint directory with LazyArray leaves: everything is
  checked (names, shapes, sparse layers, tied copies) but no weight is loaded; each leaf reads
  its tensors when it is written or converted to numpy.

  Args:
    path: the checkpoint directory.
    dtype: of the params, 'float32', 'bfloat16' or 'float16'; None keeps the checkpoint's own
      (float32 when its tensors mix dtypes). The model config's param_dtype says which.
    scan_layers: the model with model.scan_layers and its parameters stacked
      (`scan.stack_layers`; still lazy: a stacked leaf reads one layer per block).
  """
  path = _checkpoint_dir(path)
  cfg = config_from_hf(read_hf_config(path))
  tensors = read_tensors(path)
  _check_sparse_layers(cfg, tensors.shapes)
  ignored = _resolve_tied(cfg, tensors)
  _check_names_and_shapes(tensor_specs(cfg), tensors.shapes, ignored)
  dtype = _numpy_dtype(_stored_dtype(tensors, cfg) if dtype is None else dtype)
  cfg = dataclasses.replace(cfg, param_dtype=dtype.name)
  params = lazy_params_from_tensors(tensors, cfg, dtype, path)
  if scan_layers:
    cfg = dataclasses.replace(cfg, scan_layers=True)
    cfg.validate()
    params = scan.stack_layers(params, cfg)
  return SwitchTransformer(cfg), params


def from_hf(path, dtype="float32", scan_layers: bool = False) -> tuple[SwitchTransformer, dict]:
  """(model, params) from a Hugging Face checkpoint directory, in memory.

  The params are numpy arrays of `dtype` (None: the checkpoint's) in switchjax's layout;
  `model.apply({"params": params}, input_ids, decoder_input_ids)` gives transformers' logits
  when padding is token 0 (the attention mask is `input_ids != 0`). Raises CheckpointError
  naming what is wrong. For models bigger than memory, `convert_from_hf` writes a switchjax
  checkpoint one tensor at a time. `scan_layers` gives the scanned model (model.scan_layers).
  """
  model, params = lazy_from_hf(path, dtype, scan_layers)
  return model, jax.tree.map(np.asarray, params)


def convert_from_hf(
  hf_dir, output_dir, *, dtype=None, overwrite: bool = False, scan_layers: bool = False
) -> Config:
  """Converts a Hugging Face checkpoint directory into a switchjax checkpoint directory
  (config.json, the parameters as Orbax checkpoint step 0, and spiece.model when `hf_dir` has
  one), streaming: memory holds a few blocks (one expert, or 4 MiB of rows), never the model.

  `dtype` None keeps the checkpoint's dtype (bfloat16 stays bfloat16). Refuses (ValueError,
  before writing anything) an output directory inside or around `hf_dir`, or one that is not
  empty unless `overwrite`. `scan_layers` writes the scanned layout (model.scan_layers), still
  streaming (one layer of a stacked parameter at a time). Returns the Config written.
  """
  hf_dir, out = pathlib.Path(hf_dir), pathlib.Path(output_dir)
  checkpoint.check_output_dir(out, [hf_dir], overwrite, "--output_dir")
  model, params = lazy_from_hf(hf_dir, dtype, scan_layers)
  data = DataConfig(extra_ids=read_extra_ids(hf_dir))
  if (hf_dir / SPM).is_file():
    data = dataclasses.replace(data, spm_path=str((out / SPM).resolve()))
  config = Config(name=f"hf:{hf_dir.resolve().name}", model=model.config, data=data)
  checkpoint.clear_output_dir(out, (checkpoint.CONFIG_FILE, checkpoint.CHECKPOINTS, SPM))
  if (hf_dir / SPM).is_file():
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(hf_dir / SPM, out / SPM)
  checkpoint.save_model(out, config.validate(), params)
  return config


TOKENIZER_CONFIG = "tokenizer_config.json"


def read_extra_ids(hf_dir) -> int:
  """The sentinel count of an HF checkpoint's tokenizer: tokenizer_config.json's extra_ids, or
  its <extra_id_N> special tokens; T5's 100 when it says nothing."""
  try:
    tokenizer = json.loads((pathlib.Path(hf_dir) / TOKENIZER_CONFIG).read_text())
  except (OSError, ValueError):
    return 100
  if isinstance(tokenizer.get("extra_ids"), int) and tokenizer["extra_ids"] > 0:
    return tokenizer["extra_ids"]
  special = tokenizer.get("additional_special_tokens") or []
  sentinels = [t for t in special if isinstance(t, str) and t.startswith("<extra_id_")]
  return len(sentinels) or 100


def write_tokenizer_config(out_dir, extra_ids: int) -> None:
  """tokenizer_config.json for transformers' T5Tokenizer next to a copied spiece.model: the
  model's sentinel count (its default, 100, would move every sentinel id of another count)."""
  config = {"tokenizer_class": "T5Tokenizer", "extra_ids": int(extra_ids)}
  (pathlib.Path(out_dir) / TOKENIZER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def _model_config(model_or_config) -> ModelConfig:
  if isinstance(model_or_config, ModelConfig):
    return model_or_config
  if isinstance(model_or_config, (Config, SwitchTransformer)):
    return model_or_config.model if isinstance(model_or_config, Config) else model_or_config.config
  raise TypeError(
    f"to_hf takes a SwitchTransformer, a ModelConfig or a Config, not "
    f"{type(model_or_config).__name__}."
  )


def _plain_params(params) -> dict:
  """Unboxes logical-partitioning metadata and a {'params': ...} wrapper."""
  import flax.linen as nn

  params = nn.meta.unbox(params)
  if "params" in params and "token_embedder" not in params:
    params = params["params"]
  return params


# --------------------------------------------------------------------------------------------
# Writing Hugging Face checkpoints: sharded safetensors, one parameter in memory at a time.

SAFETENSORS_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16"}
HF_OUTPUTS = (
  "config.json",
  "generation_config.json",
  "model.safetensors",
  "model.safetensors.index.json",
  "model-*-of-*.safetensors",
  "pytorch_model.bin",
  "pytorch_model.bin.index.json",
  "pytorch_model-*-of-*.bin",
  SPM,
  TOKENIZER_CONFIG,
)


def parse_size(size) -> int:
  """Bytes of an int or a string like '5GB' (10**9), '500MB', '2GiB' (2**30), '100KB'."""
  if isinstance(size, int):
    return size
  m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?)B?\s*", str(size).upper())
  if not m or float(m.group(1)) <= 0:
    raise ValueError(f"max_shard_size={size!r}: use bytes or a size like '5GB', '500MB', '2GiB'.")
  base = 1024 if m.group(3) else 1000
  return int(float(m.group(1)) * base ** " KMGT".index(m.group(2) or " "))


@dataclasses.dataclass(frozen=True)
class _Entry:
  """One tensor of the HF checkpoint being written: its name, shape, dtype and file."""

  name: str
  shape: tuple[int, ...]
  dtype: np.dtype
  file: str = ""

  @property
  def nbytes(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def _leaf_and_shape(params, path: tuple[str, ...], specs: list[TensorSpec]):
  """The parameter at `path`, checked against the config's shape without loading it."""
  leaf = _get(params, path)
  spec = specs[0]
  expected = spec.jax_shape if spec.expert is None else (len(specs), *spec.jax_shape)
  if tuple(leaf.shape) != expected:
    raise ValueError(
      f"params {'/'.join(path)} has shape {tuple(leaf.shape)}, expected {expected} for this "
      "model config."
    )
  return leaf


def _hf_entries(params, cfg: ModelConfig, dtype) -> list[tuple[tuple[str, ...], list[_Entry]]]:
  """For each parameter, the HF tensors written from it (checked shapes, output dtypes)."""
  plan = []
  for path, specs in _leaf_specs(cfg).items():
    leaf = _leaf_and_shape(params, path, specs)
    out = np.dtype(leaf.dtype) if dtype is None else _numpy_dtype(dtype)
    if out.name not in SAFETENSORS_DTYPES:
      raise ValueError(f"params {'/'.join(path)} have dtype {out}, which safetensors lacks.")
    names = [s.name for s in specs]
    if path == ("token_embedder", "embedding") and not cfg.tie_embeddings:
      names += list(TIED_EMBEDDINGS)  # transformers 5.x ties nothing then: write the copies
    shape = specs[0].hf_shape
    plan.append((path, [_Entry(n, shape, out) for n in names]))
  return plan


def _shard(entries: list[_Entry], max_shard_size: int) -> list[list[_Entry]]:
  """Consecutive entries in files of at most max_shard_size bytes (a bigger tensor alone),
  named as transformers names them."""
  shards, size = [[]], 0
  for e in entries:
    if shards[-1] and size + e.nbytes > max_shard_size:
      shards.append([])
      size = 0
    shards[-1].append(e)
    size += e.nbytes
  n = len(shards)
  return [
    [
      dataclasses.replace(
        e, file="model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
      )
      for e in shard
    ]
    for i, shard in enumerate(shards)
  ]


def _safetensors_prefix(entries: list[_Entry]) -> bytes:
  """The 8-byte length and JSON header of a safetensors file holding `entries` in order
  (padded with spaces to a multiple of 8 bytes, as the safetensors library writes it)."""
  header, offset = {"__metadata__": {"format": "pt"}}, 0
  for e in entries:
    header[e.name] = {
      "dtype": SAFETENSORS_DTYPES[e.dtype.name],
      "shape": list(e.shape),
      "data_offsets": [offset, offset + e.nbytes],
    }
    offset += e.nbytes
  text = json.dumps(header, separators=(",", ":")).encode()
  text += b" " * (-len(text) % 8)
  return len(text).to_bytes(8, "little") + text


def _hf_view(spec: TensorSpec, x) -> np.ndarray:
  """One switchjax parameter (an expert's slice for experts) as its HF tensor (a view)."""
  x = np.asarray(x)
  return x.reshape(spec.hf_shape[::-1]).T if spec.transpose else x


def _stored_rows(spec: TensorSpec, leaf) -> Callable[[slice], np.ndarray] | None:
  """rows(slice) reading HF rows straight from a stored parameter, when a slice of it holds
  them (not transposed, or a transposed 2-D matrix); else None."""
  if not isinstance(leaf, checkpoint.StoredArray) or spec.expert is not None:
    return None
  if not spec.transpose:
    return leaf.__getitem__
  if len(spec.hf_shape) == 2 and leaf.shape == spec.hf_shape[::-1]:
    return lambda rows: leaf[:, rows].T
  return None


def _blocks(leaf) -> Iterator[tuple[int, np.ndarray]]:
  """(start, leaf[start:stop]) covering a parameter along its first axis: a stored block (one
  expert) at a time for LazyArrays, the whole array otherwise."""
  if isinstance(leaf, LazyArray) and leaf.axis == 0:
    for start, stop in leaf.block_ranges():
      yield start, leaf.read_block(start, stop)
  else:
    yield 0, np.asarray(leaf)


def _hf_arrays(params, cfg: ModelConfig, plan) -> Iterator[tuple[str, Callable]]:
  """(name, rows) in plan order, where rows(slice) gives those rows of the HF tensor: stacked
  experts are read a stored block (one expert) at a time, parameters stored in slices that hold
  HF rows a slice at a time, other parameters whole, one at a time."""
  specs = _leaf_specs(cfg)
  for path, entries in plan:
    by_name = {s.name: s for s in specs[path]}
    leaf = _get(params, path)
    if specs[path][0].expert is not None:
      for start, block in _blocks(leaf):
        for i, x in enumerate(block):
          spec = by_name[entries[start + i].name]
          assert spec.expert == start + i, (spec, start + i)
          yield spec.name, _hf_view(spec, x).__getitem__
    else:
      spec = by_name.get("shared.weight", specs[path][0])
      rows = _stored_rows(spec, leaf) or _hf_view(spec, leaf).__getitem__
      for e in entries:
        yield e.name, rows
    checkpoint.release_freed_memory()


def _write_tensor(fh, entry: _Entry, rows: Callable) -> None:
  """Writes one tensor from rows(slice) in blocks of BLOCK_BYTES (a transposed tensor is made
  contiguous a block at a time, not whole)."""
  if not entry.shape:
    np.asarray(rows(()), entry.dtype).tofile(fh)
    return
  step = _rows_per_block(entry.shape, entry.dtype.itemsize)
  for a in range(0, entry.shape[0], step):
    block = np.ascontiguousarray(rows(slice(a, min(a + step, entry.shape[0]))), entry.dtype)
    assert block.shape == (min(step, entry.shape[0] - a), *entry.shape[1:]), (entry, block.shape)
    block.tofile(fh)


def _write_safetensors(out: pathlib.Path, shards, arrays) -> None:
  """Writes the shard files (and the index when there are several) from `arrays`."""
  for shard in shards:
    with open(out / shard[0].file, "wb") as fh:
      fh.write(_safetensors_prefix(shard))
      for e in shard:
        name, rows = next(arrays)
        assert name == e.name, (name, e)
        _write_tensor(fh, e, rows)
  if len(shards) > 1:
    entries = [e for shard in shards for e in shard]
    index = {
      "metadata": {"total_size": sum(e.nbytes for e in entries)},
      "weight_map": {e.name: e.file for e in entries},
    }
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def to_hf(
  model_or_config,
  params,
  out_dir,
  *,
  max_shard_size="5GB",
  dtype=None,
  overwrite: bool = False,
) -> pathlib.Path:
  """Writes a Hugging Face checkpoint directory (config.json, generation_config.json and
  model.safetensors, or model-0000i-of-0000n.safetensors shards with their index) for
  `SwitchTransformersForConditionalGeneration.from_pretrained`.

  One parameter is in memory at a time: leaves may be numpy or jax arrays, or LazyArrays
  (e.g. `checkpoint.lazy_params` of a checkpoint too big to restore whole).

  Args:
    model_or_config: a SwitchTransformer, its ModelConfig, or a whole switchjax Config.
    params: the model's parameters (possibly boxed).
    out_dir: created if needed; must be empty unless `overwrite` (which replaces the files a
      conversion writes and leaves others).
    max_shard_size: bytes per safetensors file (int, or '5GB', '500MB', ...).
    dtype: of the written tensors; None keeps each parameter's.

  Raises ValueError (before writing anything) when HF cannot express the model (see
  `config_to_hf`), when params do not fit the config, when out_dir is not empty, or when it
  overlaps the directory lazily read params come from.
  """
  cfg = _model_config(model_or_config)
  hf_config = config_to_hf(cfg)
  params = _plain_params(params)
  if cfg.scan_layers:  # written from the unscanned layout; lazy leaves stay lazy per layer
    params, cfg = scan.unstack_layers(params), dataclasses.replace(cfg, scan_layers=False)
  plan = _hf_entries(params, cfg, dtype)
  shards = _shard([e for _, entries in plan for e in entries], parse_size(max_shard_size))
  out = pathlib.Path(out_dir)
  sources = {getattr(x, "source", None) for x in jax.tree.leaves(params)} - {None}
  checkpoint.check_output_dir(out, sources, overwrite, "--hf_output_dir")
  checkpoint.clear_output_dir(out, HF_OUTPUTS)
  out.mkdir(parents=True, exist_ok=True)
  _write_safetensors(out, shards, _hf_arrays(params, cfg, plan))
  dtypes = {e.dtype.name for shard in shards for e in shard}
  hf_config["dtype"] = dtypes.pop() if len(dtypes) == 1 else "float32"
  (out / "generation_config.json").write_text(
    json.dumps({"decoder_start_token_id": 0, "eos_token_id": 1, "pad_token_id": 0}, indent=2) + "\n"
  )
  (out / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
  return out
