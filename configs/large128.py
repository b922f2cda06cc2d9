"""switch-large-128: T5-Large with 128 experts in every other MLP (group size 4096)."""

from switchjax.presets import switch_large_128


def get_config():
  return switch_large_128()
