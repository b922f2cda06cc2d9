"""Hugging Face checkpoint -> switchjax: every name, shape, sparse layer and tied copy checked
first, then parameters that read their tensors on demand (`lazy_from_hf`), in memory
(`from_hf`) or streamed into an Orbax checkpoint (`convert_from_hf`)."""

from __future__ import annotations

import dataclasses
import pathlib
import re
import shutil
from typing import Any

import jax
import numpy as np

from switchjax import checkpoint, scan
from switchjax.checkpoint import LazyArray
from switchjax.config import Config, DataConfig, ModelConfig
from switchjax.config.sparse_layout import decoder_sparse_layers, encoder_sparse_layers
from switchjax.hf.config_map import config_from_hf
from switchjax.hf.files import (
  SPM,
  CheckpointError,
  Tensors,
  checkpoint_dir,
  read_extra_ids,
  read_hf_config,
  read_tensors,
)
from switchjax.hf.tensor_map import (
  DTYPES,
  TIED_EMBEDDINGS,
  TensorSpec,
  jax_layout,
  leaf_specs,
  numpy_dtype,
  rows_per_block,
  set_path,
  tensor_specs,
)
from switchjax.model import SwitchTransformer


def _names(names, limit: int = 20) -> str:
  names = sorted(names)
  more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
  return ", ".join(names[:limit]) + more


def _check_expert_count(cfg: ModelConfig, shapes: dict, path) -> None:
  """Refuses a num_experts the weights do not hold before a name is made for each expert (a
  config.json saying 1e6 experts would otherwise exhaust memory first)."""
  found = {m.group(1) for name in shapes if (m := re.search(r"\.experts\.expert_(\d+)\.", name))}
  sparse = encoder_sparse_layers(cfg) or decoder_sparse_layers(cfg)
  if sparse and found and cfg.moe.num_experts != len(found):
    raise CheckpointError(
      f"{path}/config.json has num_experts={cfg.moe.num_experts} but the weights hold "
      f"{len(found)} experts per layer; fix num_experts in config.json."
    )


def _check_sparse_layers(cfg: ModelConfig, shapes: dict) -> None:
  """The sparse blocks of the config must be the blocks holding a router in the file."""
  pattern = re.compile(
    r"^(encoder|decoder)\.block\.(\d+)\.layer\.\d+\.mlp\.router\."
    r"classifier\.weight$"
  )
  found = {"encoder": set(), "decoder": set()}
  for name in shapes:
    if m := pattern.match(name):
      found[m.group(1)].add(int(m.group(2)))
  problems = []
  for stack, expected in (
    ("encoder", encoder_sparse_layers(cfg)),
    ("decoder", decoder_sparse_layers(cfg)),
  ):
    if set(expected) != found[stack]:
      problems.append(
        f"the config makes {stack} blocks {tuple(expected)} sparse but the "
        f"weights have routers in {stack} blocks {tuple(sorted(found[stack]))}"
      )
  if problems:
    raise CheckpointError(
      "Sparse layers do not match: " + "; ".join(problems) + ". (HF's rule: step = "
      "*_sparse_step or num_layers // num_sparse_*_layers, block i sparse when i % step == "
      "1.) Fix num_sparse_encoder_layers / num_sparse_decoder_layers (or the *_sparse_step "
      "entries) in config.json."
    )


def _equal_rows(tensors: Tensors, a: str, b: str) -> bool:
  """Whether two tensors are equal, compared a block of rows at a time."""
  if tensors.shapes[a] != tensors.shapes[b]:
    return False
  rows = rows_per_block(tensors.shapes[a], 4)
  length = tensors.shapes[a][0] if tensors.shapes[a] else 1
  return all(
    np.array_equal(
      tensors.rows(a, i, i + rows).astype(np.float32),
      tensors.rows(b, i, i + rows).astype(np.float32),
    )
    for i in range(0, length, rows)
  )


def resolve_tied(cfg: ModelConfig, tensors: Tensors) -> set[str]:
  """Checks the copies of shared.weight that transformers ties, and returns their names (to
  be ignored). A file without shared.weight but with a copy gets the copy as shared.weight."""
  shapes = tensors.shapes
  copies = [n for n in TIED_EMBEDDINGS if n in shapes]
  if cfg.tie_embeddings and "lm_head.weight" in shapes:
    copies.append("lm_head.weight")
  if "shared.weight" not in shapes and copies:
    source = copies.pop(0)
    shapes["shared.weight"] = shapes[source]
    tensors.dtypes["shared.weight"] = tensors.dtypes[source]
    tensors.aliases["shared.weight"] = source
  if not copies or "shared.weight" not in shapes:
    return set(copies)
  differ = [n for n in copies if not _equal_rows(tensors, n, "shared.weight")]
  if differ:
    raise CheckpointError(
      f"{_names(differ)} differ from shared.weight: switchjax has one token embedding "
      "shared by the encoder, the decoder and (when tied) the logits. (transformers 5.x "
      "does not tie encoder/decoder.embed_tokens when tie_word_embeddings=False; copy "
      "shared.weight into them before saving.)"
    )
  return set(copies)


def check_names_and_shapes(specs: list[TensorSpec], shapes: dict, ignored: set[str]) -> None:
  """Missing, unexpected and wrongly shaped tensors, all reported in one error."""
  expected = {s.name: s.hf_shape for s in specs}
  missing = set(expected) - set(shapes)
  unexpected = set(shapes) - set(expected) - ignored
  wrong = [
    f"{n} expected {expected[n]}, found {tuple(shapes[n])}"
    for n in sorted(set(expected) & set(shapes))
    if tuple(shapes[n]) != expected[n]
  ]
  problems = []
  if missing:
    problems.append(f"missing tensors: {_names(missing)}")
  if unexpected:
    problems.append(f"unexpected tensors: {_names(unexpected)}")
  if wrong:
    problems.append(f"shape mismatch: {'; '.join(wrong[:20])}")
  if problems:
    raise CheckpointError("The weights do not match config.json: " + ". ".join(problems) + ".")


def lazy_leaf(tensors: Tensors, specs: list[TensorSpec], dtype: np.dtype, source) -> LazyArray:
  """One switchjax parameter read from its HF tensors on demand: a layer's experts stacked one
  expert per block, big 2-D tensors a block of HF rows at a time, anything else whole."""
  spec = specs[0]

  def rows(name, start=0, stop=None):
    return tensors.rows(name, start, stop).astype(dtype, copy=False)

  if spec.expert is not None:
    experts = sorted(specs, key=lambda s: s.expert)

    def read_experts(start, stop):  # [stop - start, in, out]
      if stop - start == 1:  # the usual block: a view, no copy
        return jax_layout(experts[start], rows(experts[start].name))[None]
      return np.stack([jax_layout(s, rows(s.name)) for s in experts[start:stop]])

    shape = (len(experts), *spec.jax_shape)
    return LazyArray(shape, dtype, read_experts, axis=0, block=1, source=source)
  block = rows_per_block(spec.hf_shape, dtype.itemsize)
  if not spec.transpose:  # leaf rows = HF rows
    read, axis = (lambda a, b: rows(spec.name, a, b)), 0
  elif len(spec.hf_shape) == 2 and spec.jax_shape == spec.hf_shape[::-1]:  # columns = HF rows
    read, axis = (lambda a, b: rows(spec.name, a, b).T), 1
  else:  # whole
    read, axis, block = (lambda a, b: jax_layout(spec, rows(spec.name))), 0, None
  return LazyArray(spec.jax_shape, dtype, read, axis=axis, block=block, source=source)


def lazy_params(tensors: Tensors, specs: list[TensorSpec], dtype, source=None) -> dict:
  """switchjax params whose leaves are LazyArrays of `dtype` over the checked HF tensors
  `specs` name (of the directory `source`)."""
  params: dict[str, Any] = {}
  for path, leaf in leaf_specs(specs).items():
    set_path(params, path, lazy_leaf(tensors, leaf, np.dtype(dtype), source))
  return params


def _stored_dtype(tensors: Tensors, cfg: ModelConfig) -> str:
  """The checkpoint's dtype when all its tensors share one switchjax supports; else float32
  (mixed float16/bfloat16, or float64)."""
  names = {tensors.aliases.get(s.name, s.name) for s in tensor_specs(cfg)}
  found = {np.dtype(tensors.dtypes[n]).name for n in names}
  return found.pop() if len(found) == 1 and found <= set(DTYPES) else "float32"


def lazy_from_hf(path, dtype=None, scan_layers: bool = False) -> tuple[SwitchTransformer, dict]:
  """(model, params) of a Hugging Face checkpoint directory with LazyArray leaves: everything is
  checked (names, shapes, sparse layers, tied copies) but no weight is loaded; each leaf reads
  its tensors when it is written or converted to numpy.

  Args:
    path: the checkpoint directory.
    dtype: of the params, 'float32', 'bfloat16' or 'float16'; None keeps the checkpoint's own
      (float32 when its tensors mix dtypes). The model config's param_dtype says which.
    scan_layers: the model with model.scan_layers and its parameters stacked
      (`scan.stack_layers`; still lazy: a stacked leaf reads one layer per block).
  """
  path = checkpoint_dir(path)
  cfg = config_from_hf(read_hf_config(path))
  tensors = read_tensors(path)
  _check_expert_count(cfg, tensors.shapes, path)
  _check_sparse_layers(cfg, tensors.shapes)
  ignored = resolve_tied(cfg, tensors)
  check_names_and_shapes(tensor_specs(cfg), tensors.shapes, ignored)
  dtype = numpy_dtype(_stored_dtype(tensors, cfg) if dtype is None else dtype)
  cfg = dataclasses.replace(cfg, param_dtype=dtype.name)
  params = lazy_params(tensors, tensor_specs(cfg), dtype, path)
  if scan_layers:
    cfg = dataclasses.replace(cfg, scan_layers=True)
    cfg.validate()
    params = scan.stack_layers(params, cfg)
  return SwitchTransformer(cfg), params


def from_hf(path, dtype="float32", scan_layers: bool = False) -> tuple[SwitchTransformer, dict]:
  """(model, params) from a Hugging Face checkpoint directory, in memory.

  The params are numpy arrays of `dtype` (None: the checkpoint's) in switchjax's layout;
  `model.apply({"params": params}, input_ids, decoder_input_ids)` gives transformers' logits
  when padding is token 0 (the attention mask is `input_ids != 0`). Raises CheckpointError
  naming what is wrong. For models bigger than memory, `convert_from_hf` writes a switchjax
  checkpoint one tensor at a time. `scan_layers` gives the scanned model (model.scan_layers).
  """
  model, params = lazy_from_hf(path, dtype, scan_layers)
  return model, jax.tree.map(np.asarray, params)


def convert_from_hf(
  hf_dir, output_dir, *, dtype=None, overwrite: bool = False, scan_layers: bool = False
) -> Config:
  """Converts a Hugging Face checkpoint directory into a switchjax checkpoint directory
  (config.json, the parameters as Orbax checkpoint step 0, and spiece.model when `hf_dir` has
  one), streaming: memory holds a few blocks (one expert, or 4 MiB of rows), never the model.

  `dtype` None keeps the checkpoint's dtype (bfloat16 stays bfloat16). Refuses (ValueError,
  before writing anything) an output directory inside or around `hf_dir`, or one that is not
  empty unless `overwrite`. `scan_layers` writes the scanned layout (model.scan_layers), still
  streaming (one layer of a stacked parameter at a time). Returns the Config written.
  """
  hf_dir, out = pathlib.Path(hf_dir), pathlib.Path(output_dir)
  checkpoint.check_output_dir(out, [hf_dir], overwrite, "--output_dir")
  model, params = lazy_from_hf(hf_dir, dtype, scan_layers)
  data = DataConfig(extra_ids=read_extra_ids(hf_dir))
  if (hf_dir / SPM).is_file():
    data = dataclasses.replace(data, spm_path=str((out / SPM).resolve()))
  config = Config(name=f"hf:{hf_dir.resolve().name}", model=model.config, data=data)
  with checkpoint.claim_output_dir(out, "--output_dir"):
    checkpoint.clear_output_dir(out, (checkpoint.CONFIG_FILE, checkpoint.CHECKPOINTS, SPM))
    if (hf_dir / SPM).is_file():
      out.mkdir(parents=True, exist_ok=True)
      shutil.copyfile(hf_dir / SPM, out / SPM)
    checkpoint.save_model(out, config.validate(), params)
  return config
