"""T5 building blocks: RMS norm, relative position bias, attention with a KV cache, dense MLP,
token embedding.

They follow T5.1.1 as flaxformer implements it (and Hugging Face reproduces it): no biases, RMS
norm without mean subtraction computed in float32, attention logits not scaled by 1/sqrt(d_kv)
(the scale is folded into the query initialiser), bucketed relative position biases.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from switchjax.activations import activation_fn

Array = jax.Array
NEG_INF = -1e10  # added to masked attention logits


class RMSNorm(nn.Module):
  """T5 layer norm: x / sqrt(mean(x^2) + eps) * scale, in float32, no bias, no centring."""

  epsilon: float = 1e-6
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param(
      "scale",
      nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
      (x.shape[-1],),
      self.param_dtype,
    )
    x = x.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.epsilon)
    return (x * jnp.asarray(scale, jnp.float32)).astype(self.dtype)


def relative_position_bucket(
  relative_position: np.ndarray, bidirectional: bool, num_buckets: int = 32, max_distance: int = 128
) -> np.ndarray:
  """T5's bucketing of (key position - query position), computed statically in NumPy.

  Half of the buckets hold exact small distances, the other half logarithmically wider ranges
  up to `max_distance`; bidirectional buckets split the range between past and future, causal
  ones only cover the past. Equal to Hugging Face's for every distance (tested).
  """
  n = -np.asarray(relative_position, np.int64)
  ret = np.zeros_like(n)
  if bidirectional:
    num_buckets //= 2
    ret = (n < 0).astype(np.int64) * num_buckets
    n = np.abs(n)
  else:
    n = np.maximum(n, 0)
  max_exact = num_buckets // 2
  is_small = n < max_exact
  with np.errstate(divide="ignore"):
    large = max_exact + (
      np.log(n.astype(np.float32) / max_exact + np.finfo(np.float32).eps)
      / math.log(max_distance / max_exact)
      * (num_buckets - max_exact)
    ).astype(np.int64)
  large = np.minimum(large, num_buckets - 1)
  return ret + np.where(is_small, n, large)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def broadcast_rows(x: Array, rows: int) -> Array:
  """x [1, ...] repeated to [rows, ...]. Its gradient sums the rows by a matmul with a vector
  of ones, which XLA:CPU runs several times faster than its reduction over the leading axis
  (the relative position bias's gradient)."""
  return jnp.broadcast_to(x, (rows, *x.shape[1:]))


def _broadcast_rows_fwd(x, rows):
  return broadcast_rows(x, rows), None


def _broadcast_rows_bwd(rows, _, g):
  flat = g.reshape(rows, -1)  # [rows, everything else]
  total = jnp.einsum(
    "r,rx->x", jnp.ones((rows,), g.dtype), flat, preferred_element_type=jnp.float32
  )
  return (total.astype(g.dtype).reshape(1, *g.shape[1:]),)


broadcast_rows.defvjp(_broadcast_rows_fwd, _broadcast_rows_bwd)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def softmax(x: Array, axis: int = -1) -> Array:
  """jax.nn.softmax (the same forward) with the derivative y * (dx - sum(y * dx)): the rule of
  jax's `jax_softmax_custom_jvp` flag, off by default. The default differentiates exp / sum,
  so the backward pass keeps and reads both and their quotient; this one reads the
  probabilities alone (less memory traffic in attention's backward pass)."""
  x_max = jnp.max(x, axis, keepdims=True)
  unnormalized = jnp.exp(x - x_max)
  return unnormalized / jnp.sum(unnormalized, axis, keepdims=True)


@softmax.defjvp
def _softmax_jvp(axis, primals, tangents):
  (x,), (x_dot,) = primals, tangents
  y = softmax(x, axis)
  return y, y * (x_dot - jnp.sum(y * x_dot, axis, keepdims=True))


class RelativePositionBias(nn.Module):
  """Learned per-head bias of each relative-position bucket; one per stack, shared by its layers.

  Attributes:
    num_heads, num_buckets, max_distance: T5 uses 32 buckets up to distance 128.
    bidirectional: True in the encoder, False (causal buckets) in the decoder.
    init_scale: the model's variance-scaling factor (Switch: 0.1).
  """

  num_heads: int
  num_buckets: int = 32
  max_distance: int = 128
  bidirectional: bool = True
  init_scale: float = 1.0
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def setup(self):
    # flaxformer: variance_scaling(SCALE, 'fan_avg', 'uniform') on [heads, buckets].
    init = nn.initializers.variance_scaling(self.init_scale, "fan_avg", "uniform")
    self.rel_embedding = self.param(
      "rel_embedding",
      nn.with_logical_partitioning(init, ("heads", "relpos_buckets")),
      (self.num_heads, self.num_buckets),
      self.param_dtype,
    )

  def _bias(self, buckets) -> Array:
    # [heads, *buckets.shape]
    return jnp.asarray(self.rel_embedding, self.dtype)[:, buckets]

  def __call__(self, q_len: int, k_len: int, batch: int = 1) -> Array:
    """Bias <float>[batch, heads, q_len, k_len] for queries and keys at positions 0, 1, ...
    (the same for every row)."""
    relative = np.arange(k_len)[None, :] - np.arange(q_len)[:, None]
    buckets = relative_position_bucket(
      relative, self.bidirectional, self.num_buckets, self.max_distance
    )  # [q_len, k_len]
    return broadcast_rows(self._bias(buckets)[None], batch)

  def decode_step(self, position: Array, k_len: int) -> Array:
    """Bias <float>[1, heads, 1, k_len] of one decoder query at a traced `position` over keys
    0..k_len-1 (keys after `position` get the bucket of distance 0; they are masked anyway)."""
    # Static table: bucket of each distance query - key = 0 .. k_len-1.
    table = relative_position_bucket(
      -np.arange(k_len), self.bidirectional, self.num_buckets, self.max_distance
    )
    distance = jnp.clip(position - jnp.arange(k_len), 0, k_len - 1)
    return self._bias(jnp.asarray(table)[distance])[None, :, None, :]


class MultiHeadAttention(nn.Module):
  """T5 multi-head attention (no biases, no 1/sqrt(d_kv) logit scaling), with a KV cache.

  Attributes:
    num_heads, d_kv: heads and their width.
    dropout_rate: dropout on the attention weights.
    cross_attention: attends to the encoder (its decoding cache holds the encoder's keys and
      values, computed once).
    init_scale: variance scaling of the projections (Switch: 0.1), as flaxformer's 2-D
      kernels: fan-in d_model for query/key/value, heads * d_kv for the output; the query's
      is further divided by sqrt(d_kv) (T5 folds the logit scaling into it).
  """

  num_heads: int
  d_kv: int
  dropout_rate: float = 0.0
  cross_attention: bool = False
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  init_scale: float = 1.0

  @property
  def kernel_init(self) -> nn.initializers.Initializer:
    """Key/value (and, scaled, query) kernels [d_model, heads, d_kv]: fan-in d_model."""
    return nn.initializers.variance_scaling(
      self.init_scale, "fan_in", "normal", in_axis=0, out_axis=(1, 2)
    )

  def _project(self, name, x, init):
    kernel = self.param(
      name,
      nn.with_logical_partitioning(init, ("embed", "heads", "kv")),
      (x.shape[-1], self.num_heads, self.d_kv),
      self.param_dtype,
    )
    # [batch, length, heads, d_kv]
    return jnp.einsum("bld,dhk->blhk", x, jnp.asarray(kernel, self.dtype))

  @nn.compact
  def __call__(
    self,
    inputs_q: Array,
    inputs_kv: Array | None,
    bias: Array | None,
    *,
    enable_dropout: bool = False,
    decode: bool = False,
    decode_position: Array | None = None,
  ) -> Array:
    """Attends from inputs_q [batch, q_len, d] to inputs_kv [batch, kv_len, d].

    Args:
      inputs_q: queries' inputs.
      inputs_kv: keys' and values' inputs (None in a decoding step of cross-attention, whose
        keys and values were cached when the cache was made).
      bias: additive logits bias broadcastable to [batch, heads, q_len, kv_len] (relative
        positions plus NEG_INF where masked).
      decode: use the cache: self-attention appends this step's key and value at
        `decode_position`; cross-attention reads the encoder's cached keys and values.
      decode_position: int32 scalar, the step's position (self-attention only).
    """
    d_model = inputs_q.shape[-1]
    query_init = lambda *a: self.kernel_init(*a) / jnp.sqrt(self.d_kv).astype(a[-1])
    q = self._project("query", inputs_q, query_init)

    q = nn.with_logical_constraint(q, ("batch", "length", "heads", "kv"))
    if decode:
      # [batch, heads, d_kv, kv_len]: the cache's layout (see _cached_keys_values).
      k, v = self._cached_keys_values(inputs_q, inputs_kv, decode_position)
      keys, values = "bhkv", "bhkv"
    else:
      k = self._project("key", inputs_kv, self.kernel_init)
      v = self._project("value", inputs_kv, self.kernel_init)
      k = nn.with_logical_constraint(k, ("batch", "length", "heads", "kv"))
      v = nn.with_logical_constraint(v, ("batch", "length", "heads", "kv"))
      keys, values = "bvhk", "bvhk"

    # [batch, heads, q_len, kv_len]; softmax in float32.
    logits = jnp.einsum(f"bqhk,{keys}->bhqv", q, k).astype(jnp.float32)
    if bias is not None:
      logits = logits + bias.astype(jnp.float32)
    weights = softmax(logits, -1).astype(self.dtype)
    # One dropout mask per (row, head, key), shared by all queries (flaxformer's
    # broadcast_dropout).
    weights = nn.Dropout(self.dropout_rate, broadcast_dims=(-2,))(
      weights, deterministic=not enable_dropout
    )
    # [batch, heads, q_len, d_kv]: heads before length, so that XLA:CPU's fused softmax-matmul
    # writes query rows (in [batch, q_len, heads, d_kv] it writes d_kv rows, several times
    # slower at small d_model).
    out = jnp.einsum(f"bhqv,{values}->bhqk", weights, v)
    out_kernel = self.param(
      "out",
      nn.with_logical_partitioning(
        # [heads, d_kv, d_model]: fan-in heads * d_kv.
        nn.initializers.variance_scaling(
          self.init_scale, "fan_in", "normal", in_axis=(0, 1), out_axis=2
        ),
        ("heads", "kv", "embed"),
      ),
      (self.num_heads, self.d_kv, d_model),
      self.param_dtype,
    )
    out = jnp.einsum("bhqk,hkd->bqd", out, jnp.asarray(out_kernel, self.dtype))
    return nn.with_logical_constraint(out, ("batch", "length", "embed"))

  def _cached_keys_values(self, inputs_q, inputs_kv, decode_position):
    """Keys and values [batch, heads, d_kv, kv_len] from the 'cache' collection (made by a
    first call with the full decoder length; see `decoding.init_cache`).

    The cache holds them with the length last, the layout XLA:CPU's attention matmuls read:
    in [batch, length, heads, d_kv] every decoding step copied every cross-attention's keys
    and values into it (half of a step's time for 512 encoder tokens).
    """
    to_cache = lambda x: jnp.transpose(x, (0, 2, 3, 1))  # [b, l, h, k] -> [b, h, k, l]
    initialized = self.has_variable("cache", "cached_key")
    if not initialized:
      # Cache creation: self-attention gets zeros the length of the (dummy) decoder input;
      # cross-attention gets the encoder's keys and values, computed once here.
      source = inputs_kv if self.cross_attention else inputs_q
      k = to_cache(self._project("key", source, self.kernel_init))
      v = to_cache(self._project("value", source, self.kernel_init))
      fill = (lambda a: a) if self.cross_attention else jnp.zeros_like
      self.variable("cache", "cached_key", lambda: fill(k))
      self.variable("cache", "cached_value", lambda: fill(v))
      return k, v
    cached_key: nn.Variable[Array] = self.variable("cache", "cached_key")
    cached_value: nn.Variable[Array] = self.variable("cache", "cached_value")
    if self.cross_attention:
      return cached_key.value, cached_value.value
    # One new position: [batch, heads, d_kv, 1] written at decode_position.
    k = to_cache(self._project("key", inputs_q, self.kernel_init))
    v = to_cache(self._project("value", inputs_q, self.kernel_init))
    index = (0, 0, 0, decode_position)
    cached_key.value = jax.lax.dynamic_update_slice(
      cached_key.value, k.astype(cached_key.value.dtype), index
    )
    cached_value.value = jax.lax.dynamic_update_slice(
      cached_value.value, v.astype(cached_value.value.dtype), index
    )
    return cached_key.value, cached_value.value


class MlpBlock(nn.Module):
  """Dense T5 MLP: act(x @ wi) @ wo, or gated act(x @ wi_0) * (x @ wi_1) @ wo (GEGLU).

  Attributes:
    d_ff: hidden width.
    activations: one name, or two for a gated unit.
    dropout_rate: dropout on the hidden activations (broadcast along the length, as T5X).
  """

  d_ff: int
  activations: Sequence[str] = ("relu",)
  dropout_rate: float = 0.0
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  kernel_init: nn.initializers.Initializer = nn.initializers.variance_scaling(
    1.0, "fan_in", "truncated_normal"
  )

  @nn.compact
  def __call__(self, x: Array, *, enable_dropout: bool = False) -> Array:
    d_model = x.shape[-1]

    def kernel(name, shape, axes):
      return jnp.asarray(
        self.param(
          name, nn.with_logical_partitioning(self.kernel_init, axes), shape, self.param_dtype
        ),
        self.dtype,
      )

    names = (
      ["wi"] if len(self.activations) == 1 else [f"wi_{i}" for i in range(len(self.activations))]
    )
    h = 1.0
    for name, act in zip(names, self.activations):
      h = h * activation_fn(act)(
        jnp.einsum("bld,df->blf", x, kernel(name, (d_model, self.d_ff), ("embed", "mlp")))
      )
    # [batch, length, d_ff]
    h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
    h = nn.Dropout(self.dropout_rate, broadcast_dims=(-2,))(h, deterministic=not enable_dropout)
    return jnp.einsum("blf,fd->bld", h, kernel("wo", (self.d_ff, d_model), ("mlp", "embed")))


class Embed(nn.Module):
  """Token embedding; `attend` computes logits against it in float32 (tied output layer)."""

  num_embeddings: int
  features: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  embedding_init: nn.initializers.Initializer = nn.initializers.normal(stddev=1.0)

  def setup(self):
    self.embedding = self.param(
      "embedding",
      nn.with_logical_partitioning(self.embedding_init, ("vocab", "embed")),
      (self.num_embeddings, self.features),
      self.param_dtype,
    )

  def __call__(self, tokens: Array) -> Array:
    """tokens <int>[batch, length] -> <dtype>[batch, length, features]."""
    return jnp.take(jnp.asarray(self.embedding, self.dtype), tokens, axis=0)

  def attend(self, x: Array) -> Array:
    """x [batch, length, features] -> float32 logits [batch, length, vocab]."""
    return jnp.einsum(
      "bld,vd->blv", x.astype(jnp.float32), jnp.asarray(self.embedding, jnp.float32)
    )
