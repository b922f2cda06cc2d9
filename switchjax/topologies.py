"""Cloud TPU slices described on any machine: their devices, to compile for ahead of time.

libtpu (`pip install -e ".[tpu]"`) describes a TPU topology without a TPU:
`jax.experimental.topologies.get_topology_desc` returns devices that programs can be lowered
and compiled for (XLA's TPU compiler, its memory plan and collectives), but never run on.
MaxText's `train_compile.py` works the same way.

Slices are named as Cloud TPU names them: v4 and v5p by TensorCores (`v5p-32` is 16 chips, one
device per chip, megacore), v5e and v6e by chips (`v5e-16`, `v6e-256`); or by their topology
(`v5p:2x2x4`, `v6e:4x4`). HBM per chip: v4 32 GiB, v5e 16 GiB, v5p 95 GiB, v6e 32 GiB.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Generation:
  """A TPU generation.

  Attributes:
    name: Cloud TPU's name ('v5p').
    topology_prefix: libtpu's name in topology strings ('v5').
    hbm_bytes: memory per chip.
    cores_per_chip: TensorCores per chip, which Cloud TPU names count (v4, v5p: 2).
    chip_config: libtpu's chip configuration ('megacore': one device per chip).
    shapes: chips -> topology of the standard slices, smallest first.
  """

  name: str
  topology_prefix: str
  hbm_bytes: int
  cores_per_chip: int
  chip_config: str
  shapes: dict[int, str]


# Standard slices by chips: 3-D tori for v4 and v5p, 2-D for v5e and v6e.
_TORUS = {
  4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
  512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16",
}  # fmt: skip
_PLANE = {
  1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16",
}  # fmt: skip
GENERATIONS = {
  "v4": Generation(
    "v4", "v4", 32 * GiB, 2, "megacore", {c: s for c, s in _TORUS.items() if c <= 2048}
  ),
  "v5p": Generation("v5p", "v5", 95 * GiB, 2, "megacore", dict(_TORUS)),
  "v5e": Generation("v5e", "v5e", 16 * GiB, 1, "default", dict(_PLANE)),
  "v6e": Generation("v6e", "v6e", 32 * GiB, 1, "default", dict(_PLANE)),
}
# The generations on sale today, in the order `smallest_slices` tries them.
CURRENT = ("v5e", "v6e", "v5p")


@dataclasses.dataclass(frozen=True)
class TpuSlice:
  """One slice (or several identical ones joined over the data-center network).

  Attributes:
    generation: its Generation.
    topology: chips along each axis ('2x2x4').
    num_slices: slices (multi-slice: the 'data' mesh axis spans them).
  """

  generation: Generation
  topology: str
  num_slices: int = 1

  @property
  def chips(self) -> int:
    return math.prod(int(d) for d in self.topology.split("x")) * self.num_slices

  @property
  def name(self) -> str:
    """Cloud TPU's name of one slice ('v5p-32'), with the slice count when more than one."""
    per_slice = self.chips // self.num_slices * self.generation.cores_per_chip
    name = f"{self.generation.name}-{per_slice}"
    return name if self.num_slices == 1 else f"{self.num_slices}x {name}"

  @property
  def hbm_bytes(self) -> int:
    return self.generation.hbm_bytes


def parse_slice(name: str, num_slices: int = 1) -> TpuSlice:
  """'v5p-32', 'v6e-16' or 'v5p:2x2x4' as a TpuSlice; ValueError naming the known ones."""
  if num_slices < 1:
    raise ValueError(f"--num_slices={num_slices} must be >= 1.")
  found = re.fullmatch(r"(v\d+[a-z]*)(?:-(\d+)|:(\d+(?:x\d+)+))", name.strip().lower())
  generation = GENERATIONS.get(found.group(1)) if found else None
  if generation is None:
    raise ValueError(
      f"--topology={name!r} is not a TPU slice; give a Cloud TPU name (v4-8, v5p-32, v5e-16, "
      f"v6e-256: generations {', '.join(GENERATIONS)}) or a topology (v5p:2x2x4)."
    )
  if found.group(3):
    dims = found.group(3)
    expected = 3 if generation.cores_per_chip == 2 else 2
    if len(dims.split("x")) != expected:
      raise ValueError(f"--topology={name!r}: {generation.name} topologies have {expected} axes.")
    return TpuSlice(generation, dims, num_slices)
  count = int(found.group(2))
  chips, rest = divmod(count, generation.cores_per_chip)
  if rest or chips not in generation.shapes:
    names = ", ".join(
      f"{generation.name}-{c * generation.cores_per_chip}" for c in generation.shapes
    )
    raise ValueError(
      f"--topology={name!r} is not a standard {generation.name} slice; use one of {names}, or "
      f"name its topology ({generation.name}:AxBxC)."
    )
  return TpuSlice(generation, generation.shapes[chips], num_slices)


def standard_slices(generation: str, min_chips: int = 1) -> list[TpuSlice]:
  """The standard single slices of a generation with at least `min_chips` chips, smallest
  first."""
  gen = GENERATIONS[generation]
  return [TpuSlice(gen, shape) for chips, shape in gen.shapes.items() if chips >= min_chips]


def slice_devices(tpu: TpuSlice) -> list:
  """The slice's devices as libtpu describes them (one per chip), slice by slice; ValueError
  with the fix when libtpu is missing."""
  # libtpu guards a host's chips with a lock file: a process that only compiles needs no chip,
  # so it must not wait for, or take, the lock of a run on the same host.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    import libtpu  # noqa: F401  (only to tell a missing install from other errors)
    from jax.experimental import topologies
  except ImportError:
    raise ValueError(
      'compiling for a TPU topology needs libtpu: pip install -e ".[tpu]" (it matches jax).'
    ) from None
  dims = [int(d) for d in tpu.topology.split("x")]
  bounds = tuple(min(d, 2) for d in dims) + (1,) * (3 - len(dims))
  description = topologies.get_topology_desc(
    platform="tpu",
    topology_name=f"{tpu.generation.topology_prefix}:{tpu.topology}",
    chip_config_name=tpu.generation.chip_config,
    chips_per_host_bounds=bounds,
    num_slices=tpu.num_slices,
  )
  return list(description.devices)
