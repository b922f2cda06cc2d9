"""A small Switch model for CPUs: the README's quick start.

4 + 4 layers of width 128 with 8 experts in every other MLP, trained on the embedded default
corpus (text shipped with Python) with a 2000-piece tokenizer trained at first use. The
switch_base.gin recipe otherwise (Adafactor, rsqrt schedule, aux loss 0.01, capacity factors
1.25 / 2.0), in float32 because CPUs gain nothing from bfloat16.
"""

import dataclasses

from switchjax.config import DataConfig, MeshConfig
from switchjax.presets import switch


def get_config():
  config = switch(
    "small",
    num_experts=8,
    d_model=128,
    d_ff=512,
    num_heads=4,
    num_layers=4,
    num_sparse_layers=2,
    group_size=1024,
  )
  model = dataclasses.replace(config.model, vocab_size=2176, d_kv=32, dtype="float32")
  data = DataConfig(spm_vocab_size=2000, inputs_length=128, targets_length=29, eval_fraction=0.02)
  train = dataclasses.replace(
    config.train,
    batch_size=32,
    num_microbatches=1,
    num_train_steps=300,
    log_every=25,
    eval_every=100,
    eval_steps=4,
    checkpoint_every=100,
    keep_checkpoints=2,
  )
  return dataclasses.replace(
    config, model=model, data=data, train=train, mesh=MeshConfig(data=-1, expert=1, model=1)
  )
