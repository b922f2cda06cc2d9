"""The files of a checkpoint directory, the errors of reading one, and its config."""

from __future__ import annotations

import pathlib

from switchjax import config as config_lib

CONFIG_FILE = "config.json"
CHECKPOINTS = "checkpoints"
MANIFEST = "checksums.json"


class IncompatibleCheckpointError(ValueError):
  """A checkpoint of another model or optimizer (not a broken one): never set aside."""


class CorruptCheckpointError(ValueError):
  """A step whose files differ from the checksums recorded when it was saved."""


class WriteError(RuntimeError):
  """A run's directory could not be written (full disk, permissions); what was complete is
  kept."""


def read_checkpoint_config(directory) -> config_lib.Config:
  """The Config saved in a checkpoint directory (its config.json), as it was saved.

  Unlike `switchjax.load_config`, which also takes presets and applies overrides, this reads
  exactly what a training run or a conversion wrote next to the parameters.
  """
  path = pathlib.Path(directory) / CONFIG_FILE
  if not path.exists():
    raise FileNotFoundError(
      f"{path} not found: {directory} is not a switchjax checkpoint "
      "directory (make one with scripts/convert_hf.py or pretrain.py)."
    )
  return config_lib.read_config(path)
