"""Activation functions by name, shared by the dense MLP and the experts."""

from __future__ import annotations

import jax


def activation_fn(name: str):
  """Activation names -> functions. 'gelu' is the tanh approximation (flaxformer; HF's
  'gelu_new'); 'gelu_exact' is the erf form (HF's 'gelu')."""
  return {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_exact": lambda x: jax.nn.gelu(x, approximate=False),
    "silu": jax.nn.silu,
    "linear": lambda x: x,
  }[name]
