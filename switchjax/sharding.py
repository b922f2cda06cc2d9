"""Device meshes and the logical-axis rules of expert parallelism.

Every parameter carries logical axis names (`nn.with_logical_partitioning`) and activations get
logical constraints (`nn.with_logical_constraint`); the one table below maps those names onto a
mesh with axes ('data', 'expert', 'model'), as T5X's MoE partitioner does:

- the batch (and the routing groups) are split over ('data', 'expert'): every device holds
  different tokens, so expert-parallel devices are also data-parallel for the dense layers;
- expert weights and expert buffers are split over 'expert'; the expert buffers' group axis
  ('expert_replicas') over 'data'. Moving the buffers from one layout to the other is the
  all-to-all of expert parallelism;
- hidden dimensions of MLPs, experts and attention heads are split over 'model'.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from switchjax.config import MeshConfig

MESH_AXES = ("data", "expert", "model")

LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
  ("batch", ("data", "expert")),
  ("expert", "expert"),
  ("expert_replicas", "data"),
  ("expert_mlp", "model"),
  ("mlp", "model"),
  ("heads", "model"),
  ("joined_kv", "model"),
  ("vocab", "model"),
  ("embed", None),
  ("kv", None),
  ("length", None),
  ("relpos_buckets", None),
  ("unmodeled", None),
  ("layers", None),  # the stacked axis of scanned layers (model.scan_layers)
)


def param_rules(fsdp: bool = False) -> tuple[tuple[str, Any], ...]:
  """The rules of parameters and optimizer state: those of the activations, or with FSDP
  (mesh.fsdp) 'embed' (d_model) split over 'data' too: each device keeps 1/data of every
  parameter, which XLA gathers where it is used."""
  if not fsdp:
    return LOGICAL_AXIS_RULES
  return tuple((name, "data" if name == "embed" else axes) for name, axes in LOGICAL_AXIS_RULES)


# The mesh axes the batch (and the routing groups) are split over.
BATCH_MESH_AXES: tuple[str, ...] = dict(LOGICAL_AXIS_RULES)["batch"]


def resolve_mesh_shape(mesh_cfg: MeshConfig, num_devices: int) -> tuple[int, int, int]:
  """Sizes of ('data', 'expert', 'model'), with one -1 filled in from the device count."""
  sizes = [mesh_cfg.data, mesh_cfg.expert, mesh_cfg.model]
  for name, size in zip(MESH_AXES, sizes):
    if size == 0 or size < -1:
      raise ValueError(f"mesh.{name}={size}: sizes must be >= 1, or -1 for all remaining devices.")
  if sizes.count(-1) > 1:
    raise ValueError(
      f"mesh sizes {tuple(sizes)}: at most one of mesh.data, mesh.expert, mesh.model may be -1."
    )
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if num_devices % known:
      named = ", ".join(f"mesh.{n}={s}" for n, s in zip(MESH_AXES, sizes))
      raise ValueError(
        f"{named} do not fit {num_devices} devices: the fixed sizes multiply to "
        f"{known}, which does not divide {num_devices}."
      )
    sizes[sizes.index(-1)] = num_devices // known
  if int(np.prod(sizes)) != num_devices:
    raise ValueError(
      f"mesh data x expert x model = {sizes[0]} x {sizes[1]} x {sizes[2]} = "
      f"{int(np.prod(sizes))} devices, but {num_devices} are available; make the "
      "product equal the device count (or set one size to -1)."
    )
  return tuple(sizes)


def make_mesh(
  mesh_cfg: MeshConfig | None = None,
  num_experts: int | Sequence[int] | None = None,
  devices: Sequence[jax.Device] | None = None,
) -> Mesh:
  """Builds the ('data', 'expert', 'model') mesh with Auto axis types (which Linen's logical
  constraints need) and checks it against the devices and the expert count."""
  devices = list(jax.devices() if devices is None else devices)
  shape = resolve_mesh_shape(mesh_cfg or MeshConfig(), len(devices))
  for count in (num_experts,) if isinstance(num_experts, int) else (num_experts or ()):
    if count % shape[1]:
      raise ValueError(
        f"mesh.expert={shape[1]} does not divide moe.num_experts={count}; "
        f"choose an expert axis size that divides {count}."
      )
  auto = (jax.sharding.AxisType.Auto,) * 3
  slices = len({getattr(d, "slice_index", 0) for d in devices})
  if slices == 1:
    try:
      return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)
    except NotImplementedError:  # e.g. mesh (2, 128, 1) on a 4x8x8 torus: an axis must be
      # split between mesh axes, which jax.make_mesh does not do on its own.
      grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
      return Mesh(grid, MESH_AXES, axis_types=auto)
  # Several TPU slices joined over the data-center network: 'data' spans them (each slice
  # holds whole expert and model groups, whose all-to-alls stay on the fast interconnect).
  if shape[0] % slices:
    raise ValueError(
      f"mesh.data={shape[0]} must be a multiple of the {slices} slices (the data axis spans "
      "them); choose mesh sizes whose data axis they divide."
    )
  grid = mesh_utils.create_hybrid_device_mesh(
    (shape[0] // slices, shape[1], shape[2]), (slices, 1, 1), devices
  )
  return Mesh(grid, MESH_AXES, axis_types=auto)


def logical_to_spec(logical_axes: Sequence[str | None]) -> P:
  """PartitionSpec of a tensor with the given logical axis names."""
  return nn.logical_to_mesh_axes(logical_axes, LOGICAL_AXIS_RULES)


def logical_sharding(mesh: Mesh, logical_axes: Sequence[str | None]) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(logical_axes))


def unbox(boxed) -> Any:
  """The values of a tree of `nn.Partitioned` boxes, without applying sharding constraints
  (so it also works on the abstract shapes of `jax.eval_shape`)."""
  return jax.tree.map(
    lambda x: x.value if isinstance(x, nn.Partitioned) else x,
    boxed,
    is_leaf=lambda x: isinstance(x, nn.Partitioned),
  )


def param_specs(boxed_params, fsdp: bool = False) -> Any:
  """PartitionSpecs of a parameter tree whose leaves are `nn.LogicallyPartitioned` boxes
  (as returned by `init` or `jax.eval_shape(init)`); `fsdp` as in `param_rules`."""
  logical = nn.get_partition_spec(boxed_params)
  return nn.logical_to_mesh(logical, param_rules(fsdp))


def named(mesh: Mesh, specs) -> Any:
  """A tree of PartitionSpecs as NamedShardings on `mesh`."""
  return jax.tree.map(
    lambda spec: NamedSharding(mesh, spec), specs, is_leaf=lambda x: isinstance(x, P)
  )


def param_shardings(mesh: Mesh, boxed_params, fsdp: bool = False) -> Any:
  """NamedShardings of a tree of logically partitioned (boxed) parameters."""
  return named(mesh, param_specs(boxed_params, fsdp))


def abstract_tree(shapes, shardings) -> Any:
  """`jax.ShapeDtypeStruct`s with shardings: what restoring onto a mesh needs."""
  return jax.tree.map(
    lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
  )


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of [batch, ...] inputs: the batch over ('data', 'expert')."""
  return logical_sharding(mesh, ("batch",))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def axis_rules():
  """Context manager that installs the logical-axis rules for `nn.with_logical_constraint`."""
  return nn.logical_axis_rules(LOGICAL_AXIS_RULES)


# --------------------------------------------------------------------------------------------
# Multi-host.


def initialize_distributed(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
) -> None:
  """Starts `jax.distributed` when the run spans several processes.

  With explicit flags they are used; otherwise JAX reads the usual environment (TPU pods and
  SLURM/Open MPI need nothing); a single process (no flags, no cluster environment) is left
  alone.
  """
  if coordinator_address is None and num_processes is None and process_id is None:
    cluster_env = (
      "TPU_WORKER_HOSTNAMES",
      "SLURM_JOB_ID",
      "OMPI_COMM_WORLD_SIZE",
      "JAX_COORDINATOR_ADDRESS",
    )
    if not any(v in os.environ for v in cluster_env):
      return
    jax.distributed.initialize()
    return
  if None in (coordinator_address, num_processes, process_id):
    raise ValueError(
      "Multi-host runs need all of --coordinator_address, --num_processes and "
      "--process_id (or none of them, to read the cluster environment)."
    )
  jax.distributed.initialize(
    coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
  )


def host_local_to_global(mesh: Mesh, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
  """Assembles each host's rows of the global batch into global arrays sharded over the
  batch axes (host p holds rows [p*B/P, (p+1)*B/P))."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}
