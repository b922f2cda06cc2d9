"""The files of a Hugging Face checkpoint directory: `config.json`, the weights (safetensors or
torch `.bin`, single or sharded) read a block of rows at a time, and the tokenizer's config.

Nothing here knows the model: `Tensors` gives names, shapes and dtypes first, so that
everything can be checked before a weight is read.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Callable

import numpy as np


class CheckpointError(ValueError):
  """A checkpoint directory that cannot be converted; the message names the problem."""


WEIGHT_FILES = (
  "model.safetensors",
  "model.safetensors.index.json",
  "pytorch_model.bin",
  "pytorch_model.bin.index.json",
)
SPM = "spiece.model"
TOKENIZER_CONFIG = "tokenizer_config.json"


def checkpoint_dir(path) -> pathlib.Path:
  """The directory, with clear errors for a missing, non-directory or empty path."""
  path = pathlib.Path(path)
  if not path.exists():
    raise CheckpointError(
      f"{path} does not exist: give a Hugging Face checkpoint directory (config.json plus weights)."
    )
  if not path.is_dir():
    raise CheckpointError(
      f"{path} is not a directory: give the Hugging Face checkpoint "
      "directory holding config.json and the weights."
    )
  files = sorted(p.name for p in path.iterdir())
  if not files:
    raise CheckpointError(
      f"{path} is empty: expected config.json and model.safetensors (or pytorch_model.bin)."
    )
  if "config.json" not in files:
    raise CheckpointError(
      f"{path} has no config.json (found {', '.join(files[:10])}); a "
      "Hugging Face checkpoint directory needs it."
    )
  return path


def read_hf_config(path) -> dict:
  """config.json of a checkpoint directory as a dict."""
  path = checkpoint_dir(path)
  try:
    hf = json.loads((path / "config.json").read_text())
  except (OSError, ValueError) as e:
    raise CheckpointError(f"{path / 'config.json'} is not valid JSON ({e}).") from None
  if not isinstance(hf, dict):
    raise CheckpointError(f"{path / 'config.json'} does not hold a JSON object.")
  _check_sizes(hf, path / "config.json")
  return hf


# The integer settings of a T5-family config.json: at least 1, or at least 0 (None allowed).
_POSITIVE = (
  "vocab_size",
  "d_model",
  "d_ff",
  "d_kv",
  "num_heads",
  "num_layers",
  "num_experts",
  "expert_capacity",
  "relative_attention_num_buckets",
  "relative_attention_max_distance",
)
_COUNTS = (
  "num_decoder_layers",
  "num_sparse_encoder_layers",
  "num_sparse_decoder_layers",
  "encoder_sparse_step",
  "decoder_sparse_step",
)


def _check_sizes(hf: dict, where: pathlib.Path) -> None:
  """Refuses sizes that are not whole numbers in range before anything is allocated for them
  (a num_experts of 1e7 would otherwise build ten million tensor names first)."""
  for key in (*_POSITIVE, *_COUNTS):
    value = hf.get(key)
    if value is None and key in _COUNTS:
      continue
    if key not in hf:
      continue
    least = 1 if key in _POSITIVE else 0
    if isinstance(value, bool) or not isinstance(value, int) or not least <= value < 2**31:
      raise CheckpointError(
        f"{where} has {key}={value!r}: it must be a whole number >= {least}; fix it in "
        "config.json (the file is damaged or not a model's config)."
      )


class Tensors:
  """The tensors of a checkpoint: names, shapes and dtypes first (so that everything is checked
  before anything is loaded), then rows read on demand, so that nothing is held longer than
  it is used.

  Attributes:
    shapes, dtypes: of every tensor, by name.
    aliases: names read from another tensor (shared.weight from a tied copy).
  """

  def __init__(self, shapes: dict, dtypes: dict, read_rows: Callable[[str, int, int], np.ndarray]):
    self.shapes, self.dtypes, self._read_rows = shapes, dtypes, read_rows
    self.aliases: dict[str, str] = {}

  def rows(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Rows [start, stop) along the first axis (all of a 0-d tensor), in the stored dtype."""
    name = self.aliases.get(name, name)
    shape = self.shapes[name]
    if not shape:
      return self._read_rows(name, 0, 1).reshape(())
    return self._read_rows(name, start, shape[0] if stop is None else min(stop, shape[0]))


def _safetensors_dtypes() -> dict:
  import ml_dtypes  # comes with jax; numpy itself has no bfloat16

  return {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
  }


def _safetensors_header(file: pathlib.Path) -> tuple[dict, int]:
  """(tensor entries, byte offset of the data) of a .safetensors file, validated.

  Reads the format directly (8-byte header length, JSON header, raw little-endian data)
  because safetensors' numpy loader cannot return bfloat16.
  """
  dtypes = _safetensors_dtypes()
  try:
    size = file.stat().st_size
    with open(file, "rb") as fh:
      length = int.from_bytes(fh.read(8), "little")
      if size < 8 or length > size - 8:
        raise ValueError(f"header length {length} does not fit in a {size}-byte file")
      header = json.loads(fh.read(length))
    if not isinstance(header, dict):
      raise ValueError("the header is not a JSON object")
    header.pop("__metadata__", None)
    data_size = size - 8 - length
    for name, entry in header.items():
      if entry.get("dtype") not in dtypes:
        raise ValueError(
          f"tensor {name!r} has dtype {entry.get('dtype')!r}; expected one of {', '.join(dtypes)}"
        )
      begin, end = entry["data_offsets"]
      nbytes = int(np.prod(entry["shape"], dtype=np.int64)) * dtypes[entry["dtype"]].itemsize
      if not 0 <= begin <= end <= data_size or end - begin != nbytes:
        raise ValueError(
          f"tensor {name!r} has byte range {begin}..{end}, which does not fit "
          f"its shape {entry['shape']} or the file"
        )
  except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
    raise CheckpointError(
      f"{file} is not a readable safetensors file ({e}); the file is "
      "corrupt or truncated: download or save it again."
    ) from None
  return header, 8 + length


def _read_safetensors(files: list[pathlib.Path]) -> Tensors:
  """Tensors of one or more .safetensors files; rows are read straight from the file (no
  memory map, whose touched pages would stay resident)."""
  dtypes = _safetensors_dtypes()
  where: dict[str, tuple[pathlib.Path, dict, int]] = {}
  for file in files:
    header, start = _safetensors_header(file)
    for name, entry in header.items():
      where[name] = (file, entry, start)

  def read_rows(name: str, first: int, stop: int) -> np.ndarray:
    file, entry, start = where[name]
    shape, dtype = entry["shape"], dtypes[entry["dtype"]]
    row = int(np.prod(shape[1:], dtype=np.int64))
    offset = start + entry["data_offsets"][0] + first * row * dtype.itemsize
    count = (stop - first) * row
    data = np.fromfile(file, dtype, count, offset=offset) if count else np.zeros(0, dtype)
    return data.reshape([stop - first, *shape[1:]])

  return Tensors(
    {name: tuple(e["shape"]) for name, (_, e, _) in where.items()},
    {name: dtypes[e["dtype"]] for name, (_, e, _) in where.items()},
    read_rows,
  )


def _torch_load(file: pathlib.Path, mmap: bool) -> dict:
  """A state dict of tensors (memory-mapped when `mmap`), or CheckpointError."""
  import torch  # only for .bin checkpoints

  try:
    part = torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
  except Exception as e:  # noqa: BLE001  (torch raises many kinds for a bad file)
    if mmap and "mmap" in str(e):  # the legacy (pre-zip) format: loaded whole
      return _torch_load(file, mmap=False)
    raise CheckpointError(
      f"{file} could not be read by torch.load ({type(e).__name__}: "
      f"{str(e)[:200]}); the file is corrupt or not a state dict."
    ) from None
  if not isinstance(part, dict) or not all(isinstance(v, torch.Tensor) for v in part.values()):
    raise CheckpointError(f"{file} does not hold a state dict of tensors.")
  return part


def _torch_numpy(tensor) -> np.ndarray:
  """A torch tensor as numpy in the same dtype (bfloat16 through its bits)."""
  import ml_dtypes
  import torch

  if tensor.dtype == torch.bfloat16:
    return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return tensor.numpy()


def _read_torch(files: list[pathlib.Path]) -> Tensors:
  """Tensors of pytorch_model.bin files (torch.load with weights_only=True), one shard open
  (memory-mapped) at a time, so that at most one shard's pages are resident."""
  where, shapes, dtypes = {}, {}, {}
  for file in files:
    for name, t in _torch_load(file, mmap=True).items():
      where[name], shapes[name] = file, tuple(t.shape)
      dtypes[name] = _torch_numpy(t.reshape(-1)[:0]).dtype
  current: dict[pathlib.Path, dict] = {}

  def read_rows(name: str, start: int, stop: int) -> np.ndarray:
    if where[name] not in current:
      current.clear()  # drops the previous shard's mapping first
      current[where[name]] = _torch_load(where[name], mmap=True)
    tensor = current[where[name]][name]
    return _torch_numpy(tensor.reshape(-1) if tensor.dim() == 0 else tensor)[start:stop].copy()

  return Tensors(shapes, dtypes, read_rows)


def _shard_files(index_file: pathlib.Path) -> list[pathlib.Path]:
  """The shard files named by a *.index.json weight map (which must all exist)."""
  try:
    weight_map = json.loads(index_file.read_text())["weight_map"]
    names = sorted(set(weight_map.values()))
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    raise CheckpointError(f"{index_file} is not a readable shard index ({e}).") from None
  missing = [n for n in names if not (index_file.parent / n).is_file()]
  if missing:
    raise CheckpointError(f"{index_file} names shard files that are missing: {', '.join(missing)}.")
  return [index_file.parent / n for n in names]


def read_tensors(path: pathlib.Path) -> Tensors:
  """The tensors of a checkpoint directory, from the first of WEIGHT_FILES it holds."""
  single, sharded, torch_single, torch_sharded = (path / n for n in WEIGHT_FILES)
  if single.is_file():
    return _read_safetensors([single])
  if sharded.is_file():
    return _read_safetensors(_shard_files(sharded))
  if torch_single.is_file():
    return _read_torch([torch_single])
  if torch_sharded.is_file():
    return _read_torch(_shard_files(torch_sharded))
  raise CheckpointError(
    f"{path} has no weights: expected one of {', '.join(WEIGHT_FILES)} "
    f"(found {', '.join(sorted(p.name for p in path.iterdir()))})."
  )


def read_extra_ids(hf_dir) -> int:
  """The sentinel count of an HF checkpoint's tokenizer: tokenizer_config.json's extra_ids, or
  its <extra_id_N> special tokens; T5's 100 when it says nothing."""
  try:
    tokenizer = json.loads((pathlib.Path(hf_dir) / TOKENIZER_CONFIG).read_text())
  except (OSError, ValueError):
    return 100
  if isinstance(tokenizer.get("extra_ids"), int) and tokenizer["extra_ids"] > 0:
    return tokenizer["extra_ids"]
  special = tokenizer.get("additional_special_tokens") or []
  sentinels = [t for t in special if isinstance(t, str) and t.startswith("<extra_id_")]
  return len(sentinels) or 100


def write_tokenizer_config(out_dir, extra_ids: int) -> None:
  """tokenizer_config.json for transformers' T5Tokenizer next to a copied spiece.model: the
  model's sentinel count (its default, 100, would move every sentinel id of another count)."""
  config = {"tokenizer_class": "T5Tokenizer", "extra_ids": int(extra_ids)}
  (pathlib.Path(out_dir) / TOKENIZER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
