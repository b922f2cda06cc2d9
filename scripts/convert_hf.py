"""Converts Hugging Face Switch Transformers checkpoints to switchjax (Orbax) and back.

  # HF directory (config.json + model.safetensors / pytorch_model.bin) -> switchjax checkpoint
  python scripts/convert_hf.py --hf_dir switch-base-8 --output_dir ckpt/switch-base-8

  # switchjax checkpoint (converted or a training workdir) -> HF directory
  python scripts/convert_hf.py --checkpoint ckpt/switch-base-8 --hf_output_dir hf/switch-base-8
  # a model trained with capacity factors needs a fixed capacity for HF:
  python scripts/convert_hf.py --checkpoint workdir --hf_output_dir hf/out \
      --set model.moe.expert_capacity=64

Both directions stream: one tensor (one layer's stacked experts) is in memory at a time, so
checkpoints far bigger than memory convert. The tensors keep their dtype unless --dtype is
given. The output of the first direction holds config.json (the resolved switchjax Config,
with data.spm_path pointing at the copied spiece.model when the HF directory has one) and the
parameters as checkpoint step 0; the second writes safetensors shards of at most
--max_shard_size. An output directory must be new or empty (or --overwrite) and never the
input. Expected errors print one line and exit with status 1.
"""

import argparse
import pathlib
import shutil
import sys

from switchjax import checkpoint, hf
from switchjax import config as config_lib


def hf_to_switchjax(args) -> None:
  """HF directory -> Orbax checkpoint plus config (and the tokenizer, if any)."""
  config = hf.convert_from_hf(
    args.hf_dir, args.output_dir, dtype=args.dtype, overwrite=args.overwrite
  )
  print(
    f"Wrote {args.output_dir} ({config.model.num_layers}+{config.model.decoder_layers} layers, "
    f"{config.model.moe.num_experts} experts, {config.model.param_dtype}; tokenizer: "
    f"{config.data.spm_path})."
  )


def switchjax_to_hf(args) -> None:
  """switchjax checkpoint directory -> HF directory (and the tokenizer, if known)."""
  ckpt, out = args.checkpoint, args.hf_output_dir
  checkpoint.check_output_dir(out, [ckpt], args.overwrite, "--hf_output_dir")
  config, params = checkpoint.lazy_params(ckpt)
  config = config_lib.apply_overrides(config, args.set)
  hf.to_hf(
    config,
    params,
    out,
    max_shard_size=args.max_shard_size,
    dtype=args.dtype,
    overwrite=args.overwrite,
  )
  spm = next(
    (p for p in (config.data.spm_path, ckpt / hf.SPM) if p and pathlib.Path(p).is_file()), None
  )
  if spm is not None:
    shutil.copyfile(spm, out / hf.SPM)
  print(
    f"Wrote {out} (load it with SwitchTransformersForConditionalGeneration"
    f".from_pretrained; tokenizer: {spm})."
  )


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--hf_dir", type=pathlib.Path, help="Hugging Face checkpoint directory.")
  parser.add_argument("--output_dir", type=pathlib.Path, help="switchjax checkpoint to write.")
  parser.add_argument("--checkpoint", type=pathlib.Path, help="switchjax checkpoint directory.")
  parser.add_argument("--hf_output_dir", type=pathlib.Path, help="HF directory to write.")
  parser.add_argument(
    "--dtype",
    choices=hf.DTYPES,
    default=None,
    help="dtype of the written tensors (default: keep the input's)",
  )
  parser.add_argument(
    "--max_shard_size", default="5GB", help="HF direction: bytes per safetensors file (5GB)"
  )
  parser.add_argument(
    "--overwrite",
    action="store_true",
    help="write into a non-empty output directory, replacing a previous conversion's files",
  )
  parser.add_argument(
    "--set",
    action="append",
    default=[],
    metavar="FIELD=VALUE",
    help="config override before writing HF, e.g. model.moe.expert_capacity=64",
  )
  args = parser.parse_args(argv)
  if (
    bool(args.hf_dir) == bool(args.checkpoint)
    or bool(args.hf_dir) != bool(args.output_dir)
    or bool(args.checkpoint) != bool(args.hf_output_dir)
  ):
    parser.error(
      "use either --hf_dir DIR --output_dir OUT or --checkpoint DIR --hf_output_dir OUT."
    )
  return args


def main(argv=None) -> int:
  args = parse_args(argv)
  checkpoint.release_memory_eagerly()  # freed tensors go back to the OS at once
  try:
    if args.hf_dir:
      hf_to_switchjax(args)
    else:
      switchjax_to_hf(args)
  except (ValueError, OSError) as e:  # CheckpointError is a ValueError
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
