"""Converts Hugging Face Switch Transformers checkpoints to switchjax (Orbax) and back.

  # HF directory (config.json + model.safetensors / pytorch_model.bin) -> switchjax checkpoint
  python scripts/convert_hf.py --hf_dir switch-base-8 --output_dir ckpt/switch-base-8

  # switchjax checkpoint (converted or a training workdir) -> HF directory
  python scripts/convert_hf.py --checkpoint ckpt/switch-base-8 --hf_output_dir hf/switch-base-8
  # a model trained with capacity factors needs a fixed capacity for HF:
  python scripts/convert_hf.py --checkpoint workdir --hf_output_dir hf/out \
      --set model.moe.expert_capacity=64

The output of the first direction holds config.json (the resolved switchjax Config, with
data.spm_path pointing at the copied spiece.model when the HF directory has one) and the
parameters as checkpoint step 0. Expected errors print one line and exit with status 1.
"""

import argparse
import dataclasses
import pathlib
import shutil
import sys

from switchjax import checkpoint, hf
from switchjax import config as config_lib

SPM = "spiece.model"


def hf_to_switchjax(hf_dir: pathlib.Path, out: pathlib.Path) -> None:
  """HF directory -> Orbax checkpoint plus config (and the tokenizer, if any)."""
  if (out / checkpoint.CHECKPOINTS).exists():
    raise ValueError(f"{out} already holds a checkpoint; choose a new --output_dir.")
  model, params = hf.from_hf(hf_dir)
  config = config_lib.Config(name=f"hf:{hf_dir.resolve().name}", model=model.config)
  if (hf_dir / SPM).is_file():
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(hf_dir / SPM, out / SPM)
    config = dataclasses.replace(
      config, data=dataclasses.replace(config.data, spm_path=str((out / SPM).resolve()))
    )
  checkpoint.save_model(out, config.validate(), params)
  print(
    f"Wrote {out} ({config.model.num_layers}+{config.model.decoder_layers} layers, "
    f"{config.model.moe.num_experts} experts; tokenizer: {config.data.spm_path})."
  )


def switchjax_to_hf(ckpt: pathlib.Path, out: pathlib.Path, overrides: list[str]) -> None:
  """switchjax checkpoint directory -> HF directory (and the tokenizer, if known)."""
  config, params = checkpoint.load_model(ckpt)
  config = config_lib.apply_overrides(config, overrides)
  hf.to_hf(config, params, out)
  spm = next(
    (p for p in (config.data.spm_path, ckpt / SPM) if p and pathlib.Path(p).is_file()), None
  )
  if spm is not None:
    shutil.copyfile(spm, out / SPM)
  print(
    f"Wrote {out} (load it with SwitchTransformersForConditionalGeneration"
    f".from_pretrained; tokenizer: {spm})."
  )


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--hf_dir", type=pathlib.Path, help="Hugging Face checkpoint directory.")
  parser.add_argument("--output_dir", type=pathlib.Path, help="switchjax checkpoint to write.")
  parser.add_argument("--checkpoint", type=pathlib.Path, help="switchjax checkpoint directory.")
  parser.add_argument("--hf_output_dir", type=pathlib.Path, help="HF directory to write.")
  parser.add_argument(
    "--set",
    action="append",
    default=[],
    metavar="FIELD=VALUE",
    help="config override before writing HF, e.g. model.moe.expert_capacity=64",
  )
  args = parser.parse_args()
  if (
    bool(args.hf_dir) == bool(args.checkpoint)
    or bool(args.hf_dir) != bool(args.output_dir)
    or bool(args.checkpoint) != bool(args.hf_output_dir)
  ):
    parser.error(
      "use either --hf_dir DIR --output_dir OUT or --checkpoint DIR --hf_output_dir OUT."
    )
  try:
    if args.hf_dir:
      hf_to_switchjax(args.hf_dir, args.output_dir)
    else:
      switchjax_to_hf(args.checkpoint, args.hf_output_dir, args.set)
  except (ValueError, OSError) as e:  # CheckpointError is a ValueError
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  main()
