"""Configuration: frozen dataclasses, the preset registry and dotted overrides.

A preset is a Python file in `configs/` with a `get_config() -> Config` function (big_vision
style). The command line picks one with `--config=NAME` and changes any field with
`--set a.b=value`; values are parsed and type checked against the dataclass annotations, and an
unknown field is an error that names the nearest valid ones.

The parts, one concept each:
  schema         the dataclasses (Config, ModelConfig, MoeConfig, ...) and their validation
  sizes          the size limits and the parameter count by arithmetic
  paths          dotted field names, the values at them, derived sub-config defaults
  overrides      `--set a.b=value`: parsing and type checking
  serialization  config.json (to_dict, from_dict, save_config, read_config)
  loading        load_config: presets, .py files, config.json, checkpoint directories
"""

from switchjax.config.loading import PRESETS_PACKAGE, available_configs, load_config
from switchjax.config.overrides import apply_overrides
from switchjax.config.paths import flatten, format_config
from switchjax.config.schema import (
  ACTIVATIONS,
  DISPATCHES,
  FINETUNE_TASKS,
  PRECISIONS,
  SPARSE_LAYOUTS,
  Config,
  DataConfig,
  FinetuneConfig,
  MeshConfig,
  ModelConfig,
  MoeConfig,
  TrainConfig,
  causal_moe,
)
from switchjax.config.serialization import from_dict, read_config, save_config, to_dict
from switchjax.config.sizes import MAX_PARAMETERS, SIZE_LIMITS, check_sizes, estimate_parameters
