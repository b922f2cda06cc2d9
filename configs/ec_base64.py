"""Experts-choose Base (flaxformer's experts_choose_base.gin): 64 experts, experts-choose routing
in the encoder, tokens-choose top-2 in the decoder."""

from switchjax.presets import experts_choose_base


def get_config():
  return experts_choose_base(num_experts=64)
