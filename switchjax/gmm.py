"""Grouped matrix multiplication: each run of rows of a sorted array times its group's matrix.

The dropless MoE path sorts the (token, choice) pairs by expert, so that each expert's rows are
one contiguous run, and multiplies every run by its expert's matrix (MegaBlocks' grouped GEMM,
MaxText's dropless path):

  out[rows of group e] = lhs[rows of group e] @ rhs[e]

That is `jax.lax.ragged_dot`, which TPUs and GPUs run with native kernels. XLA:CPU has no ragged
dot: jax lowers it there to one dense matmul over all rows and all groups (E times the FLOPs).
On CPUs `grouped_matmul` therefore runs blocked loops of static-shape matmuls instead: for each
group that has rows (groups without rows are skipped, their matrices never read), the run
of `n * block` rows is cut into chunks of `block * 2^j` rows, one per binary digit of n, so a run
costs a few large matmuls whatever its length. The backward pass runs the same loops (a custom
VJP): d lhs with the transposed matrices, d rhs[e] = lhs_e^T d out_e chunk by chunk.

Layout (both implementations): group e occupies rows [start_e, start_e + group_sizes[e]),
start_e = the sum of the sizes before it, and every size is a multiple of `block` (a run is
zero-padded to it); rows after the last group are zero in `lhs` and come out zero. Padding rows
cost FLOPs: a block of b rows wastes at most b - 1 rows per group.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

Array = jax.Array
IMPLEMENTATIONS = ("auto", "ragged_dot", "blocked")
UNROLL_GROUPS = 16  # the weight gradient's loop over groups is unrolled up to this many
# Up to this many rows (a decoding step's tokens), each group multiplies all rows and keeps its
# own: one matmul per expert instead of a chunk loop, whose conditionals cost more than the
# few extra rows (the weights, read once either way, dominate).
WHOLE_ROWS = 16


def grouped_matmul(
  lhs: Array, rhs: Array, group_sizes: Array, *, block: int = 1, implementation: str = "auto"
) -> Array:
  """out[rows of group e] = lhs[rows of group e] @ rhs[e].

  Args:
    lhs: [rows, k], the groups' rows in group order (see the module's layout).
    rhs: [groups, k, n].
    group_sizes: <int32>[groups], each a multiple of `block`, summing to at most `rows`.
    block: the run granularity (a power of two); larger blocks waste more padding rows, smaller
      ones make the CPU loops do more, smaller matmuls.
    implementation: 'ragged_dot' (jax.lax.ragged_dot), 'blocked' (the CPU loops) or 'auto'
      (blocked on CPU, ragged_dot elsewhere).

  Returns:
    [rows, n] in lhs's dtype.
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation={implementation!r}; use one of {', '.join(IMPLEMENTATIONS)}.")
  if implementation == "auto":
    implementation = "blocked" if jax.default_backend() == "cpu" else "ragged_dot"
  group_sizes = group_sizes.astype(jnp.int32)
  lhs, rhs, group_sizes = _vary_like([lhs, rhs, group_sizes], [lhs, rhs, group_sizes])
  if implementation == "ragged_dot":
    return jax.lax.ragged_dot(lhs, rhs.astype(lhs.dtype), group_sizes)
  return _blocked_gmm(lhs, rhs.astype(lhs.dtype), group_sizes, block)


# --------------------------------------------------------------------------------------------
# The CPU loops.


def _chunk_sizes(rows: int, block: int) -> list[int]:
  """Static chunk sizes block * 2^j, largest first, enough to tile any run of <= rows rows."""
  return [block << j for j in reversed(range(max(1, (rows // block).bit_length())))]


def _for_each_group(group_sizes: Array, fn, carry):
  """carry = fn(e, carry) for every group e that has rows (the others are skipped)."""

  def body(e, carry):
    return jax.lax.cond(group_sizes[e] > 0, functools.partial(fn, e), lambda c: c, carry)

  return jax.lax.fori_loop(0, group_sizes.shape[0], body, carry)


def _for_each_chunk(start: Array, size: Array, block: int, rows: int, fn, carry):
  """carry = fn(offset, chunk, carry) over the chunks (static sizes) tiling rows
  [start, start + size): one chunk per binary digit of size / block."""
  blocks = size // block
  offset = start
  for chunk in _chunk_sizes(rows, block):

    def run(state, chunk=chunk):
      offset, carry = state
      return offset + chunk, fn(offset, chunk, carry)

    offset, carry = jax.lax.cond((blocks & (chunk // block)) > 0, run, lambda s: s, (offset, carry))
  return carry


def _varying_axes(x: Array) -> frozenset[str]:
  """The manual mesh axes over which `x` varies inside `jax.shard_map` (none outside)."""
  return frozenset(jax.typeof(x).manual_axis_type.varying)


def _vary_like(arrays, like):
  """`arrays` made to vary over every manual mesh axis that any of `like` varies over (the
  identity outside `jax.shard_map`). Inside it (the expert-parallel dropless path) a loop's
  carry, both branches of a cond, and a custom VJP's inputs and cotangents must agree on them;
  the transpose of this cast sums the cotangents over the added axes."""
  axes = frozenset().union(*(_varying_axes(x) for x in like))
  out = []
  for x in arrays:
    missing = tuple(sorted(axes - _varying_axes(x)))
    out.append(jax.lax.pcast(x, missing, to="varying") if missing else x)
  return out


def _zeros(shape, dtype, *like: Array) -> Array:
  """Zeros that vary over the manual mesh axes `like` vary over."""
  return _vary_like([jnp.zeros(shape, dtype)], like)[0]


def _group_starts(group_sizes: Array) -> Array:
  return jnp.cumsum(group_sizes) - group_sizes


def _loop_matmul(lhs: Array, rhs: Array, group_sizes: Array, block: int, transpose: bool):
  """out[rows of e] = lhs[rows of e] @ rhs[e] (or @ rhs[e].T when `transpose`)."""
  rows = lhs.shape[0]
  n = rhs.shape[1] if transpose else rhs.shape[2]
  starts = _group_starts(group_sizes)
  contract = ((1,), (1,)) if transpose else ((1,), (0,))

  def group(e, out):
    w = jax.lax.dynamic_index_in_dim(rhs, e, keepdims=False)  # [k, n] (or [n, k])
    if rows <= WHOLE_ROWS:  # every row, the group's kept
      y = jax.lax.dot_general(lhs, w, (contract, ((), ())))  # [rows, n]
      row = jnp.arange(rows)
      mine = (row >= starts[e]) & (row < starts[e] + group_sizes[e])
      return jnp.where(mine[:, None], y.astype(out.dtype), out)

    def chunk_matmul(offset, chunk, out):
      x = jax.lax.dynamic_slice_in_dim(lhs, offset, chunk)  # [chunk, k]
      y = jax.lax.dot_general(x, w, (contract, ((), ())))
      return jax.lax.dynamic_update_slice_in_dim(out, y.astype(out.dtype), offset, 0)

    return _for_each_chunk(starts[e], group_sizes[e], block, rows, chunk_matmul, out)

  return _for_each_group(group_sizes, group, _zeros((rows, n), lhs.dtype, lhs, rhs, group_sizes))


def _loop_weight_grad(lhs: Array, dout: Array, group_sizes: Array, block: int, rhs_dtype):
  """[groups, k, n]: lhs[rows of e]^T @ dout[rows of e], accumulated in float32.

  Each group's largest chunk starts its sum (no zero-filled accumulator); up to UNROLL_GROUPS
  groups, the per-group gradients are stacked as they are computed (a loop would fill a
  [groups, k, n] buffer with zeros first: 5% of a dense MLP's time at E = 8).
  """
  rows, k = lhs.shape
  n = dout.shape[1]
  starts = _group_starts(group_sizes)
  chunks = _chunk_sizes(rows, block)  # largest first

  def product(offset, chunk):
    x = jax.lax.dynamic_slice_in_dim(lhs, offset, chunk)  # [chunk, k]
    d = jax.lax.dynamic_slice_in_dim(dout, offset, chunk)  # [chunk, n]
    return jax.lax.dot_general(x, d, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)

  def group(e):
    blocks = group_sizes[e] // block
    # The largest chunk: the highest binary digit of `blocks` (chunks[i] = block << (J - 1 - i)).
    top = len(chunks) - jnp.maximum(_bit_length(blocks), 1)
    acc = jax.lax.switch(top, [functools.partial(product, chunk=c) for c in chunks], starts[e])
    offset = starts[e] + block * jnp.left_shift(1, len(chunks) - 1 - top)
    for i, chunk in enumerate(chunks):

      def add(state, chunk=chunk):
        offset, acc = state
        return offset + chunk, acc + product(offset, chunk)

      take = (i > top) & ((blocks & (chunk // block)) > 0)
      offset, acc = jax.lax.cond(take, add, lambda s: s, (offset, acc))
    return acc.astype(rhs_dtype)

  def group_grad(e):
    zeros = lambda e: _zeros((k, n), rhs_dtype, lhs, dout, group_sizes)
    return jax.lax.cond(group_sizes[e] > 0, group, zeros, e)

  num_groups = group_sizes.shape[0]
  if num_groups <= UNROLL_GROUPS:  # stacked as computed: no zero-filled buffer to update
    return jnp.stack([group_grad(jnp.int32(e)) for e in range(num_groups)])
  return jax.lax.map(group_grad, jnp.arange(num_groups))


def _bit_length(x: Array) -> Array:
  """Number of binary digits of a non-negative int32 (0 for 0)."""
  return 32 - jax.lax.clz(x.astype(jnp.int32))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _blocked_gmm(lhs, rhs, group_sizes, block):
  return _loop_matmul(lhs, rhs, group_sizes, block, transpose=False)


def _blocked_gmm_fwd(lhs, rhs, group_sizes, block):
  return _loop_matmul(lhs, rhs, group_sizes, block, transpose=False), (lhs, rhs, group_sizes)


def _blocked_gmm_bwd(block, residuals, dout):
  lhs, rhs, group_sizes = residuals
  dlhs = _loop_matmul(dout, rhs, group_sizes, block, transpose=True)
  drhs = _loop_weight_grad(lhs, dout, group_sizes, block, rhs.dtype)
  return dlhs, drhs, None


_blocked_gmm.defvjp(_blocked_gmm_fwd, _blocked_gmm_bwd)
