"""Which layers of a stack are MoE layers: flaxformer's layouts, Hugging Face's sparse step,
or explicit indices; and the period with which they repeat (the block of scanned layers).
Plain arithmetic on the config, with no model imports."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
  from switchjax.config.schema import ModelConfig

STACKS = ("encoder", "decoder")


def sparse_layer_indices(num_layers: int, num_sparse: int, layout: str) -> tuple[int, ...]:
  """Indices of the MoE layers of a stack.

  flaxformer's `LayerLayout`: bottom (layer < s), top (layer >= n - s), middle
  (n - s <= 2 * layer < n + s), mixed (layer % (n // s) == n // s - 1: 12 layers, 6 sparse ->
  1, 3, 5, ...). 'hf' is Hugging Face's rule (step = n // s, sparse when i % step == 1 or step
  == 1; 12/4 -> 1, 4, 7, 10 where mixed gives 2, 5, 8, 11); kept when converting checkpoints.
  """
  n, s = num_layers, num_sparse
  if layout == "hf":
    return hf_sparse_blocks(n, n // s if s > 0 else n)
  if s == 0:
    return ()
  if layout == "bottom":
    return tuple(range(s))
  if layout == "top":
    return tuple(range(n - s, n))
  if layout == "middle":
    return tuple(i for i in range(n) if n - s <= 2 * i < n + s)
  if layout == "mixed":
    step = n // s
    return tuple(i for i in range(n) if i % step == step - 1)
  raise ValueError(f"model.sparse_layout={layout!r}; use mixed, top, bottom, middle or hf.")


def hf_sparse_blocks(num_layers: int, step: int) -> tuple[int, ...]:
  """Hugging Face's rule for a sparse step: block i is sparse when i % step == 1, or every
  block when step == 1; a step of 0 gives none."""
  if step <= 0:
    return ()
  return tuple(i for i in range(num_layers) if i % step == 1 or step == 1)


def encoder_sparse_layers(cfg: ModelConfig) -> tuple[int, ...]:
  if cfg.sparse_encoder_layers is not None:
    return tuple(cfg.sparse_encoder_layers)
  return sparse_layer_indices(cfg.num_layers, cfg.num_sparse_encoder_layers, cfg.sparse_layout)


def decoder_sparse_layers(cfg: ModelConfig) -> tuple[int, ...]:
  if cfg.sparse_decoder_layers is not None:
    return tuple(cfg.sparse_decoder_layers)
  return sparse_layer_indices(cfg.decoder_layers, cfg.num_sparse_decoder_layers, cfg.sparse_layout)


def layer_period(num_layers: int, sparse: tuple[int, ...]) -> int:
  """The smallest p dividing num_layers such that layer i is sparse iff layer i + p is."""
  is_sparse = [i in set(sparse) for i in range(num_layers)]
  for p in range(1, num_layers + 1):
    if num_layers % p == 0 and all(is_sparse[i] == is_sparse[i + p] for i in range(num_layers - p)):
      return p
  return num_layers


def stack_layout(cfg: ModelConfig, stack: str) -> tuple[int, tuple[bool, ...]]:
  """(period, which layers of a block are sparse) of a stack; a ValueError naming the setting
  when its sparse layers do not repeat with a period shorter than the stack (2 layers or fewer
  always scan, as one block)."""
  if stack == "encoder":
    n, sparse = cfg.num_layers, encoder_sparse_layers(cfg)
  else:
    n, sparse = cfg.decoder_layers, decoder_sparse_layers(cfg)
  p = layer_period(n, sparse)
  if p == n and n > 2:
    raise ValueError(
      f"model.scan_layers=True needs each stack's sparse layers to repeat, but the {stack}'s "
      f"sparse layers {tuple(sparse)} of {n} (model.sparse_layout={cfg.sparse_layout!r}) have "
      "no period shorter than the stack; use model.sparse_layout='mixed' (or evenly spaced "
      "model.sparse_*_layers) or model.scan_layers=False."
    )
  return p, tuple(i in set(sparse) for i in range(p))
