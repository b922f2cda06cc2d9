"""One process of a multi-process restore (tests/test_hf_streaming.py): restores a checkpoint
onto a mesh over the devices of all processes, then writes a JSON report (resident memory
before and after the restore, bytes of parameters on this process's devices, whether each
shard equals the stored slice) and, from process 0, the logits of a fixed batch.

  python tests/restore_on_mesh.py CKPT REPORT_PREFIX --mesh 1,4,2 \
      [--coordinator_address 127.0.0.1:PORT --num_processes 2 --process_id I]
"""

import argparse
import json
import sys


def rss_mib(field: str = "VmRSS") -> float:
  """Resident memory now (VmRSS) or at its peak (VmHWM) in MiB. VmHWM starts at exec, unlike
  ru_maxrss, which also counts the image of the process this one was forked from."""
  with open("/proc/self/status") as f:
    return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def batch(vocab: int):
  import numpy as np

  rng = np.random.default_rng(0)
  inputs = rng.integers(2, vocab, (8, 12)).astype(np.int32)
  inputs[1, 9:] = 0
  targets = rng.integers(2, vocab, (8, 5)).astype(np.int32)
  return inputs, targets


def main(argv=None) -> int:
  parser = argparse.ArgumentParser()
  parser.add_argument("checkpoint")
  parser.add_argument("report")
  parser.add_argument("--mesh", default="1,4,2", help="data,expert,model")
  parser.add_argument("--coordinator_address")
  parser.add_argument("--num_processes", type=int)
  parser.add_argument("--process_id", type=int)
  args = parser.parse_args(argv)

  from switchjax import sharding

  sharding.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
  import jax
  import numpy as np
  from jax.experimental import multihost_utils

  jax.config.update("jax_default_matmul_precision", "highest")  # as tests/conftest.py

  from switchjax import checkpoint, model_loading
  from switchjax.config import MeshConfig
  from switchjax.model import SwitchTransformer, abstract_params

  checkpoint.release_memory_eagerly()  # as scripts/generate.py does
  data, expert, model_axis = map(int, args.mesh.split(","))
  config = checkpoint.read_checkpoint_config(args.checkpoint)
  mesh = sharding.make_mesh(MeshConfig(data=data, expert=expert, model=model_axis))
  model = SwitchTransformer(config.model)
  boxed = abstract_params(model)
  shardings = sharding.param_shardings(mesh, boxed)
  before = rss_mib()  # the restore starts here
  config, params = model_loading.load_model(args.checkpoint, shardings=shardings)
  jax.block_until_ready(params)
  peak = rss_mib("VmHWM")
  shards = [s for leaf in jax.tree.leaves(params) for s in leaf.addressable_shards]
  local_bytes = sum(s.data.nbytes for s in shards)

  _, stored = checkpoint.lazy_params(args.checkpoint)
  exact = all(
    np.array_equal(np.asarray(s.data), full[s.index])
    for leaf, lazy in zip(jax.tree.leaves(params), jax.tree.leaves(stored))
    for full in [np.asarray(lazy)]
    for s in leaf.addressable_shards
  )

  inputs, targets = batch(config.model.vocab_size)
  with jax.set_mesh(mesh), sharding.axis_rules():
    replicated = sharding.replicated(mesh)
    logits = jax.jit(model.apply)(
      {"params": params},
      jax.device_put(inputs, replicated),
      jax.device_put(targets, replicated),
    )
  logits = multihost_utils.process_allgather(logits, tiled=True)
  if jax.process_index() == 0:
    np.save(f"{args.report}.logits.npy", np.asarray(logits))
  report = dict(
    process=jax.process_index(),
    devices=jax.local_device_count(),
    rss_before_mib=before,
    peak_mib=peak,
    local_param_mib=local_bytes / 2**20,
    shards_equal_stored=bool(exact),
  )
  with open(f"{args.report}.{jax.process_index()}.json", "w") as f:
    json.dump(report, f)
  return 0


if __name__ == "__main__":
  sys.exit(main())
