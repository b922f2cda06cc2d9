"""switchjax -> Hugging Face checkpoint (`to_hf`): config.json and sharded safetensors written
one parameter, and a block of rows, at a time."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
from collections.abc import Callable, Iterator

import jax
import numpy as np

from switchjax import checkpoint, scan
from switchjax.checkpoint import LazyArray
from switchjax.config import Config, ModelConfig
from switchjax.hf.config_map import config_to_hf
from switchjax.hf.files import SPM, TOKENIZER_CONFIG
from switchjax.hf.tensor_map import (
  TIED_EMBEDDINGS,
  TensorSpec,
  get_path,
  hf_layout,
  leaf_specs,
  numpy_dtype,
  rows_per_block,
  tensor_specs,
)
from switchjax.model import SwitchTransformer

SAFETENSORS_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16"}
HF_OUTPUTS = (
  "config.json",
  "generation_config.json",
  "model.safetensors",
  "model.safetensors.index.json",
  "model-*-of-*.safetensors",
  "pytorch_model.bin",
  "pytorch_model.bin.index.json",
  "pytorch_model-*-of-*.bin",
  SPM,
  TOKENIZER_CONFIG,
)


def parse_size(size) -> int:
  """Bytes of an int or a string like '5GB' (10**9), '500MB', '2GiB' (2**30), '100KB'."""
  if isinstance(size, int):
    return size
  m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?)B?\s*", str(size).upper())
  if not m or float(m.group(1)) <= 0:
    raise ValueError(f"max_shard_size={size!r}: use bytes or a size like '5GB', '500MB', '2GiB'.")
  base = 1024 if m.group(3) else 1000
  return int(float(m.group(1)) * base ** " KMGT".index(m.group(2) or " "))


def _model_config(model_or_config) -> ModelConfig:
  if isinstance(model_or_config, ModelConfig):
    return model_or_config
  if isinstance(model_or_config, (Config, SwitchTransformer)):
    return model_or_config.model if isinstance(model_or_config, Config) else model_or_config.config
  raise TypeError(
    f"to_hf takes a SwitchTransformer, a ModelConfig or a Config, not "
    f"{type(model_or_config).__name__}."
  )


def _plain_params(params) -> dict:
  """Unboxes logical-partitioning metadata and a {'params': ...} wrapper."""
  import flax.linen as nn

  params = nn.meta.unbox(params)
  if "params" in params and "token_embedder" not in params:
    params = params["params"]
  return params


@dataclasses.dataclass(frozen=True)
class _Entry:
  """One tensor of the HF checkpoint being written: its name, shape, dtype and file."""

  name: str
  shape: tuple[int, ...]
  dtype: np.dtype
  file: str = ""

  @property
  def nbytes(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def _leaf_and_shape(params, path: tuple[str, ...], specs: list[TensorSpec]):
  """The parameter at `path`, checked against the config's shape without loading it."""
  leaf = get_path(params, path)
  spec = specs[0]
  expected = spec.jax_shape if spec.expert is None else (len(specs), *spec.jax_shape)
  if tuple(leaf.shape) != expected:
    raise ValueError(
      f"params {'/'.join(path)} has shape {tuple(leaf.shape)}, expected {expected} for this "
      "model config."
    )
  return leaf


def _hf_entries(params, cfg: ModelConfig, dtype) -> list[tuple[tuple[str, ...], list[_Entry]]]:
  """For each parameter, the HF tensors written from it (checked shapes, output dtypes)."""
  plan = []
  for path, specs in leaf_specs(tensor_specs(cfg)).items():
    leaf = _leaf_and_shape(params, path, specs)
    out = np.dtype(leaf.dtype) if dtype is None else numpy_dtype(dtype)
    if out.name not in SAFETENSORS_DTYPES:
      raise ValueError(f"params {'/'.join(path)} have dtype {out}, which safetensors lacks.")
    names = [s.name for s in specs]
    if path == ("token_embedder", "embedding") and not cfg.tie_embeddings:
      names += list(TIED_EMBEDDINGS)  # transformers 5.x ties nothing then: write the copies
    shape = specs[0].hf_shape
    plan.append((path, [_Entry(n, shape, out) for n in names]))
  return plan


def _shard(entries: list[_Entry], max_shard_size: int) -> list[list[_Entry]]:
  """Consecutive entries in files of at most max_shard_size bytes (a bigger tensor alone),
  named as transformers names them."""
  shards, size = [[]], 0
  for e in entries:
    if shards[-1] and size + e.nbytes > max_shard_size:
      shards.append([])
      size = 0
    shards[-1].append(e)
    size += e.nbytes
  n = len(shards)
  return [
    [
      dataclasses.replace(
        e, file="model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
      )
      for e in shard
    ]
    for i, shard in enumerate(shards)
  ]


def _safetensors_prefix(entries: list[_Entry]) -> bytes:
  """The 8-byte length and JSON header of a safetensors file holding `entries` in order
  (padded with spaces to a multiple of 8 bytes, as the safetensors library writes it)."""
  header, offset = {"__metadata__": {"format": "pt"}}, 0
  for e in entries:
    header[e.name] = {
      "dtype": SAFETENSORS_DTYPES[e.dtype.name],
      "shape": list(e.shape),
      "data_offsets": [offset, offset + e.nbytes],
    }
    offset += e.nbytes
  text = json.dumps(header, separators=(",", ":")).encode()
  text += b" " * (-len(text) % 8)
  return len(text).to_bytes(8, "little") + text


def _stored_rows(spec: TensorSpec, leaf) -> Callable[[slice], np.ndarray] | None:
  """rows(slice) reading HF rows straight from a stored parameter, when a slice of it holds
  them (not transposed, or a transposed 2-D matrix); else None."""
  if not isinstance(leaf, checkpoint.StoredArray) or spec.expert is not None:
    return None
  if not spec.transpose:
    return leaf.__getitem__
  if len(spec.hf_shape) == 2 and leaf.shape == spec.hf_shape[::-1]:
    return lambda rows: leaf[:, rows].T
  return None


def _blocks(leaf) -> Iterator[tuple[int, np.ndarray]]:
  """(start, leaf[start:stop]) covering a parameter along its first axis: a stored block (one
  expert) at a time for LazyArrays, the whole array otherwise."""
  if isinstance(leaf, LazyArray) and leaf.axis == 0:
    for start, stop in leaf.block_ranges():
      yield start, leaf.read_block(start, stop)
  else:
    yield 0, np.asarray(leaf)


def _hf_arrays(params, cfg: ModelConfig, plan) -> Iterator[tuple[str, Callable]]:
  """(name, rows) in plan order, where rows(slice) gives those rows of the HF tensor: stacked
  experts are read a stored block (one expert) at a time, parameters stored in slices that hold
  HF rows a slice at a time, other parameters whole, one at a time."""
  specs = leaf_specs(tensor_specs(cfg))
  for path, entries in plan:
    by_name = {s.name: s for s in specs[path]}
    leaf = get_path(params, path)
    if specs[path][0].expert is not None:
      for start, block in _blocks(leaf):
        for i, x in enumerate(block):
          spec = by_name[entries[start + i].name]
          assert spec.expert == start + i, (spec, start + i)
          yield spec.name, hf_layout(spec, x).__getitem__
    else:
      spec = by_name.get("shared.weight", specs[path][0])
      rows = _stored_rows(spec, leaf) or hf_layout(spec, leaf).__getitem__
      for e in entries:
        yield e.name, rows
    checkpoint.release_freed_memory()


def _write_tensor(fh, entry: _Entry, rows: Callable) -> None:
  """Writes one tensor from rows(slice) in blocks of BLOCK_BYTES (a transposed tensor is made
  contiguous a block at a time, not whole)."""
  if not entry.shape:
    np.asarray(rows(()), entry.dtype).tofile(fh)
    return
  step = rows_per_block(entry.shape, entry.dtype.itemsize)
  for a in range(0, entry.shape[0], step):
    block = np.ascontiguousarray(rows(slice(a, min(a + step, entry.shape[0]))), entry.dtype)
    assert block.shape == (min(step, entry.shape[0] - a), *entry.shape[1:]), (entry, block.shape)
    block.tofile(fh)


def _write_safetensors(out: pathlib.Path, shards, arrays) -> None:
  """Writes the shard files (and the index when there are several) from `arrays`."""
  for shard in shards:
    with open(out / shard[0].file, "wb") as fh:
      fh.write(_safetensors_prefix(shard))
      for e in shard:
        name, rows = next(arrays)
        assert name == e.name, (name, e)
        _write_tensor(fh, e, rows)
  if len(shards) > 1:
    entries = [e for shard in shards for e in shard]
    index = {
      "metadata": {"total_size": sum(e.nbytes for e in entries)},
      "weight_map": {e.name: e.file for e in entries},
    }
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def to_hf(
  model_or_config,
  params,
  out_dir,
  *,
  max_shard_size="5GB",
  dtype=None,
  overwrite: bool = False,
) -> pathlib.Path:
  """Writes a Hugging Face checkpoint directory (config.json, generation_config.json and
  model.safetensors, or model-0000i-of-0000n.safetensors shards with their index) for
  `SwitchTransformersForConditionalGeneration.from_pretrained`.

  One parameter is in memory at a time: leaves may be numpy or jax arrays, or LazyArrays
  (e.g. `checkpoint.lazy_params` of a checkpoint too big to restore whole).

  Args:
    model_or_config: a SwitchTransformer, its ModelConfig, or a whole switchjax Config.
    params: the model's parameters (possibly boxed).
    out_dir: created if needed; must be empty unless `overwrite` (which replaces the files a
      conversion writes and leaves others).
    max_shard_size: bytes per safetensors file (int, or '5GB', '500MB', ...).
    dtype: of the written tensors; None keeps each parameter's.

  Raises ValueError (before writing anything) when HF cannot express the model (see
  `config_to_hf`), when params do not fit the config, when out_dir is not empty, or when it
  overlaps the directory lazily read params come from.
  """
  cfg = _model_config(model_or_config)
  hf_config = config_to_hf(cfg)
  params = _plain_params(params)
  if cfg.scan_layers:  # written from the unscanned layout; lazy leaves stay lazy per layer
    params, cfg = scan.unstack_layers(params), dataclasses.replace(cfg, scan_layers=False)
  plan = _hf_entries(params, cfg, dtype)
  shards = _shard([e for _, entries in plan for e in entries], parse_size(max_shard_size))
  out = pathlib.Path(out_dir)
  sources = {getattr(x, "source", None) for x in jax.tree.leaves(params)} - {None}
  checkpoint.check_output_dir(out, sources, overwrite, "--hf_output_dir")
  with checkpoint.claim_output_dir(out, "--hf_output_dir"):
    checkpoint.clear_output_dir(out, HF_OUTPUTS)
    out.mkdir(parents=True, exist_ok=True)
    _write_safetensors(out, shards, _hf_arrays(params, cfg, plan))
    dtypes = {e.dtype.name for shard in shards for e in shard}
    hf_config["dtype"] = dtypes.pop() if len(dtypes) == 1 else "float32"
    generation = {"decoder_start_token_id": 0, "eos_token_id": 1, "pad_token_id": 0}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
  return out
