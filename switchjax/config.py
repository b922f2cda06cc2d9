"""Configuration: frozen dataclasses, the preset registry and dotted overrides.

A preset is a Python file in `configs/` with a `get_config() -> Config` function (big_vision
style). The command line picks one with `--config=NAME` and changes any field with
`--set a.b=value`; values are parsed and type checked against the dataclass annotations, and an
unknown field is an error that names the nearest valid ones.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import json
import numbers
import os
import pathlib
import pkgutil
import sys
import types
import typing
from typing import Any

SPARSE_LAYOUTS = ("mixed", "top", "bottom", "middle", "hf")
PRECISIONS = ("default", "high", "highest")
DISPATCHES = ("auto", "buffers", "sorted")
ACTIVATIONS = ("relu", "gelu", "gelu_new", "gelu_exact", "silu", "linear")


@dataclasses.dataclass(frozen=True)
class MoeConfig:
  """Routing and capacity of every sparse (MoE) layer.

  Attributes:
    num_experts: experts per sparse layer (E).
    router_type: a registered router (switchjax.routing): tokens_choose_masked (Switch top-1 /
      GShard top-k by one-hot einsum), tokens_choose_scatter (same choices, dispatch by
      scatter/gather) or experts_choose_masked (each expert takes its top-C tokens; encoder
      only: it breaks causality in a decoder).
    num_selected_experts: k, experts per token for the tokens-choose routers.
    batch_prioritized_routing: route the most confident tokens first (V-MoE BPR). Encoder
      only: it breaks causality in a decoder (refused there, as flaxformer never uses it).
    ignore_padding_tokens: flaxformer's option: tokens whose inputs are all zero are not routed.
    jitter_noise: multiplicative U(1-eps, 1+eps) noise on the router's copy of the inputs
      (training only).
    router_bias: add a bias to the router logits (off for Switch).
    max_group_size: tokens are routed in groups of at most this many (flaxformer rule).
    train_capacity_factor, eval_capacity_factor: capacity = cf * tokens_per_group / E.
    min_expert_capacity: lower bound on the capacity.
    expert_capacity: Hugging Face mode when set: every sequence is one group and each expert
      takes at most this many tokens of it (switch-base-*: 64); the factors are then unused.
    group_multiple: the number of routing groups is a multiple of this. 0 (default): of the
      data x expert devices of the mesh the layer runs on (1 without a mesh), so groups always
      split over the devices (flaxformer's rule; routing then depends on the mesh). N > 0:
      a fixed multiple, so a run routes identically on every mesh whose data x expert
      devices divide the group count (others are refused). flaxformer on one device is N = E.
    router_precision: matmul precision of the router logits: 'default' (flaxformer; one
      bfloat16 pass on TPUs), 'high' or 'highest' (exact float32).
    combine_dtype: dtype of the combine weights and so of the layer's output: 'float32'
      (flaxformer's tokens-choose routers: the residual stream is float32 from the first
      sparse layer on, even in a bfloat16 model) or 'bfloat16' (faster, keeps activations in
      bfloat16, as flaxformer's experts-choose configs do).
    dispatch: how routed tokens reach the experts (routing and outputs are the same either
      way): 'buffers' (flaxformer's [groups, experts, capacity] buffers, which a mesh's
      all-to-all moves between devices; empty slots are computed too), 'sorted' (the kept
      choices sorted by expert and run by grouped matmuls, switchjax.gmm: no empty slot is
      computed; one device's worth of work, not expert-parallel) or 'auto' (sorted on one CPU
      device with at most 16 experts, where it is fastest, except in a decoder outside
      training; buffers otherwise). The dropless router always runs sorted. Sorted runs are
      cut into matmuls by each expert's whole load, so in a decoder a later token can change
      an earlier token's output in the last bit (routing stays causal); buffers keep decoders
      bit-causal, which 'auto' keeps for scoring and decoding.
  """

  num_experts: int = 8
  router_type: str = "tokens_choose_masked"
  num_selected_experts: int = 1
  batch_prioritized_routing: bool = False
  ignore_padding_tokens: bool = False
  jitter_noise: float = 0.0
  router_bias: bool = False
  max_group_size: int = 8192
  train_capacity_factor: float = 1.25
  eval_capacity_factor: float = 2.0
  min_expert_capacity: int = 4
  expert_capacity: int | None = None
  group_multiple: int = 0
  router_precision: str = "default"
  combine_dtype: str = "float32"
  dispatch: str = "auto"

  def validate(self, prefix: str = "moe") -> None:
    """Raises ValueError naming the field and the fix."""
    p = prefix
    if self.num_experts < 1:
      raise ValueError(f"{p}.num_experts={self.num_experts}: need at least 1 expert.")
    router = self.router()  # ValueError naming the registered routers
    if problem := router.config_problem(self, p):
      raise ValueError(problem)
    for name in ("train_capacity_factor", "eval_capacity_factor"):
      if getattr(self, name) <= 0:
        raise ValueError(
          f"{p}.{name}={getattr(self, name)} must be > 0 (Switch uses 1.25 "
          "for training and 2.0 for evaluation)."
        )
    if self.max_group_size < 1:
      raise ValueError(
        f"{p}.max_group_size={self.max_group_size} must be >= 1 token (Switch uses 8192)."
      )
    if self.min_expert_capacity < 0:
      raise ValueError(f"{p}.min_expert_capacity={self.min_expert_capacity} must be >= 0.")
    if self.expert_capacity is not None and self.expert_capacity < 1:
      raise ValueError(
        f"{p}.expert_capacity={self.expert_capacity} must be >= 1, or None "
        "to use the capacity factors."
      )
    if not 0.0 <= self.jitter_noise < 1.0:
      raise ValueError(f"{p}.jitter_noise={self.jitter_noise} must be in [0, 1).")
    if self.group_multiple < 0:
      raise ValueError(
        f"{p}.group_multiple={self.group_multiple} must be >= 0 (0 follows the mesh)."
      )
    if self.router_precision not in PRECISIONS:
      raise ValueError(
        f"{p}.router_precision={self.router_precision!r}; use one of {', '.join(PRECISIONS)}."
      )
    if self.combine_dtype not in ("float32", "bfloat16"):
      raise ValueError(f"{p}.combine_dtype={self.combine_dtype!r}; use float32 or bfloat16.")
    if self.dispatch not in DISPATCHES:
      raise ValueError(f"{p}.dispatch={self.dispatch!r}; use one of {', '.join(DISPATCHES)}.")

  def validate_causal(self, prefix: str) -> None:
    """Refuses routing that lets a decoder token's routing depend on later tokens."""
    if problem := self.router().causal_problem(self, prefix):
      raise ValueError(problem)

  def router(self):
    """The Router class of `router_type` (switchjax.routing's registry)."""
    from switchjax import routing  # local: routing imports this module

    return routing.router_class(self.router_type)


def causal_moe(moe: MoeConfig) -> MoeConfig:
  """The decoder's default MoE settings: the encoder's, made causal.

  Batch-prioritized routing is turned off and experts-choose routing becomes tokens-choose
  top-2, as flaxformer's experts_choose_*.gin route their decoders.
  """
  changes = {"batch_prioritized_routing": False}
  causal = dataclasses.replace(moe, **changes)
  if causal.router().causal_problem(causal, "moe"):
    changes.update(router_type="tokens_choose_masked", num_selected_experts=2)
  return dataclasses.replace(moe, **changes)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The Switch (sparse T5.1.1-style) encoder-decoder.

  Attributes:
    vocab_size: embedding rows (32128 for the T5 vocabulary rounded up to 128).
    d_model, d_ff, num_heads, d_kv: widths; expert_d_ff defaults to d_ff.
    num_layers, num_decoder_layers: encoder and decoder depth (decoder defaults to num_layers).
    num_sparse_encoder_layers, num_sparse_decoder_layers: how many MLPs are MoE layers.
    sparse_layout: where they go: flaxformer's mixed | top | bottom | middle, or hf
      (Hugging Face's rule, which differs from mixed for some counts).
    sparse_encoder_layers, sparse_decoder_layers: explicit layer indices; override the layout.
    mlp_activations: ('relu',), ('gelu',) or GEGLU ('gelu', 'linear') for the dense MLPs;
      expert_activations (default: the same) for the experts.
    dropout_rate, expert_dropout_rate: T5 dropout; experts default to dropout_rate.
    tie_embeddings: logits from the shared embedding scaled by d_model**-0.5 (Switch base),
      else an untied output layer (xxl, c2048).
    dtype: activation dtype; the router and layer norms always compute in float32.
    param_dtype: parameter dtype.
    init_scale: variance-scaling factor of the dense kernels (Switch: 0.1).
    mask_padding_activations: flaxformer zeroes the normalised inputs of every sublayer at
      padding positions (so padding is routed as all-zero tokens); Hugging Face does not.
    remat: rematerialise each layer in the backward pass ('none' | 'full').
    scan_layers: run each stack as `nn.scan` over a block of layers (one period of the sparse
      layout: dense + sparse for every-other-layer MoE), parameters stacked along a leading
      'layers' axis (`switchjax.scan`); compiles one block instead of every layer.
    moe: the encoder's MoE settings (and the decoder's, made causal, unless decoder_moe is set).
    decoder_moe: the decoder's own MoE settings; None derives them from `moe` (see
      `causal_moe`). `--set model.decoder_moe.FIELD=...` starts from that derived default.
  """

  vocab_size: int = 32128
  d_model: int = 768
  d_ff: int = 3072
  expert_d_ff: int | None = None
  num_heads: int = 12
  d_kv: int = 64
  num_layers: int = 12
  num_decoder_layers: int | None = None
  num_sparse_encoder_layers: int = 6
  num_sparse_decoder_layers: int = 6
  sparse_layout: str = "mixed"
  sparse_encoder_layers: tuple[int, ...] | None = None
  sparse_decoder_layers: tuple[int, ...] | None = None
  mlp_activations: tuple[str, ...] = ("relu",)
  expert_activations: tuple[str, ...] | None = None
  dropout_rate: float = 0.1
  expert_dropout_rate: float | None = None
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  tie_embeddings: bool = True
  layer_norm_epsilon: float = 1e-6
  dtype: str = "bfloat16"
  param_dtype: str = "float32"
  init_scale: float = 0.1
  mask_padding_activations: bool = True
  remat: str = "none"
  scan_layers: bool = False
  moe: MoeConfig = MoeConfig()
  decoder_moe: MoeConfig | None = None

  def default_decoder_moe(self) -> MoeConfig:
    """The decoder's MoE settings when decoder_moe is not set: the encoder's, made causal."""
    return causal_moe(self.moe)

  def moe_for(self, stack: str) -> MoeConfig:
    """The MoE settings of the 'encoder' or 'decoder' stack."""
    if stack == "encoder":
      return self.moe
    return self.default_decoder_moe() if self.decoder_moe is None else self.decoder_moe

  @property
  def decoder_layers(self) -> int:
    return self.num_layers if self.num_decoder_layers is None else self.num_decoder_layers

  @property
  def expert_mlp_dim(self) -> int:
    return self.d_ff if self.expert_d_ff is None else self.expert_d_ff

  @property
  def expert_acts(self) -> tuple[str, ...]:
    return self.mlp_activations if self.expert_activations is None else self.expert_activations

  @property
  def expert_dropout(self) -> float:
    return self.dropout_rate if self.expert_dropout_rate is None else self.expert_dropout_rate

  def validate(self, prefix: str = "model") -> None:
    p = prefix
    for name in ("vocab_size", "d_model", "d_ff", "num_heads", "d_kv", "num_layers"):
      if getattr(self, name) < 1:
        raise ValueError(f"{p}.{name}={getattr(self, name)} must be >= 1.")
    if self.decoder_layers < 1:
      raise ValueError(f"{p}.num_decoder_layers={self.num_decoder_layers} must be >= 1.")
    if self.sparse_layout not in SPARSE_LAYOUTS:
      raise ValueError(
        f"{p}.sparse_layout={self.sparse_layout!r}; use one of {', '.join(SPARSE_LAYOUTS)}."
      )
    for stack, n, s, explicit in (
      ("encoder", self.num_layers, self.num_sparse_encoder_layers, self.sparse_encoder_layers),
      ("decoder", self.decoder_layers, self.num_sparse_decoder_layers, self.sparse_decoder_layers),
    ):
      if explicit is None and not 0 <= s <= n:
        raise ValueError(
          f"{p}.num_sparse_{stack}_layers={s} must be between 0 and the {n} {stack} layers."
        )
    for stack, n, idx in (
      ("encoder", self.num_layers, self.sparse_encoder_layers),
      ("decoder", self.decoder_layers, self.sparse_decoder_layers),
    ):
      if idx is not None and any(not 0 <= i < n for i in idx):
        raise ValueError(f"{p}.sparse_{stack}_layers={idx} has indices outside 0..{n - 1}.")
    for name in ("mlp_activations", "expert_acts"):
      acts = getattr(self, name)
      if not 1 <= len(acts) <= 2 or any(a not in ACTIVATIONS for a in acts):
        field = "mlp_activations" if name == "mlp_activations" else "expert_activations"
        raise ValueError(
          f"{p}.{field}={acts}: use one activation, e.g. ('relu',), or two "
          f"for a gated unit, e.g. ('gelu', 'linear'); known: {ACTIVATIONS}."
        )
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"{p}.{name}={getattr(self, name)!r}; use float32 or bfloat16.")
    if self.remat not in ("none", "full"):
      raise ValueError(f"{p}.remat={self.remat!r}; use 'none' or 'full'.")
    if self.scan_layers:
      from switchjax import scan  # local: scan imports the model

      for stack in scan.STACKS:
        scan.stack_layout(self, stack)  # one-line error when the layout does not repeat
    for name in ("dropout_rate", "expert_dropout"):
      if not 0.0 <= getattr(self, name) < 1.0:
        raise ValueError(f"{p}.{name}={getattr(self, name)} must be in [0, 1).")
    self.moe.validate(f"{p}.moe")
    if self.decoder_moe is not None:
      self.decoder_moe.validate(f"{p}.decoder_moe")
      self.decoder_moe.validate_causal(f"{p}.decoder_moe")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Corpus, tokenizer and span corruption.

  Attributes:
    paths: text / JSON Lines / Parquet files or globs; empty = the embedded default corpus.
    text_field: the field holding the text in JSON Lines and Parquet files.
    spm_path: a SentencePiece model (e.g. an HF checkpoint's spiece.model); None = train a
      T5-layout model on the corpus at first use and cache it.
    spm_vocab_size: pieces of that trained model (the sentinels come on top); the embedded
      default corpus supports up to about 12,000.
    extra_ids: sentinel ids appended after the pieces (<extra_id_N> = vocab - 1 - N; T5: 100).
    cache_dir: where trained tokenizers and tokenized corpora are cached (default:
      $SWITCHJAX_CACHE, else ~/.cache/switchjax).
    inputs_length, targets_length: encoder and decoder lengths (T5: 512 and 114).
    noise_density, mean_noise_span_length: T5 span corruption (0.15, 3.0).
    eval_fraction: share of the corpus's chunks held out for evaluation.
    shuffle_seed: seed of the input order and of the noise.
  """

  paths: tuple[str, ...] = ()
  text_field: str = "text"
  spm_path: str | None = None
  spm_vocab_size: int = 32000
  extra_ids: int = 100
  cache_dir: str | None = None
  inputs_length: int = 512
  targets_length: int = 114
  noise_density: float = 0.15
  mean_noise_span_length: float = 3.0
  eval_fraction: float = 0.01
  shuffle_seed: int = 0

  def validate(self, prefix: str = "data") -> None:
    p = prefix
    if self.inputs_length < 2 or self.targets_length < 2:
      raise ValueError(f"{p}.inputs_length and {p}.targets_length must be >= 2.")
    if not 0.0 < self.noise_density < 1.0:
      raise ValueError(f"{p}.noise_density={self.noise_density} must be in (0, 1).")
    if self.mean_noise_span_length < 1.0:
      raise ValueError(f"{p}.mean_noise_span_length={self.mean_noise_span_length} must be >= 1.")
    if not 0.0 <= self.eval_fraction < 1.0:
      raise ValueError(f"{p}.eval_fraction={self.eval_fraction} must be in [0, 1).")
    if self.extra_ids < 0:
      raise ValueError(f"{p}.extra_ids={self.extra_ids} must be >= 0 (T5 uses 100).")
    if self.spm_vocab_size < 16:
      raise ValueError(f"{p}.spm_vocab_size={self.spm_vocab_size} must be >= 16.")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Optimisation, losses, logging and checkpointing.

  Attributes:
    batch_size: global batch (sequences per step).
    num_microbatches: gradient accumulation steps per batch; 0 = automatic: the fewest that
      keep each device at most `device_microbatch_size` sequences at a time (1 on a pod that
      fits the batch; more on small machines).
    device_microbatch_size: the per-device limit of the automatic choice.
    num_train_steps: total steps of the run.
    learning_rate: peak learning rate 'rsqrt' schedule: lr = learning_rate / sqrt(max(step,
      warmup_steps)) (T5X: 1.0 and 10000); 'constant' uses learning_rate as it is.
    optimizer: 'adafactor' (T5X's MoE Adafactor, `optimizers.t5x_adafactor`) or 'adamw'.
    adafactor_decay_rate, clipping_threshold, factored, multiply_by_parameter_scale: Adafactor.
    weight_decay: AdamW only.
    z_loss: output logits z-loss (T5X 1e-4); label_smoothing: 0 in T5X.
    aux_loss_factor, router_z_loss_factor: MoE losses (Switch: 0.01 and 0).
    seed: parameter init, dropout and jitter.
    log_every, eval_every (0: only at the end), eval_steps, checkpoint_every, keep_checkpoints.
    init_from: a checkpoint directory whose parameters start a new run (fine-tuning, or a
      converted Hugging Face model); ignored when the workdir already has a checkpoint.
    peak_tflops_per_device: for the MFU estimate; 0 looks the device kind up (TPU, A100, H100).
  """

  batch_size: int = 256
  num_microbatches: int = 1
  device_microbatch_size: int = 8
  num_train_steps: int = 100_000
  learning_rate: float = 1.0
  schedule: str = "rsqrt"
  warmup_steps: int = 10_000
  optimizer: str = "adafactor"
  adafactor_decay_rate: float = 0.8
  clipping_threshold: float = 1.0
  factored: bool = True
  multiply_by_parameter_scale: bool = True
  weight_decay: float = 0.0
  z_loss: float = 1e-4
  label_smoothing: float = 0.0
  aux_loss_factor: float = 0.01
  router_z_loss_factor: float = 0.0
  seed: int = 0
  log_every: int = 100
  eval_every: int = 1000
  eval_steps: int = 10
  checkpoint_every: int = 1000
  keep_checkpoints: int = 3
  init_from: str | None = None
  peak_tflops_per_device: float = 0.0

  def validate(self, prefix: str = "train") -> None:
    p = prefix
    for name in (
      "batch_size",
      "device_microbatch_size",
      "num_train_steps",
      "log_every",
      "checkpoint_every",
      "keep_checkpoints",
    ):
      if getattr(self, name) < 1:
        raise ValueError(f"{p}.{name}={getattr(self, name)} must be >= 1.")
    if self.eval_every < 0 or self.eval_steps < 1:
      raise ValueError(f"{p}.eval_every must be >= 0 and {p}.eval_steps >= 1.")
    if self.num_microbatches < 0:
      raise ValueError(
        f"{p}.num_microbatches={self.num_microbatches} must be >= 1, or 0 for an automatic choice."
      )
    if self.num_microbatches and self.batch_size % self.num_microbatches:
      raise ValueError(
        f"{p}.batch_size={self.batch_size} must be divisible by "
        f"{p}.num_microbatches={self.num_microbatches}."
      )
    if self.schedule not in ("rsqrt", "constant"):
      raise ValueError(f"{p}.schedule={self.schedule!r}; use 'rsqrt' or 'constant'.")
    if self.optimizer not in ("adafactor", "adamw"):
      raise ValueError(f"{p}.optimizer={self.optimizer!r}; use 'adafactor' or 'adamw'.")
    if self.learning_rate <= 0:
      raise ValueError(f"{p}.learning_rate={self.learning_rate} must be > 0.")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Device mesh sizes along ('data', 'expert', 'model'); -1 means all remaining devices."""

  data: int = -1
  expert: int = 1
  model: int = 1


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
  """Supervised fine-tuning on text-to-text pairs (scripts/finetune.py).

  Attributes:
    train_file, eval_file: .tsv (input<TAB>target) or .jsonl files; None = the bundled task.
    task: the bundled task made from the embedded corpus ('fill_in_the_blank').
    input_field, target_field: the JSON Lines fields (and the TSV header, if any).
    exact_match_every: generate the eval examples and score exact match every this many steps
      (0: only at the end); teacher-forced eval loss follows train.eval_every.
    exact_match_examples: eval examples generated each time.
    keep_best: the metric whose best checkpoint is kept in WORKDIR/best ('exact_match' or
      'loss').
  """

  train_file: str | None = None
  eval_file: str | None = None
  task: str = "fill_in_the_blank"
  input_field: str = "input"
  target_field: str = "target"
  exact_match_every: int = 100
  exact_match_examples: int = 128
  keep_best: str = "exact_match"

  def validate(self, prefix: str = "finetune") -> None:
    if (self.train_file is None) != (self.eval_file is None):
      raise ValueError(
        f"{prefix}.train_file and {prefix}.eval_file go together: give both files (--train and "
        "--eval), or neither for the bundled task."
      )
    if self.train_file is None and self.task not in FINETUNE_TASKS:
      raise ValueError(f"{prefix}.task={self.task!r}; bundled tasks: {', '.join(FINETUNE_TASKS)}.")
    if self.exact_match_every < 0 or self.exact_match_examples < 1:
      raise ValueError(
        f"{prefix}.exact_match_every must be >= 0 and {prefix}.exact_match_examples >= 1."
      )
    if self.keep_best not in ("exact_match", "loss"):
      raise ValueError(f"{prefix}.keep_best={self.keep_best!r}; use 'exact_match' or 'loss'.")


FINETUNE_TASKS = ("fill_in_the_blank",)


@dataclasses.dataclass(frozen=True)
class Config:
  """A whole run; `finetune` is set for supervised fine-tuning runs."""

  name: str = "custom"
  model: ModelConfig = ModelConfig()
  data: DataConfig = DataConfig()
  train: TrainConfig = TrainConfig()
  mesh: MeshConfig = MeshConfig()
  finetune: FinetuneConfig | None = None

  def validate(self) -> Config:
    self.model.validate("model")
    self.data.validate("data")
    self.train.validate("train")
    if self.finetune is not None:
      self.finetune.validate("finetune")
    check_sizes(self)
    return self


# --------------------------------------------------------------------------------------------
# Size limits: a config no machine can hold is refused before anything is allocated or traced.

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
  terms = {
    "model.moe.num_experts": 0,
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
  length = _get(config, field)
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
    value = _get(config, field)
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
      f"model); {terms[largest]:.2g} of them come from {largest}={_get(config, largest)} "
      f"(with model.d_model={model.d_model}, {model.num_layers} + {model.decoder_layers} "
      f"layers): lower {largest}, model.d_model or the layer counts."
    )


# --------------------------------------------------------------------------------------------
# Presets.

PRESETS_PACKAGE = "switchjax.configs"  # The top-level configs/ directory, installed by setup.py.


def _presets() -> types.ModuleType:
  """The package of the presets, `switchjax.configs`.

  setup.py installs the top-level configs/ directory as this package (a wheel copies it; an
  editable install maps it to configs/). A source tree on sys.path without an install of its
  own (PYTHONPATH=repo, or an editable install made before configs/ was a package) has no such
  package: then configs/ next to the switchjax directory is imported under that name.
  """
  try:
    return importlib.import_module(PRESETS_PACKAGE)
  except ModuleNotFoundError as e:
    if e.name != PRESETS_PACKAGE:
      raise
  source = pathlib.Path(__file__).resolve().parent.parent / "configs" / "__init__.py"
  if not source.is_file():
    raise ValueError(
      f"the presets package {PRESETS_PACKAGE} is not installed; reinstall switchjax "
      "(pip install . in its source tree), or pass a .py file with get_config()."
    )
  spec = importlib.util.spec_from_file_location(
    PRESETS_PACKAGE, source, submodule_search_locations=[str(source.parent)]
  )
  module = importlib.util.module_from_spec(spec)
  sys.modules[PRESETS_PACKAGE] = module
  spec.loader.exec_module(module)
  sys.modules["switchjax"].configs = module  # As the import system does for a subpackage.
  return module


def available_configs() -> list[str]:
  """Names of the presets (the files of configs/, installed as switchjax.configs)."""
  return sorted(
    m.name
    for m in pkgutil.iter_modules(_presets().__path__)
    if not m.ispkg and not m.name.startswith("_")
  )


def load_config(name_or_path: str, overrides: tuple[str, ...] | list[str] = ()) -> Config:
  """Loads a config, then applies `a.b=value` overrides and validates the result.

  `name_or_path` is a preset name (configs/NAME.py), a .py file with get_config(), a saved
  config.json, or a checkpoint directory (a converted model or a training workdir): its
  config, with train.init_from set to the directory so a new run starts from its parameters
  (and data.spm_path, unless set, to its spiece.model). Every problem is a one-line ValueError
  naming the file or setting and the fix.
  """
  path = pathlib.Path(name_or_path)
  if path.is_dir() and (path / "config.json").is_file():
    config = _checkpoint_config(path)
  elif path.suffix == ".json" and path.is_file():
    config = _read_json_config(path)
  elif path.suffix == ".py":
    if not path.is_file():
      raise ValueError(f"config file {str(path)!r} does not exist; check the --config path.")
    config = _config_from_file(path)
  elif str(name_or_path) in available_configs():
    config = _config_from_preset(str(name_or_path))
  else:
    names = available_configs()
    close = difflib.get_close_matches(str(name_or_path), names, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ValueError(
      f"Unknown config {name_or_path!r}.{hint} Available: {', '.join(names)} "
      "(or a .py file with get_config(), a config.json, or a checkpoint "
      "directory)."
    )
  return apply_overrides(config, overrides).validate()


def _checkpoint_config(path: pathlib.Path) -> Config:
  """The config of a checkpoint directory, made to start a new run from it: train.init_from is
  the directory and, unless set, data.spm_path its spiece.model (the tokenizer its parameters
  were trained with travels with them)."""
  config = _read_json_config(path / "config.json")
  train, data = config.train, config.data
  if train.init_from is None:
    train = dataclasses.replace(train, init_from=str(path.resolve()))
  if data.spm_path is None and (path / "spiece.model").is_file():
    data = dataclasses.replace(data, spm_path=str((path / "spiece.model").resolve()))
  return dataclasses.replace(config, train=train, data=data)


def _one_line(error: BaseException) -> str:
  return " ".join(str(error).split()) or type(error).__name__


def _read_json_config(path: pathlib.Path) -> Config:
  """A saved config.json; a file that is not one is a ValueError naming it."""
  try:
    return read_config(path)
  except (ValueError, TypeError, KeyError, AttributeError, UnicodeDecodeError) as e:
    raise ValueError(
      f"{path} is not a switchjax config.json ({_one_line(e)}); give a config.json written by "
      "switchjax (pretrain.py or convert_hf.py), a preset name or a .py file."
    ) from None


def _config_from_file(path: pathlib.Path) -> Config:
  """get_config() of a Python file (imported under a private module name)."""
  spec = importlib.util.spec_from_file_location(f"switchjax_config_{path.stem}", path)
  return _config_from_module(path, lambda: _exec_module(spec))


def _config_from_preset(name: str) -> Config:
  """get_config() of configs/NAME.py (the module switchjax.configs.NAME)."""
  module_name = f"{PRESETS_PACKAGE}.{name}"
  spec = importlib.util.find_spec(module_name)
  where = pathlib.Path(spec.origin) if spec and spec.origin else pathlib.Path(f"configs/{name}.py")
  return _config_from_module(where, lambda: importlib.import_module(module_name))


def _exec_module(spec) -> types.ModuleType:
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _config_from_module(path: pathlib.Path, load) -> Config:
  """Runs `load()` (which imports the config file at `path`) and its get_config().

  Whatever goes wrong (a syntax error, a failed import, get_config raising or returning
  something else than a Config with fields of the declared types) becomes one ValueError that
  names the file and the problem.
  """
  try:
    module = load()
  except SyntaxError as e:
    where = "" if e.filename and pathlib.Path(e.filename) == path else f" in {e.filename}"
    raise ValueError(
      f"{path}: syntax error{where} at line {e.lineno}: {e.msg}; fix the file."
    ) from None
  except ImportError as e:
    raise ValueError(
      f"{path}: an import failed ({_one_line(e)}); fix the import or install what it needs."
    ) from None
  except Exception as e:  # noqa: BLE001  (any error of the user's file: report it in one line)
    raise ValueError(
      f"{path}: running the file raised {type(e).__name__}: {_one_line(e)}; fix the file."
    ) from None
  get_config = getattr(module, "get_config", None)
  if not callable(get_config):
    raise ValueError(f"{path} has no get_config() function returning a switchjax Config.")
  try:
    config = get_config()
  except Exception as e:  # noqa: BLE001
    raise ValueError(
      f"{path}: get_config() raised {type(e).__name__}: {_one_line(e)}; fix the file."
    ) from None
  if not isinstance(config, Config):
    kind = f"{type(config).__module__}.{type(config).__qualname__}"
    raise ValueError(
      f"{path}: get_config() returned a {kind}, not a switchjax.config.Config; return a "
      "Config (see configs/small.py)."
    )
  problem = _type_problem(config)
  if problem:
    raise ValueError(f"{path}: get_config() returned a Config whose {problem}; fix the file.")
  return config


def _type_problem(obj, prefix: str = "") -> str | None:
  """'model.d_model='big' is a str, expected int' for the first field of the wrong type."""
  hints = typing.get_type_hints(type(obj))
  for f in dataclasses.fields(obj):
    value, annotation, name = getattr(obj, f.name), hints[f.name], prefix + f.name
    if dataclasses.is_dataclass(annotation):
      if not isinstance(value, annotation):
        return f"{name} is a {type(value).__name__}, expected a {annotation.__name__}"
      problem = _type_problem(value, name + ".")
      if problem:
        return problem
    elif not _has_type(value, annotation):
      return f"{name}={value!r} is a {type(value).__name__}, expected {_type_name(annotation)}"
  return None


def _has_type(value, annotation) -> bool:
  origin, args = typing.get_origin(annotation), typing.get_args(annotation)
  if origin in (typing.Union, types.UnionType):
    return any(_has_type(value, a) for a in args)
  if annotation is type(None):
    return value is None
  if annotation is bool:
    return isinstance(value, bool)
  if annotation is int:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
  if annotation is float:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
  if origin is tuple:
    return isinstance(value, (tuple, list)) and all(_has_type(v, args[0]) for v in value)
  return isinstance(value, annotation) if isinstance(annotation, type) else True


def _type_name(annotation) -> str:
  if typing.get_origin(annotation) in (typing.Union, types.UnionType):
    return " or ".join(_type_name(a) for a in typing.get_args(annotation))
  if typing.get_origin(annotation) is tuple:
    return f"a tuple of {_type_name(typing.get_args(annotation)[0])}"
  return "None" if annotation is type(None) else getattr(annotation, "__name__", str(annotation))


# --------------------------------------------------------------------------------------------
# Dotted overrides.


def _optional_dataclass(annotation) -> type | None:
  """The dataclass D of an `Optional[D]` annotation, else None."""
  args = [a for a in typing.get_args(annotation) if a is not type(None)]
  return args[0] if len(args) == 1 and dataclasses.is_dataclass(args[0]) else None


def _derived(obj, name: str):
  """The value an unset (None) dataclass field takes when one of its fields is overridden:
  `obj.default_<name>()` if the class defines it (e.g. ModelConfig.default_decoder_moe), else
  the field class's defaults."""
  maker = getattr(obj, f"default_{name}", None)
  return maker() if maker else _optional_dataclass(typing.get_type_hints(type(obj))[name])()


def _all_paths(obj, prefix="") -> list[str]:
  """Every overridable dotted name; unset optional sub-configs list theirs too."""
  out = []
  hints = typing.get_type_hints(type(obj))
  for f in dataclasses.fields(obj):
    value = getattr(obj, f.name)
    path = f"{prefix}{f.name}"
    if value is None and _optional_dataclass(hints[f.name]):
      out.append(path)  # may be set back to none
      value = _derived(obj, f.name)
    if dataclasses.is_dataclass(value):
      out += _all_paths(value, path + ".")
    else:
      out.append(path)
  return out


def _derives(config, key: str) -> bool:
  """Does `key` go through an unset sub-config whose default derives from other fields?"""
  obj = config
  for part in key.split(".")[:-1]:
    value = getattr(obj, part, None)
    if value is None and hasattr(obj, f"default_{part}"):
      return True
    obj = value
  return False


def _parse_value(text: str, annotation, field: str):
  """Parses `text` as a value of type `annotation`; errors name the field and the type."""
  origin = typing.get_origin(annotation)
  args = typing.get_args(annotation)
  lowered = text.strip()
  if origin in (typing.Union, types.UnionType):
    if type(None) in args and lowered.lower() in ("none", "null", ""):
      return None
    inner = [a for a in args if a is not type(None)]
    return _parse_value(text, inner[0], field)
  if annotation is bool:
    if lowered.lower() in ("true", "1", "yes"):
      return True
    if lowered.lower() in ("false", "0", "no"):
      return False
    raise ValueError(f"--set {field}={text}: expected a bool (true or false).")
  if annotation in (int, float):
    try:
      value = ast.literal_eval(lowered)
    except (ValueError, SyntaxError):
      value = None
    if (
      isinstance(value, bool)
      or not isinstance(value, (int, float))
      or (annotation is int and not float(value).is_integer())
    ):
      raise ValueError(f"--set {field}={text}: expected {annotation.__name__}.")
    return annotation(value)
  if annotation is str:
    return lowered
  if origin is tuple:
    if lowered.startswith(("(", "[")):
      try:
        items = list(ast.literal_eval(lowered))
      except (ValueError, SyntaxError) as e:
        raise ValueError(f"--set {field}={text}: cannot parse as a tuple ({e}).") from None
      items = [str(x) if args[0] is str else x for x in items]
      items = [_parse_value(str(x), args[0], field) for x in items]
    else:
      items = [_parse_value(x, args[0], field) for x in lowered.split(",") if x.strip()]
    return tuple(items)
  raise ValueError(f"--set {field}: fields of type {annotation} cannot be set from text.")


def apply_overrides(config, overrides) -> Any:
  """Returns `config` with each `a.b.c=value` applied (type checked).

  Overrides of an unset sub-config whose default derives from other fields (e.g.
  model.decoder_moe.* from model.moe) are applied last, so the order of --set flags does not
  matter.
  """
  items = []
  for item in overrides:
    if "=" not in item:
      raise ValueError(
        f"--set {item!r}: expected the form field.path=value, e.g. train.batch_size=32."
      )
    items.append(tuple(s.strip() for s in item.split("=", 1)))
  items.sort(key=lambda kv: _derives(config, kv[0]))  # stable: derived ones last
  for key, text in items:
    valid = _all_paths(config)
    if key not in valid:
      raise ValueError(f"Unknown config field {key!r}.{_suggest(key, valid)}")
    config = _set_path(config, key.split("."), text, key)
  return config


def _suggest(key: str, valid: list[str]) -> str:
  """' Nearest valid names: ...' for an unknown dotted name (by full path, then last part)."""
  close = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
  if not close:
    last = key.rsplit(".", 1)[-1]
    by_last = {p.rsplit(".", 1)[-1]: p for p in valid}
    close = [by_last[m] for m in difflib.get_close_matches(last, list(by_last), n=3)]
  return f" Nearest valid names: {', '.join(close)}." if close else ""


def _set_path(obj, parts, text, full):
  name = parts[0]
  current = getattr(obj, name)
  if current is None and len(parts) > 1:
    current = _derived(obj, name)
  if len(parts) == 1:
    value = _parse_value(text, typing.get_type_hints(type(obj))[name], full)
  else:
    value = _set_path(current, parts[1:], text, full)
  return dataclasses.replace(obj, **{name: value})


# --------------------------------------------------------------------------------------------
# Serialisation (the resolved config saved in the workdir and next to converted checkpoints).


def to_dict(config) -> dict:
  return dataclasses.asdict(config)


def from_dict(cls, data: dict):
  """Builds dataclass `cls` from a (JSON) dict, converting lists back to tuples."""
  hints = typing.get_type_hints(cls)
  kwargs = {}
  for f in dataclasses.fields(cls):
    if f.name not in data:
      continue
    value, ann = data[f.name], hints[f.name]
    ann = _optional_dataclass(ann) if value is not None and _optional_dataclass(ann) else ann
    if dataclasses.is_dataclass(ann):
      value = from_dict(ann, value)
    elif isinstance(value, list):
      value = tuple(value)
    kwargs[f.name] = value
  unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
  if unknown:
    raise ValueError(f"Unknown {cls.__name__} fields in saved config: {sorted(unknown)}.")
  return cls(**kwargs)


def save_config(config: Config, path: str | os.PathLike) -> None:
  pathlib.Path(path).write_text(json.dumps(to_dict(config), indent=2) + "\n")


def read_config(path: str | os.PathLike) -> Config:
  return from_dict(Config, json.loads(pathlib.Path(path).read_text()))


def flatten(config) -> dict[str, Any]:
  """{dotted path: value} of every leaf field; an unset optional sub-config (model.decoder_moe)
  gives the values it derives, so two configs that behave alike flatten alike."""
  paths = _all_paths(config)
  leaves = [
    p for i, p in enumerate(paths) if not paths[i + 1 :] or not paths[i + 1].startswith(p + ".")
  ]
  return {p: _get(config, p) for p in leaves}


def format_config(config, prefix="") -> str:
  """One `path = value` line per field, for printing the resolved config; an unset optional
  sub-config shows the values it derives."""
  paths = _all_paths(config, prefix)
  lines = []
  for i, p in enumerate(paths):
    derived = i + 1 < len(paths) and paths[i + 1].startswith(p + ".")
    lines.append(
      f"{p} = {_get(config, p)!r}" + ("  (derived: the values below)" if derived else "")
    )
  return "\n".join(lines)


def _get(obj, path):
  """The value at a dotted path, through the derived defaults of unset sub-configs."""
  parts = path.split(".")
  for i, part in enumerate(parts):
    parent, obj = obj, getattr(obj, part)
    if obj is None and i < len(parts) - 1:
      obj = _derived(parent, part)
  return obj
