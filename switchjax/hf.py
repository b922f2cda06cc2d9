"""Hugging Face `google/switch-*` checkpoints <-> switchjax.

`from_hf(path)` reads `config.json` (transformers 4.x or 5.x) and the weights, maps the names,
transposes torch's (out, in) Linear weights, stacks the experts into [E, in, out] kernels, and
builds a ModelConfig that computes what Hugging Face computes: one routing group per sequence
with a fixed `expert_capacity`, HF's sparse-layer placement, no zeroing of padding activations,
tied or untied logits. `to_hf` is the reverse and refuses what HF cannot express.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import numpy as np

from switchjax.config import ModelConfig, MoeConfig
from switchjax.model import SwitchTransformer, sparse_layer_indices

HF_ACTIVATIONS = {"relu": "relu", "gelu": "gelu_exact", "gelu_new": "gelu", "silu": "silu"}


class CheckpointError(ValueError):
  """A checkpoint directory that cannot be converted; the message names the problem."""


# --------------------------------------------------------------------------------------------
# Config.

def config_from_hf(hf: dict) -> ModelConfig:
  """ModelConfig equivalent to a Hugging Face SwitchTransformersConfig dict."""
  if hf.get("model_type") != "switch_transformers":
    raise CheckpointError(
        f"config.json has model_type={hf.get('model_type')!r}, not 'switch_transformers'; "
        "from_hf converts SwitchTransformersForConditionalGeneration checkpoints only.")
  act = hf.get("dense_act_fn", "relu")
  if act not in HF_ACTIVATIONS:
    raise CheckpointError(f"config.json has dense_act_fn={act!r}; supported: "
                          f"{', '.join(HF_ACTIVATIONS)}.")
  num_layers = hf.get("num_layers", 12)
  num_decoder_layers = hf.get("num_decoder_layers") or num_layers
  enc = _hf_sparse_layers(num_layers, hf.get("num_sparse_encoder_layers", 3),
                          hf.get("encoder_sparse_step"))
  dec = _hf_sparse_layers(num_decoder_layers, hf.get("num_sparse_decoder_layers", 3),
                          hf.get("decoder_sparse_step"))
  return ModelConfig(
      vocab_size=hf.get("vocab_size", 32128),
      d_model=hf.get("d_model", 768),
      d_ff=hf.get("d_ff", 2048),
      num_heads=hf.get("num_heads", 12),
      d_kv=hf.get("d_kv", 64),
      num_layers=num_layers,
      num_decoder_layers=num_decoder_layers,
      num_sparse_encoder_layers=len(enc),
      num_sparse_decoder_layers=len(dec),
      sparse_layout="hf",
      sparse_encoder_layers=enc,
      sparse_decoder_layers=dec,
      mlp_activations=(HF_ACTIVATIONS[act],),
      dropout_rate=hf.get("dropout_rate", 0.1),
      relative_attention_num_buckets=hf.get("relative_attention_num_buckets", 32),
      relative_attention_max_distance=hf.get("relative_attention_max_distance", 128),
      tie_embeddings=hf.get("tie_word_embeddings", True),
      layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-6),
      dtype="float32",
      param_dtype="float32",
      init_scale=1.0,
      mask_padding_activations=False,
      moe=MoeConfig(
          num_experts=hf.get("num_experts", 8),
          router_type="tokens_choose_masked",
          num_selected_experts=1,
          jitter_noise=hf.get("router_jitter_noise", 0.01),
          router_bias=hf.get("router_bias", False),
          expert_capacity=hf.get("expert_capacity", 64)))


def _hf_sparse_layers(num_layers: int, num_sparse: int, step: int | None) -> tuple[int, ...]:
  """HF's placement; 4.x configs store the step, 5.x derive it from the sparse count."""
  if step is not None and num_sparse:
    return tuple(i for i in range(num_layers) if i % step == 1 or step == 1)
  return sparse_layer_indices(num_layers, num_sparse, "hf")


# --------------------------------------------------------------------------------------------
# Weights.

def _t(w: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(np.asarray(w, np.float32).T)


def params_from_state_dict(state: dict[str, np.ndarray], cfg: ModelConfig) -> dict:
  """switchjax params from a Hugging Face state dict (numpy arrays)."""
  h, k = cfg.num_heads, cfg.d_kv
  used: set[str] = set()

  def get(name):
    if name not in state:
      raise CheckpointError(f"missing tensor {name!r} in the checkpoint.")
    used.add(name)
    return np.asarray(state[name], np.float32)

  def attention(prefix):
    return {"query": _t(get(f"{prefix}.q.weight")).reshape(-1, h, k),
            "key": _t(get(f"{prefix}.k.weight")).reshape(-1, h, k),
            "value": _t(get(f"{prefix}.v.weight")).reshape(-1, h, k),
            "out": _t(get(f"{prefix}.o.weight")).reshape(h, k, -1)}

  def mlp(prefix, sparse):
    if not sparse:
      return {"wi": _t(get(f"{prefix}.wi.weight")), "wo": _t(get(f"{prefix}.wo.weight"))}
    experts = [f"{prefix}.experts.expert_{e}" for e in range(cfg.moe.num_experts)]
    out = {"router": {"kernel": _t(get(f"{prefix}.router.classifier.weight"))},
           "wi": np.stack([_t(get(f"{e}.wi.weight")) for e in experts]),
           "wo": np.stack([_t(get(f"{e}.wo.weight")) for e in experts])}
    if cfg.moe.router_bias:
      out["router"]["bias"] = get(f"{prefix}.router.classifier.bias")
    return out

  from switchjax.model import decoder_sparse_layers, encoder_sparse_layers
  enc_sparse, dec_sparse = set(encoder_sparse_layers(cfg)), set(decoder_sparse_layers(cfg))
  encoder: dict[str, Any] = {
      "relpos_bias": {"rel_embedding": _t(get(
          "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"))},
      "encoder_norm": {"scale": get("encoder.final_layer_norm.weight")}}
  for i in range(cfg.num_layers):
    b = f"encoder.block.{i}.layer"
    encoder[f"layers_{i}"] = {
        "pre_attention_layer_norm": {"scale": get(f"{b}.0.layer_norm.weight")},
        "attention": attention(f"{b}.0.SelfAttention"),
        "pre_mlp_layer_norm": {"scale": get(f"{b}.1.layer_norm.weight")},
        "mlp": mlp(f"{b}.1.mlp", i in enc_sparse)}
  decoder: dict[str, Any] = {
      "relpos_bias": {"rel_embedding": _t(get(
          "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"))},
      "decoder_norm": {"scale": get("decoder.final_layer_norm.weight")}}
  for i in range(cfg.decoder_layers):
    b = f"decoder.block.{i}.layer"
    decoder[f"layers_{i}"] = {
        "pre_self_attention_layer_norm": {"scale": get(f"{b}.0.layer_norm.weight")},
        "self_attention": attention(f"{b}.0.SelfAttention"),
        "pre_cross_attention_layer_norm": {"scale": get(f"{b}.1.layer_norm.weight")},
        "encoder_decoder_attention": attention(f"{b}.1.EncDecAttention"),
        "pre_mlp_layer_norm": {"scale": get(f"{b}.2.layer_norm.weight")},
        "mlp": mlp(f"{b}.2.mlp", i in dec_sparse)}
  if not cfg.tie_embeddings:
    decoder["logits_dense"] = _t(get("lm_head.weight"))
  params = {"token_embedder": {"embedding": get("shared.weight")}, "encoder": encoder,
            "decoder": decoder}
  return params


def load_state_dict(path: pathlib.Path) -> dict[str, np.ndarray]:
  """Reads model.safetensors (numpy)."""
  from safetensors.numpy import load_file
  return load_file(str(path / "model.safetensors"))


def from_hf(path) -> tuple[SwitchTransformer, dict]:
  """(model, params) from a Hugging Face checkpoint directory."""
  path = pathlib.Path(path)
  cfg = config_from_hf(json.loads((path / "config.json").read_text()))
  params = params_from_state_dict(load_state_dict(path), cfg)
  return SwitchTransformer(cfg), params
