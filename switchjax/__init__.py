"""switchjax: Switch Transformers (sparse T5 Mixture-of-Experts) in JAX/Flax.

The public API:
  configs     Config, ModelConfig, MoeConfig, DataConfig, TrainConfig, MeshConfig, load_config
  modules     SwitchTransformer, SwitchEncoder, MoeLayer
  routers     Router (base class), register_router, make_router
  Hugging Face  from_hf, to_hf
  generation  generate
  checkpoints save_model, load_model
  training    train
"""

from switchjax.checkpoint import load_model, save_model
from switchjax.config import (
  Config,
  DataConfig,
  MeshConfig,
  ModelConfig,
  MoeConfig,
  TrainConfig,
  load_config,
)
from switchjax.decoding import generate
from switchjax.hf import from_hf, to_hf
from switchjax.model import SwitchEncoder, SwitchTransformer
from switchjax.moe import MoeLayer
from switchjax.routing import Router, make_router, register_router
from switchjax.training import train
