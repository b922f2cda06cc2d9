"""The config dataclasses: one frozen dataclass per part of a run (model, MoE, data, training,
mesh, fine-tuning), each with a `validate` that names the field and the fix."""

from __future__ import annotations

import dataclasses

from switchjax.config.router_registry import router_class
from switchjax.config.sizes import check_sizes
from switchjax.config.sparse_layout import STACKS, stack_layout

SPARSE_LAYOUTS = ("mixed", "top", "bottom", "middle", "hf")
PRECISIONS = ("default", "high", "highest")
DISPATCHES = ("auto", "einsum", "buffers", "sorted")
ROUTER_SCORES = ("softmax", "sigmoid")
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
    train_capacity_factor, eval_capacity_factor: capacity = cf * tokens_per_group / E
      (x k with capacity_per_choice).
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
    dispatch: how a capacity router's tokens reach the experts (routing and outputs are the
      same every way, up to float32 rounding): 'einsum' (flaxformer's and GShard's one-hot
      einsums into [groups, experts, capacity] buffers, matmuls a TPU runs on its matrix
      units), 'buffers' (the same buffers filled and emptied by gathers: O(slots) instead of
      O(tokens x slots) work per group), both moved between devices by a mesh's all-to-all
      (empty slots are computed too), 'sorted' (the kept choices sorted by expert and run by
      grouped matmuls, switchjax.gmm: no empty slot is computed; on a mesh with an expert
      axis, expert-parallel by an all-to-all of capped buffers, see
      dropless_ep_capacity_factor) or 'auto' (sorted on one CPU device with at most 16
      experts, where it is fastest, except in a decoder outside training; otherwise the
      backend's measured choice, moe.layer.AUTO_DISPATCH). The dropless router always runs
      sorted. Sorted runs are cut into matmuls by each expert's whole load, so in a decoder
      a later token can change an earlier token's output in the last bit (routing stays
      causal); the buffers keep decoders bit-causal, which 'auto' keeps for scoring and
      decoding.
    num_shared_experts: dense experts every token passes through beside its routed ones
      (DeepSeekMoE), their outputs added to the routed output; 0 (default, Switch): none.
      They run as one dense MLP of num_shared_experts x shared_expert_d_ff hidden units,
      sharded like the dense MLPs ('embed', 'mlp').
    shared_expert_d_ff: hidden width of each shared expert; None: the routed experts' width.
    router_score: how router logits become scores: 'softmax' (Switch) or 'sigmoid'
      (DeepSeek-V3: independent per expert; the load-balancing loss then uses the scores
      normalised to sum 1 per token). Tokens-choose routers only.
    normalize_top_k: divide each token's combine weights by the sum of its k chosen scores.
    routed_scaling_factor: multiplies the routed experts' combine weights (DeepSeek-V3: 2.5).
    router_bias_update_rate: auxiliary-loss-free load balancing (DeepSeek-V3) when > 0: a
      per-expert bias (the router's `choice_bias` parameter) is added to the scores for
      choosing experts only, never to the combine weights, and after each train step
      becomes bias + rate * sign(mean load - expert load), the loads counted over the whole
      global batch. It has no gradient and the optimizer never changes it (the train step
      writes it); it is saved with the parameters. 0 (default): no bias.
    dropless_ep_capacity_factor: dropless dispatch (the dropless router, or dispatch
      'sorted') on a mesh whose 'expert' axis has more than one device runs expert-parallel
      (moe.expert_parallel, chosen automatically): every device sends each expert shard a
      buffer of ceil(factor x its choices / expert shards) rows (at most all its choices,
      which never caps). Choices beyond the cap contribute 0, like dropped tokens, and are
      reported as fraction_choices_capped. Unused on one device or without an expert axis.
    dropless_ep_collective: how those buffers travel: 'all_to_all' (whole buffers; every
      backend) or 'ragged' (only their filled rows, jax.lax.ragged_all_to_all as MaxText;
      TPUs and GPUs: XLA:CPU cannot run it). Same layout, cap and results.
    capacity_per_choice: capacity = cf * k * tokens_per_group / E for the tokens-choose
      routers (GShard's 2N/E for top-2; MaxText and DeepSpeed for any k): room for every
      choice of a balanced routing at cf 1, which many narrow experts with a large k
      (fine-grained experts, model.expert_d_ff < d_ff) need. False (default): flaxformer's
      cf * tokens_per_group / E whatever k, so top-k drops most choices when k > cf.
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
  num_shared_experts: int = 0
  shared_expert_d_ff: int | None = None
  router_score: str = "softmax"
  normalize_top_k: bool = False
  routed_scaling_factor: float = 1.0
  router_bias_update_rate: float = 0.0
  dropless_ep_capacity_factor: float = 2.0
  dropless_ep_collective: str = "all_to_all"
  capacity_per_choice: bool = False

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
    self._validate_modern(p)

  def _validate_modern(self, p: str) -> None:
    """The shared-expert and DeepSeek-style router settings (all off by default)."""
    if self.num_shared_experts < 0:
      raise ValueError(f"{p}.num_shared_experts={self.num_shared_experts} must be >= 0.")
    if self.shared_expert_d_ff is not None and self.shared_expert_d_ff < 1:
      raise ValueError(
        f"{p}.shared_expert_d_ff={self.shared_expert_d_ff} must be >= 1, or None for the "
        "experts' width."
      )
    if self.router_score not in ROUTER_SCORES:
      raise ValueError(
        f"{p}.router_score={self.router_score!r}; use one of {', '.join(ROUTER_SCORES)}."
      )
    if self.routed_scaling_factor <= 0:
      raise ValueError(f"{p}.routed_scaling_factor={self.routed_scaling_factor} must be > 0.")
    if self.dropless_ep_capacity_factor <= 0:
      raise ValueError(
        f"{p}.dropless_ep_capacity_factor={self.dropless_ep_capacity_factor} must be > 0 "
        "(2.0: twice the even share of each device's choices per expert shard)."
      )
    if self.dropless_ep_collective not in ("all_to_all", "ragged"):
      raise ValueError(
        f"{p}.dropless_ep_collective={self.dropless_ep_collective!r}; use all_to_all or "
        "ragged (TPUs and GPUs only)."
      )
    if self.router_bias_update_rate < 0:
      raise ValueError(
        f"{p}.router_bias_update_rate={self.router_bias_update_rate} must be >= 0 (0: off)."
      )

  @property
  def default_gating(self) -> bool:
    """Switch's gating: softmax scores, raw top-k weights, no choice bias."""
    return (
      self.router_score == "softmax"
      and not self.normalize_top_k
      and self.routed_scaling_factor == 1.0
      and self.router_bias_update_rate == 0.0
    )

  def validate_causal(self, prefix: str) -> None:
    """Refuses routing that lets a decoder token's routing depend on later tokens."""
    if problem := self.router().causal_problem(self, prefix):
      raise ValueError(problem)

  def router(self):
    """The Router class of `router_type` (the classes switchjax.routing registers)."""
    return router_class(self.router_type)


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
      for stack in STACKS:
        stack_layout(self, stack)  # one-line error when the layout does not repeat
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
    paths: text / JSON Lines / Parquet files or globs, local or URLs (gs://bucket/dir/*.jsonl,
      read through etils.epath: pip install gcsfs for gs://); empty = the embedded default
      corpus.
    text_field: the field holding the text in JSON Lines and Parquet files.
    spm_path: a SentencePiece model (e.g. an HF checkpoint's spiece.model); None = train a
      T5-layout model on the corpus at first use and cache it.
    spm_vocab_size: pieces of that trained model (the sentinels come on top); the embedded
      default corpus supports up to about 12,000.
    extra_ids: sentinel ids appended after the pieces (<extra_id_N> = vocab - 1 - N; T5: 100).
    cache_dir: where trained tokenizers and tokenized corpora are cached (default:
      $SWITCHJAX_CACHE, else ~/.cache/switchjax).
    prepared: a prepared corpus (scripts/prepare_data.py): a directory or a URL (gs://...)
      shared by all hosts; the run reads its tokenizer and only its own rows' tokens from
      there instead of tokenizing data.paths. data.paths, text_field, extra_ids and
      spm_vocab_size (or spm_path) must agree with the corpus's; data.paths may be empty.
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
  prepared: str | None = None
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
    if self.prepared is not None and not str(self.prepared).strip():
      raise ValueError(
        f"{p}.prepared is empty; give a prepared corpus's directory or URL, or leave it unset."
      )


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
  """Device mesh sizes along ('data', 'expert', 'model'); -1 means all remaining devices.

  Attributes:
    data, expert, model: the axis sizes.
    fsdp: also split every parameter and its optimizer state along d_model over 'data'
      (MaxText's FSDP, ZeRO-3): each device keeps 1/data of them, and the step gathers each
      parameter where it is used and reduce-scatters its gradient. For models whose
      replicated parameters do not fit a device.
  """

  data: int = -1
  expert: int = 1
  model: int = 1
  fsdp: bool = False


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
