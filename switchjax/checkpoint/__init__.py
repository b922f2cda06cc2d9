"""Orbax checkpoints: one layout for training runs, converted models and fine-tuning starts.

A checkpoint directory (a training workdir or the output of `scripts/convert_hf.py`) holds

  config.json                 the resolved switchjax Config
  checkpoints/<step>/params   the model parameters (Orbax, sharded arrays)
  checkpoints/<step>/opt_state  optimizer state (training runs only)
  checkpoints/<step>/meta     JSON: {"step": ..., "data": input-pipeline position, ...}

  checkpoints/<step>/checksums.json  size and sha256 of each file of the step (MANIFEST)

Orbax writes each step to a temporary directory and renames it when complete, so a run killed
while saving leaves the previous steps intact. Once Orbax has finished a step, its files are
checksummed; `CheckpointStore.restore_latest` verifies them and steps back over a newest
checkpoint whose bytes changed or that fails to load, and says so. A directory written by
`save_model` (a converted model) holds parameters only: a read-only input of new runs, never
resumed as a training run.

Models bigger than memory: `save_model` writes `LazyArray` leaves one block at a time (an Orbax
type handler of its own, storing what Orbax's NumpyHandler stores), `lazy_params` reads a
checkpoint's arrays on demand (`StoredArray`); `switchjax.model_loading.load_model` restores a
model from them one parameter at a time, each device reading only its own slices. The package
reads and writes arrays without importing the model.

The package, a module per part: `layout` (the directory's files, the errors), `manifest`
(checksums), `compatibility` (a stored tree against the expected one), `store`
(CheckpointStore: a run's checkpoints), `lazy_array`, `streaming` (block-wise writes),
`memory`, `output_dir` (a conversion's target), `model_save` and `stored_array` (reads on
demand).
"""

from switchjax.checkpoint.compatibility import params_equal
from switchjax.checkpoint.layout import (
  CHECKPOINTS,
  CONFIG_FILE,
  MANIFEST,
  CorruptCheckpointError,
  IncompatibleCheckpointError,
  WriteError,
  read_checkpoint_config,
)
from switchjax.checkpoint.lazy_array import LazyArray
from switchjax.checkpoint.manifest import verify_manifest, write_manifest
from switchjax.checkpoint.memory import release_freed_memory, release_memory_eagerly
from switchjax.checkpoint.model_save import save_model
from switchjax.checkpoint.output_dir import check_output_dir, claim_output_dir, clear_output_dir
from switchjax.checkpoint.store import CheckpointStore
from switchjax.checkpoint.stored_array import StoredArray, lazy_params
from switchjax.checkpoint.streaming import WRITE_BUDGET

__all__ = [
  "CHECKPOINTS",
  "CONFIG_FILE",
  "MANIFEST",
  "WRITE_BUDGET",
  "CheckpointStore",
  "CorruptCheckpointError",
  "IncompatibleCheckpointError",
  "LazyArray",
  "StoredArray",
  "WriteError",
  "check_output_dir",
  "claim_output_dir",
  "clear_output_dir",
  "lazy_params",
  "params_equal",
  "read_checkpoint_config",
  "release_freed_memory",
  "release_memory_eagerly",
  "save_model",
  "verify_manifest",
  "write_manifest",
]
