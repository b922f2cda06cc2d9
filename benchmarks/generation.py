"""Greedy generation (`switchjax.generate`) of a randomly initialised model with and without
the KV cache: new tokens/s of each, and the cache's speed-up measured in the same run."""

import flax.linen as nn
import jax
import numpy as np

from benchmarks.timing import time_interleaved
from switchjax.config import Config
from switchjax.decoding import generate
from switchjax.model import SwitchTransformer, init_params
from switchjax.pod import format_table


def bench_generate(config: Config, *, quick: bool, reps: int, warmup: int) -> dict:
  """Both variants compiled, then timed interleaved; EOS is disabled so every row decodes
  every step. Prints the table."""
  batch, length, new = (2, 16, 8) if quick else (8, config.data.inputs_length, 64)
  model = SwitchTransformer(config.model)
  params = jax.jit(lambda: nn.unbox(init_params(model, jax.random.key(config.train.seed))))()
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
  for name, (median, times) in time_interleaved(fns, reps, warmup).items():
    out[name] = {"ms": median * 1e3, "tokens_per_s": batch * new / median, "times_s": times}
  out["cache_speedup"] = out["uncached"]["ms"] / out["cached"]["ms"]
  print_generate(out)
  return out


def print_generate(out: dict) -> None:
  """The section's table: cached and uncached, and the cache's speed-up."""
  rows = [
    [name, f"{out[name]['ms']:.1f}", f"{out[name]['tokens_per_s']:,.0f}"]
    for name in ("cached", "uncached")
  ]
  print(
    f"\n## Greedy generation: --config {out['config']} (random weights), batch "
    f"{out['batch_size']}, {out['input_length']} input tokens, {out['new_tokens']} new tokens "
    "per row\n"
  )
  print(format_table(["KV cache", "ms/call", "new tokens/s"], rows))
  print(f"uncached / cached time (the cache's speed-up): {out['cache_speedup']:.2f}")
