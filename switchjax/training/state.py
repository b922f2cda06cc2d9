"""The train state and how it lies on a mesh.

`TrainState` is everything a run resumes from. `state_layout` describes it on a mesh without
allocating anything (abstract arrays and shardings: what restoring, compiling ahead of time and
the pod simulation need); `make_train_state` makes it there, restored from the newest readable
checkpoint or fresh.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from switchjax import checkpoint, model_loading, sharding
from switchjax.config import Config
from switchjax.model import SwitchTransformer, abstract_params, init_params
from switchjax.optimizers import make_optimizer, opt_state_specs


@dataclasses.dataclass
class TrainState:
  """Everything a run resumes from.

  Attributes:
    step: training steps done.
    params: the model parameters (device arrays, sharded on the run's mesh).
    opt_state: the optimizer state (sharded like the parameters).
    data_position: global training examples consumed: where the input pipeline resumes.
  """

  step: int
  params: Any
  opt_state: Any
  data_position: int = 0


@dataclasses.dataclass(frozen=True)
class StateLayout:
  """A run's model, optimizer and state on a mesh, as abstract arrays with shardings.

  Attributes:
    mesh: the ('data', 'expert', 'model') mesh.
    model: the SwitchTransformer.
    tx: the optimizer.
    param_axes: the parameters' logical axis names.
    params, opt_state: jax.ShapeDtypeStructs carrying their NamedShardings.
  """

  mesh: Mesh
  model: SwitchTransformer
  tx: optax.GradientTransformation
  param_axes: Any
  params: Any
  opt_state: Any

  @property
  def param_shardings(self) -> Any:
    return jax.tree.map(lambda x: x.sharding, self.params)

  @property
  def opt_state_shardings(self) -> Any:
    return jax.tree.map(lambda x: x.sharding, self.opt_state)

  @property
  def num_params(self) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.params))


def state_layout(config: Config, mesh: Mesh) -> StateLayout:
  """The layout of `config`'s train state on `mesh` (nothing is allocated)."""
  model = SwitchTransformer(config.model)
  with jax.set_mesh(mesh), sharding.axis_rules():
    boxed = abstract_params(model)  # no concrete key: the mesh's devices may only be described
  param_shapes = sharding.unbox(boxed)
  param_axes = nn.get_partition_spec(boxed)  # logical axis names
  tx = make_optimizer(config.train, param_axes)
  fsdp = config.mesh.fsdp
  params = sharding.abstract_tree(param_shapes, sharding.param_shardings(mesh, boxed, fsdp))
  opt_specs = opt_state_specs(config.train, param_shapes, param_axes, fsdp)
  opt_state = sharding.abstract_tree(
    jax.eval_shape(tx.init, param_shapes), sharding.named(mesh, opt_specs)
  )
  return StateLayout(mesh, model, tx, param_axes, params, opt_state)


def make_train_state(
  layout: StateLayout,
  config: Config,
  store: checkpoint.CheckpointStore | None = None,
  report=print,
) -> tuple[TrainState, dict | None]:
  """The run's state on the layout's mesh, and the restored checkpoint's metadata (None when
  fresh): the newest readable training checkpoint of `store` (broken ones are left in
  `store.broken`, for the run to set aside once it starts), else fresh: the parameters of
  `train.init_from` or a new initialisation (seed train.seed), with a new optimizer state."""
  if store is not None:
    restored = store.restore_latest(layout.params, layout.opt_state, report, set_aside=False)
    if restored is not None:
      meta = restored["meta"]
      position = meta.get("data_position", meta.get("data", {}).get("next_example", 0))
      state = TrainState(int(meta["step"]), restored["params"], restored["opt_state"], position)
      return state, meta
  with jax.set_mesh(layout.mesh), sharding.axis_rules():
    if config.train.init_from:
      _, params = model_loading.load_model(
        config.train.init_from,
        shardings=layout.param_shardings,
        dtype=config.model.param_dtype,
        scan_layers=config.model.scan_layers,
      )
      report(f"Initialised parameters from {config.train.init_from}.")
    else:
      init = jax.jit(
        lambda key: nn.unbox(init_params(layout.model, key)), out_shardings=layout.param_shardings
      )
      params = init(jax.random.key(config.train.seed))
    opt_state = jax.jit(layout.tx.init, out_shardings=layout.opt_state_shardings)(params)
  return TrainState(0, params, opt_state, 0), None


def device_scalar(value, mesh: Mesh, dtype=jnp.int32) -> jax.Array:
  """A replicated scalar on `mesh`."""
  return jax.device_put(jnp.asarray(value, dtype), sharding.replicated(mesh))
