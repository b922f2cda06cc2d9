"""A pod on one machine: the real train step compiled ahead of time for an emulated mesh.

`simulate(config, (data, expert, model))` plans the run on that many devices (they may be
emulated CPU devices: XLA_FLAGS=--xla_force_host_platform_device_count=N before jax starts),
lowers `switchjax.training`'s train step with abstract inputs (nothing is allocated) and
compiles it, then reads what the compiled program needs per device (XLA's memory analysis)
and which collectives it runs. Expert parallelism shows as all-to-alls (a dispatch and a
combine per sparse layer, forward and backward); an all-gather of token-sized activations, or
XLA's "Involuntary full rematerialization" warning, means the batch or the routing groups did
not split over the devices.

CPU compilation converts bfloat16 collectives to float32, so on TPUs and GPUs the all-to-all
traffic of a bfloat16 model is half of what these programs move; memory figures are CPU's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import sys
import tempfile
import time
from typing import Any

import jax

from switchjax import huge_pages, topologies
from switchjax.config import Config, apply_overrides, estimate_parameters
from switchjax.moe import group_layout
from switchjax.topologies import TpuSlice
from switchjax.training import lower_eval_step, lower_train_step, plan_run, state_layout
from switchjax.training.plan import expert_counts

COLLECTIVES = ("all-to-all", "all-gather", "all-reduce", "reduce-scatter", "collective-permute")
GiB = 2**30


@dataclasses.dataclass
class PodReport:
  """What one compiled train step (and its eval step) needs.

  Attributes:
    config: the preset's name.
    mesh: (data, expert, model) sizes; devices their product.
    platform: 'cpu (emulated)' or the TPU slice ('v5p-32').
    device_kind: the devices' kind ('cpu', 'TPU v5').
    hbm_bytes: memory per device to fit in (0: unknown, emulated CPU devices).
    batch_size, num_microbatches: the global batch and its microbatches per step.
    settings: the fields that shape memory (remat, scan_layers, dispatch, fsdp).
    compile_seconds: lowering plus compilation of the train step.
    argument_bytes, output_bytes, temp_bytes, alias_bytes: XLA's per-device memory figures
      of the train step (arguments: parameters, optimizer state and the batch shard; temp:
      activations).
    eval_total_bytes, eval_compile_seconds: the eval step's peak memory and compile time (0
      when not compiled).
    flops, bytes_accessed: XLA's cost analysis of the train step, per device.
    collectives: instructions of each kind in the compiled train step.
    all_gathers: result shapes of the all-gathers; token_sized_all_gathers: those with
      dimensions of a routing group, a sequence or the batch and more values per token than
      'model' shards (activations, not parameters or a cross-shard argmax).
    replications: XLA's "Involuntary full rematerialization" warnings while compiling.
  """

  config: str
  mesh: tuple[int, int, int]
  platform: str
  device_kind: str
  hbm_bytes: int
  batch_size: int
  num_microbatches: int
  settings: dict[str, Any]
  compile_seconds: float
  argument_bytes: int
  output_bytes: int
  temp_bytes: int
  alias_bytes: int
  eval_total_bytes: int
  eval_compile_seconds: float
  flops: float
  bytes_accessed: float
  collectives: dict[str, int]
  all_gathers: list[str]
  token_sized_all_gathers: list[str]
  replications: int

  @property
  def devices(self) -> int:
    return math.prod(self.mesh)

  @property
  def total_bytes(self) -> int:
    """Peak memory per device: arguments + outputs + temporaries, minus donated buffers."""
    return self.argument_bytes + self.output_bytes + self.temp_bytes - self.alias_bytes

  @property
  def fits(self) -> bool | None:
    """Whether the train and eval steps fit the device's memory (None: unknown)."""
    if not self.hbm_bytes:
      return None
    return max(self.total_bytes, self.eval_total_bytes) <= self.hbm_bytes

  def row(self) -> list[str]:
    fits = {None: "-", True: "yes", False: "NO"}[self.fits]
    return [
      self.platform,
      "x".join(map(str, self.mesh)),
      str(self.batch_size),
      str(self.num_microbatches),
      str(self.collectives["all-to-all"]),
      str(self.collectives["all-gather"]),
      str(len(self.token_sized_all_gathers)),
      f"{self.argument_bytes / GiB:.2f}",
      f"{self.temp_bytes / GiB:.2f}",
      f"{self.total_bytes / GiB:.2f}",
      f"{self.hbm_bytes / GiB:.0f}" if self.hbm_bytes else "-",
      fits,
      f"{self.compile_seconds:.0f}",
    ]


HEADERS = [
  "devices",
  "mesh (DxExM)",
  "global batch",
  "microbatches",
  "all-to-all",
  "all-gather",
  "token-sized all-gathers",
  "arguments GiB/device",
  "temp GiB/device",
  "total GiB/device",
  "HBM GiB",
  "fits",
  "compile s",
]


def format_table(headers: list[str], rows: list[list[str]]) -> str:
  """A plain-text table with right-aligned columns."""
  cells = [list(map(str, headers))] + [[str(c) for c in row] for row in rows]
  widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
  lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
  return "\n".join([lines[0], "  ".join("-" * w for w in widths)] + lines[1:])


def default_mesh(config: Config, devices: int) -> tuple[int, int, int]:
  """A (data, expert, model) mesh of `devices`: the experts over as many devices as their
  count shares with it, the batch over the rest, and what the batch cannot split over (more
  devices than sequences) over 'model'."""
  batch = config.train.batch_size  # split over data x expert: each shard whole sequences
  expert = math.gcd(math.gcd(*expert_counts(config.model)), math.gcd(devices, batch))
  data = math.gcd(devices // expert, batch // expert)
  return data, expert, devices // expert // data


def simulate(
  config: Config,
  mesh: tuple[int, int, int],
  tpu: TpuSlice | None = None,
  eval_step: bool = True,
) -> PodReport:
  """Compiles `config`'s train step (and eval step) for a (data, expert, model) mesh: of the
  described TPU slice's devices, or else of the first (emulated) CPU devices."""
  need = math.prod(mesh)
  devices = topologies.slice_devices(tpu) if tpu else jax.devices()
  if len(devices) < need or (tpu and len(devices) != need):
    where = f"the {tpu.name} slice has" if tpu else "exist"
    fix = (
      "choose a mesh whose sizes multiply to its chips"
      if tpu
      else f"on a CPU emulate them with XLA_FLAGS=--xla_force_host_platform_device_count={need} "
      "(set before jax starts)"
    )
    raise ValueError(f"mesh {mesh} needs {need} devices but {where} {len(devices)}; {fix}.")
  sizes = dict(zip(("data", "expert", "model"), mesh))
  config = dataclasses.replace(config, mesh=dataclasses.replace(config.mesh, **sizes))
  plan = plan_run(config, devices[:need])
  layout = state_layout(plan.config, plan.mesh)
  train = _compile(lower_train_step, layout, plan.config)
  evaluate = _compile(lower_eval_step, layout, plan.config) if eval_step else None
  gathers = all_gather_shapes(train.hlo)
  sizes = token_sizes(plan.config, plan.batch_shards)
  model = plan.config.model
  return PodReport(
    config=plan.config.name,
    mesh=tuple(mesh),
    platform=tpu.name if tpu else "cpu (emulated)",
    device_kind=devices[0].device_kind,
    hbm_bytes=tpu.hbm_bytes if tpu else 0,
    batch_size=plan.config.train.batch_size,
    num_microbatches=plan.config.train.num_microbatches,
    settings={
      "remat": model.remat,
      "scan_layers": model.scan_layers,
      "dispatch": model.moe.dispatch,
      "fsdp": plan.config.mesh.fsdp,
    },
    compile_seconds=train.seconds,
    argument_bytes=train.memory.argument_size_in_bytes,
    output_bytes=train.memory.output_size_in_bytes,
    temp_bytes=train.memory.temp_size_in_bytes,
    alias_bytes=train.memory.alias_size_in_bytes,
    eval_total_bytes=evaluate.total_bytes if evaluate else 0,
    eval_compile_seconds=evaluate.seconds if evaluate else 0.0,
    flops=train.cost.get("flops", 0.0),
    bytes_accessed=train.cost.get("bytes accessed", 0.0),
    collectives=count_collectives(train.hlo),
    all_gathers=gathers,
    token_sized_all_gathers=[g for g in gathers if _per_token(g, sizes) > mesh[2]],
    replications=train.log.count("Involuntary full rematerialization"),
  )


@dataclasses.dataclass
class _Compiled:
  """One compiled program's figures."""

  seconds: float
  memory: Any
  cost: dict[str, float]
  hlo: str
  log: str

  @property
  def total_bytes(self) -> int:
    m = self.memory
    return (
      m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
    ) - m.alias_size_in_bytes


class DoesNotFitError(ValueError):
  """The TPU compiler refused a program whose memory exceeds the chip's HBM."""


def _compile(lower, layout, config) -> _Compiled:
  start = time.perf_counter()
  with _stderr_to_string() as log:
    try:
      compiled = lower(layout, config).compile()
    except jax.errors.JaxRuntimeError as e:
      if "RESOURCE_EXHAUSTED" not in str(e):
        raise
      # XLA's TPU compiler stops at a memory plan beyond the chip: the step does not fit.
      raise DoesNotFitError(str(e).split("RESOURCE_EXHAUSTED:", 1)[1].strip()) from None
  seconds = time.perf_counter() - start
  cost = compiled.cost_analysis()
  cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
  return _Compiled(seconds, compiled.memory_analysis(), dict(cost), compiled.as_text(), log.text)


def count_collectives(hlo: str) -> dict[str, int]:
  """Instructions of each collective kind in an HLO module's text (async starts count once)."""
  return {op: len(re.findall(rf"\s{op}(?:-start)?\(", hlo)) for op in COLLECTIVES}


def all_gather_shapes(hlo: str) -> list[str]:
  """The result shapes ('f32[32,4096,768]') of the all-gathers in an HLO module's text."""
  shapes = []
  for line in hlo.splitlines():
    found = re.search(r"=\s*(.*?)\sall-gather(?:-start)?\(", line)
    if found:  # the result type, between '=' and the op
      shapes += re.findall(r"[a-z]+\d*\[[\d,]*\]", found.group(1))
  return shapes


def token_sizes(config: Config, batch_shards: int) -> set[int]:
  """Dimensions that only activations have: the sequence lengths, the (micro)batch and the
  routing groups' sizes and counts (global and per device)."""
  micro = config.train.batch_size // config.train.num_microbatches
  sizes = {micro, micro // batch_shards}
  for stack, length in (
    ("encoder", config.data.inputs_length),
    ("decoder", config.data.targets_length),
  ):
    layout = group_layout(micro, length, config.model.moe_for(stack), True, batch_shards)
    sizes |= {length, layout.tokens_per_group, layout.num_groups, micro * length}
  return {s for s in sizes if s > 1}


def _per_token(shape: str, sizes: set[int]) -> int:
  """Values per token of an all-gather result: its size over its token-sized dimensions (0
  when it has none). A reduction across the 'model' shards (e.g. the argmax over a vocabulary
  split over them) gathers one value per shard and token; activations gather many more."""
  dims = [int(d) for d in re.findall(r"\d+", shape.split("[", 1)[1])]
  tokens = math.prod(d for d in dims if d in sizes)
  return math.prod(dims) // tokens if tokens > 1 else 0


@contextlib.contextmanager
def _stderr_to_string():
  """Collects what native code (XLA) writes to file descriptor 2 (its warnings)."""
  captured = type("Captured", (), {"text": ""})()
  with tempfile.TemporaryFile(mode="w+b") as sink:
    saved = os.dup(2)
    os.dup2(sink.fileno(), 2)
    try:
      yield captured
    finally:
      os.dup2(saved, 2)
      os.close(saved)
      sink.seek(0)
      captured.text = sink.read().decode(errors="replace")


# The most CPU devices XLA is asked to emulate: each is a thread pool and buffers of its own, and
# a mesh of millions of them exhausts memory (or crashes) before a line of the script runs.
MAX_EMULATED_DEVICES = 4096


def check_emulated(count: int, flag: str = "--mesh") -> None:
  """Refuses (ValueError, one line) a mesh too big to emulate with CPU devices."""
  if count > MAX_EMULATED_DEVICES:
    raise ValueError(
      f"{flag} asks for {count:,} emulated CPU devices, more than {MAX_EMULATED_DEVICES}: "
      "choose smaller sizes (or compile for a TPU slice with --topology)."
    )


def reexec_with_devices(count: int, argv: list[str], extra_flags: tuple[str, ...] = ()) -> None:
  """Re-executes this Python script with XLA_FLAGS emulating `count` CPU devices (and
  `extra_flags`) unless they are already set: XLA reads the flag only when jax starts. The
  new process also gets `switchjax.huge_pages`' malloc setting (one restart for both)."""
  check_emulated(count)
  flags = os.environ.get("XLA_FLAGS", "")
  found = re.search(r"--xla_force_host_platform_device_count=(\d+)", flags)
  missing = [f for f in extra_flags if f.split("=")[0] not in flags]
  if found and int(found.group(1)) >= count and not missing:
    return
  flags = flags.replace(found.group(0), "") if found else flags
  flags = " ".join(flags.split() + [f"--xla_force_host_platform_device_count={count}", *missing])
  print(f"Restarting with XLA_FLAGS={flags}", flush=True)
  environ = huge_pages.environment() or dict(os.environ)
  os.execve(sys.executable, [sys.executable, *argv], {**environ, "XLA_FLAGS": flags})


# --------------------------------------------------------------------------------------------
# Fitting a preset: the smallest slice whose chips hold its train and eval steps.

# What is tried on each slice, in order, until the steps fit: layers scanned (one compiled
# block, which keeps the big presets' compile times short), then each layer rematerialised in
# the backward pass, then parameters and optimizer state split over 'data' as well (FSDP).
ATTEMPTS = (
  {"model.scan_layers": True},
  {"model.scan_layers": True, "model.remat": "full"},
  {"model.scan_layers": True, "model.remat": "full", "mesh.fsdp": True},
)


@dataclasses.dataclass
class Fit:
  """The outcome of `fit`: the first report that fits (None if none did) and every attempt."""

  config: str
  parameters: int
  report: PodReport | None
  attempts: list[dict[str, Any]]


def fit(
  config: Config,
  generation: str = "v5p",
  max_chips: int | None = None,
  say=print,
) -> Fit:
  """Compiles `config`'s steps on the standard slices of `generation`, smallest first, with
  the settings of ATTEMPTS in turn, until they fit the chips' HBM. Slices too small to hold
  the float32 parameters even split over every chip are skipped without compiling."""
  parameters = estimate_parameters(config.model)
  hbm = topologies.GENERATIONS[generation].hbm_bytes
  least = max(1, -(-4 * parameters // hbm))  # chips that hold the parameters alone
  attempts: list[dict[str, Any]] = []
  for tpu in topologies.standard_slices(generation, min_chips=least):
    if max_chips and tpu.chips > max_chips:
      break
    for changes in ATTEMPTS:
      run = apply_overrides(config, [f"{k}={v}" for k, v in changes.items()]).validate()
      mesh = default_mesh(run, tpu.chips)
      if changes.get("mesh.fsdp") and mesh[0] == 1:  # no data axis to shard over: the
        continue  # program is the one just compiled without FSDP
      try:
        report = simulate(run, mesh, tpu, eval_step=False)
        if report.fits:
          report = simulate(run, mesh, tpu)  # the eval step must fit too
      except DoesNotFitError as e:
        attempts.append({"slice": tpu.name, "mesh": mesh, **changes, "fits": False})
        say(f"{config.name} on {tpu.name} {mesh} {changes}: does not fit ({e})")
        continue
      except ValueError as e:  # this mesh cannot hold the config (e.g. a head count)
        attempts.append({"slice": tpu.name, "mesh": mesh, **changes, "error": str(e)})
        say(f"{config.name} on {tpu.name} {mesh} {changes}: {e}")
        continue
      attempts.append({"slice": tpu.name, "mesh": mesh, **changes, "fits": report.fits})
      say(
        f"{config.name} on {tpu.name} {mesh} {changes}: {report.total_bytes / GiB:.1f} GiB "
        f"(eval {report.eval_total_bytes / GiB:.1f}) of {hbm / GiB:.0f}, "
        f"compiled in {report.compile_seconds + report.eval_compile_seconds:.0f} s"
      )
      if report.fits:
        return Fit(config.name, parameters, report, attempts)
  return Fit(config.name, parameters, None, attempts)


FIT_HEADERS = [
  "preset",
  "parameters",
  "slice",
  "mesh (DxExM)",
  "microbatches",
  "remat",
  "scan",
  "fsdp",
  "arguments GiB/chip",
  "temp GiB/chip",
  "total GiB/chip",
  "eval GiB/chip",
  "HBM GiB",
  "compile s",
]


def fit_from_dict(d: dict[str, Any]) -> Fit:
  """A `Fit` read back from its JSON (`dataclasses.asdict`)."""
  report = d["report"] and PodReport(**{**d["report"], "mesh": tuple(d["report"]["mesh"])})
  return Fit(d["config"], d["parameters"], report, d["attempts"])


def fit_row(found: Fit) -> list[str]:
  """One line of the fit table."""
  r = found.report
  if r is None:
    return [found.config, f"{found.parameters / 1e9:.1f}B", "none fits"] + ["-"] * 11
  return [
    found.config,
    f"{found.parameters / 1e9:.1f}B",
    r.platform,
    "x".join(map(str, r.mesh)),
    str(r.num_microbatches),
    r.settings["remat"],
    "yes" if r.settings["scan_layers"] else "no",
    "yes" if r.settings["fsdp"] else "no",
    f"{r.argument_bytes / GiB:.1f}",
    f"{r.temp_bytes / GiB:.1f}",
    f"{r.total_bytes / GiB:.1f}",
    f"{r.eval_total_bytes / GiB:.1f}",
    f"{r.hbm_bytes / GiB:.0f}",
    f"{r.compile_seconds:.0f} + {r.eval_compile_seconds:.0f}",
  ]
