"""How many choices the expert-parallel dropless layer caps, on a trained router.

  python -m benchmarks.dropless_cap --run=runs/study/switch-top1-dropless/seed0
  python -m benchmarks.dropless_cap --run=... --factors=1.25,1.5,2 --batch=128 --steps=10

On an emulated (1, 8, 1) CPU mesh every device sends each expert shard at most
ceil(factor x its choices / shards) rows (`model.moe.dropless_ep_capacity_factor`, default
2.0); choices beyond that are capped (they give 0, like dropped tokens). How often that happens
depends on how unevenly a trained router loads the experts within one device's tokens, so this
starts from a trained dropless run (`train.init_from`; a learning rate of ~0 keeps its router)
and reads each sparse layer's fraction_choices_capped from the training metrics, per factor and
per batch size (sequences per device = batch / 8).
"""

import argparse
import os
import pathlib
import tempfile

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import numpy as np  # noqa: E402  (after XLA_FLAGS)

from switchjax import routing_history  # noqa: E402
from switchjax.config import load_config  # noqa: E402
from switchjax.training import train  # noqa: E402


def capped(run: pathlib.Path, factor: float, batch: int, steps: int) -> dict[str, float]:
  """{layer: mean fraction of its choices capped over `steps` steps} from `run`'s parameters."""
  config = load_config(
    str(run / "config.json"),
    [
      f"train.init_from={run}",
      "name=dropless-cap",
      "mesh.data=1",
      "mesh.expert=8",
      f"train.batch_size={batch}",
      f"train.num_train_steps={steps}",
      "train.learning_rate=1e-9",
      "train.log_every=1",
      "train.eval_every=0",
      f"train.checkpoint_every={steps}",
      f"model.moe.dropless_ep_capacity_factor={factor}",
    ],
  )
  with tempfile.TemporaryDirectory() as workdir:
    train(config, workdir, progress=False, log=lambda _: None)
    history = routing_history.read_history(workdir)
  return {
    layer: float(np.mean([v for _, v in m["fraction_choices_capped"]]))
    for layer, m in history.items()
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--run", required=True, help="a trained run of the dropless router")
  parser.add_argument("--factors", default="1.25,1.5,2")
  parser.add_argument("--batches", default="16,128", help="global batch sizes (sequences)")
  parser.add_argument("--steps", type=int, default=10)
  args = parser.parse_args()
  run = pathlib.Path(args.run)
  rows = []
  for batch in [int(b) for b in args.batches.split(",")]:
    for factor in [float(f) for f in args.factors.split(",")]:
      rows.append((batch, factor, capped(run, factor, batch, args.steps)))
      print(f"batch {batch}, factor {factor:g}: {rows[-1][2]}", flush=True)
  layers = sorted(rows[0][2])
  print(f"\n| batch (per device) | factor | {' | '.join(layers)} |")
  print("| --- | ---: |" + " ---: |" * len(layers))
  for batch, factor, capped_share in rows:
    cells = " | ".join(f"{capped_share[layer]:.4f}" for layer in layers)
    print(f"| {batch} ({batch // 8}) | {factor:g} | {cells} |")


if __name__ == "__main__":
  main()
