"""switch-base-64: T5-Base with 64 experts in every other MLP, switch_base.gin recipe."""

from switchjax.presets import switch_base


def get_config():
  return switch_base(num_experts=64)
