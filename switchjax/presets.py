"""The released Switch Transformer recipes (flaxformer's switch_*.gin) as Python functions.

The files in `configs/` call these; `--set a.b=value` changes any field afterwards.
"""

from __future__ import annotations

import dataclasses

from switchjax.config import Config, DataConfig, MeshConfig, ModelConfig, MoeConfig, TrainConfig


def switch(
  name: str,
  *,
  num_experts: int,
  d_model: int,
  d_ff: int,
  num_heads: int,
  num_layers: int,
  num_sparse_layers: int,
  group_size: int,
  train_capacity_factor: float = 1.25,
  eval_capacity_factor: float = 2.0,
  min_expert_capacity: int = 4,
  activations: tuple[str, ...] = ("relu",),
  tie_embeddings: bool = True,
) -> Config:
  """A Switch model with the switch_base.gin training recipe.

  Recipe: top-1 routing without jitter or BPR, aux loss 0.01, router z-loss 0, init scale 0.1,
  router init normal(0.02), bfloat16 activations with a float32 router and float32 params,
  no dropout in pretraining, Adafactor (decay 0.8, factored, parameter scale, clipping 1.0),
  lr 1/sqrt(max(step, 10000)), output z-loss 1e-4, batch 256 x (512 inputs, 114 targets).
  Gradient accumulation is automatic: one microbatch when every device holds at most 8
  sequences (e.g. 32 devices), more on smaller machines.
  """
  model = ModelConfig(
    vocab_size=32128,
    d_model=d_model,
    d_ff=d_ff,
    num_heads=num_heads,
    d_kv=64,
    num_layers=num_layers,
    num_decoder_layers=num_layers,
    num_sparse_encoder_layers=num_sparse_layers,
    num_sparse_decoder_layers=num_sparse_layers,
    sparse_layout="mixed",
    mlp_activations=activations,
    dropout_rate=0.0,
    tie_embeddings=tie_embeddings,
    dtype="bfloat16",
    param_dtype="float32",
    init_scale=0.1,
    moe=MoeConfig(
      num_experts=num_experts,
      router_type="tokens_choose_masked",
      num_selected_experts=1,
      batch_prioritized_routing=False,
      jitter_noise=0.0,
      max_group_size=group_size,
      train_capacity_factor=train_capacity_factor,
      eval_capacity_factor=eval_capacity_factor,
      min_expert_capacity=min_expert_capacity,
    ),
  )
  train = TrainConfig(
    batch_size=256,
    num_microbatches=0,
    num_train_steps=500_000,
    learning_rate=1.0,
    schedule="rsqrt",
    warmup_steps=10_000,
    optimizer="adafactor",
    z_loss=1e-4,
    aux_loss_factor=0.01,
    router_z_loss_factor=0.0,
  )
  data = DataConfig(inputs_length=512, targets_length=114)
  return Config(
    name=name, model=model, data=data, train=train, mesh=MeshConfig(data=-1, expert=1, model=1)
  )


def switch_base(num_experts: int) -> Config:
  """switch-base-E: T5-Base (768 wide, 12 + 12 layers) with every other MLP sparse."""
  return switch(
    f"base{num_experts}",
    num_experts=num_experts,
    d_model=768,
    d_ff=3072,
    num_heads=12,
    num_layers=12,
    num_sparse_layers=6,
    group_size=8192,
  )


def switch_large_128() -> Config:
  """switch-large-128: T5-Large (1024 wide, 24 + 24 layers), 128 experts every other MLP."""
  return switch(
    "large128",
    num_experts=128,
    d_model=1024,
    d_ff=4096,
    num_heads=16,
    num_layers=24,
    num_sparse_layers=12,
    group_size=4096,
  )


def switch_xxl_128() -> Config:
  """switch-xxl-128: 4096 wide, 24 + 24 layers, GEGLU, untied logits, 128 experts."""
  return switch(
    "xxl128",
    num_experts=128,
    d_model=4096,
    d_ff=10240,
    num_heads=64,
    num_layers=24,
    num_sparse_layers=12,
    group_size=4096,
    eval_capacity_factor=4.0,
    min_expert_capacity=2,
    activations=("gelu", "linear"),
    tie_embeddings=False,
  )


def switch_c_2048() -> Config:
  """switch-c-2048: 2080 wide, 15 + 15 layers, every MLP sparse with 2048 experts."""
  return switch(
    "c2048",
    num_experts=2048,
    d_model=2080,
    d_ff=6144,
    num_heads=30,
    num_layers=15,
    num_sparse_layers=15,
    group_size=2048,
    train_capacity_factor=1.0,
    eval_capacity_factor=2.0,
    min_expert_capacity=2,
    tie_embeddings=False,
  )


def experts_choose_base(num_experts: int = 64) -> Config:
  """flaxformer's experts_choose_base.gin (Zhou et al., 2022): T5-Base with 2048-wide GEGLU
  MLPs and untied logits (moe.gin), every other MLP sparse with 64 experts; the encoder routes
  by experts choose (capacity factor 1.0, combine weights in bfloat16 as that gin's router
  dtype), the decoder by tokens-choose top-2 (float32 router), groups of 4096 tokens."""
  config = switch(
    f"ec_base{num_experts}",
    num_experts=num_experts,
    d_model=768,
    d_ff=2048,
    num_heads=12,
    num_layers=12,
    num_sparse_layers=6,
    group_size=4096,
    train_capacity_factor=1.0,
    eval_capacity_factor=1.0,
    activations=("gelu", "linear"),
    tie_embeddings=False,
  )
  encoder = dataclasses.replace(
    config.model.moe, router_type="experts_choose_masked", combine_dtype="bfloat16"
  )
  decoder = dataclasses.replace(
    config.model.moe, router_type="tokens_choose_masked", num_selected_experts=2
  )
  model = dataclasses.replace(config.model, moe=encoder, decoder_moe=decoder)
  return dataclasses.replace(config, model=model)
