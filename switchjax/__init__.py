"""switchjax: Switch Transformers (sparse T5 Mixture-of-Experts) in JAX/Flax.

The public API (each name imported from its module on first use, so that `import switchjax`
loads only the routers, not training, conversion or checkpointing):
  configs       Config, ModelConfig, MoeConfig, DataConfig, TrainConfig, MeshConfig, load_config
  modules       SwitchTransformer, SwitchEncoder, MoeLayer
  routers       Router (base class), register_router, make_router
  Hugging Face  from_hf, to_hf
  generation    generate
  checkpoints   save_model, load_model
  training      train
The subpackages and modules (switchjax.routing, .moe, .training, .hf, .upcycle, ...) import as
usual.
"""

import importlib

# The built-in routers register their names with switchjax.config when switchjax.routing is
# imported: importing it here, before anything else of the package, makes them known to every
# config.
from switchjax import routing
from switchjax.routing import Router, make_router, register_router

_LAZY = {
  "Config": "switchjax.config",
  "DataConfig": "switchjax.config",
  "MeshConfig": "switchjax.config",
  "ModelConfig": "switchjax.config",
  "MoeConfig": "switchjax.config",
  "TrainConfig": "switchjax.config",
  "load_config": "switchjax.config",
  "SwitchTransformer": "switchjax.model",
  "SwitchEncoder": "switchjax.model",
  "MoeLayer": "switchjax.moe",
  "from_hf": "switchjax.hf",
  "to_hf": "switchjax.hf",
  "generate": "switchjax.decoding",
  "save_model": "switchjax.checkpoint",
  "load_model": "switchjax.model_loading",
  "train": "switchjax.training",
}

__all__ = ["Router", "make_router", "register_router", "routing", *_LAZY]


def __getattr__(name: str):
  """The public names above, and submodules (`switchjax.upcycle`), imported on first use."""
  if name in _LAZY:
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value
  try:
    return importlib.import_module(f"{__name__}.{name}")
  except ModuleNotFoundError as e:
    if e.name != f"{__name__}.{name}":
      raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(_LAZY))
