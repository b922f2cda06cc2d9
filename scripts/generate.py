"""Generates text with a switchjax checkpoint.

  python scripts/generate.py --checkpoint DIR --input "The capital of France is <extra_id_0>."
  # a model bigger than one device: experts over 4 devices, hidden dimensions over 2
  python scripts/generate.py --checkpoint DIR --input "..." --set mesh.expert=4 --set mesh.model=2

Loads the model of DIR (a training workdir or the output of scripts/convert_hf.py) and a
SentencePiece model (--spm_path, else DIR/spiece.model, else the config's data.spm_path), with
the sentinel count of DIR's config (data.extra_ids), encodes each --input with EOS (as Hugging
Face's T5 tokenizer does), generates, and prints one decoded line per input. With --set mesh.*
the parameters are restored straight onto a mesh of all devices (each device reads its own
slices; no copy of the model is made on the host) and generation runs sharded. Errors print
one line and exit with status 1.
"""

import argparse
import contextlib
import os
import pathlib
import sys

import jax
import numpy as np

from switchjax import checkpoint, model_loading, sharding
from switchjax import config as config_lib
from switchjax.data.tokenizer import Tokenizer
from switchjax.decoding import generate
from switchjax.model import SwitchTransformer


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--checkpoint", required=True, help="switchjax checkpoint directory")
  parser.add_argument(
    "--input",
    action="append",
    required=True,
    help="input text (repeat for a batch); <extra_id_N> marks sentinels",
  )
  parser.add_argument("--max_new_tokens", type=int, default=32)
  parser.add_argument("--method", choices=("greedy", "sample", "beam"), default="greedy")
  parser.add_argument("--temperature", type=float, default=1.0)
  parser.add_argument("--top_k", type=int, default=0, help="0 = no top-k filtering")
  parser.add_argument("--top_p", type=float, default=1.0, help="1.0 = no nucleus filtering")
  parser.add_argument("--num_beams", type=int, default=4)
  parser.add_argument("--length_penalty", type=float, default=1.0)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument(
    "--spm_path",
    help="SentencePiece model (default: DIR/spiece.model, then the config's data.spm_path)",
  )
  parser.add_argument(
    "--set",
    action="append",
    default=[],
    metavar="mesh.FIELD=VALUE",
    help="restore onto a device mesh and generate on it, e.g. --set mesh.expert=4",
  )
  parser.add_argument(
    "--dtype", choices=("float32", "bfloat16"), help="cast the parameters while restoring"
  )
  return parser.parse_args(argv)


def load(args):
  """(config, params, context): the checkpoint's model, on the default device or (with
  --set mesh.*) on a mesh, and the context to run it in."""
  if any(not item.startswith("mesh.") for item in args.set):
    raise ValueError(f"--set takes mesh.* fields only (e.g. mesh.expert=4), not {args.set}.")
  if not args.set:
    config, params = model_loading.load_model(args.checkpoint, dtype=args.dtype)
    return config, params, contextlib.nullcontext()
  mesh_config = config_lib.apply_overrides(config_lib.Config(), args.set).mesh
  config, params, mesh = model_loading.load_model_on_mesh(
    args.checkpoint, mesh_config, dtype=args.dtype
  )
  context = contextlib.ExitStack()
  context.enter_context(jax.set_mesh(mesh))
  context.enter_context(sharding.axis_rules())
  return config, params, context


def find_spm(args, config) -> tuple[str, str]:
  """(path, the setting it came from) of the SentencePiece model: --spm_path, else
  DIR/spiece.model, else data.spm_path. The Tokenizer reports a path that is not a model."""
  if args.spm_path:
    return args.spm_path, "--spm_path"
  default = pathlib.Path(args.checkpoint) / "spiece.model"
  if default.is_file():
    return str(default), ""
  if config.data.spm_path and pathlib.Path(config.data.spm_path).is_file():
    return config.data.spm_path, "data.spm_path"
  raise FileNotFoundError(
    f"No SentencePiece model: pass --spm_path, or put spiece.model in "
    f"{args.checkpoint}, or set data.spm_path in its config.json."
  )


def load_tokenizer(args, config) -> Tokenizer:
  """The tokenizer of `find_spm` with the sentinel count the model was trained with (the
  checkpoint's data.extra_ids: T5 and converted models 100), checked against the model."""
  spm_path, setting = find_spm(args, config)
  tokenizer = Tokenizer(spm_path, extra_ids=config.data.extra_ids, setting=setting)
  if tokenizer.vocab_size > config.model.vocab_size:
    raise ValueError(
      f"The tokenizer has {tokenizer.vocab_size} ids but the model only "
      f"{config.model.vocab_size}: wrong --spm_path?"
    )
  return tokenizer


def check_arguments(args) -> None:
  """Refuses arguments generation cannot use, before anything is read."""
  problems = [
    (args.max_new_tokens < 1, f"--max_new_tokens={args.max_new_tokens} must be >= 1"),
    (args.num_beams < 1, f"--num_beams={args.num_beams} must be >= 1"),
    (not args.temperature > 0, f"--temperature={args.temperature} must be > 0"),
    (args.top_k < 0, f"--top_k={args.top_k} must be >= 0 (0: no top-k filtering)"),
    (not 0 < args.top_p <= 1, f"--top_p={args.top_p} must be in (0, 1]"),
  ]
  for bad, message in problems:
    if bad:
      raise ValueError(message + ".")


def available_bytes() -> int:
  """Memory generation may use: the first device's free memory when it reports it (GPU,
  TPU), else the host's available memory."""
  stats = jax.devices()[0].memory_stats() or {}
  if "bytes_limit" in stats:
    return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
  try:
    for line in pathlib.Path("/proc/meminfo").read_text().splitlines():
      if line.startswith("MemAvailable:"):
        return int(line.split()[1]) * 1024
  except OSError:
    pass
  return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_size(args, config, batch: int, length: int) -> None:
  """Refuses (one line) prompts whose attention would not fit in memory, before the model is
  read: the attention scores of a layer are batch x heads x length^2 floats, a few copies of
  them (and the softmax's) live at once, and a prompt of 100,000 tokens asks for tens of GiB."""
  model, beams = config.model, args.num_beams if args.method == "beam" else 1
  rows = batch * beams
  longest = max(length, args.max_new_tokens)
  need = 6 * rows * model.num_heads * longest**2 * 4
  free = available_bytes()
  if need > free:
    raise ValueError(
      f"the longest --input is {length} tokens (--max_new_tokens {args.max_new_tokens}): its "
      f"attention needs about {need / 2**30:,.1f} GiB, more than the {free / 2**30:,.1f} GiB "
      f"free; shorten the input (the model was trained on {config.data.inputs_length} tokens) "
      "or generate fewer inputs at a time."
    )


def run(args) -> list[str]:
  check_arguments(args)
  checkpoint.release_memory_eagerly()  # restored slices go back to the OS once placed
  saved = checkpoint.read_checkpoint_config(args.checkpoint)
  tokenizer = load_tokenizer(args, saved)
  ids = [tokenizer.encode(text, add_eos=True) for text in args.input]
  check_size(args, saved, len(ids), max(map(len, ids)))
  inputs = np.zeros((len(ids), max(map(len, ids))), np.int32)  # [batch, length], pad 0
  for row, seq in enumerate(ids):
    inputs[row, : len(seq)] = seq
  config, params, context = load(args)

  model = SwitchTransformer(config.model)
  with context:
    outputs = generate(
      model,
      params,
      inputs,
      args.max_new_tokens,
      method=args.method,
      temperature=args.temperature,
      top_k=args.top_k,
      top_p=args.top_p,
      num_beams=args.num_beams,
      length_penalty=args.length_penalty,
      rng=args.seed,
    )
  # The model's vocabulary may be rounded up past the tokenizer's: those ids have no text.
  return [
    tokenizer.decode([t for t in row if t < tokenizer.vocab_size])
    for row in np.asarray(outputs).tolist()
  ]


def main(argv=None) -> int:
  args = parse_args(argv)
  try:
    lines = run(args)
  except (OSError, ValueError) as e:
    print(f"generate.py: error: {' '.join(str(e).split())}", file=sys.stderr)
    return 1
  for line in lines:
    print(line)
  return 0


if __name__ == "__main__":
  sys.exit(main())
