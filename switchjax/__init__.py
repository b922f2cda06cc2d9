"""switchjax: Switch Transformers (sparse T5 Mixture-of-Experts) in JAX/Flax."""

from switchjax.config import Config, DataConfig, MeshConfig, ModelConfig, MoeConfig, TrainConfig
from switchjax.config import load_config
from switchjax.moe import MoeLayer
from switchjax.routing import Router
