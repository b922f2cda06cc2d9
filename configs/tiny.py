"""A tiny Switch model for tests and smoke runs (seconds per run on one CPU core).

2 + 2 layers of width 32, 4 experts in layer 1 of each stack, a 500-piece tokenizer (+100
sentinels) on the embedded default corpus, 32-token inputs, float32.
"""

from switchjax.config import Config, DataConfig, MeshConfig, ModelConfig, MoeConfig, TrainConfig


def get_config():
  model = ModelConfig(
    vocab_size=640,
    d_model=32,
    d_ff=64,
    num_heads=2,
    d_kv=16,
    num_layers=2,
    num_decoder_layers=2,
    num_sparse_encoder_layers=1,
    num_sparse_decoder_layers=1,
    sparse_layout="mixed",
    mlp_activations=("relu",),
    dropout_rate=0.0,
    dtype="float32",
    init_scale=0.1,
    moe=MoeConfig(
      num_experts=4,
      max_group_size=8,
      train_capacity_factor=1.25,
      eval_capacity_factor=2.0,
      min_expert_capacity=2,
    ),
  )
  data = DataConfig(spm_vocab_size=500, inputs_length=32, targets_length=8, eval_fraction=0.02)
  train = TrainConfig(
    batch_size=8,
    num_train_steps=40,
    learning_rate=0.02,
    schedule="constant",
    log_every=5,
    eval_every=20,
    eval_steps=2,
    checkpoint_every=20,
    keep_checkpoints=2,
  )
  return Config(
    name="tiny", model=model, data=data, train=train, mesh=MeshConfig(data=-1, expert=1, model=1)
  )
