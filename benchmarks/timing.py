"""Interleaved timing, the matmul peak that MFU is measured against, and compiled memory."""

import math
import statistics
import time

import jax
import jax.numpy as jnp

MiB = 2**20


def time_interleaved(fns: dict, reps: int, warmup: int) -> dict:
  """Seconds per call of each blocking fn(): {name: (median, [all times])}, calls interleaved
  (A B A B ...) so that machine noise hits every variant alike."""
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


def mib(d: dict, key: str) -> str:
  """d[key] bytes in MiB, one decimal, or 'n/a'."""
  return f"{d[key] / MiB:.1f}" if key in d else "n/a"
