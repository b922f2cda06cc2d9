"""Dropless expert parallelism: each device sends its tokens' choices to the devices that hold
the chosen experts, runs grouped matmuls there on what it received, and sends the outputs back
(MaxText's `sparse_matmul` path, Megatron-Core's token dispatcher), never gathering all tokens
or all experts on one device.

On a ('data', 'expert', 'model') mesh, tokens are split over ('data', 'expert') and the experts
over 'expert' (replicated over 'data', their hidden units split over 'model'). Inside
`jax.shard_map` every device:

1. sorts its choices by destination (the 'expert' shard that holds the chosen expert) into a
   send buffer of `cap` rows per destination: [expert shards, cap, d_model];
2. all-to-all over 'expert': row block j goes to shard j, which receives one block from each
   peer of its data replica: [expert shards (sources), cap, d_model];
3. sorts the received rows by local expert (`sorted_rows`) and runs the local experts on them
   with grouped matmuls (`switchjax.gmm`), the partial sums over 'model' added by a psum;
4. all-to-all back, and each choice reads its output from where it was sent.

XLA:CPU (jax 0.10) has no ragged all-to-all, so the buffers have a fixed size: `cap` =
ceil(moe.dropless_ep_capacity_factor x the even share, choices / expert shards), at most all
of the device's choices (then nothing can be capped). A choice beyond the cap of its
destination is *capped*: it contributes 0, like a dropped token, and the MoE layer reports the
share of such choices as `fraction_choices_capped`.

Transport (moe.dropless_ep_collective): 'all_to_all' (default; runs everywhere) moves whole
blocks of `cap` rows; 'ragged' moves only each block's filled rows with
`jax.lax.ragged_all_to_all` (MaxText's way; TPUs and GPUs, not XLA:CPU) into the same
fixed-size buffers, so the layout, the cap and the results are the same.
"""

from __future__ import annotations

import functools
import math

import flax
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from switchjax.gmm import grouped_matmul
from switchjax.moe.groups import mesh_group_shards
from switchjax.moe.sorted_layout import dropless_block, sorted_rows
from switchjax.sharding import BATCH_MESH_AXES

Array = jax.Array
EXPERT_AXIS, MODEL_AXIS = "expert", "model"
TOKEN_AXES = BATCH_MESH_AXES  # ('data', 'expert'): the mesh axes the routing groups split over


def expert_shards() -> int:
  """The size of the 'expert' axis of the mesh set by `jax.set_mesh` (1 without one)."""
  mesh = jax.sharding.get_abstract_mesh()
  return 1 if mesh.empty else mesh.shape.get(EXPERT_AXIS, 1)


def send_capacity(choices: int, shards: int, factor: float) -> int:
  """Rows each device may send to each expert shard: ceil(factor x choices / shards), between
  1 and all of its `choices` (a cap of all of them never caps)."""
  return max(1, min(choices, math.ceil(factor * choices / shards)))


@flax.struct.dataclass
class ExpertWeights:
  """The expert MLP's inputs besides the tokens, global arrays split as the parameters are.

  Attributes:
    wis: [wi] or [wi_0, wi_1], each [experts, d_model, d_ff].
    wo: [experts, d_ff, d_model].
    keep: <bool>[experts, d_ff] expert dropout masks (scaled where kept), or None.
  """

  wis: list[Array]
  wo: Array
  keep: Array | None


def dropless_all_to_all(
  x: Array,
  expert_index: Array,
  weights: ExpertWeights,
  hidden,
  *,
  factor: float,
  dropout: float,
  ragged: bool = False,
) -> tuple[Array, Array]:
  """Expert outputs of every choice by expert-parallel all-to-all (see the module docstring).

  Args:
    x: [groups, tokens, d_model] in the experts' compute dtype, groups split over
      ('data', 'expert').
    expert_index: <int32>[groups, tokens, k], -1 for choices that go nowhere.
    weights: the experts' kernels (and dropout masks).
    hidden: act(x @ wi) (or its gated product) from the list of pre-activations.
    factor: moe.dropless_ep_capacity_factor.
    dropout: expert dropout rate (used when weights.keep is set).
    ragged: move only the filled rows (jax.lax.ragged_all_to_all; not on XLA:CPU).

  Returns:
    outputs: [groups, tokens, k, d_model], zero for choices that go nowhere or were capped;
    served: <bool>[groups, tokens, k], the choices an expert computed (not capped).
  """
  groups, tokens, k = expert_index.shape
  shards = expert_shards()
  local_choices = groups * tokens * k // mesh_group_shards()
  cap = send_capacity(local_choices, shards, factor)
  num_experts = weights.wo.shape[0]
  if num_experts % shards:
    raise ValueError(
      f"The mesh's expert axis ({shards}) does not divide moe.num_experts={num_experts}; "
      f"choose an expert axis size that divides {num_experts}."
    )

  def local(x, expert_index, wis, wo, keep):
    local_weights = ExpertWeights(wis=wis, wo=wo, keep=keep)
    return _device_step(
      x, expert_index, local_weights, hidden, cap=cap, dropout=dropout, ragged=ragged
    )

  tokens_spec = P(TOKEN_AXES)
  # Experts over 'expert' (replicated over 'data'), hidden units over 'model'.
  wi_specs = [P(EXPERT_AXIS, None, MODEL_AXIS)] * len(weights.wis)
  keep_spec = None if weights.keep is None else P(EXPERT_AXIS, MODEL_AXIS)
  return jax.shard_map(
    local,
    in_specs=(tokens_spec, tokens_spec, wi_specs, P(EXPERT_AXIS, MODEL_AXIS, None), keep_spec),
    out_specs=(tokens_spec, tokens_spec),
  )(x, expert_index, weights.wis, weights.wo, weights.keep)


def _device_step(
  x, expert_index, weights: ExpertWeights, hidden, *, cap: int, dropout: float, ragged: bool
):
  """One device's part of `dropless_all_to_all`: local [groups, tokens, ...] blocks in and
  out; the kernels are its experts' ([local experts, ...], hidden units of its 'model' shard)."""
  groups, tokens, k = expert_index.shape
  d_model = x.shape[-1]
  shards = jax.lax.axis_size(EXPERT_AXIS)
  local_experts = weights.wo.shape[0]
  choices = expert_index.reshape(-1)  # [choices], token-major
  # [choices]: each choice's place in the send buffer (shards * cap: capped or nowhere).
  place, served = _send_places(choices, local_experts, shards, cap)
  token_of_choice = jnp.repeat(jnp.arange(groups * tokens, dtype=jnp.int32), k)
  x_flat = x.reshape(groups * tokens, d_model)
  buffer = shards * cap
  send = jnp.zeros((buffer + 1, d_model), x.dtype).at[place].set(x_flat[token_of_choice])
  # Each row's expert on its destination shard, -1 for empty rows.
  send_expert = jnp.full((buffer + 1,), -1, jnp.int32).at[place].set(choices % local_experts)
  # Blocks of `cap` rows: [shards (destinations) * cap, ...] -> [shards (sources) * cap, ...]
  if ragged:
    sent = jnp.bincount(place, length=buffer + 1)[:buffer].reshape(shards, cap).sum(-1)
    exchange = functools.partial(_ragged_exchange, cap=cap)
    recv, received = exchange(send[:buffer], sent), _all_to_all(sent)
    recv_expert = exchange(send_expert[:buffer], sent, fill=-1)
  else:
    recv = _block_exchange(send[:buffer], shards)
    recv_expert = _block_exchange(send_expert[:buffer], shards)
  out = _local_experts(recv, recv_expert, weights, hidden, dropout)
  back = exchange(out, received) if ragged else _block_exchange(out, shards)
  # [choices, d_model]: capped choices and those going nowhere read the zero row.
  outputs = jnp.pad(back, ((0, 1), (0, 0)))[place]
  return outputs.reshape(groups, tokens, k, d_model), served.reshape(groups, tokens, k)


def _send_places(choices: Array, local_experts: int, shards: int, cap: int):
  """Each choice's row in the send buffer [shards * cap]: its destination's block, in choice
  order; `shards * cap` (none) for choices that go nowhere or beyond the cap.

  Returns (place <int32>[choices], served <bool>[choices]).
  """
  destination = jnp.where(choices >= 0, choices // local_experts, shards)  # shards: nowhere
  one_hot = jax.nn.one_hot(destination, shards + 1, dtype=jnp.int32)  # [choices, shards + 1]
  rank = jnp.sum((jnp.cumsum(one_hot, axis=0) - 1) * one_hot, axis=-1)  # order within its block
  served = (destination < shards) & (rank < cap)
  place = jnp.where(served, destination * cap + rank, shards * cap)
  return place.astype(jnp.int32), served


def _all_to_all(x: Array) -> Array:
  """Block j of axis 0 to expert shard j; block i of the result came from shard i."""
  return jax.lax.all_to_all(x, EXPERT_AXIS, 0, 0, tiled=True)


def _block_exchange(rows: Array, shards: int) -> Array:
  """[shards * cap, ...] rows: block j to expert shard j, whole (empty rows too)."""
  return _all_to_all(rows.reshape(shards, -1, *rows.shape[1:])).reshape(rows.shape)


def _ragged_exchange(rows: Array, sizes: Array, *, cap: int, fill=0) -> Array:
  """As `_block_exchange`, but only the first sizes[j] rows of block j travel (to block
  `this shard` of shard j's result); the rest of the result is `fill`."""
  shards = sizes.shape[0]
  offsets = jnp.arange(shards, dtype=jnp.int32) * cap
  here = jnp.full((shards,), jax.lax.axis_index(EXPERT_AXIS) * cap, jnp.int32)
  return jax.lax.ragged_all_to_all(
    rows,
    jnp.full_like(rows, fill),
    offsets,
    sizes.astype(jnp.int32),
    here,
    _all_to_all(sizes).astype(jnp.int32),
    axis_name=EXPERT_AXIS,
  )


def _local_experts(rows: Array, row_expert: Array, weights: ExpertWeights, hidden, dropout):
  """This device's experts on the rows it received, in their order.

  Args:
    rows: [buffer, d_model]; row_expert: <int32>[buffer], the local expert, -1 for empty rows.

  Returns:
    [buffer, d_model], zero for empty rows, summed over the 'model' shards.
  """
  local_experts = weights.wo.shape[0]
  block = dropless_block(rows.shape[0], local_experts)
  row, group_sizes, sorted_count = sorted_rows(row_expert, local_experts, block)
  # [sorted rows, d_model]: the rows expert by expert (buffer: none, a zero row).
  source = (
    jnp.full((sorted_count + 1,), rows.shape[0], jnp.int32)
    .at[row]
    .set(jnp.arange(rows.shape[0], dtype=jnp.int32))[:sorted_count]
  )
  padded = jnp.pad(rows, ((0, 1), (0, 0)))
  gmm = lambda lhs, rhs: grouped_matmul(lhs, rhs, group_sizes, block=block)
  h = hidden([gmm(padded[source], wi) for wi in weights.wis])  # [sorted rows, d_ff / model]
  if weights.keep is not None:
    sorted_expert = (
      jnp.zeros((sorted_count + 1,), jnp.int32)
      .at[row]
      .set(jnp.maximum(row_expert, 0))[:sorted_count]
    )
    h = jnp.where(weights.keep[sorted_expert], h / (1.0 - dropout), 0.0)
  y = gmm(h.astype(rows.dtype), weights.wo)  # partial over the 'model' shards
  y = jax.lax.psum(y, MODEL_AXIS)
  return jnp.pad(y, ((0, 1), (0, 0)))[row]  # back in the received order; empty rows zero
