"""The machine a benchmark ran on: what its figures need to be read and compared."""

import importlib.metadata
import os
import platform

import flax
import jax

from switchjax import huge_pages


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
  """The installed version of `package`, or None when it is not installed."""
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return None


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


def describe() -> dict:
  """Versions, devices, cores, XLA and glibc settings and the load average, as --json keeps
  them next to the figures."""
  return {
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
    "machine": platform.machine(),
    "cpu_model": cpu_model(),
    "torch": optional_version("torch"),
    "transformers": optional_version("transformers"),
    "load_average_1min": os.getloadavg()[0],
  }


def headline(env: dict) -> str:
  """One line of `describe()` (and the measured peak) for the top of the report."""
  return (
    f"switchjax benchmark: jax {env['jax']} (jaxlib {env['jaxlib']}), flax {env['flax']}, "
    f"{env['device_count']} x {env['device_kind']} ({env['backend']}), "
    f"{env['cpu_count']} CPU cores ({env['usable_cores']} usable), XLA_FLAGS={env['xla_flags']!r}, "
    f"GLIBC_TUNABLES={env['glibc_tunables']!r} (huge pages: {env['transparent_huge_pages']}); "
    f"float32 matmul peak {env['matmul_peak_tflops']:.3f} TFLOP/s (the MFU denominator)"
  )
