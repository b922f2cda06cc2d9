"""How a run lays out on its devices: the mesh, the microbatches and the routing groups."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
from jax.sharding import Mesh

from switchjax import sharding
from switchjax.config import Config, TrainConfig
from switchjax.moe import group_layout


@dataclasses.dataclass(frozen=True)
class RunPlan:
  """A config placed on devices.

  Attributes:
    config: the config with train.num_microbatches resolved.
    mesh: the ('data', 'expert', 'model') mesh.
    batch_shards: data x expert devices (the batch and the routing groups split over them).
  """

  config: Config
  mesh: Mesh
  batch_shards: int

  def describe(self) -> list[str]:
    """Start-up log lines: mesh, gradient accumulation, routing groups and capacity."""
    mesh, tcfg = self.mesh, self.config.train
    lines = [
      f"Mesh {dict(mesh.shape)} over {mesh.devices.size} devices ({jax.process_count()} "
      f"processes, {mesh.devices.flat[0].device_kind})."
    ]
    if tcfg.num_microbatches > 1:
      lines.append(
        f"Gradient accumulation: {tcfg.num_microbatches} microbatches of "
        f"{tcfg.batch_size // tcfg.num_microbatches} sequences per step."
      )
    return lines + routing_summary(self.config, self.batch_shards)


def plan_run(config: Config, devices: Sequence[jax.Device] | None = None) -> RunPlan:
  """The mesh of config.mesh over `devices` (default: all, over all processes) and the
  microbatches; ValueError when the batch or the routing groups do not split over it."""
  mesh = sharding.make_mesh(config.mesh, expert_counts(config.model), devices)
  shards = mesh.shape["data"] * mesh.shape["expert"]
  if config.mesh.fsdp and config.model.d_model % mesh.shape["data"]:
    raise ValueError(
      f"mesh.fsdp=True splits d_model over mesh.data, but model.d_model={config.model.d_model} "
      f"is not divisible by the {mesh.shape['data']} data devices; choose a data axis that "
      "divides it, or set mesh.fsdp=False."
    )
  train = dataclasses.replace(
    config.train, num_microbatches=resolve_microbatches(config.train, shards)
  )
  config = dataclasses.replace(config, train=train)
  routing_summary(config, shards)  # refuses a fixed moe.group_multiple the mesh cannot split
  return RunPlan(config, mesh, shards)


def resolve_microbatches(cfg: TrainConfig, batch_shards: int) -> int:
  """The number of microbatches: as configured, or (0) the fewest that keep every device at
  most `device_microbatch_size` sequences at a time. Checks that the batch splits evenly."""
  if cfg.batch_size % batch_shards:
    raise ValueError(
      f"train.batch_size={cfg.batch_size} must be divisible by the "
      f"{batch_shards} data x expert devices of the mesh."
    )
  per_device = cfg.batch_size // batch_shards
  n = cfg.num_microbatches
  if n == 0:
    n = -(-per_device // cfg.device_microbatch_size)
    while per_device % n:
      n += 1
  if per_device % n:
    raise ValueError(
      f"train.batch_size={cfg.batch_size} must be divisible by "
      f"train.num_microbatches x mesh data x mesh expert = {n} x "
      f"{batch_shards}."
    )
  return n


def expert_counts(model_cfg) -> tuple[int, ...]:
  """The expert counts of the encoder and decoder MoE layers (the mesh's expert axis must
  divide each)."""
  return tuple(sorted({model_cfg.moe.num_experts, model_cfg.moe_for("decoder").num_experts}))


def routing_summary(config: Config, batch_shards: int) -> list[str]:
  """Each stack's routing groups, tokens per group and capacity, in training (per
  microbatch) and evaluation (per batch), for a batch split over `batch_shards` data x
  expert devices. Raises ValueError for a fixed moe.group_multiple that cannot split over
  them."""
  model, train_cfg, data = config.model, config.train, config.data
  micro = train_cfg.batch_size // max(train_cfg.num_microbatches, 1)
  lines = []
  for stack, length in (("encoder", data.inputs_length), ("decoder", data.targets_length)):
    moe = model.moe_for(stack)
    parts = []
    for mode, batch in (("train", micro), ("eval", train_cfg.batch_size)):
      layout = group_layout(batch, length, moe, train=mode == "train", num_shards=batch_shards)
      parts.append(
        f"{mode}: {layout.num_groups} x {layout.tokens_per_group}-token groups per "
        f"{batch} x {length} tokens, capacity {layout.expert_capacity}"
      )
    rule = (
      f"a multiple of moe.group_multiple={moe.group_multiple}"
      if moe.group_multiple
      else f"a multiple of the {batch_shards} data x expert devices"
    )
    lines.append(
      f"Routing, {stack} ({moe.router_type}, {moe.num_experts} experts, groups {rule}): "
      + "; ".join(parts)
      + "."
    )
  return lines
