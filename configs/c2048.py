"""switch-c-2048: 2080 wide, 15 + 15 layers, every MLP sparse with 2048 experts."""

from switchjax.presets import switch_c_2048


def get_config():
  return switch_c_2048()
