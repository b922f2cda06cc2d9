"""flaxformer, the reference, run next to switchjax: its source imported from the tarballs of
`../shared/refs` and its MoeLayer built with a switchjax MoeConfig's routing on one device.

Used to measure (`scripts/benchmark.py moe`) and to make golden cases
(`scripts/make_gradient_cases.py`); the tests never import flaxformer.
"""

from __future__ import annotations

import pathlib
import sys
import tarfile
import tempfile

import jax.numpy as jnp

from switchjax.config import MoeConfig

ROUTERS = {
  "tokens_choose_masked": "TokensChooseMaskedRouter",
  "tokens_choose_scatter": "TokensChooseScatterRouter",
  "experts_choose_masked": "ExpertsChooseMaskedRouter",
}


def load_flaxformer(refs: pathlib.Path):
  """flaxformer's moe_layers, routing and dense modules from the source tarballs in `refs`
  (flaxformer-*.tgz and the aqt-stub.tgz it imports), or (None, reason)."""
  refs = pathlib.Path(refs)
  sources = sorted(refs.glob("flaxformer-*.tgz"))
  if not sources:
    return None, f"no flaxformer-*.tgz in {refs}"
  target = pathlib.Path(tempfile.mkdtemp(prefix="switchjax-flaxformer-"))
  for name in [sources[-1].name, "aqt-stub.tgz"]:
    if (refs / name).exists():
      with tarfile.open(refs / name) as tar:
        tar.extractall(target / name.split(".")[0], filter="data")
  sys.path[:0] = [str(d) for d in target.iterdir()]
  try:
    from flaxformer.architectures.moe import moe_layers
    from flaxformer.architectures.moe import routing as ff_routing
    from flaxformer.components import dense as ff_dense
  except ImportError as e:
    return None, f"flaxformer from {sources[-1]} does not import: {e}"
  return (moe_layers, ff_routing, ff_dense), str(sources[-1])


def flaxformer_layer(flaxformer, config: MoeConfig, d_ff: int, activations=("relu",)):
  """flaxformer's float32 MoeLayer with `config`'s routing on one device (groups a multiple of
  E, flaxformer's default partitions), no bias, jitter or dropout."""
  moe_layers, ff_routing, ff_dense = flaxformer
  if config.router_type not in ROUTERS:
    raise ValueError(f"flaxformer has no {config.router_type} router; use one of {list(ROUTERS)}.")
  expert = ff_dense.MlpBlock(
    use_bias=False,
    intermediate_dim=d_ff,
    activations=tuple(activations),
    intermediate_dropout_rate=0.0,
    final_dropout_rate=0.0,
    dtype=jnp.float32,
  )
  choice = {}
  if config.router_type.startswith("tokens_choose"):
    choice = dict(
      num_selected_experts=config.num_selected_experts,
      batch_prioritized_routing=config.batch_prioritized_routing,
    )
  router = getattr(ff_routing, ROUTERS[config.router_type])(
    router_weights=ff_routing.RouterWeights(use_bias=False, dtype=jnp.float32),
    jitter_noise=0.0,
    dtype=jnp.float32,
    ignore_padding_tokens=config.ignore_padding_tokens,
    **choice,
  )
  return moe_layers.MoeLayer(
    num_experts=config.num_experts,
    max_group_size=config.max_group_size,
    train_capacity_factor=config.train_capacity_factor,
    eval_capacity_factor=config.eval_capacity_factor,
    expert=expert,
    router=router,
    num_expert_partitions=config.num_experts,
    num_model_partitions=1,
    min_expert_capacity=config.min_expert_capacity,
    dropout_rate=0.0,
    dtype=jnp.float32,
  )


def flaxformer_params(arrays: dict) -> dict:
  """A golden case's arrays (router_kernel, expert_wi or expert_wi_0/1, expert_wo) as the
  parameter tree of flaxformer's MoeLayer."""
  expert = {
    k.removeprefix("expert_"): {"kernel": v} for k, v in arrays.items() if k != "router_kernel"
  }
  return {
    "router": {"router_weights": {"w": {"kernel": arrays["router_kernel"]}}},
    "expert": expert,
  }


def flaxformer_arrays(params: dict) -> dict:
  """flaxformer's MoeLayer parameters (or their gradients) under a golden case's names."""
  arrays = {"router_kernel": params["router"]["router_weights"]["w"]["kernel"]}
  arrays.update({f"expert_{k}": v["kernel"] for k, v in params["expert"].items()})
  return arrays
