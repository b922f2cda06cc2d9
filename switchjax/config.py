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
import os
import pathlib
import types
import typing
from typing import Any

ROUTER_TYPES = ("tokens_choose_masked", "tokens_choose_scatter", "experts_choose_masked")
SPARSE_LAYOUTS = ("mixed", "top", "bottom", "middle", "hf")
ACTIVATIONS = ("relu", "gelu", "gelu_new", "gelu_exact", "silu", "linear")


@dataclasses.dataclass(frozen=True)
class MoeConfig:
  """Routing and capacity of every sparse (MoE) layer.

  Attributes:
    num_experts: experts per sparse layer (E).
    router_type: tokens_choose_masked (Switch top-1 / GShard top-k by one-hot einsum),
      tokens_choose_scatter (same choices, dispatch by scatter/gather) or experts_choose_masked
      (each expert takes its top-C tokens; encoder only: it breaks causality in a decoder).
    num_selected_experts: k, experts per token for the tokens-choose routers.
    batch_prioritized_routing: route the most confident tokens first (V-MoE BPR). Applied in
      the encoder only; the decoder never uses it (it breaks autoregression), as in flaxformer.
    ignore_padding_tokens: flaxformer's option: tokens whose inputs are all zero are not routed.
    jitter_noise: multiplicative U(1-eps, 1+eps) noise on the router's copy of the inputs
      (training only).
    router_bias: add a bias to the router logits (off for Switch).
    max_group_size: tokens are routed in groups of at most this many (flaxformer rule).
    train_capacity_factor, eval_capacity_factor: capacity = cf * tokens_per_group / E.
    min_expert_capacity: lower bound on the capacity.
    expert_capacity: Hugging Face mode when set: every sequence is one group and each expert
      takes at most this many tokens of it (switch-base-*: 64); the factors are then unused.
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

  def validate(self, prefix: str = "moe") -> None:
    """Raises ValueError naming the field and the fix."""
    p = prefix
    if self.num_experts < 1:
      raise ValueError(f"{p}.num_experts={self.num_experts}: need at least 1 expert.")
    if self.router_type not in ROUTER_TYPES:
      raise ValueError(
        f"{p}.router_type={self.router_type!r} is not a router; use one of "
        f"{', '.join(ROUTER_TYPES)}."
      )
    if self.router_type != "experts_choose_masked":
      if not 1 <= self.num_selected_experts <= self.num_experts:
        raise ValueError(
          f"{p}.num_selected_experts={self.num_selected_experts} must be between 1 and "
          f"{p}.num_experts={self.num_experts}; lower k or add experts."
        )
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
  moe: MoeConfig = MoeConfig()

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
    for name in ("dropout_rate", "expert_dropout"):
      if not 0.0 <= getattr(self, name) < 1.0:
        raise ValueError(f"{p}.{name}={getattr(self, name)} must be in [0, 1).")
    self.moe.validate(f"{p}.moe")


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
class Config:
  """A whole run."""

  name: str = "custom"
  model: ModelConfig = ModelConfig()
  data: DataConfig = DataConfig()
  train: TrainConfig = TrainConfig()
  mesh: MeshConfig = MeshConfig()

  def validate(self) -> Config:
    self.model.validate("model")
    self.data.validate("data")
    self.train.validate("train")
    return self


# --------------------------------------------------------------------------------------------
# Presets.

CONFIGS_DIR = pathlib.Path(__file__).resolve().parent.parent / "configs"


def available_configs() -> list[str]:
  """Names of the presets in configs/."""
  return sorted(p.stem for p in CONFIGS_DIR.glob("*.py") if not p.stem.startswith("_"))


def load_config(name_or_path: str, overrides: tuple[str, ...] | list[str] = ()) -> Config:
  """Loads a config, then applies `a.b=value` overrides.

  `name_or_path` is a preset name (configs/NAME.py), a .py file with get_config(), a saved
  config.json, or a checkpoint directory (a converted model or a training workdir): its
  config, with train.init_from set to the directory so a new run starts from its parameters.
  """
  path = pathlib.Path(name_or_path)
  if path.is_dir() and (path / "config.json").is_file():
    config = read_config(path / "config.json")
    if config.train.init_from is None:
      config = dataclasses.replace(
        config, train=dataclasses.replace(config.train, init_from=str(path.resolve()))
      )
    return apply_overrides(config, overrides).validate()
  if path.suffix == ".json" and path.is_file():
    return apply_overrides(read_config(path), overrides).validate()
  if not (path.suffix == ".py" and path.exists()):
    path = CONFIGS_DIR / f"{name_or_path}.py"
  if not path.exists():
    names = available_configs()
    close = difflib.get_close_matches(str(name_or_path), names, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ValueError(
      f"Unknown config {name_or_path!r}.{hint} Available: {', '.join(names)} "
      "(or a .py file with get_config(), a config.json, or a checkpoint "
      "directory)."
    )
  spec = importlib.util.spec_from_file_location(f"switchjax_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ValueError(f"{path} has no get_config() function returning a switchjax Config.")
  config = module.get_config()
  return apply_overrides(config, overrides).validate()


# --------------------------------------------------------------------------------------------
# Dotted overrides.


def _all_paths(obj, prefix="") -> list[str]:
  out = []
  for f in dataclasses.fields(obj):
    value = getattr(obj, f.name)
    path = f"{prefix}{f.name}"
    if dataclasses.is_dataclass(value):
      out += _all_paths(value, path + ".")
    else:
      out.append(path)
  return out


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
  """Returns `config` with each `a.b.c=value` applied (type checked)."""
  for item in overrides:
    if "=" not in item:
      raise ValueError(
        f"--set {item!r}: expected the form field.path=value, e.g. train.batch_size=32."
      )
    key, text = (s.strip() for s in item.split("=", 1))
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


def format_config(config, prefix="") -> str:
  """One `path = value` line per field, for printing the resolved config."""
  return "\n".join(f"{p} = {_get(config, p)!r}" for p in _all_paths(config, prefix))


def _get(obj, path):
  for part in path.split("."):
    obj = getattr(obj, part)
  return obj
