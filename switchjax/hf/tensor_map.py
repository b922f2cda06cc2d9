"""The tensor map: every Hugging Face tensor of a model config, where it lives in switchjax's
params and how its layout differs; with the block size tensors are moved in."""

from __future__ import annotations

import dataclasses

import numpy as np

from switchjax.config import ModelConfig
from switchjax.config.sparse_layout import decoder_sparse_layers, encoder_sparse_layers

TIED_EMBEDDINGS = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")


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


def jax_layout(spec: TensorSpec, x: np.ndarray) -> np.ndarray:
  """One HF tensor in switchjax's layout: torch's (out, in) transposed and reshaped (a view
  where numpy can make one: the writer and LazyArray.__array__ copy it once anyway)."""
  return x.T.reshape(spec.jax_shape) if spec.transpose else x


def hf_layout(spec: TensorSpec, x) -> np.ndarray:
  """One switchjax parameter (an expert's slice for experts) as its HF tensor (a view)."""
  x = np.asarray(x)
  return x.reshape(spec.hf_shape[::-1]).T if spec.transpose else x


def hf_arrays(params, cfg: ModelConfig) -> dict[str, np.ndarray]:
  """Unscanned `params` of `cfg`, or any tree of their shapes such as their gradients, as
  numpy arrays named and laid out as in transformers' state dict (without the tied copies of
  shared.weight). Every map is a transpose or a reshape, so a gradient maps like its
  parameter; in memory, for comparisons (`to_hf` writes files in bounded memory)."""
  out = {}
  for spec in tensor_specs(cfg):
    x = np.asarray(get_path(params, spec.path))
    out[spec.name] = hf_layout(spec, x if spec.expert is None else x[spec.expert])
  return out


def leaf_specs(specs: list[TensorSpec]) -> dict[tuple[str, ...], list[TensorSpec]]:
  """`specs` grouped by switchjax parameter (several for stacked experts), in order."""
  groups: dict[tuple[str, ...], list[TensorSpec]] = {}
  for spec in specs:
    groups.setdefault(spec.path, []).append(spec)
  return groups


def set_path(tree: dict, path: tuple[str, ...], value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def get_path(tree, path: tuple[str, ...]):
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


def rows_per_block(shape: tuple[int, ...], itemsize: int) -> int:
  row = int(np.prod(shape[1:], dtype=np.int64)) * itemsize
  return max(1, BLOCK_BYTES // max(row, 1))


def numpy_dtype(dtype) -> np.dtype:
  """np.dtype of 'float32', 'bfloat16' or 'float16' (any spelling); else ValueError."""
  import ml_dtypes

  name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
  if name not in DTYPES:
    raise ValueError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}.")
  return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)
