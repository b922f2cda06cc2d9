"""Compile time and memory of a config's train step, from abstract inputs (no data, no weights).

  python scripts/compile_step.py --config=base8 --set train.batch_size=8
  python scripts/compile_step.py --config=base8 --set train.batch_size=8 \
      --set model.scan_layers=true

Lowers pretrain.py's jitted train step (`switchjax.training.lower_train_step`: forward,
backward, gradient accumulation and the Adafactor update) for the config's mesh on this
machine's devices, compiles it, and prints the seconds each took and the compiled program's
memory per device (`compiled.memory_analysis()`: arguments, outputs, temporaries). Wall
seconds move with the machine's load; the process's CPU seconds much less.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from switchjax.config import load_config
from switchjax.training import lower_train_step, plan_run, state_layout

GB = 1 << 30


def measure(config) -> dict:
  """Seconds to trace + lower and to compile the train step, and its memory in GB."""
  plan = plan_run(config)
  start, cpu_start = time.perf_counter(), time.process_time()
  lowered = lower_train_step(state_layout(plan.config, plan.mesh), plan.config)
  lowered_at, cpu_lowered = time.perf_counter(), time.process_time()
  compiled = lowered.compile()
  done, cpu_done = time.perf_counter(), time.process_time()
  memory = compiled.memory_analysis()
  return {
    "lower_s": round(lowered_at - start, 1),
    "compile_s": round(done - lowered_at, 1),
    "lower_cpu_s": round(cpu_lowered - cpu_start, 1),  # CPU seconds: less sensitive to load
    "compile_cpu_s": round(cpu_done - cpu_lowered, 1),
    "microbatches": plan.config.train.num_microbatches,
    "arguments_gb": round(memory.argument_size_in_bytes / GB, 2),
    "outputs_gb": round(memory.output_size_in_bytes / GB, 2),
    "temp_gb": round(memory.temp_size_in_bytes / GB, 2),
    "aliased_gb": round(memory.alias_size_in_bytes / GB, 2),
  }


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="base8")
  parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
  args = parser.parse_args(argv)
  config = load_config(args.config, args.set)
  print(json.dumps({"config": args.config, "set": args.set, **measure(config)}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
