"""Speed and memory of switchjax, reported as ratios measured within one run.

  python scripts/benchmark.py                      # all three sections (5-6 min on 2 CPU cores)
  python scripts/benchmark.py moe generate         # some sections only
  python scripts/benchmark.py train --set model.moe.router_type=tokens_choose_scatter --mesh 1,8,1
  python scripts/benchmark.py --quick --json out.json   # the smoke test (~20 s)

--quick shrinks everything (the tiny preset, small MoE layers, 3 repetitions) and compiles with
XLA's CPU backend at optimisation level 0, as the tests do: it checks that the benchmark runs,
its figures mean little. --json PATH writes every figure, with the raw per-call times.

Sections:
  moe       MoeLayer forward + backward (jit, float32), one-hot einsum dispatch
            (moe.router_type=tokens_choose_masked) vs scatter/gather dispatch
            (tokens_choose_scatter) at a few (tokens, group size, experts E, capacity factor,
            d_model) settings, d_ff = 4 d_model. Memory is XLA's compiled-program figure
            (`memory_analysis()`): `temp` holds the intermediates, where the masked dispatch's
            [groups, group_tokens, E, capacity] one-hot tensors live: they grow as
            tokens x group_tokens x capacity factor, the scatter buffers as tokens x cf only.
  train     The jitted, sharded train step (`switchjax.training`, Adafactor, as
            pretrain.py builds it) of --config (with --set overrides) on synthetic batches of
            the config's shapes (data loading excluded): ms/step, tokens/s (inputs + targets),
            model TFLOP/s (`train_flops_per_example`, all devices together) and the compiled
            step's temporary memory per device, on 1 device and on the --mesh (data, expert,
            model) mesh; microbatches as pretrain.py picks them. Default --config small.
  generate  `switchjax.generate` (greedy) of a randomly initialised --config model with and
            without the KV cache: new tokens/s; EOS is disabled so every row decodes every step.

How to read it: every time is the median of --reps timed calls after --warmup untimed ones
(compilation is done before, with `jit(...).lower(...).compile()`), and the variants being
compared are timed interleaved (A B A B ...) so that machine noise hits them alike. Absolute
times on a shared CPU move by tens of percent between runs; compare the RATIOS, which this run
measures side by side: scatter/masked time and memory (< 1: scatter is cheaper), mesh/1-device
step time, uncached/cached generation time (the cache's speed-up).

Emulated devices: the mesh needs that many devices; on a CPU host they are emulated with
XLA_FLAGS=--xla_force_host_platform_device_count=N, which XLA reads only when jax starts. When
the flag is missing (or too small) the script re-executes itself with it added. Emulated devices
share the host's cores, so on a CPU the mesh ratio measures the cost of partitioning and
collectives (all-to-all), not a speed-up. --mesh none skips the mesh.
"""

import argparse
import dataclasses
import importlib.metadata
import json
import math
import os
import platform
import re
import statistics
import sys
import time

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from switchjax import sharding
from switchjax.config import MeshConfig, MoeConfig, load_config
from switchjax.decoding import generate
from switchjax.model import SwitchTransformer, init_params
from switchjax.moe import MoeLayer, group_layout
from switchjax.optimizers import make_optimizer
from switchjax.training import lower_train_step, plan_run, state_layout, train_flops_per_example
from switchjax.training.state import device_scalar

SECTIONS = ("moe", "train", "generate")
# MoE layer settings: (tokens, moe.max_group_size, experts, capacity factor, d_model). There
# are at least E groups, so tokens per group = min(max_group_size, tokens / E).
MOE_SETTINGS = [
  (8192, 256, 8, 1.25, 256),
  (8192, 1024, 8, 1.25, 256),
  (8192, 1024, 8, 2.0, 256),
  (8192, 256, 32, 1.25, 256),
  (8192, 1024, 8, 1.25, 512),
  (16384, 2048, 8, 1.25, 256),
]
MOE_SETTINGS_QUICK = [(256, 64, 4, 1.25, 32), (512, 64, 8, 2.0, 32)]
MiB = 2**20


def parse_args(argv=None):
  parser = argparse.ArgumentParser(
    description=__doc__.split("\n\n")[0],
    formatter_class=argparse.RawDescriptionHelpFormatter,
    epilog=__doc__.split("\n\n", 2)[2],
  )
  parser.add_argument(
    "sections", nargs="*", metavar="SECTION", help=f"any of {', '.join(SECTIONS)} (default: all)"
  )
  parser.add_argument(
    "--quick",
    action="store_true",
    help="tiny sizes and few repetitions (the smoke test; the figures mean little)",
  )
  parser.add_argument(
    "--config",
    default=None,
    help="preset of the train and generate sections (default: small; tiny with --quick)",
  )
  parser.add_argument(
    "--set",
    action="append",
    default=[],
    metavar="FIELD=VALUE",
    help="override a config field, as in pretrain.py (repeatable)",
  )
  parser.add_argument(
    "--mesh",
    default="2,4,1",
    help="data,expert,model sizes of the mesh "
    "compared with 1 device in the train section, or 'none' (default: 2,4,1)",
  )
  parser.add_argument(
    "--reps", type=int, default=None, help="timed repetitions (default 10; 3 with --quick)"
  )
  parser.add_argument(
    "--warmup",
    type=int,
    default=None,
    help="untimed calls before timing (default 2; 1 with --quick)",
  )
  parser.add_argument("--json", default=None, metavar="PATH", help="also write all figures here")
  args = parser.parse_args(argv)
  bad = [s for s in args.sections if s not in SECTIONS]
  if bad:
    parser.error(f"unknown section(s) {', '.join(bad)}; choose from {', '.join(SECTIONS)}")
  args.sections = [s for s in SECTIONS if s in args.sections] or list(SECTIONS)
  args.config = args.config or ("tiny" if args.quick else "small")
  args.reps = args.reps or (3 if args.quick else 10)
  args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
  text, args.mesh = args.mesh, None
  if text.lower() not in ("none", "", "1,1,1"):
    sizes = text.split(",")
    if len(sizes) != 3 or not all(s.strip().isdigit() and int(s) >= 1 for s in sizes):
      parser.error(f"--mesh={text}: give three sizes >= 1 (data,expert,model), e.g. 2,4,1, or none")
    args.mesh = tuple(map(int, sizes))
  return args


def reexec_with_xla_flags(args, argv) -> None:
  """XLA reads XLA_FLAGS once, when jax starts: re-executes this script with the flags it needs
  (the mesh's emulated devices; with --quick, fast compilation as in the tests)."""
  flags = os.environ.get("XLA_FLAGS", "")
  add = []
  need = math.prod(args.mesh) if args.mesh and "train" in args.sections else 1
  count = re.search(r"--xla_force_host_platform_device_count=(\d+)", flags)
  if need > 1 and (not count or int(count.group(1)) < need):
    flags = flags.replace(count.group(0), "") if count else flags
    add.append(f"--xla_force_host_platform_device_count={need}")
  if args.quick and "--xla_backend_optimization_level" not in flags:
    add.append("--xla_backend_optimization_level=0")
  if add:
    flags = " ".join(flags.split() + add)
    print(f"Restarting with XLA_FLAGS={flags}", flush=True)
    os.execve(
      sys.executable,
      [sys.executable, os.path.abspath(__file__), *argv],
      {**os.environ, "XLA_FLAGS": flags},
    )


# --------------------------------------------------------------------------------------------
# Timing and reporting.


def time_interleaved(fns: dict, reps: int, warmup: int) -> dict:
  """Seconds per call of each blocking fn(): {name: (median, [all times])}, calls interleaved."""
  for fn in fns.values():
    for _ in range(warmup):
      fn()
  times = {name: [] for name in fns}
  for _ in range(reps):
    for name, fn in fns.items():
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)
  return {name: (statistics.median(t), t) for name, t in times.items()}


def memory(compiled) -> dict:
  """XLA's memory figures of a compiled program (bytes; per device), or {} if unknown."""
  m = compiled.memory_analysis()
  if m is None:
    return {}
  out = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in ("temp", "argument", "output")}
  out["total"] = out["temp"] + out["argument"] + out["output"] - int(m.alias_size_in_bytes)
  return out


def table(headers, rows) -> str:
  cells = [list(map(str, headers))] + [[str(c) for c in row] for row in rows]
  widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
  lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
  return "\n".join([lines[0], "  ".join("-" * w for w in widths)] + lines[1:])


def mib(d, key):
  return f"{d[key] / MiB:.1f}" if key in d else "n/a"


# --------------------------------------------------------------------------------------------
# 1. The MoE layer: masked vs scatter dispatch.


def bench_moe(args) -> list:
  rows, out = [], []
  for tokens, group, experts, cf, d_model in MOE_SETTINGS_QUICK if args.quick else MOE_SETTINGS:
    length = min(tokens, 512)
    x = jax.random.normal(jax.random.key(1), (tokens // length, length, d_model), jnp.float32)
    result = {
      "tokens": tokens,
      "max_group_size": group,
      "experts": experts,
      "capacity_factor": cf,
      "d_model": d_model,
      "d_ff": 4 * d_model,
    }
    compiled = {}
    for router in ("tokens_choose_masked", "tokens_choose_scatter"):
      config = MoeConfig(
        num_experts=experts, router_type=router, max_group_size=group, train_capacity_factor=cf
      )
      layer = MoeLayer(config, d_ff=4 * d_model)
      params = nn.unbox(jax.jit(layer.init)(jax.random.key(0), x))["params"]

      def loss(params, x, layer=layer):
        y = layer.apply({"params": params}, x, enable_dropout=True)
        return jnp.sum(y * y)

      fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(params, x).compile()
      compiled[router] = lambda fn=fn, params=params, x=x: jax.block_until_ready(fn(params, x))
      result[router] = {"memory_bytes": memory(fn)}
    layout = group_layout(x.shape[0], length, config, train=True)
    result.update(tokens_per_group=layout.tokens_per_group, capacity=layout.expert_capacity)
    for router, (median, times) in time_interleaved(compiled, args.reps, args.warmup).items():
      result[router].update(ms=median * 1e3, times_s=times)
    masked, scatter = result["tokens_choose_masked"], result["tokens_choose_scatter"]
    result["scatter_over_masked_time"] = scatter["ms"] / masked["ms"]
    mm, sm = masked["memory_bytes"], scatter["memory_bytes"]
    if mm and sm:
      result["scatter_over_masked_temp_memory"] = sm["temp"] / mm["temp"]
      result["scatter_over_masked_total_memory"] = sm["total"] / mm["total"]
    out.append(result)
    rows.append(
      [
        tokens,
        layout.tokens_per_group,
        experts,
        cf,
        d_model,
        layout.expert_capacity,
        f"{masked['ms']:.1f}",
        f"{scatter['ms']:.1f}",
        f"{result['scatter_over_masked_time']:.2f}",
        mib(mm, "temp"),
        mib(sm, "temp"),
        mib(mm, "total"),
        mib(sm, "total"),
        f"{result.get('scatter_over_masked_total_memory', float('nan')):.2f}",
      ]
    )
  print("\n## MoE layer forward + backward: masked (one-hot einsum) vs scatter dispatch\n")
  print(
    table(
      [
        "tokens",
        "per group",
        "E",
        "cf",
        "d_model",
        "capacity",
        "masked ms",
        "scatter ms",
        "time s/m",
        "masked temp MiB",
        "scatter temp MiB",
        "masked total MiB",
        "scatter total MiB",
        "total s/m",
      ],
      rows,
    )
  )
  print(
    "(s/m = scatter / masked; per group = tokens per routing group; MiB of the compiled "
    "program: temp = intermediates, total = arguments + outputs + temp)"
  )
  return out


# --------------------------------------------------------------------------------------------
# 2. Train-step throughput, 1 device vs a mesh.


def synthetic_batch(config, batch_size, rng) -> dict:
  d, vocab = config.data, config.model.vocab_size
  targets = rng.integers(2, vocab, (batch_size, d.targets_length), dtype=np.int32)
  return {
    "encoder_input_tokens": rng.integers(2, vocab, (batch_size, d.inputs_length), dtype=np.int32),
    "decoder_target_tokens": targets,
    "decoder_input_tokens": np.pad(targets[:, :-1], ((0, 0), (1, 0))),
    "decoder_loss_weights": np.ones_like(targets, np.float32),
  }


def compile_train_step(config, devices, params, opt_state, batch):
  """pretrain.py's train step (switchjax.training) compiled for config.mesh over `devices`,
  with the state and batch placed on that mesh."""
  plan = plan_run(config, devices)
  layout = state_layout(plan.config, plan.mesh)
  compiled = lower_train_step(layout, plan.config).compile()
  args = (
    jax.device_put(params, layout.param_shardings, may_alias=False),  # donated
    jax.device_put(opt_state, layout.opt_state_shardings, may_alias=False),
    device_scalar(0, plan.mesh),
    jax.device_put(batch, sharding.batch_sharding(plan.mesh)),
  )
  return compiled, args, plan


def init_model(config):
  """Boxed (logically partitioned) parameters of the config's model, seed train.seed."""
  return init_params(SwitchTransformer(config.model), jax.random.key(config.train.seed))


def bench_train(args, config) -> dict:
  devices = jax.devices()
  meshes = {"1 device": (1, 1, 1)}
  if args.mesh:
    meshes["mesh " + "x".join(map(str, args.mesh))] = args.mesh
  need = max(math.prod(m) for m in meshes.values())
  if len(devices) < need:
    raise ValueError(f"--mesh {args.mesh} needs {need} devices, {len(devices)} available.")
  batch = synthetic_batch(config, config.train.batch_size, np.random.default_rng(0))
  tokens = config.train.batch_size * (config.data.inputs_length + config.data.targets_length)
  flops = train_flops_per_example(config) * config.train.batch_size
  params = jax.jit(lambda: nn.unbox(init_model(config)))()
  axes = nn.get_partition_spec(jax.eval_shape(lambda: init_model(config)))
  opt_state = jax.jit(make_optimizer(config.train, axes).init)(params)
  runs, fns, out = (
    {},
    {},
    {
      "config": config.name,
      "batch_size": config.train.batch_size,
      "inputs_length": config.data.inputs_length,
      "targets_length": config.data.targets_length,
      "tokens_per_step": tokens,
      "flops_per_step": flops,
    },
  )
  for name, shape in meshes.items():
    mesh_config = dataclasses.replace(config, mesh=MeshConfig(*shape))
    step, step_args, plan = compile_train_step(
      mesh_config, devices[: math.prod(shape)], params, opt_state, batch
    )
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
  rows = []
  for name, (median, times) in time_interleaved(fns, args.reps, args.warmup).items():
    r = runs[name]
    r.update(
      ms_per_step=median * 1e3,
      tokens_per_s=tokens / median,
      model_tflops_per_s=flops / median / 1e12,
      model_tflops_per_s_per_device=flops / median / 1e12 / r["devices"],
      times_s=times,
    )
    rows.append(
      [
        name,
        r["devices"],
        r["num_microbatches"],
        f"{r['ms_per_step']:.1f}",
        f"{r['tokens_per_s']:,.0f}",
        f"{r['model_tflops_per_s']:.4f}",
        mib(r["memory_bytes"], "temp"),
      ]
    )
  out["runs"] = runs
  print(
    f"\n## Train step: --config {config.name}, batch {config.train.batch_size} x "
    f"({config.data.inputs_length} + {config.data.targets_length}) tokens, "
    f"{flops / 1e9:.2f} model GFLOP per step\n"
  )
  print(
    table(
      [
        "setup",
        "devices",
        "microbatches",
        "ms/step",
        "tokens/s",
        "model TFLOP/s",
        "temp MiB/device",
      ],
      rows,
    )
  )
  if args.mesh:
    name = list(meshes)[1]
    out["mesh_over_1_device_time"] = runs[name]["ms_per_step"] / runs["1 device"]["ms_per_step"]
    print(
      f"{name} / 1 device step time: {out['mesh_over_1_device_time']:.2f} "
      "(emulated CPU devices share the cores: this is partitioning overhead, not speed-up)"
    )
  return out


# --------------------------------------------------------------------------------------------
# 3. Generation with and without the KV cache.


def bench_generate(args, config) -> dict:
  batch, length, new = (2, 16, 8) if args.quick else (8, config.data.inputs_length, 64)
  model = SwitchTransformer(config.model)
  params = jax.jit(lambda: nn.unbox(init_model(config)))()
  inputs = np.random.default_rng(0).integers(
    2, config.model.vocab_size, (batch, length), dtype=np.int32
  )
  fns = {}
  for cached in (True, False):
    # eos_id=-1: no row ever finishes, so every call decodes exactly `new` tokens per row.
    fns["cached" if cached else "uncached"] = lambda cached=cached: jax.block_until_ready(
      generate(model, params, inputs, new, eos_id=-1, use_cache=cached)
    )
  for fn in fns.values():
    fn()  # compiles
  out = {"config": config.name, "batch_size": batch, "input_length": length, "new_tokens": new}
  rows = []
  for name, (median, times) in time_interleaved(fns, args.reps, args.warmup).items():
    out[name] = {"ms": median * 1e3, "tokens_per_s": batch * new / median, "times_s": times}
    rows.append([name, f"{median * 1e3:.1f}", f"{batch * new / median:,.0f}"])
  out["cache_speedup"] = out["uncached"]["ms"] / out["cached"]["ms"]
  print(
    f"\n## Greedy generation: --config {config.name} (random weights), batch {batch}, "
    f"{length} input tokens, {new} new tokens per row\n"
  )
  print(table(["KV cache", "ms/call", "new tokens/s"], rows))
  print(f"uncached / cached time (the cache's speed-up): {out['cache_speedup']:.2f}")
  return out


# --------------------------------------------------------------------------------------------


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  args = parse_args(argv)
  reexec_with_xla_flags(args, argv)
  try:
    config = load_config(args.config, args.set)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  env = {
    "jax": jax.__version__,
    "jaxlib": importlib.metadata.version("jaxlib"),
    "flax": flax.__version__,
    "python": platform.python_version(),
    "backend": jax.default_backend(),
    "device_kind": jax.devices()[0].device_kind,
    "device_count": jax.device_count(),
    "cpu_count": os.cpu_count(),
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    "reps": args.reps,
    "warmup": args.warmup,
    "quick": args.quick,
    "command": " ".join(["scripts/benchmark.py"] + argv),
  }
  print(
    f"switchjax benchmark: jax {env['jax']} (jaxlib {env['jaxlib']}), flax {env['flax']}, "
    f"{env['device_count']} x {env['device_kind']} ({env['backend']}), "
    f"{env['cpu_count']} CPU cores, XLA_FLAGS={env['xla_flags']!r}"
  )
  print(
    f"Times: median of {args.reps} interleaved repetitions after {args.warmup} warm-up "
    "calls, compilation excluded. Compare the ratios, not absolute times."
  )
  results = {"env": env}
  try:
    if "moe" in args.sections:
      results["moe"] = bench_moe(args)
    if "train" in args.sections:
      results["train"] = bench_train(args, config)
    if "generate" in args.sections:
      results["generate"] = bench_generate(args, config)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=1)
    print(f"\nWrote {args.json}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
