"""Speed and memory of switchjax, reported as ratios measured within one run.

  python scripts/benchmark.py                      # every section (long on 2 CPU cores)
  python scripts/benchmark.py moe vs_hf --mesh none --json out.json   # README's table
  python scripts/benchmark.py train --set model.moe.router_type=tokens_choose_scatter --mesh 1,8,1
  python scripts/benchmark.py --quick --json out.json   # the smoke test

--quick shrinks everything (the tiny preset, small MoE layers, 3 repetitions) and compiles with
XLA's CPU backend at optimisation level 0, as the tests do: it checks that the benchmark runs,
its figures mean little. --json PATH writes every figure, the raw per-call times and the
machine (CPU model, cores, versions, XLA flags, the measured matmul peak).

Sections:
  moe       MoeLayer forward + backward (jit, float32, 1 device) on B x L x d_model (8 x 512 x
            768, d_ff 3072) against a dense MlpBlock of the same d_ff, over expert counts E
            (8, 32, 128): one-hot (tokens_choose_masked), scatter (tokens_choose_scatter) and
            dropless (tokens_choose_dropless, no capacity) routers, and flaxformer's MoeLayer
            when its source is found (--flaxformer); a larger batch shows the cost per token
            when more tokens share the experts' weights. Memory is XLA's compiled-program
            figure (`memory_analysis()`).
  train     The jitted, sharded train step (`switchjax.training`, Adafactor, as
            pretrain.py builds it) of --config (with --set overrides) on synthetic batches of
            the config's shapes (data loading excluded): ms/step, tokens/s (inputs + targets),
            model TFLOP/s (`train_flops_per_example`, all devices together), MFU against the
            float32 matmul peak measured at the start of the run, and the compiled step's
            temporary memory per device, on 1 device and on the --mesh (data, expert, model)
            mesh; microbatches as pretrain.py picks them. Default --config small.
  generate  `switchjax.generate` (greedy) of a randomly initialised --config model with and
            without the KV cache: new tokens/s; EOS is disabled so every row decodes every step.
  vs_hf     The same random transformers SwitchTransformersForConditionalGeneration converted
            by `switchjax.hf.from_hf` (a `small`-sized 4+4-layer d_model 128 model and a
            6+6-layer d_model 512 one, E = 8), when torch and transformers are installed:
            greedy generation (same tokens checked) and an AdamW train step on the same loss,
            tokens/s and MFU of both.

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

Huge pages: run as a script, it restarts once with GLIBC_TUNABLES=glibc.malloc.hugetlb=1
(`switchjax.huge_pages`; both sides of vs_hf run under it); set glibc.malloc.hugetlb=0 to
measure without.
"""

import argparse
import dataclasses
import importlib.metadata
import json
import math
import os
import pathlib
import platform
import statistics
import sys
import tarfile
import tempfile
import time

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from switchjax import huge_pages, losses, pod, sharding
from switchjax.config import Config, DataConfig, MeshConfig, MoeConfig, load_config
from switchjax.decoding import generate
from switchjax.layers import MlpBlock
from switchjax.model import SwitchTransformer, init_params
from switchjax.moe import MoeLayer, group_layout
from switchjax.optimizers import make_optimizer
from switchjax.pod import format_table
from switchjax.training import lower_train_step, plan_run, state_layout, train_flops_per_example
from switchjax.training.state import device_scalar

SECTIONS = ("moe", "train", "generate", "vs_hf")
ROOT = pathlib.Path(__file__).resolve().parents[1]
# The MoE layer: (batch, length, d_model, d_ff, train capacity factor) and the sweep: per batch
# (None: the shape's), (experts, with flaxformer) timed together. Default MoeConfig
# otherwise (groups of <= 8192 tokens following the devices: one group here; top-1).
MOE_SHAPE = (8, 512, 768, 3072, 1.25)
MOE_SWEEP = {None: [(8, True), (32, True), (128, True)], 32: [(8, False), (128, False)]}
MOE_SHAPE_QUICK = (2, 64, 32, 128, 1.25)
MOE_SWEEP_QUICK = {None: [(4, True), (8, True)], 4: [(4, False)]}
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
  parser.add_argument(
    "--flaxformer",
    default=None,
    metavar="DIR",
    help="directory of flaxformer-*.tgz (and aqt-stub.tgz) for the moe section's reference "
    "column (default: ../shared/refs next to the repository; skipped when absent)",
  )
  parser.add_argument(
    "--hf_reps",
    type=int,
    default=None,
    help="timed repetitions of the vs_hf section (default 3; 2 with --quick)",
  )
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
  need = math.prod(args.mesh) if args.mesh and "train" in args.sections else 1
  extra = ("--xla_backend_optimization_level=0",) if args.quick else ()
  if need > 1 or extra:
    pod.reexec_with_devices(need, [os.path.abspath(__file__), *argv], extra)


# --------------------------------------------------------------------------------------------
# Timing and reporting.


def cpu_model() -> str:
  """The CPU's model name (Linux), or the platform's processor string."""
  try:
    with open("/proc/cpuinfo") as f:
      return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    return platform.processor()


def usable_cores() -> int:
  """The cores this process may run on (its CPU affinity, e.g. under `taskset -c 0`), which
  os.cpu_count() does not see; the machine's count where affinity is unknown."""
  try:
    return len(os.sched_getaffinity(0))
  except (AttributeError, OSError):
    return os.cpu_count() or 1


def optional_version(package: str) -> str | None:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return None


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


def warn_if_loaded(load: float, cores: int) -> bool:
  """Warns (and returns True) when other jobs were running as the benchmark started: under
  load PyTorch's threads slow down far more than XLA's, so the vs_hf ratios come out several
  times too favourable to switchjax (measured: 3.06x instead of 0.61x for a train step)."""
  if load < 0.5 * cores:
    return False
  print(
    f"warning: the load average is {load:.2f} on {cores} cores: other jobs are running. "
    "Ratios against transformers are not reliable under load; rerun on a quiet machine.",
    flush=True,
  )
  return True


def matmul_peak_tflops(n: int = 1024, reps: int = 7) -> float:
  """TFLOP/s of a jitted float32 [n, n] x [n, n] matmul, the best of `reps` calls: the peak
  that MFU (model FLOPs / s over this) is measured against in this run."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  matmul = jax.jit(jnp.matmul).lower(a, a).compile()
  jax.block_until_ready(matmul(a, a))
  best = math.inf
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(matmul(a, a))
    best = min(best, time.perf_counter() - start)
  return 2 * n**3 / best / 1e12


def memory(compiled) -> dict:
  """XLA's memory figures of a compiled program (bytes; per device), or {} if unknown."""
  m = compiled.memory_analysis()
  if m is None:
    return {}
  out = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in ("temp", "argument", "output")}
  out["total"] = out["temp"] + out["argument"] + out["output"] - int(m.alias_size_in_bytes)
  return out


def milliseconds(ms: float) -> str:
  """Three significant figures (or all the integer digits)."""
  return f"{ms:.0f}" if ms >= 100 else f"{ms:.3g}"


def mib(d, key):
  return f"{d[key] / MiB:.1f}" if key in d else "n/a"


# --------------------------------------------------------------------------------------------
# 1. The MoE layer against a dense MLP and flaxformer's MoeLayer, over expert counts.


def load_flaxformer(refs: str | None):
  """flaxformer's moe_layers, routing and dense modules from the source tarballs in `refs`
  (../shared/refs: flaxformer-*.tgz and the aqt-stub.tgz it imports), or (None, reason)."""
  refs = pathlib.Path(refs) if refs else ROOT.parent / "shared" / "refs"
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


def flaxformer_layer(flaxformer, config: MoeConfig, d_ff: int):
  """flaxformer's MoeLayer with `config`'s routing on one device (groups a multiple of E)."""
  moe_layers, ff_routing, ff_dense = flaxformer
  expert = ff_dense.MlpBlock(
    use_bias=False,
    intermediate_dim=d_ff,
    activations=("relu",),
    intermediate_dropout_rate=0.0,
    final_dropout_rate=0.0,
    dtype=jnp.float32,
  )
  router = ff_routing.TokensChooseMaskedRouter(
    router_weights=ff_routing.RouterWeights(use_bias=False, dtype=jnp.float32),
    num_selected_experts=config.num_selected_experts,
    jitter_noise=0.0,
    batch_prioritized_routing=False,
    dtype=jnp.float32,
    ignore_padding_tokens=False,
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


def compile_fwd_bwd(layer, x, params=None, **apply_kwargs):
  """(blocking call, compiled program) of d/d(params, x) sum(layer(x)^2)."""
  if params is None:
    kwargs = {k: v for k, v in apply_kwargs.items() if k != "rngs"}
    params = nn.unbox(jax.jit(lambda key: layer.init(key, x, **kwargs))(jax.random.key(0)))
    params = params["params"]

  def loss(params, x):
    return jnp.sum(layer.apply({"params": params}, x, **apply_kwargs) ** 2)

  fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(params, x).compile()
  return (lambda: jax.block_until_ready(fn(params, x))), fn


def bench_moe(args) -> list:
  """Per batch size, a dense MLP of the same d_ff and, for each expert count, switchjax's
  MoeLayer with the one-hot (masked), scatter and dropless routers and flaxformer's MoeLayer
  (masked, its one-device groups), forward + backward, all timed interleaved (so the ratios
  between expert counts are measured side by side too)."""
  flaxformer, where = load_flaxformer(args.flaxformer)
  batch, length, d_model, d_ff, cf = MOE_SHAPE_QUICK if args.quick else MOE_SHAPE
  routers = ("tokens_choose_masked", "tokens_choose_scatter", "tokens_choose_dropless")
  out = []
  for batch_size, sweep in (MOE_SWEEP_QUICK if args.quick else MOE_SWEEP).items():
    batch_size = batch_size or batch
    x = jax.random.normal(jax.random.key(1), (batch_size, length, d_model), jnp.float32)
    print(f"MoE layer: compiling batch {batch_size}, E in {[e for e, _ in sweep]}", flush=True)
    fns, compiled = {}, {}
    fns["dense"], compiled["dense"] = compile_fwd_bwd(MlpBlock(d_ff), x, enable_dropout=True)
    rows = []
    for experts, with_flaxformer in sweep:
      config = MoeConfig(num_experts=experts, train_capacity_factor=cf)
      layers = {r: MoeLayer(dataclasses.replace(config, router_type=r), d_ff=d_ff) for r in routers}
      params = nn.unbox(jax.jit(layers[routers[0]].init)(jax.random.key(0), x))["params"]
      for name, layer in layers.items():  # the routers share the parameters
        fns[(experts, name)], compiled[(experts, name)] = compile_fwd_bwd(
          layer, x, params=params, enable_dropout=True
        )
      if flaxformer and with_flaxformer:
        layer = flaxformer_layer(flaxformer, config, d_ff)
        fns[(experts, "flaxformer")], compiled[(experts, "flaxformer")] = compile_fwd_bwd(
          layer, x, enable_dropout=True, rngs={"dropout": jax.random.key(0)}
        )
      layout = group_layout(batch_size, length, config, train=True)
      rows.append(
        {
          "experts": experts,
          "batch": batch_size,
          "length": length,
          "tokens": batch_size * length,
          "d_model": d_model,
          "d_ff": d_ff,
          "capacity_factor": cf,
          "num_groups": layout.num_groups,
          "tokens_per_group": layout.tokens_per_group,
          "capacity": layout.expert_capacity,
        }
      )
    reps = args.reps if batch_size == batch else max(1, args.reps // 2)
    timed = time_interleaved(fns, reps, args.warmup)
    for row in rows:
      row["reps"] = reps
      for key, (median, times) in timed.items():
        if key == "dense" or key[0] == row["experts"]:
          name = key if key == "dense" else key[1]
          row[name] = {"ms": median * 1e3, "times_s": times, "memory_bytes": memory(compiled[key])}
    out.extend(_moe_ratios(rows))
  _print_moe(out, (d_model, d_ff, cf), where if flaxformer else "skipped, " + where)
  return out


def _moe_ratios(rows: list) -> list:
  """Adds each row's ratios: to the dense MLP, scatter / one-hot, to flaxformer, and the time
  per token relative to the first expert count of the same batch."""
  first = rows[0]
  for r in rows:
    dense, masked = r["dense"]["ms"], r["tokens_choose_masked"]
    for name in ("tokens_choose_masked", "tokens_choose_scatter", "tokens_choose_dropless"):
      r[f"{name}_over_dense"] = r[name]["ms"] / dense
      r[f"{name}_over_E{first['experts']}"] = r[name]["ms"] / first[name]["ms"]
    scatter = r["tokens_choose_scatter"]
    r["scatter_over_masked_time"] = scatter["ms"] / masked["ms"]
    if masked["memory_bytes"] and scatter["memory_bytes"]:
      r["scatter_over_masked_total_memory"] = (
        scatter["memory_bytes"]["total"] / masked["memory_bytes"]["total"]
      )
    if "flaxformer" in r:
      r["flaxformer_over_dense"] = r["flaxformer"]["ms"] / dense
      r["masked_over_flaxformer"] = masked["ms"] / r["flaxformer"]["ms"]
      r["dropless_over_flaxformer"] = r["tokens_choose_dropless"]["ms"] / r["flaxformer"]["ms"]
  return rows


def _print_moe(out: list, shape, flaxformer: str) -> None:
  d_model, d_ff, cf = shape
  rows = []

  def cell(r, name):  # "ms (x dense)"
    if name not in r:
      return "-"
    return f"{milliseconds(r[name]['ms'])} ({r[name]['ms'] / r['dense']['ms']:.2f}x)"

  for r in out:
    first_e = next(f["experts"] for f in out if f["batch"] == r["batch"])
    rows.append(
      [
        r["experts"],
        f"{r['batch']}x{r['length']}",
        f"{r['num_groups']}x{r['tokens_per_group']}",
        r["capacity"],
        milliseconds(r["dense"]["ms"]),
        cell(r, "tokens_choose_masked"),
        cell(r, "tokens_choose_scatter"),
        cell(r, "tokens_choose_dropless"),
        cell(r, "flaxformer"),
        f"{r['masked_over_flaxformer']:.2f}" if "masked_over_flaxformer" in r else "-",
        f"{r[f'tokens_choose_masked_over_E{first_e}']:.2f} (E={first_e})",
        mib(r["tokens_choose_masked"]["memory_bytes"], "temp"),
        mib(r["tokens_choose_dropless"]["memory_bytes"], "temp"),
      ]
    )
  print(
    f"\n## MoE layer forward + backward vs a dense MLP: d_model {d_model}, d_ff {d_ff}, "
    f"capacity factor {cf}, float32, 1 device\n"
  )
  print(
    format_table(
      [
        "E",
        "batch",
        "groups",
        "capacity",
        "dense ms",
        "one-hot ms (x dense)",
        "scatter ms",
        "dropless ms",
        "flaxformer ms",
        "one-hot/flaxformer",
        "one-hot per token",
        "one-hot temp MiB",
        "dropless temp MiB",
      ],
      rows,
    )
  )
  print(
    "(one-hot = moe.router_type tokens_choose_masked, flaxformer's masked routing; dense = "
    f"MlpBlock(d_ff); flaxformer: {flaxformer}; one-hot per token: the time relative to the "
    "first expert count of the same batch (timed interleaved with it); the larger batch, "
    "without flaxformer (which pads E=128 16x), shows the cost per token when more tokens "
    "share the experts' weights, with half the repetitions)"
  )


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
      mfu=flops / median / 1e12 / args.peak_tflops,
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
        f"{r['mfu']:.1%}",
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
    format_table(
      [
        "setup",
        "devices",
        "microbatches",
        "ms/step",
        "tokens/s",
        "model TFLOP/s",
        "MFU",
        "temp MiB/device",
      ],
      rows,
    )
  )
  print(f"(MFU: model TFLOP/s over the matmul peak of this run, {args.peak_tflops:.3f} TFLOP/s)")
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
  print(format_table(["KV cache", "ms/call", "new tokens/s"], rows))
  print(f"uncached / cached time (the cache's speed-up): {out['cache_speedup']:.2f}")
  return out


# --------------------------------------------------------------------------------------------
# 4. The same converted model in transformers: greedy generation and a train step.

# transformers' SwitchTransformersConfig fields of the compared models (HF mode: one routing
# group per sequence, expert_capacity 64), and their shapes: generation rows x input tokens
# (32 new tokens), train batch x (inputs + targets).
HF_COMMON = dict(
  expert_capacity=64,
  decoder_start_token_id=0,
  pad_token_id=0,
  eos_token_id=1,
  dropout_rate=0.0,
  router_jitter_noise=0.0,
)
HF_MODELS = {
  "small (4+4 layers, d_model 128)": (
    dict(vocab_size=2176, d_model=128, d_ff=512, num_heads=4, d_kv=32, num_layers=4),
    dict(experts=8, sparse=2, rows=8, inputs=128, new=32, batch=32, targets=29),
  ),
  "6+6 layers, d_model 512": (
    dict(vocab_size=32128, d_model=512, d_ff=2048, num_heads=8, d_kv=64, num_layers=6),
    dict(experts=8, sparse=3, rows=8, inputs=512, new=32, batch=8, targets=114),
  ),
}
HF_MODELS_QUICK = {
  "tiny (2+2 layers, d_model 32)": (
    dict(vocab_size=96, d_model=32, d_ff=64, num_heads=2, d_kv=16, num_layers=2),
    dict(experts=4, sparse=1, rows=2, inputs=16, new=8, batch=2, targets=8),
  ),
}


def hf_and_switchjax(fields: dict, shape: dict, directory: str):
  """A random transformers SwitchTransformersForConditionalGeneration (seed 0) saved to
  `directory`, reloaded, and converted by switchjax.hf.from_hf: (hf model, model, params)."""
  import torch
  import transformers

  from switchjax.hf import from_hf

  config = transformers.SwitchTransformersConfig(
    **fields,
    **HF_COMMON,
    num_decoder_layers=fields["num_layers"],
    num_experts=shape["experts"],
    num_sparse_encoder_layers=shape["sparse"],
    num_sparse_decoder_layers=shape["sparse"],
  )
  torch.manual_seed(0)
  transformers.SwitchTransformersForConditionalGeneration(config).save_pretrained(directory)
  hf = transformers.SwitchTransformersForConditionalGeneration.from_pretrained(directory)
  model, params = from_hf(directory)
  return hf.eval(), model, jax.device_put(params)


def hf_generation(hf, model, params, shape, rng, reps, warmup) -> dict:
  """Greedy generation of both: the same tokens (EOS on), then the time of exactly `new`
  tokens per row (transformers min_new_tokens, switchjax with EOS disabled), interleaved."""
  import torch

  rows, new = shape["rows"], shape["new"]
  ids = rng.integers(2, model.config.vocab_size, (rows, shape["inputs"])).astype(np.int32)
  torch_ids = torch.tensor(ids, dtype=torch.long)

  def run_hf(**kwargs):
    with torch.no_grad():
      out = hf.generate(
        input_ids=torch_ids,
        attention_mask=torch.ones_like(torch_ids),
        do_sample=False,
        max_new_tokens=new,
        **kwargs,
      )
    return out.numpy()[:, 1:]  # without the start token

  expected = np.zeros((rows, new), np.int32)
  reference = run_hf()
  expected[:, : reference.shape[1]] = reference
  ours = np.asarray(generate(model, params, ids, new))
  after_eos = lambda t: np.cumsum(np.cumsum(t == 1, axis=1), axis=1) > 1
  expected = np.where(after_eos(expected), 0, expected)
  fns = {
    "transformers": lambda: run_hf(min_new_tokens=new),
    "switchjax": lambda: jax.block_until_ready(generate(model, params, ids, new, eos_id=-1)),
  }
  out = {"rows": rows, "input_tokens": shape["inputs"], "new_tokens": new}
  out["same_tokens"] = bool((ours == expected).all())
  out["token_agreement"] = float((ours == expected).mean())
  for name, (median, times) in time_interleaved(fns, reps, warmup).items():
    out[name] = {"s": median, "tokens_per_s": rows * new / median, "times_s": times}
  out["speedup"] = out["transformers"]["s"] / out["switchjax"]["s"]
  return out


def model_flops_per_step(model_config, batch: int, inputs: int, targets: int) -> float:
  """`train_flops_per_example` of a model at these lengths, times the batch."""
  data = DataConfig(inputs_length=inputs, targets_length=targets)
  return train_flops_per_example(Config(model=model_config, data=data)) * batch


def adamw_step(model, params, inputs, targets, coefficients):
  """switchjax's side of the comparison: a blocking call of one jitted AdamW step (lr 1e-4,
  weight decay 0.01; parameters and optimizer state donated) on the loss transformers computes
  (cross-entropy + z_coef * router z-loss + aux_coef * load balancing), returning the loss."""
  import optax

  decoder_inputs = np.pad(targets[:, :-1], ((0, 0), (1, 0)))
  z_coef, aux_coef = coefficients

  def loss_fn(params):
    logits, state = model.apply(
      {"params": params}, inputs, decoder_inputs, enable_dropout=True, mutable=["intermediates"]
    )
    total, _, count = losses.cross_entropy_with_z_loss(logits, targets, jnp.ones(targets.shape))
    loss = total / count
    for stack in ("encoder", "decoder"):
      z, aux = losses.hf_router_losses(state["intermediates"], stack)
      loss = loss + z_coef * z + aux_coef * aux
    return loss

  tx = optax.adamw(1e-4, weight_decay=0.01)

  def update(state):
    params, opt_state = state
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  params = jax.tree.map(jnp.array, params)  # a copy: the step donates it
  holder = {"state": (params, tx.init(params))}
  step = jax.jit(update, donate_argnums=0).lower(holder["state"]).compile()

  def run():
    holder["state"], loss = step(holder["state"])
    return float(jax.block_until_ready(loss))

  return run


def hf_train_step(hf, model, params, shape, rng, reps, warmup, peak_tflops) -> dict:
  """One AdamW step (lr 1e-4, weight decay 0.01) of both on the same batch: cross-entropy plus
  transformers' router z- and load-balancing losses (output_router_logits=True, coefficients
  of its config), forward + backward + update; the first-step losses are reported too."""
  import torch

  batch, vocab = shape["batch"], model.config.vocab_size
  inputs = rng.integers(2, vocab, (batch, shape["inputs"])).astype(np.int32)
  targets = rng.integers(2, vocab, (batch, shape["targets"])).astype(np.int32)
  coefficients = (hf.config.router_z_loss_coef, hf.config.router_aux_loss_coef)

  hf.train()
  optimizer = torch.optim.AdamW(hf.parameters(), lr=1e-4, weight_decay=0.01)
  torch_batch = dict(
    input_ids=torch.tensor(inputs, dtype=torch.long),
    attention_mask=torch.ones(inputs.shape, dtype=torch.long),
    labels=torch.tensor(targets, dtype=torch.long),
    output_router_logits=True,
  )

  def hf_step():
    optimizer.zero_grad(set_to_none=True)
    loss = hf(**torch_batch).loss
    loss.backward()
    optimizer.step()
    return loss.item()

  fns = {
    "transformers": hf_step,
    "switchjax": adamw_step(model, params, inputs, targets, coefficients),
  }
  out = {"batch": batch, "input_tokens": shape["inputs"], "target_tokens": shape["targets"]}
  out["first_loss"] = {name: fn() for name, fn in fns.items()}
  tokens = batch * (shape["inputs"] + shape["targets"])
  out["flops_per_step"] = flops = model_flops_per_step(
    model.config, batch, shape["inputs"], shape["targets"]
  )
  for name, (median, times) in time_interleaved(fns, reps, warmup).items():
    out[name] = {"s": median, "tokens_per_s": tokens / median, "times_s": times}
    out[name]["mfu"] = flops / median / 1e12 / peak_tflops
  out["speedup"] = out["transformers"]["s"] / out["switchjax"]["s"]
  hf.eval()
  return out


def bench_vs_hf(args) -> dict:
  try:
    import optax  # noqa: F401
    import torch
    import transformers
  except ImportError as e:
    print(f"\n## vs transformers: skipped ({e}; pip install torch==2.13.0 transformers)")
    return {"skipped": str(e)}
  transformers.utils.logging.set_verbosity_error()
  transformers.utils.logging.disable_progress_bar()
  out, rng = {}, np.random.default_rng(0)
  reps = args.hf_reps or (2 if args.quick else 3)
  for name, (fields, shape) in (HF_MODELS_QUICK if args.quick else HF_MODELS).items():
    print(f"vs transformers: {name}: converting, then generation and train step", flush=True)
    with tempfile.TemporaryDirectory() as directory:
      hf, model, params = hf_and_switchjax(fields, shape, directory)
    out[name] = {
      "generate": hf_generation(hf, model, params, shape, rng, reps, args.warmup),
      "train_step": hf_train_step(
        hf, model, params, shape, rng, reps, args.warmup, args.peak_tflops
      ),
    }
  rows = []
  for name, r in out.items():
    g, t = r["generate"], r["train_step"]
    rows.append(
      [
        name,
        f"{g['rows']}x{g['input_tokens']}",
        f"{g['transformers']['tokens_per_s']:,.1f}",
        f"{g['switchjax']['tokens_per_s']:,.1f}",
        f"{g['speedup']:.2f}",
        "yes" if g["same_tokens"] else f"{g['token_agreement']:.3f}",
        f"{t['batch']}x({t['input_tokens']}+{t['target_tokens']})",
        f"{t['transformers']['s'] * 1e3:,.0f}",
        f"{t['switchjax']['s'] * 1e3:,.0f}",
        f"{t['speedup']:.2f}",
        f"{t['transformers']['mfu']:.1%} / {t['switchjax']['mfu']:.1%}",
        f"{t['first_loss']['transformers']:.4f} / {t['first_loss']['switchjax']:.4f}",
      ]
    )
  print(
    f"\n## vs transformers {transformers.__version__} (torch {torch.__version__}, "
    f"{torch.get_num_threads()} threads): the same random "
    "SwitchTransformersForConditionalGeneration, converted by switchjax.hf.from_hf\n"
  )
  print(
    format_table(
      [
        "model",
        "generate rows",
        "HF tokens/s",
        "switchjax tokens/s",
        "generate speed-up",
        "same tokens",
        "train batch",
        "HF ms/step",
        "switchjax ms/step",
        "train speed-up",
        "MFU HF / switchjax",
        "first loss HF / switchjax",
      ],
      rows,
    )
  )
  print(
    "(greedy: transformers generate(do_sample=False, min_new_tokens=max_new_tokens) under "
    "torch.no_grad vs switchjax.generate with EOS disabled, both exactly the new tokens per "
    "row; 'same tokens' compares both with EOS on. Train step: cross-entropy + router losses, "
    "AdamW, forward + backward + update, parameters donated; speed-ups: HF time over "
    f"switchjax's. Median of {reps} interleaved calls.)"
  )
  return out


# --------------------------------------------------------------------------------------------


def main(argv=None) -> int:
  arguments = sys.argv[1:] if argv is None else list(argv)
  args = parse_args(arguments)
  reexec_with_xla_flags(args, arguments)  # with huge pages when it restarts
  huge_pages.reexec_script(argv)  # both sides of vs_hf share the setting
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
    "usable_cores": usable_cores(),
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
    "transparent_huge_pages": huge_pages.thp_mode(),
    "reps": args.reps,
    "warmup": args.warmup,
    "quick": args.quick,
    "command": " ".join(["scripts/benchmark.py"] + arguments),
    "machine": platform.machine(),
    "cpu_model": cpu_model(),
    "torch": optional_version("torch"),
    "transformers": optional_version("transformers"),
    "load_average_1min": os.getloadavg()[0],
  }
  args.peak_tflops = env["matmul_peak_tflops"] = matmul_peak_tflops(256 if args.quick else 1024)
  print(
    f"switchjax benchmark: jax {env['jax']} (jaxlib {env['jaxlib']}), flax {env['flax']}, "
    f"{env['device_count']} x {env['device_kind']} ({env['backend']}), "
    f"{env['cpu_count']} CPU cores ({env['usable_cores']} usable), XLA_FLAGS={env['xla_flags']!r}, "
    f"GLIBC_TUNABLES={env['glibc_tunables']!r} (huge pages: {env['transparent_huge_pages']}); "
    "float32 matmul peak "
    f"{args.peak_tflops:.3f} TFLOP/s (the MFU denominator)"
  )
  warn_if_loaded(env["load_average_1min"], env["cpu_count"])
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
    if "vs_hf" in args.sections:
      results["vs_hf"] = bench_vs_hf(args)
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
