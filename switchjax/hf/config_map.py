"""Hugging Face's `SwitchTransformersConfig` (config.json) <-> switchjax's ModelConfig, with
transformers' sparse-layer placement rule and what HF cannot express."""

from __future__ import annotations

from switchjax.config import ModelConfig, MoeConfig
from switchjax.config.sparse_layout import (
  decoder_sparse_layers,
  encoder_sparse_layers,
  hf_sparse_blocks,
  sparse_layer_indices,
)
from switchjax.hf.files import CheckpointError

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


def t5_fields(hf: dict) -> dict:
  """The ModelConfig fields every T5-family config.json (T5, mT5, Switch) gives the same way,
  from a dict already completed with transformers' defaults: sizes, dropout, relative
  attention, norm epsilon, and float32 compute with transformers' initialisation and
  unmasked padding activations."""
  return dict(
    vocab_size=hf["vocab_size"],
    d_model=hf["d_model"],
    d_ff=hf["d_ff"],
    num_heads=hf["num_heads"],
    d_kv=hf["d_kv"],
    num_layers=hf["num_layers"],
    num_decoder_layers=hf["num_decoder_layers"] or hf["num_layers"],
    dropout_rate=hf["dropout_rate"],
    relative_attention_num_buckets=hf["relative_attention_num_buckets"],
    relative_attention_max_distance=hf["relative_attention_max_distance"],
    layer_norm_epsilon=hf["layer_norm_epsilon"],
    dtype="float32",
    init_scale=1.0,
    mask_padding_activations=False,
  )


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
    **t5_fields(hf),
    num_sparse_encoder_layers=len(enc),
    num_sparse_decoder_layers=len(dec),
    sparse_layout="hf",
    sparse_encoder_layers=enc,
    sparse_decoder_layers=dec,
    mlp_activations=(HF_ACTIVATIONS[act],),
    tie_embeddings=hf["tie_word_embeddings"],
    param_dtype="float32",
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
  return refusals + _modern_refusals(moe)


# Settings beyond Switch that HF's SwitchTransformers has no place for: (field, off value, what
# it is). Each gives one refusal naming the setting and its off value.
_MODERN = (
  ("num_shared_experts", 0, "shared experts"),
  ("router_bias_update_rate", 0.0, "auxiliary-loss-free balancing (a choice bias)"),
  ("router_score", "softmax", "sigmoid router scores"),
  ("normalize_top_k", False, "top-k normalised combine weights"),
  ("routed_scaling_factor", 1.0, "a routed scaling factor"),
)


def _modern_refusals(moe) -> list[str]:
  """One refusal per setting HF's Switch cannot express (shared experts, DeepSeek gating)."""
  return [
    f"{what} (model.moe.{field}={getattr(moe, field)!r}): HF's SwitchTransformers has none; "
    f"set model.moe.{field}={off!r}"
    for field, off, what in _MODERN
    if getattr(moe, field) != off
  ]
