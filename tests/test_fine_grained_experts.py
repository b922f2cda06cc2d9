"""Fine-grained experts (DeepSeekMoE): many narrow experts (model.expert_d_ff < d_ff) with
top-k > 2 at the FLOPs of Switch's top-1; capacity per choice (moe.capacity_per_choice) so that
capacity routing has room for k choices per token; their metrics.
"""

import dataclasses

import flax.linen as nn
import jax
import numpy as np
import pytest

from switchjax import load_config
from switchjax.config import MoeConfig
from switchjax.config.sparse_layout import decoder_sparse_layers, encoder_sparse_layers
from switchjax.moe import MoeLayer, group_layout
from switchjax.training import resume_rules, train_flops_per_example


def test_fine_grained_top_k_has_switch_flops_plus_the_wider_router():
  """E = 16 experts of d_ff / 4 with top-4 against E = 4 of d_ff with top-1: the experts'
  FLOPs are equal; only the router's d_model x E per token and sparse layer grows."""
  switch = load_config("tiny", ["model.moe.num_experts=4"])
  fine = load_config(
    "tiny",
    [
      "model.moe.num_experts=16",
      "model.moe.num_selected_experts=4",
      f"model.expert_d_ff={switch.model.d_ff // 4}",
    ],
  )
  m, d = switch.model, switch.data
  sparse_tokens = (
    len(encoder_sparse_layers(m)) * d.inputs_length
    + len(decoder_sparse_layers(m)) * d.targets_length
  )
  router = 3 * 2 * sparse_tokens * m.d_model * (16 - 4)  # train = 3 x forward, 2 per MAC
  assert train_flops_per_example(fine) - train_flops_per_example(switch) == router
  # A top-4 model of full-width experts counts four full experts per token: three more.
  top4 = load_config("tiny", ["model.moe.num_experts=16", "model.moe.num_selected_experts=4"])
  expert = 3 * 2 * sparse_tokens * m.d_model * m.d_ff * (len(m.expert_acts) + 1)
  assert train_flops_per_example(top4) - train_flops_per_example(fine) == 3 * expert


def test_capacity_per_choice_multiplies_the_capacity_by_k():
  moe = MoeConfig(num_experts=16, num_selected_experts=4, max_group_size=64, min_expert_capacity=1)
  flaxformer = group_layout(2, 32, moe, train=True)
  per_choice = group_layout(2, 32, dataclasses.replace(moe, capacity_per_choice=True), True)
  assert flaxformer.expert_capacity == round(1.25 * 64 / 16) == 5
  assert per_choice.expert_capacity == round(1.25 * 4 * 64 / 16) == 20
  # Experts-choose routers have no k: their capacity is unchanged.
  experts_choose = dataclasses.replace(moe, router_type="experts_choose_masked")
  assert group_layout(
    2, 32, dataclasses.replace(experts_choose, capacity_per_choice=True), True
  ) == group_layout(2, 32, experts_choose, True)
  assert resume_rules.rule_of("model.moe.capacity_per_choice") == resume_rules.OPTIMISATION


def _run(config: MoeConfig, params=None):
  layer = MoeLayer(config, d_ff=8, activations=("relu",))
  x = jax.random.normal(jax.random.key(2), (4, 16, 16))
  if params is None:
    params = nn.unbox(layer.init(jax.random.key(0), x))["params"]
    params["router"]["kernel"] = params["router"]["kernel"] * 50  # confident, uneven routing
  y, state = layer.apply({"params": params}, x, enable_dropout=True, mutable=["intermediates"])
  return y, {k: np.asarray(v[0]) for k, v in state["intermediates"].items()}, params


@pytest.mark.parametrize("dispatch", ["buffers", "sorted"])
def test_fine_grained_top_k_metrics_and_room_for_every_choice(dispatch):
  """Top-4 of 16 experts: flaxformer's capacity drops many choices and the metrics count them;
  per-choice capacity at cf 4 has room for every choice and equals dropless routing."""
  moe = MoeConfig(
    num_experts=16,
    num_selected_experts=4,
    max_group_size=64,
    min_expert_capacity=1,
    train_capacity_factor=1.0,
    dispatch=dispatch,
  )
  _, flaxformer, params = _run(moe)
  tokens, k = 64, 4
  served = flaxformer["tokens_per_expert"].sum()
  assert served <= 16 * 4  # capacity round(1.0 x 64 / 16) = 4 per expert: at most 64 choices
  np.testing.assert_allclose(flaxformer["fraction_choices_dropped"], 1 - served / (tokens * k))
  np.testing.assert_allclose(flaxformer["expert_usage"], served / (16 * 4))

  roomy = dataclasses.replace(moe, capacity_per_choice=True, train_capacity_factor=4.0)
  y, metrics, _ = _run(roomy, params)  # capacity 4 x 4 x 64 / 16 = 64: every choice fits
  assert metrics["tokens_per_expert"].sum() == tokens * k
  assert metrics["fraction_choices_dropped"] == 0.0
  assert metrics["fraction_tokens_left_behind"] == 0.0
  np.testing.assert_allclose(metrics["expert_usage"], tokens * k / (16 * 64))
  dropless = dataclasses.replace(roomy, router_type="tokens_choose_dropless")
  y_dropless, metrics_dropless, _ = _run(dropless, params)
  np.testing.assert_allclose(np.asarray(y), np.asarray(y_dropless), atol=1e-5)
  np.testing.assert_allclose(metrics["load_imbalance"], metrics_dropless["load_imbalance"])
