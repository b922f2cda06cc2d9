"""Measures the peak memory and time of scripts/convert_hf.py both ways on a random model.

  python scripts/conversion_memory.py --workdir /tmp/conv            # the 451M model of the
  python scripts/conversion_memory.py --workdir /tmp/conv --before /work/main   # README table

Builds a random transformers Switch model (default: d_model 512, d_ff 2048, 6 + 6 layers,
every other one sparse with 32 experts, 451M parameters, four 500 MB safetensors shards),
then runs, each in a fresh process whose peak resident memory (ru_maxrss) and wall time are
taken: the interpreter's baseline (importing jax, orbax and switchjax), HF -> switchjax, and
switchjax -> HF; with --before DIR also both directions with the code of another checkout
(e.g. the one before streaming). Prints one line per run and deletes what it wrote unless
--keep.
"""

import argparse
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCHER = (
  "import resource, subprocess, sys; status = subprocess.call(sys.argv[2:]); "
  "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)); "
  "sys.exit(status)"
)
BASELINE = "import jax, orbax.checkpoint, switchjax.hf, switchjax.checkpoint; jax.devices()"


def measure(args: list, code_root: pathlib.Path) -> tuple[float, float]:
  """(peak resident MiB, seconds) of `python *args` run with `code_root` first on the path.
  The command is a child of a small launcher, so that no larger parent's pages are counted."""
  with tempfile.TemporaryDirectory() as tmp:
    peak = pathlib.Path(tmp) / "peak"
    env = {**os.environ, "PYTHONPATH": str(code_root), "PYTHONDONTWRITEBYTECODE": "1"}
    start = time.time()
    subprocess.run(
      [sys.executable, "-c", LAUNCHER, str(peak), sys.executable, *map(str, args)],
      check=True,
      cwd=tmp,
      env=env,
      stdout=subprocess.DEVNULL,
    )
    return int(peak.read_text()) / 1024, time.time() - start


def build(directory: pathlib.Path, args) -> int:
  """Saves the random model; returns its parameter count."""
  import torch
  import transformers

  config = transformers.SwitchTransformersConfig(
    vocab_size=args.vocab_size,
    d_model=args.d_model,
    d_ff=args.d_ff,
    d_kv=args.d_model // args.num_heads,
    num_heads=args.num_heads,
    num_layers=args.num_layers,
    num_decoder_layers=args.num_layers,
    num_sparse_encoder_layers=args.num_sparse,
    num_sparse_decoder_layers=args.num_sparse,
    num_experts=args.num_experts,
    decoder_start_token_id=0,
  )
  torch.manual_seed(0)
  model = transformers.SwitchTransformersForConditionalGeneration(config)
  model = model.to(getattr(torch, args.dtype))
  model.save_pretrained(directory, max_shard_size="500MB")
  return sum(p.numel() for p in model.parameters())


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", type=pathlib.Path, required=True)
  parser.add_argument("--before", type=pathlib.Path, help="another checkout to compare with")
  parser.add_argument("--keep", action="store_true")
  parser.add_argument("--d_model", type=int, default=512)
  parser.add_argument("--d_ff", type=int, default=2048)
  parser.add_argument("--num_heads", type=int, default=8)
  parser.add_argument("--num_layers", type=int, default=6)
  parser.add_argument("--num_sparse", type=int, default=3)
  parser.add_argument("--num_experts", type=int, default=32)
  parser.add_argument("--vocab_size", type=int, default=32128)
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  args = parser.parse_args()

  work = args.workdir
  hf_dir = work / "hf"
  shutil.rmtree(work, ignore_errors=True)
  work.mkdir(parents=True)
  count = build(hf_dir, args)
  size = sum(f.stat().st_size for f in hf_dir.glob("*.safetensors")) / 2**20
  largest = args.num_experts * args.d_model * args.d_ff * 4 / 2**20
  print(
    f"{count:,} parameters, checkpoint {size:.0f} MiB ({args.dtype}), largest stacked tensor "
    f"{largest:.0f} MiB in float32"
  )
  base, _ = measure(["-c", BASELINE], ROOT)
  print(f"baseline (imports): {base:.0f} MiB")
  script = "scripts/convert_hf.py"
  for name, root in [("after", ROOT)] + ([("before", args.before)] if args.before else []):
    out, back = work / f"ckpt_{name}", work / f"hf_{name}"
    runs = {
      "from_hf": ["--hf_dir", hf_dir, "--output_dir", out],
      "to_hf": ["--checkpoint", out, "--hf_output_dir", back],
    }
    for direction, flags in runs.items():
      peak, seconds = measure([root / script, *flags], root)
      print(
        f"{name:6s} {direction}: peak {peak:.0f} MiB = {peak / size:.2f} x checkpoint; "
        f"above baseline {peak - base:.0f} MiB = {(peak - base) / largest:.2f} x largest "
        f"stacked; {seconds:.1f} s"
      )
  if not args.keep:
    shutil.rmtree(work)


if __name__ == "__main__":
  main()
