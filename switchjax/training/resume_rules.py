"""What a change of each setting means when a run resumes a workdir (or starts from a
checkpoint): RULES by dotted prefix, and the settings that differ between two configs. The
README's resume table is this one."""

from __future__ import annotations

import dataclasses
from typing import Any

from switchjax import config as config_lib
from switchjax.config import Config
from switchjax.config.sparse_layout import decoder_sparse_layers, encoder_sparse_layers

FREE, OPTIMISATION, DATA, TOKENIZER, MODEL = "free", "optimisation", "data", "tokenizer", "model"
_MOE_TRAINING = (
  "train_capacity_factor",
  "eval_capacity_factor",
  "min_expert_capacity",
  "jitter_noise",
  "max_group_size",
  "group_multiple",
  "router_precision",
  "combine_dtype",
  # How fast the choice bias moves; its value is in the checkpoint and carries on. (Turning
  # balancing on or off adds or removes the bias parameter: the checkpoint then no longer
  # fits and the run is refused as another model.)
  "router_bias_update_rate",
  # The expert-parallel dropless buffers' cap: which choices are capped, like a capacity factor.
  "dropless_ep_capacity_factor",
  "capacity_per_choice",  # capacity x k: a capacity factor too
)
# How the computation runs, not what it computes.
_MOE_FREE = ("dropless_ep_collective",)
_BOOKKEEPING = (
  "num_train_steps",
  "num_microbatches",
  "device_microbatch_size",
  "log_every",
  "eval_every",
  "eval_steps",
  "checkpoint_every",
  "keep_checkpoints",
  "init_from",
  "peak_tflops_per_device",
)
# Settings of the routing beyond Switch that change what the model computes from the same
# parameters (or its parameters): refused on resume like the rest of the model. Listed so the
# README's table names them.
_MOE_MODEL = (
  "num_shared_experts",
  "shared_expert_d_ff",
  "router_score",
  "normalize_top_k",
  "routed_scaling_factor",
)
# What a change of each setting means on resume; the longest matching prefix decides
# (model.decoder_moe.* follows model.moe.*). FREE and OPTIMISATION changes are allowed (noted,
# recorded), DATA needs --restart_data, TOKENIZER and MODEL are refused.
RULES: dict[str, str] = {
  "name": FREE,
  "mesh": FREE,
  "model": MODEL,
  "model.remat": FREE,
  "model.dtype": OPTIMISATION,
  "model.dropout_rate": OPTIMISATION,
  "model.expert_dropout_rate": OPTIMISATION,
  **{f"model.moe.{name}": OPTIMISATION for name in _MOE_TRAINING},
  **{f"model.moe.{name}": MODEL for name in _MOE_MODEL},
  **{f"model.moe.{name}": FREE for name in _MOE_FREE},
  "data": DATA,
  "data.cache_dir": FREE,
  "data.prepared": FREE,  # the same tokens wherever they are read from (checked at start-up)
  "data.spm_vocab_size": TOKENIZER,
  "data.extra_ids": TOKENIZER,
  "train": OPTIMISATION,
  **{f"train.{name}": FREE for name in _BOOKKEEPING},
  **{f"train.{name}": MODEL for name in ("optimizer", "factored", "multiply_by_parameter_scale")},
  "finetune": DATA,  # the examples: files, task, fields
  **{f"finetune.{name}": FREE for name in ("exact_match_every", "exact_match_examples")},
  "finetune.keep_best": FREE,
}
# A new run started from train.init_from keeps the checkpoint's model and tokenizer; the
# parameters are cast to the run's dtype and restacked to its layer layout (model.scan_layers),
# and the initialisation scale is unused. Resuming refuses a layout change (the optimizer state).
_INIT_FREE = ("model.param_dtype", "model.init_scale", "model.scan_layers")


def rule_of(field: str, starting_from: bool = False) -> str:
  """The RULES entry of a dotted field; `starting_from` a checkpoint (train.init_from) only
  the model (but its dtype) and the sentinels must stay."""
  key = field.replace("model.decoder_moe.", "model.moe.")
  parts = key.split(".")
  rule = next(
    RULES[p] for p in (".".join(parts[:i]) for i in range(len(parts), 0, -1)) if p in RULES
  )
  if starting_from:
    keeps = (rule == MODEL and key.startswith("model.") and key not in _INIT_FREE) or (
      key == "data.extra_ids"
    )
    return rule if keeps else FREE
  return rule


@dataclasses.dataclass(frozen=True)
class Change:
  """One setting that differs from the workdir's (or the init_from checkpoint's) config."""

  field: str
  old: Any
  new: Any
  rule: str

  def __str__(self) -> str:
    return f"{self.field}={self.new!r} (was {self.old!r})"


# Settings whose unset value follows another one: compared by the value they take, and
# reported only when set differently (else the setting they follow is the one reported).
_FOLLOWERS = {
  "model.num_decoder_layers": lambda m: m.decoder_layers,
  "model.expert_d_ff": lambda m: m.expert_mlp_dim,
  "model.expert_activations": lambda m: tuple(m.expert_acts),
  "model.expert_dropout_rate": lambda m: m.expert_dropout,
}


def comparable(config: Config, tokenizer_file: bool = False) -> dict[str, Any]:
  """The settings of a config as {field: value} with the sparse layers resolved to indices (a
  layout and its explicit indices compare equal). data.spm_path is left out (tokenizers are
  compared by their bytes), and data.spm_vocab_size too when `tokenizer_file` (either config
  names a model file, so no tokenizer is trained)."""
  flat = config_lib.flatten(config)
  for key in ("sparse_layout", "num_sparse_encoder_layers", "num_sparse_decoder_layers"):
    flat.pop(f"model.{key}")
  flat["model.sparse_encoder_layers"] = tuple(encoder_sparse_layers(config.model))
  flat["model.sparse_decoder_layers"] = tuple(decoder_sparse_layers(config.model))
  flat.pop("data.spm_path")
  if tokenizer_file:
    flat.pop("data.spm_vocab_size")
  return flat


def changes(old: Config, new: Config, starting_from: bool = False) -> list[Change]:
  """The settings of `new` that differ from `old`, each with its rule."""
  by_file = bool(old.data.spm_path or new.data.spm_path)
  before, after = comparable(old, by_file), comparable(new, by_file)
  differ = [f for f in sorted(set(before) | set(after)) if before.get(f) != after.get(f)]
  differ = [
    f for f in differ if f not in _FOLLOWERS or _FOLLOWERS[f](old.model) != _FOLLOWERS[f](new.model)
  ]
  if old.model.decoder_moe is None and new.model.decoder_moe is None:  # follows model.moe
    differ = [f for f in differ if not f.startswith("model.decoder_moe.")]
  return [Change(f, before.get(f), after.get(f), rule_of(f, starting_from)) for f in differ]


def listed(items: list[Change]) -> str:
  """The first three changes, and how many more."""
  text = "; ".join(str(c) for c in items[:3])
  return text + (f" (and {len(items) - 3} more)" if len(items) > 3 else "")
