"""Hugging Face `google/switch-*` checkpoints <-> switchjax.

`from_hf(path)` reads `config.json` (transformers 4.x or 5.x layout) and the weights
(`model.safetensors`, sharded safetensors, `pytorch_model.bin` or sharded bins; float32, float16
or bfloat16), checks every tensor name and shape against the config, transposes torch's
(out, in) Linear weights and stacks the experts into [E, in, out] kernels. The ModelConfig it
builds computes what transformers computes: each sequence is one routing group with a fixed
`expert_capacity`, HF's sparse-layer placement, padding routed like any token (no
`mask_padding_activations`), tied or untied logits.

`to_hf(model_or_config, params, out_dir)` writes `config.json` (5.x layout) and safetensors
(`model.safetensors`, or shards with their index) for
`SwitchTransformersForConditionalGeneration.from_pretrained`, and refuses (ValueError) what that
model cannot express: gated MLPs, capacity-factor routing, k > 1, experts-choose or
batch-prioritized routing, ignored padding tokens, expert widths or activations that differ from
the dense ones, sparse placements HF's rule cannot produce.

Both directions stream for checkpoints bigger than memory: `lazy_from_hf` checks everything and
returns `checkpoint.LazyArray` leaves that read their HF tensors a block (one expert, or a few
MiB of rows) at a time, which `convert_from_hf` writes into an Orbax checkpoint block by block;
`to_hf` takes lazily read leaves (`checkpoint.lazy_params`) and writes each tensor in row blocks.

Notes on transformers 5.x: `save_pretrained` omits tied tensors (4.x files contain them); with
`tie_word_embeddings=False` it does not tie `encoder/decoder.embed_tokens` to `shared` either, so
`to_hf` writes those copies for untied models and `from_hf` refuses copies that differ.

The parts, one concept each:
  files       the directory's files: config.json, weights read a block of rows at a time
  config_map  HF config.json <-> ModelConfig, HF's sparse-layer rule, what HF cannot express
  tensor_map  every HF tensor of a config and where it lives in switchjax's params
  reader      HF -> switchjax (checks, lazy leaves, from_hf, convert_from_hf)
  writer      switchjax -> HF (to_hf: sharded safetensors, streaming)
"""

from switchjax.hf.config_map import (
  HF_ACTIVATIONS,
  HF_DEFAULTS,
  TO_HF_ACTIVATIONS,
  config_from_hf,
  config_to_hf,
  hf_sparse_count,
  hf_sparse_layers,
  t5_fields,
)
from switchjax.hf.files import (
  SPM,
  TOKENIZER_CONFIG,
  WEIGHT_FILES,
  CheckpointError,
  Tensors,
  read_extra_ids,
  read_hf_config,
  read_tensors,
  write_tokenizer_config,
)
from switchjax.hf.reader import (
  check_names_and_shapes,
  convert_from_hf,
  from_hf,
  lazy_from_hf,
  lazy_params,
  resolve_tied,
)
from switchjax.hf.tensor_map import (
  BLOCK_BYTES,
  DTYPES,
  TIED_EMBEDDINGS,
  TensorSpec,
  get_path,
  hf_arrays,
  hf_layout,
  jax_layout,
  set_path,
  tensor_specs,
)
from switchjax.hf.writer import HF_OUTPUTS, SAFETENSORS_DTYPES, parse_size, to_hf
