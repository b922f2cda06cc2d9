"""The MoE layer's stages carry jax.named_scope names into the compiled HLO's op metadata (what
profiles and HLO dumps show): moe_router, moe_dispatch, moe_experts, moe_combine."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

import switchjax
from switchjax.config import MoeConfig

SCOPES = ("moe_router", "moe_dispatch", "moe_experts", "moe_combine")


def _op_names(config: MoeConfig, train: bool = False) -> list[str]:
  """op_name metadata of the compiled HLO of a tiny MoeLayer (training: its gradients with respect
  to the parameters and the inputs)."""
  layer = switchjax.MoeLayer(config, d_ff=16, activations=("gelu", "linear"))
  x = jax.random.normal(jax.random.key(1), (2, 8, 8))
  params = nn.unbox(layer.init(jax.random.key(0), x))["params"]

  def apply(params, x):
    return layer.apply(
      {"params": params}, x, enable_dropout=train, rngs={"jitter": jax.random.key(2)}
    )

  f = jax.grad(lambda p, x: jnp.sum(apply(p, x)), argnums=(0, 1)) if train else apply
  hlo = jax.jit(f).lower(params, x).compile().as_text()
  return re.findall(r'op_name="([^"]*)"', hlo)


@pytest.mark.parametrize(
  "case",
  [
    dict(router_type="tokens_choose_masked"),  # one-hot einsums
    dict(router_type="tokens_choose_scatter", num_selected_experts=2, dispatch="buffers"),
    dict(router_type="tokens_choose_scatter", num_selected_experts=2, dispatch="sorted"),
    dict(router_type="experts_choose_masked"),
    dict(router_type="tokens_choose_dropless", num_selected_experts=2),
  ],
  ids=lambda c: "-".join(map(str, c.values())),
)
def test_moe_stages_are_named_in_the_compiled_hlo(case):
  names = _op_names(MoeConfig(num_experts=4, max_group_size=8, **case))
  for scope in SCOPES:
    assert any(f"/{scope}/" in name for name in names), (scope, sorted(set(names))[:20])
  # The router's logits matmul is in moe_router; the experts' matmuls are in moe_experts.
  assert any("/moe_router/" in n and "gtd,de->gte" in n for n in names)
  matmuls = [n for n in names if n.endswith("dot_general") and "/moe_" in n]
  assert any("/moe_experts/" in n for n in matmuls)
  # No stage is nested in another.
  for name in names:
    assert sum(f"/{scope}/" in name for scope in SCOPES) <= 1, name


def test_moe_stages_are_named_in_the_backward_pass():
  names = _op_names(MoeConfig(num_experts=4, max_group_size=8, jitter_noise=0.1), train=True)
  for scope in SCOPES:
    assert any(f"/{scope}/" in name and "transpose(" in name for name in names), scope
