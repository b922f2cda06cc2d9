"""The sparse Mixture-of-Experts MLP layer (flaxformer's `MoeLayer`).

Tokens of the flattened batch are cut into groups; a router assigns each token of a group to
experts, each expert holding at most `capacity` tokens per group; the experts (one stacked MLP)
run on their buffers; outputs are combined with the router probabilities. Dropped tokens give 0
(the residual connection around the layer passes them through).

Two capacity modes:
- flaxformer (default): groups of at most `max_group_size` tokens, the count chosen by
  flaxformer's rule; capacity = max(round(cf * tokens_per_group / E), min_expert_capacity) with
  the train or eval capacity factor.
- Hugging Face (`expert_capacity` set): every sequence is one group, capacity is fixed.

Dispatch never builds flaxformer's one-hot [groups, tokens, experts, capacity] tensors (whose
einsums cost tokens x group size x d per group: as much as the experts at 4096-token groups):
- buffers: each slot of the [groups, experts, capacity, d] buffers gathers its token, each
  token gathers its outputs back; the experts run on whole buffers, empty slots included;
- sorted: the kept choices sorted by expert, each expert run on exactly its tokens by grouped
  matmuls (`switchjax.gmm`); the dropless router's only path, and capacity routing's on one CPU
  device (`MoeConfig.dispatch`);
- a router returning flaxformer's RouterMask is dispatched by its one-hot einsums.
A cached decoding step (one token per sequence) routes without capacity and runs sorted.

Expert parallelism: buffers are laid out [groups, experts, capacity, d] with groups sharded over
('data', 'expert') and moved to [experts, groups, capacity, d] with experts sharded over
'expert'; under a mesh the compiler turns that resharding into an all-to-all. Sorted dispatch
on a mesh whose 'expert' axis has more than one device is expert-parallel by explicit
all-to-alls inside `jax.shard_map` (`expert_parallel`): each choice goes to its expert's
device in a buffer of fixed size per destination (`MoeConfig.dropless_ep_capacity_factor`;
choices beyond it are capped, give 0 and are counted in `fraction_choices_capped`).

The package: `groups` (routing groups and capacity), `sorted_layout` (choices sorted by
expert), `expert_parallel` (sorted dispatch across the expert axis) and `layer` (MoeLayer).
"""

from switchjax.moe.groups import (
  GroupLayout,
  causal_token_order,
  group_layout,
  mesh_group_shards,
  num_groups,
)
from switchjax.moe.layer import SORTED_MAX_EXPERTS, MoeLayer, RouteStats, expert_kernel_init
from switchjax.moe.sorted_layout import dropless_block, sorted_rows

__all__ = [
  "SORTED_MAX_EXPERTS",
  "GroupLayout",
  "MoeLayer",
  "RouteStats",
  "causal_token_order",
  "dropless_block",
  "expert_kernel_init",
  "group_layout",
  "mesh_group_shards",
  "num_groups",
  "sorted_rows",
]
