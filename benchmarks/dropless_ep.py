"""Dropless MoE layer on an emulated 8-device CPU mesh: expert-parallel (all-to-all of capped
buffers, `switchjax.moe.expert_parallel`) against the path before it (one device's sort, which
XLA feeds by gathering the choices and every expert's weights onto each device).

  python -m benchmarks.dropless_ep                 # meshes (1,8,1) and (2,4,1)
  python -m benchmarks.dropless_ep --mesh 2,4,1 --factor 1.0

Per mesh and path: the compiled forward + backward's collectives, its all-gather shapes,
XLA's temporary memory per device and the step time (CPU devices emulated on the host's cores:
the time is the host's, not a pod's). The gathered path is reached by telling the layer the
mesh has one expert shard.
"""

import argparse
import os
import time

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import flax.linen as nn  # noqa: E402  (after XLA_FLAGS)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from switchjax import pod, sharding  # noqa: E402
from switchjax.config import MeshConfig, MoeConfig  # noqa: E402
from switchjax.moe import MoeLayer, expert_parallel  # noqa: E402

# batch, length, d_model, d_ff, experts, top-k
SHAPE = (64, 128, 64, 256, 8, 2)


def measure(mesh_shape, expert_parallel_path: bool, factor: float, repeats: int = 5) -> dict:
  """Compiles and times the layer's gradient on one mesh through one path."""
  batch, length, d_model, d_ff, experts, k = SHAPE
  config = MoeConfig(
    num_experts=experts,
    router_type="tokens_choose_dropless",
    num_selected_experts=k,
    max_group_size=256,
    dropless_ep_capacity_factor=factor,
  )
  layer = MoeLayer(config, d_ff=d_ff, activations=("gelu", "linear"))
  x = jax.random.normal(jax.random.key(1), (batch, length, d_model))
  boxed = jax.eval_shape(lambda: layer.init(jax.random.key(0), x))["params"]
  params = nn.unbox(layer.init(jax.random.key(0), x))["params"]

  def loss(params, x):  # a new function per call: no trace is shared between the paths
    y, state = layer.apply({"params": params}, x, enable_dropout=True, mutable=["intermediates"])
    capped = state["intermediates"].get("fraction_choices_capped", (jnp.float32(0.0),))[0]
    return jnp.sum(y * jnp.cos(y)), capped

  shards = expert_parallel.expert_shards
  if not expert_parallel_path:
    expert_parallel.expert_shards = lambda: 1
  try:
    mesh = sharding.make_mesh(MeshConfig(*mesh_shape), num_experts=experts)
    param_sharding = sharding.param_shardings(mesh, boxed)
    data_sharding = sharding.batch_sharding(mesh)
    with jax.set_mesh(mesh), sharding.axis_rules():
      step = jax.jit(jax.grad(loss, has_aux=True), in_shardings=(param_sharding, data_sharding))
      args = jax.device_put(params, param_sharding), jax.device_put(x, data_sharding)
      compiled = step.lower(*args).compile()
      _, capped = jax.block_until_ready(compiled(*args))
      start = time.perf_counter()
      for _ in range(repeats):
        out = compiled(*args)
      jax.block_until_ready(out)
      seconds = (time.perf_counter() - start) / repeats
  finally:
    expert_parallel.expert_shards = shards
  hlo = compiled.as_text()
  collectives = pod.count_collectives(hlo)
  return {
    "mesh": ",".join(map(str, mesh_shape)),
    "path": "expert-parallel" if expert_parallel_path else "gathered",
    "all-to-all": collectives["all-to-all"],
    "all-gather": collectives["all-gather"],
    "all-gather shapes": " ".join(pod.all_gather_shapes(hlo)) or "-",
    "temp MiB/device": f"{compiled.memory_analysis().temp_size_in_bytes / 2**20:.1f}",
    "step ms": f"{seconds * 1e3:.0f}",
    "capped": f"{float(capped):.4f}",
  }


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--mesh", action="append", help="data,expert,model (repeatable)")
  parser.add_argument("--factor", type=float, default=2.0, help="dropless_ep_capacity_factor")
  args = parser.parse_args(argv)
  meshes = [tuple(int(s) for s in m.split(",")) for m in args.mesh or ["1,8,1", "2,4,1"]]
  rows = [measure(m, ep, args.factor) for m in meshes for ep in (False, True)]
  print(f"B, L, d_model, d_ff, E, k = {SHAPE}; moe.dropless_ep_capacity_factor={args.factor}")
  print(pod.format_table(list(rows[0]), [list(map(str, r.values())) for r in rows]))


if __name__ == "__main__":
  main()
