"""The Switch Transformer: a T5.1.1 encoder-decoder whose MLPs are partly Mixture-of-Experts.

Layer structure (pre-norm residual blocks, as flaxformer and Hugging Face):

  encoder layer:  x += Dropout(Attention(Norm(x)))          with the stack's relative bias
                  x += Dropout(Mlp(Norm(x)))                 Mlp = dense MLP or MoeLayer
  decoder layer:  x += Dropout(CausalSelfAttention(Norm(x)))
                  x += Dropout(CrossAttention(Norm(x), encoded))
                  x += Dropout(Mlp(Norm(x)))
  stack output:   Dropout(Norm(x)); the decoder's logits come from the shared embedding
                  (scaled by d_model**-0.5) or from an untied output layer.

Masks come from the pad id 0: padding keys are masked in every attention; the decoder's
self-attention is causal. With `mask_padding_activations` (flaxformer) the normalised inputs of
every sublayer are zeroed at padding positions, so padding is routed as all-zero tokens.
"""

from __future__ import annotations

import inspect

import flax.linen as nn
import jax
import jax.numpy as jnp

from switchjax import layers, scan
from switchjax.config import ModelConfig
from switchjax.config.sparse_layout import (
  decoder_sparse_layers,
  encoder_sparse_layers,
  stack_layout,
)
from switchjax.moe import MoeLayer, expert_kernel_init

Array = jax.Array


# --------------------------------------------------------------------------------------------
# Masks.


def padding_bias(key_tokens: Array, dtype=jnp.float32) -> Array:
  """[batch, 1, 1, keys]: 0 for real keys, NEG_INF for padding (token 0)."""
  return jnp.where(key_tokens > 0, 0.0, layers.NEG_INF).astype(dtype)[:, None, None, :]


def causal_bias(length: int, dtype=jnp.float32) -> Array:
  """[1, 1, length, length]: NEG_INF above the diagonal."""
  keep = jnp.tril(jnp.ones((length, length), jnp.bool_))
  return jnp.where(keep, 0.0, layers.NEG_INF).astype(dtype)[None, None]


def decoder_logit_mask(decoder_input_tokens: Array) -> Array:
  """flaxformer's mask of real decoder positions [batch, length, 1]: the 0 at position 0 is the
  start token, not padding, and so is any 0 just before a real token."""
  shifted_left = jnp.pad(decoder_input_tokens[:, 1:], ((0, 0), (0, 1)))
  first = jnp.arange(decoder_input_tokens.shape[1])[None, :] == 0
  real = (decoder_input_tokens > 0) | (shifted_left > 0) | first
  return real[..., None]


# --------------------------------------------------------------------------------------------
# Layers.


def _mlp(cfg: ModelConfig, sparse: bool, causal: bool, name: str) -> nn.Module:
  dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
  if sparse:
    return MoeLayer(
      cfg.moe_for("decoder" if causal else "encoder"),
      d_ff=cfg.expert_mlp_dim,
      activations=cfg.expert_acts,
      dropout_rate=cfg.expert_dropout,
      causal=causal,
      dtype=dtype,
      param_dtype=param_dtype,
      kernel_init=expert_kernel_init(cfg.init_scale),
      shared_kernel_init=nn.initializers.variance_scaling(
        cfg.init_scale, "fan_in", "truncated_normal"
      ),
      name=name,
    )
  return layers.MlpBlock(
    cfg.d_ff,
    cfg.mlp_activations,
    cfg.dropout_rate,
    dtype=dtype,
    param_dtype=param_dtype,
    kernel_init=nn.initializers.variance_scaling(cfg.init_scale, "fan_in", "truncated_normal"),
    name=name,
  )


def _attention(cfg: ModelConfig, name: str, cross: bool = False) -> layers.MultiHeadAttention:
  return layers.MultiHeadAttention(
    cfg.num_heads,
    cfg.d_kv,
    cfg.dropout_rate,
    cross_attention=cross,
    dtype=jnp.dtype(cfg.dtype),
    param_dtype=jnp.dtype(cfg.param_dtype),
    init_scale=cfg.init_scale,
    name=name,
  )


def _norm(cfg: ModelConfig, name: str) -> layers.RMSNorm:
  return layers.RMSNorm(
    cfg.layer_norm_epsilon,
    dtype=jnp.dtype(cfg.dtype),
    param_dtype=jnp.dtype(cfg.param_dtype),
    name=name,
  )


def _dropout(cfg: ModelConfig) -> nn.Dropout:
  return nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))  # broadcast along length, as T5X


def _residual(
  cfg: ModelConfig,
  x: Array,
  norm_name: str,
  logit_mask: Array | None,
  sublayer,
  enable_dropout: bool,
) -> Array:
  """A pre-norm residual block: x + Dropout(sublayer(Norm(x) * logit_mask))."""
  h = _norm(cfg, norm_name)(x)
  if logit_mask is not None:
    h = h * logit_mask
  return x + _dropout(cfg)(sublayer(h), deterministic=not enable_dropout)


class EncoderLayer(nn.Module):
  """Self-attention then a dense or sparse MLP, each pre-normed with a residual."""

  config: ModelConfig
  sparse: bool = False

  @nn.compact
  def __call__(
    self, x: Array, bias: Array, logit_mask: Array | None, enable_dropout: bool = False
  ) -> Array:
    cfg = self.config
    x = _residual(
      cfg,
      x,
      "pre_attention_layer_norm",
      logit_mask,
      lambda h: _attention(cfg, "attention")(h, h, bias, enable_dropout=enable_dropout),
      enable_dropout,
    )
    x = _residual(
      cfg,
      x,
      "pre_mlp_layer_norm",
      logit_mask,
      lambda h: _mlp(cfg, self.sparse, causal=False, name="mlp")(h, enable_dropout=enable_dropout),
      enable_dropout,
    )
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class DecoderLayer(nn.Module):
  """Causal self-attention, cross-attention to the encoder, then a dense or sparse MLP."""

  config: ModelConfig
  sparse: bool = False

  @nn.compact
  def __call__(
    self,
    x: Array,
    encoded: Array | None,
    self_bias: Array,
    cross_bias: Array,
    logit_mask: Array | None,
    enable_dropout: bool = False,
    decode: bool = False,
    decode_position: Array | None = None,
  ) -> Array:
    cfg = self.config
    x = _residual(
      cfg,
      x,
      "pre_self_attention_layer_norm",
      logit_mask,
      lambda h: _attention(cfg, "self_attention")(
        h,
        h,
        self_bias,
        enable_dropout=enable_dropout,
        decode=decode,
        decode_position=decode_position,
      ),
      enable_dropout,
    )
    x = _residual(
      cfg,
      x,
      "pre_cross_attention_layer_norm",
      logit_mask,
      lambda h: _attention(cfg, "encoder_decoder_attention", cross=True)(
        h, encoded, cross_bias, enable_dropout=enable_dropout, decode=decode
      ),
      enable_dropout,
    )
    # A cached decoding step routes its tokens without capacity buffers (see MoeLayer).
    step = {"decode": decode} if self.sparse else {}
    x = _residual(
      cfg,
      x,
      "pre_mlp_layer_norm",
      logit_mask,
      lambda h: _mlp(cfg, self.sparse, causal=True, name="mlp")(
        h, enable_dropout=enable_dropout, **step
      ),
      enable_dropout,
    )
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))


# The parameters of each layer's __call__ that are Python flags, not arrays: under `nn.remat`
# they must be static (jax.checkpoint would trace them), so callers pass them positionally.
REMAT_STATIC_ARGS: dict[type[nn.Module], tuple[str, ...]] = {
  EncoderLayer: ("enable_dropout",),
  DecoderLayer: ("enable_dropout", "decode"),
}


def remat_static_argnums(cls: type[nn.Module], names: tuple[str, ...]) -> tuple[int, ...]:
  """`nn.remat`'s static_argnums for the parameters `names` of `cls.__call__`, looked up by name
  in its signature (counting `self` as 0, as nn.remat does): a parameter added to the layer
  moves them with it instead of silently making another argument static."""
  params = inspect.signature(cls.__call__).parameters.values()
  positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
  missing = [name for name in names if name not in positional]
  if missing:
    raise ValueError(
      f"{cls.__name__}.__call__ has no positional parameters {missing} to make static under "
      f"remat; its positional parameters are {positional}."
    )
  return tuple(positional.index(name) for name in names)


def _maybe_remat(cls: type[nn.Module], cfg: ModelConfig) -> type[nn.Module]:
  """Rematerialise whole layers in the backward pass (saves activation memory)."""
  if cfg.remat != "full":
    return cls
  return nn.remat(cls, static_argnums=remat_static_argnums(cls, REMAT_STATIC_ARGS[cls]))


class EncoderBlock(nn.Module):
  """One period of encoder layers (`layers_0` .. `layers_{p-1}`): the body of the scanned
  encoder. `sparse` says which are MoE layers. Returns (x, None) as `nn.scan` wants."""

  config: ModelConfig
  sparse: tuple[bool, ...] = (False,)
  enable_dropout: bool = False

  @nn.compact
  def __call__(self, x: Array, bias: Array, logit_mask: Array | None) -> tuple[Array, None]:
    layer_cls = _maybe_remat(EncoderLayer, self.config)
    for k, sparse in enumerate(self.sparse):
      x = layer_cls(self.config, sparse=sparse, name=f"layers_{k}")(
        x, bias, logit_mask, self.enable_dropout
      )
    return x, None


class DecoderBlock(nn.Module):
  """One period of decoder layers: the body of the scanned decoder (see `EncoderBlock`)."""

  config: ModelConfig
  sparse: tuple[bool, ...] = (False,)
  enable_dropout: bool = False
  decode: bool = False

  @nn.compact
  def __call__(self, x, encoded, self_bias, cross_bias, logit_mask, position) -> tuple[Array, None]:
    layer_cls = _maybe_remat(DecoderLayer, self.config)
    for k, sparse in enumerate(self.sparse):
      x = layer_cls(self.config, sparse=sparse, name=f"layers_{k}")(
        x, encoded, self_bias, cross_bias, logit_mask, self.enable_dropout, self.decode, position
      )
    return x, None


def _scanned(block_cls, cfg: ModelConfig, stack: str, num_layers: int, num_args: int, **attrs):
  """The stack's layers as `nn.scan` over blocks of one period: parameters, routing metrics
  ('intermediates') and the decoding cache stacked along a leading 'layers' axis; the
  non-carry arguments broadcast to every block; fresh dropout/jitter noise per block.

  A scan's carry keeps one dtype: since a sparse layer's float32 combine weights make the
  residual float32, a stack with sparse layers carries float32 from its first layer on
  (unscanned: from its first sparse layer; the same in a float32 model). Returns
  (scanned module, carry dtype or None to keep the input's)."""
  period, sparse = stack_layout(cfg, stack)
  carry_dtype = jnp.promote_types(cfg.dtype, jnp.float32) if any(sparse) else None
  scanned = nn.scan(
    block_cls,
    variable_axes={"params": 0, "intermediates": 0, "cache": 0},
    split_rngs={"params": True, "dropout": True, "jitter": True},
    in_axes=(nn.broadcast,) * num_args,
    length=num_layers // period,
    metadata_params={nn.PARTITION_NAME: "layers"},
  )
  return scanned(cfg, sparse=sparse, name=scan.scan_name(period), **attrs), carry_dtype


# --------------------------------------------------------------------------------------------
# Stacks.


class Encoder(nn.Module):
  """Token embedding (shared), relative position bias, the encoder layers, final norm."""

  config: ModelConfig
  embedder: layers.Embed

  @nn.compact
  def __call__(self, tokens: Array, enable_dropout: bool = False) -> Array:
    """tokens <int>[batch, length] -> encoded [batch, length, d_model]."""
    cfg = self.config
    length = tokens.shape[1]
    x = self.embedder(tokens)
    x = _dropout(cfg)(x, deterministic=not enable_dropout)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    relpos = layers.RelativePositionBias(
      cfg.num_heads,
      cfg.relative_attention_num_buckets,
      cfg.relative_attention_max_distance,
      bidirectional=True,
      init_scale=cfg.init_scale,
      dtype=jnp.dtype(cfg.dtype),
      param_dtype=jnp.dtype(cfg.param_dtype),
      name="relpos_bias",
    )
    bias = relpos(length, length, tokens.shape[0]) + padding_bias(tokens, jnp.dtype(cfg.dtype))
    logit_mask = (tokens > 0)[..., None].astype(x.dtype) if cfg.mask_padding_activations else None
    if cfg.scan_layers:
      scanned, carry_dtype = _scanned(
        EncoderBlock, cfg, "encoder", cfg.num_layers, 2, enable_dropout=enable_dropout
      )
      x = x if carry_dtype is None else x.astype(carry_dtype)
      x, _ = scanned(x, bias, logit_mask)
    else:
      sparse = set(encoder_sparse_layers(cfg))
      layer_cls = _maybe_remat(EncoderLayer, cfg)
      for i in range(cfg.num_layers):
        x = layer_cls(cfg, sparse=i in sparse, name=f"layers_{i}")(
          x, bias, logit_mask, enable_dropout
        )
    x = _norm(cfg, "encoder_norm")(x)
    return _dropout(cfg)(x, deterministic=not enable_dropout)


class Decoder(nn.Module):
  """Token embedding (shared), causal relative bias, decoder layers, final norm, logits."""

  config: ModelConfig
  embedder: layers.Embed

  @nn.compact
  def __call__(
    self,
    encoded: Array | None,
    encoder_input_tokens: Array,
    decoder_input_tokens: Array,
    decoder_target_tokens: Array | None = None,
    enable_dropout: bool = False,
    decode: bool = False,
  ) -> Array:
    """Returns float32 logits [batch, length, vocab].

    In decode mode the 'cache' collection must be mutable. The first such call (on a dummy
    [batch, max_length] input) creates the cache: zeroed self-attention keys/values and the
    encoder's keys/values; each later call takes one token [batch, 1] and `encoded` may be None.
    """
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    relpos = layers.RelativePositionBias(
      cfg.num_heads,
      cfg.relative_attention_num_buckets,
      cfg.relative_attention_max_distance,
      bidirectional=False,
      init_scale=cfg.init_scale,
      dtype=dtype,
      param_dtype=jnp.dtype(cfg.param_dtype),
      name="relpos_bias",
    )
    cross_bias = padding_bias(encoder_input_tokens, dtype)

    self_bias, logit_mask, position = self._self_attention_bias(
      relpos, decoder_input_tokens, decoder_target_tokens, decode
    )

    x = self.embedder(decoder_input_tokens)
    x = _dropout(cfg)(x, deterministic=not enable_dropout)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    if cfg.scan_layers:
      scanned, carry_dtype = _scanned(
        DecoderBlock,
        cfg,
        "decoder",
        cfg.decoder_layers,
        5,
        enable_dropout=enable_dropout,
        decode=decode,
      )
      x = x if carry_dtype is None else x.astype(carry_dtype)
      x, _ = scanned(x, encoded, self_bias, cross_bias, logit_mask, position)
    else:
      sparse = set(decoder_sparse_layers(cfg))
      layer_cls = _maybe_remat(DecoderLayer, cfg)
      for i in range(cfg.decoder_layers):
        x = layer_cls(cfg, sparse=i in sparse, name=f"layers_{i}")(
          x, encoded, self_bias, cross_bias, logit_mask, enable_dropout, decode, position
        )
    x = _norm(cfg, "decoder_norm")(x)
    x = _dropout(cfg)(x, deterministic=not enable_dropout)
    logits = self._logits(x)
    return nn.with_logical_constraint(logits, ("batch", "length", "vocab"))

  def _self_attention_bias(self, relpos, decoder_input_tokens, decoder_target_tokens, decode):
    """(self-attention bias, logit mask, decoding position): causal relative bias over the
    whole sequence, or in a cached decoding step the one query at the cache's position
    against all the cache's keys (and the position advanced)."""
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    length = decoder_input_tokens.shape[1]
    if decode and self.has_variable("cache", "position"):
      # One decoding step: the query sits at `position`; keys are the cache's positions.
      position_var = self.variable("cache", "position")
      key_positions = self.variable("cache", "key_positions").value  # [max_length]
      position = position_var.value
      position_var.value = position + 1
      max_length = key_positions.shape[0]
      future = jnp.where(key_positions > position, layers.NEG_INF, 0.0).astype(dtype)
      self_bias = relpos.decode_step(position, max_length) + future[None, None, None, :]
      return self_bias, None, position
    if decode:  # cache creation
      self.variable("cache", "position", lambda: jnp.zeros((), jnp.int32))
      self.variable("cache", "key_positions", lambda: jnp.arange(length, dtype=jnp.int32))
    self_bias = relpos(length, length, decoder_input_tokens.shape[0]) + causal_bias(length, dtype)
    if decoder_target_tokens is not None:  # T5X: padding targets are masked as keys too
      self_bias = self_bias + padding_bias(decoder_target_tokens, dtype)
    logit_mask = (
      decoder_logit_mask(decoder_input_tokens).astype(dtype)
      if cfg.mask_padding_activations
      else None
    )
    return self_bias, logit_mask, None

  def _logits(self, x: Array) -> Array:
    """float32 logits [batch, length, vocab]: the tied embedding (scaled by d_model^-0.5, as
    T5) or the separate `logits_dense` kernel."""
    cfg = self.config
    if cfg.tie_embeddings:
      return self.embedder.attend(x * cfg.d_model**-0.5)
    kernel = self.param(
      "logits_dense",
      nn.with_logical_partitioning(
        nn.initializers.variance_scaling(cfg.init_scale, "fan_in", "truncated_normal"),
        ("embed", "vocab"),
      ),
      (cfg.d_model, cfg.vocab_size),
      jnp.dtype(cfg.param_dtype),
    )
    return jnp.einsum("bld,dv->blv", x.astype(jnp.float32), jnp.asarray(kernel, jnp.float32))


# --------------------------------------------------------------------------------------------
# Models.


def _embedder(cfg: ModelConfig) -> layers.Embed:
  return layers.Embed(
    cfg.vocab_size, cfg.d_model, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype)
  )


class SwitchTransformer(nn.Module):
  """The Switch encoder-decoder.

  `model.apply({"params": params}, encoder_input_tokens, decoder_input_tokens,
  decoder_target_tokens=None, enable_dropout=False)` returns float32 logits
  [batch, target_length, vocab]. Apply with `mutable=["intermediates"]` to collect each sparse
  layer's router logits and metrics; training needs rngs 'dropout' (and 'jitter' if the router
  jitters).
  """

  config: ModelConfig

  def setup(self):
    self.config.validate()
    self.token_embedder = _embedder(self.config)  # shared by encoder, decoder and logits
    self.encoder = Encoder(self.config, self.token_embedder)
    self.decoder = Decoder(self.config, self.token_embedder)

  def __call__(
    self,
    encoder_input_tokens: Array,
    decoder_input_tokens: Array,
    decoder_target_tokens: Array | None = None,
    enable_dropout: bool = False,
  ) -> Array:
    encoded = self.encode(encoder_input_tokens, enable_dropout=enable_dropout)
    return self.decode(
      encoded,
      encoder_input_tokens,
      decoder_input_tokens,
      decoder_target_tokens,
      enable_dropout=enable_dropout,
    )

  def encode(self, encoder_input_tokens: Array, enable_dropout: bool = False) -> Array:
    """[batch, input_length] tokens -> [batch, input_length, d_model]."""
    return self.encoder(encoder_input_tokens, enable_dropout=enable_dropout)

  def decode(
    self,
    encoded: Array | None,
    encoder_input_tokens: Array,
    decoder_input_tokens: Array,
    decoder_target_tokens: Array | None = None,
    enable_dropout: bool = False,
    decode: bool = False,
  ) -> Array:
    """Decoder logits given the encoder's output (see `Decoder` for decode mode)."""
    return self.decoder(
      encoded,
      encoder_input_tokens,
      decoder_input_tokens,
      decoder_target_tokens,
      enable_dropout=enable_dropout,
      decode=decode,
    )


def init_params(model: SwitchTransformer, key: Array) -> dict:
  """Freshly initialised, logically partitioned (boxed) parameters of `model`. Their shapes do
  not depend on the dummy inputs, so `jax.eval_shape` of this gives the abstract tree."""
  dummy = jnp.ones((1, 8), jnp.int32)
  return model.init({"params": key}, dummy, dummy)["params"]


def abstract_params(model: SwitchTransformer) -> dict:
  """The boxed parameter shapes of `model`. The key is made inside the trace: a concrete key
  would run (and compile) a first XLA computation before any restore, and cannot exist for
  devices that are only described (a TPU topology compiled for on another machine)."""
  return jax.eval_shape(lambda: init_params(model, jax.random.key(0)))


class SwitchEncoder(nn.Module):
  """Encoder-only Switch model: tokens -> contextual embeddings [batch, length, d_model]."""

  config: ModelConfig

  def setup(self):
    self.config.validate()
    self.token_embedder = _embedder(self.config)
    self.encoder = Encoder(self.config, self.token_embedder)

  def __call__(self, encoder_input_tokens: Array, enable_dropout: bool = False) -> Array:
    return self.encoder(encoder_input_tokens, enable_dropout=enable_dropout)
