"""switch-xxl-128: 4096 wide, 24 + 24 layers, GEGLU experts, untied output logits."""

from switchjax.presets import switch_xxl_128


def get_config():
  return switch_xxl_128()
