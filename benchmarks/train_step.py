"""Train-step throughput of the library's sharded step (as pretrain.py builds it), on 1 device
and on a (data, expert, model) mesh, with model FLOPs utilisation and compiled memory.

Synthetic batches of the config's shapes (data loading excluded); microbatches as pretrain.py
picks them. Emulated CPU devices share the host's cores, so on a CPU the mesh / 1-device ratio
measures the cost of partitioning and collectives, not a speed-up.
"""

import dataclasses
import math

import jax
import numpy as np

from benchmarks.timing import memory, mib, time_interleaved
from switchjax import sharding
from switchjax.config import Config, MeshConfig
from switchjax.data.pipeline import make_batch
from switchjax.pod import format_table
from switchjax.training import (
  lower_train_step,
  make_train_state,
  plan_run,
  state_layout,
  train_flops_per_example,
)
from switchjax.training.state import device_scalar


def synthetic_batch(config: Config, batch_size: int, rng) -> dict:
  """A batch of random non-padding tokens in the train step's layout (every target weighted)."""
  d, vocab = config.data, config.model.vocab_size
  targets = rng.integers(2, vocab, (batch_size, d.targets_length), dtype=np.int32)
  inputs = rng.integers(2, vocab, (batch_size, d.inputs_length), dtype=np.int32)
  return make_batch(inputs, targets)


def compile_train_step(config: Config, devices, batch):
  """pretrain.py's train step (switchjax.training) compiled for config.mesh over `devices`,
  with a fresh train state (seed train.seed) and the batch placed on that mesh: (compiled,
  its arguments, the run plan)."""
  plan = plan_run(config, devices)
  layout = state_layout(plan.config, plan.mesh)
  compiled = lower_train_step(layout, plan.config).compile()
  state, _ = make_train_state(layout, plan.config)
  args = (
    state.params,  # donated, as the optimizer state
    state.opt_state,
    device_scalar(0, plan.mesh),
    jax.device_put(batch, sharding.batch_sharding(plan.mesh)),
  )
  return compiled, args, plan


def _compile_runs(config: Config, meshes: dict) -> tuple[dict, dict]:
  """Per mesh, the run's description (devices, microbatches, memory) and a blocking call of
  one step that carries the donated state over to the next call."""
  devices = jax.devices()
  batch = synthetic_batch(config, config.train.batch_size, np.random.default_rng(0))
  runs, fns = {}, {}
  for name, shape in meshes.items():
    mesh_config = dataclasses.replace(config, mesh=MeshConfig(*shape))
    step, step_args, plan = compile_train_step(mesh_config, devices[: math.prod(shape)], batch)
    for line in plan.describe()[1:]:
      print(f"{name}: {line}")
    runs[name] = {
      "mesh": list(shape),
      "devices": math.prod(shape),
      "num_microbatches": plan.config.train.num_microbatches,
      "memory_bytes": memory(step),
    }
    holder = {"args": step_args}

    def run(step=step, holder=holder):
      params, opt_state, metrics = step(*holder["args"])
      holder["args"] = (params, opt_state, *holder["args"][2:])
      jax.block_until_ready((params, opt_state, metrics))

    fns[name] = run
  return runs, fns


def bench_train(
  config: Config, *, mesh: tuple | None, reps: int, warmup: int, peak_tflops: float
) -> dict:
  """ms/step, tokens/s, model TFLOP/s, MFU and temporary memory per device of the step on 1
  device and (when given) on `mesh`, timed interleaved; prints the table."""
  meshes = {"1 device": (1, 1, 1)}
  if mesh:
    meshes["mesh " + "x".join(map(str, mesh))] = mesh
  need = max(math.prod(m) for m in meshes.values())
  if jax.device_count() < need:
    raise ValueError(f"--mesh {mesh} needs {need} devices, {jax.device_count()} available.")
  tokens = config.train.batch_size * (config.data.inputs_length + config.data.targets_length)
  flops = train_flops_per_example(config) * config.train.batch_size
  out = {
    "config": config.name,
    "batch_size": config.train.batch_size,
    "inputs_length": config.data.inputs_length,
    "targets_length": config.data.targets_length,
    "tokens_per_step": tokens,
    "flops_per_step": flops,
  }
  runs, fns = _compile_runs(config, meshes)
  for name, (median, times) in time_interleaved(fns, reps, warmup).items():
    runs[name].update(
      ms_per_step=median * 1e3,
      tokens_per_s=tokens / median,
      model_tflops_per_s=flops / median / 1e12,
      model_tflops_per_s_per_device=flops / median / 1e12 / runs[name]["devices"],
      mfu=flops / median / 1e12 / peak_tflops,
      times_s=times,
    )
  out["runs"] = runs
  if mesh:
    name = list(meshes)[1]
    out["mesh_over_1_device_time"] = runs[name]["ms_per_step"] / runs["1 device"]["ms_per_step"]
  print_train(out, peak_tflops)
  return out


def print_train(out: dict, peak_tflops: float) -> None:
  """The section's table: one line per setup, and the mesh / 1-device ratio."""
  rows = [
    [
      name,
      r["devices"],
      r["num_microbatches"],
      f"{r['ms_per_step']:.1f}",
      f"{r['tokens_per_s']:,.0f}",
      f"{r['model_tflops_per_s']:.4f}",
      f"{r['mfu']:.1%}",
      mib(r["memory_bytes"], "temp"),
    ]
    for name, r in out["runs"].items()
  ]
  print(
    f"\n## Train step: --config {out['config']}, batch {out['batch_size']} x "
    f"({out['inputs_length']} + {out['targets_length']}) tokens, "
    f"{out['flops_per_step'] / 1e9:.2f} model GFLOP per step\n"
  )
  headers = ["setup", "devices", "microbatches", "ms/step", "tokens/s", "model TFLOP/s", "MFU"]
  print(format_table(headers + ["temp MiB/device"], rows))
  print(f"(MFU: model TFLOP/s over the matmul peak of this run, {peak_tflops:.3f} TFLOP/s)")
  if "mesh_over_1_device_time" in out:
    name = list(out["runs"])[1]
    print(
      f"{name} / 1 device step time: {out['mesh_over_1_device_time']:.2f} "
      "(emulated CPU devices share the cores: this is partitioning overhead, not speed-up)"
    )
