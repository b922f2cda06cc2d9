"""Size limits: a config no machine can hold is refused before anything is allocated or traced.
The parameter count comes from arithmetic on the config (nothing is built)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from switchjax.config.paths import get_path

if TYPE_CHECKING:
  from switchjax.config.schema import Config, ModelConfig


MAX_PARAMETERS = 10**13  # 6x switch-c-2048 (1.57e12), the largest released Switch model.
# field: (limit, why). Each is far beyond any published T5 or Switch model.
SIZE_LIMITS = {
  "model.vocab_size": (2**24, "67x mT5's 250,112"),
  "model.d_model": (2**17, "32x switch-xxl-128's 4096"),
  "model.d_ff": (2**20, "102x switch-xxl-128's 10240"),
  "model.expert_d_ff": (2**20, "102x switch-xxl-128's 10240"),
  "model.num_heads": (2**12, "64x switch-xxl-128's 64"),
  "model.d_kv": (2**12, "64x T5's 64"),
  "model.num_layers": (2**10, "43x switch-large-128's 24; every layer is traced and compiled"),
  "model.num_decoder_layers": (
    2**10,
    "43x switch-large-128's 24; every layer is traced and compiled",
  ),
  "model.moe.num_experts": (2**16, "32x switch-c-2048's 2048"),
  "data.spm_vocab_size": (2**24, "67x mT5's 250,112"),
  "data.inputs_length": (2**16, "128x T5's 512"),
  "data.targets_length": (2**16, "575x T5's 114"),
  "train.batch_size": (2**20, "4096x Switch's 256"),
}


def estimate_parameters(model: ModelConfig) -> int:
  """The number of parameters of a model config, by arithmetic (nothing is built).

  Exact when the sparse layout places exactly num_sparse_*_layers MoE layers (every preset);
  the 'mixed' and 'hf' layouts place a few more when the count does not divide the depth.
  """
  return sum(_parameter_terms(model).values())


def _parameter_terms(model: ModelConfig) -> dict[str, int]:
  """Parameters by the setting that sizes them: experts, dense MLPs, embeddings, attention."""
  d, moe = model.d_model, model.moe
  expert = d * model.expert_mlp_dim * (len(model.expert_acts) + 1) + moe.router_bias
  expert += 1 if moe.router_bias_update_rate > 0 else 0  # the choice bias
  shared_width = moe.num_shared_experts * (moe.shared_expert_d_ff or model.expert_mlp_dim)
  terms = {
    "model.moe.num_experts": 0,
    "model.moe.num_shared_experts": 0,
    "model.d_ff": 0,
    "model.vocab_size": model.vocab_size * d * (1 if model.tie_embeddings else 2),
    "model.num_heads": 0,
    "other": 2 * (model.relative_attention_num_buckets * model.num_heads + d),  # final norms
  }
  for layers, given, count, attentions in (
    (model.num_layers, model.sparse_encoder_layers, model.num_sparse_encoder_layers, 1),
    (model.decoder_layers, model.sparse_decoder_layers, model.num_sparse_decoder_layers, 2),
  ):
    num_sparse = len(set(given)) if given is not None else count
    terms["model.moe.num_experts"] += num_sparse * moe.num_experts * (expert + d)
    terms["model.moe.num_shared_experts"] += (
      num_sparse * d * shared_width * (len(model.expert_acts) + 1)
    )
    terms["model.d_ff"] += (layers - num_sparse) * d * model.d_ff * (len(model.mlp_activations) + 1)
    terms["model.num_heads"] += layers * attentions * 4 * d * model.num_heads * model.d_kv
    terms["other"] += layers * (attentions + 1) * d  # RMS norm scales
  return terms


def _human_bytes(n: float) -> str:
  """'3.2 PB' (powers of 1000)."""
  if n < 1000:
    return f"{n:.0f} bytes"
  for unit in ("KB", "MB", "GB", "TB", "PB"):
    n /= 1000
    if n < 1000:
      return f"{n:.1f} {unit}"
  return f"{n / 1000:.1f} EB"


def _implied(config: Config, field: str) -> str:
  """What a size implies, in parameters or memory, for the error message."""
  if field.startswith("model."):
    count = estimate_parameters(config.model)
    size = count * {"float32": 4}.get(config.model.param_dtype, 2)
    return f"the model would have {count:.2g} parameters ({_human_bytes(size)} of weights)"
  if field == "data.spm_vocab_size":
    rows = config.data.spm_vocab_size + config.data.extra_ids
    return f"its embedding alone would have {rows * config.model.d_model:.2g} parameters"
  if field == "train.batch_size":
    tokens = config.train.batch_size * (config.data.inputs_length + config.data.targets_length)
    return f"one step would read {tokens:.2g} tokens"
  length = get_path(config, field)
  return (
    f"the attention scores of one sequence and one head alone would take "
    f"{_human_bytes(4 * length * length)}"
  )


def check_sizes(config: Config) -> None:
  """Raises a one-line ValueError for a size no machine can hold (see SIZE_LIMITS).

  Each field has a bound far beyond any published model, and the whole model at most
  MAX_PARAMETERS; the message names the field, what it implies and the fix.
  """
  for field, (limit, why) in SIZE_LIMITS.items():
    value = get_path(config, field)
    if value is not None and value > limit:
      raise ValueError(
        f"{field}={value} is beyond the limit of {limit:,} ({why}): {_implied(config, field)}; "
        f"lower {field}."
      )
  terms = _parameter_terms(config.model)
  count = sum(terms.values())
  if count > MAX_PARAMETERS:
    model = config.model
    largest = max((k for k in terms if k != "other"), key=terms.get)
    raise ValueError(
      f"model: {count:.2g} parameters ({_human_bytes(count * 4)} in float32) is beyond the "
      f"limit of {MAX_PARAMETERS:.0e}, 6x switch-c-2048 (1.6e+12, the largest released Switch "
      f"model); {terms[largest]:.2g} of them come from {largest}={get_path(config, largest)} "
      f"(with model.d_model={model.d_model}, {model.num_layers} + {model.decoder_layers} "
      f"layers): lower {largest}, model.d_model or the layer counts."
    )
