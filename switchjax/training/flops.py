"""Model FLOPs of a training step, and device peaks, for the MFU estimate."""

from __future__ import annotations

import jax

from switchjax.config import Config
from switchjax.config.sparse_layout import decoder_sparse_layers, encoder_sparse_layers

PEAK_TFLOPS = {  # dense bfloat16 peak per device
  "TPU v4": 275.0,
  "TPU v5 lite": 197.0,
  "TPU v5e": 197.0,
  "TPU v5p": 459.0,
  "TPU v6 lite": 918.0,
  "TPU v6e": 918.0,
  "NVIDIA A100": 312.0,
  "NVIDIA H100": 989.0,
  "NVIDIA H200": 989.0,
}


def peak_tflops(device: jax.Device, configured: float) -> float | None:
  """Per-device peak TFLOP/s: the configured value, else a known device kind, else None."""
  if configured > 0:
    return configured
  return next((v for k, v in PEAK_TFLOPS.items() if device.device_kind.startswith(k)), None)


def train_flops_per_example(config: Config) -> float:
  """Approximate training FLOPs (forward + backward = 3 x forward) of one example.

  Counts the matmuls: 2 FLOPs per multiply-add of every dense weight a token passes through,
  each MoE token through the experts its router sends it to (the router class says how many:
  k for top-k, each of width model.expert_d_ff, so 4 x 16 experts of d_ff / 4 with top-4 cost
  Switch's top-1 plus the wider router; capacity slack and dropped choices not counted: with
  flaxformer's capacity, cf x tokens / E whatever k, a top-k router with k > cf serves fewer
  choices than counted, which moe.capacity_per_choice avoids) and through the shared experts,
  attention's QK^T and AV, and the output logits.
  """
  m, d = config.model, config.data
  s, t = d.inputs_length, d.targets_length
  attn_proj = 4 * m.d_model * m.num_heads * m.d_kv
  mlp = (len(m.mlp_activations) + 1) * m.d_model * m.d_ff

  def expert(moe):  # MACs of one token through the router, its experts and the shared ones
    k = moe.router().experts_per_token(moe, train=True)
    width = k * m.expert_mlp_dim + moe.num_shared_experts * (
      moe.shared_expert_d_ff or m.expert_mlp_dim
    )
    return (len(m.expert_acts) + 1) * m.d_model * width + m.d_model * moe.num_experts

  def stack(name, num_layers, sparse, length, cross):
    sparse_mlp = expert(m.moe_for(name))
    per_layer = [
      (attn_proj * (2 if cross else 1)) + (sparse_mlp if i in sparse else mlp)
      for i in range(num_layers)
    ]
    attention = num_layers * 2 * m.num_heads * m.d_kv * (length + (s if cross else 0))
    return length * (sum(per_layer) + attention)

  forward_macs = (
    stack("encoder", m.num_layers, set(encoder_sparse_layers(m)), s, False)
    + stack("decoder", m.decoder_layers, set(decoder_sparse_layers(m)), t, True)
    + t * m.d_model * m.vocab_size
  )
  return 3 * 2 * forward_macs
