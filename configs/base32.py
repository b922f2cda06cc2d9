"""switch-base-32: T5-Base with 32 experts in every other MLP, switch_base.gin recipe."""

from switchjax.presets import switch_base


def get_config():
  return switch_base(num_experts=32)
