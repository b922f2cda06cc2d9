"""The same model in transformers and switchjax: greedy generation and an AdamW train step.

A random transformers `SwitchTransformersForConditionalGeneration` (seed 0) is converted by
`switchjax.hf.from_hf`; both generate greedily (the same tokens checked) and take AdamW steps
on the loss transformers computes (cross-entropy + router z-loss + load balancing), timed
interleaved. Needs torch and transformers (the test extras); skipped without them.
"""

import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.timing import time_interleaved
from switchjax import losses
from switchjax.config import Config, DataConfig
from switchjax.data.pipeline import make_batch
from switchjax.decoding import generate
from switchjax.pod import format_table
from switchjax.training import train_flops_per_example

# transformers' SwitchTransformersConfig fields of the compared models (HF mode: one routing
# group per sequence, expert_capacity 64), and their shapes: generation rows x input tokens
# (32 new tokens), train batch x (inputs + targets).
HF_COMMON = dict(
  expert_capacity=64,
  decoder_start_token_id=0,
  pad_token_id=0,
  eos_token_id=1,
  dropout_rate=0.0,
  router_jitter_noise=0.0,
)
MODELS = {
  "small (4+4 layers, d_model 128)": (
    dict(vocab_size=2176, d_model=128, d_ff=512, num_heads=4, d_kv=32, num_layers=4),
    dict(experts=8, sparse=2, rows=8, inputs=128, new=32, batch=32, targets=29),
  ),
  "6+6 layers, d_model 512": (
    dict(vocab_size=32128, d_model=512, d_ff=2048, num_heads=8, d_kv=64, num_layers=6),
    dict(experts=8, sparse=3, rows=8, inputs=512, new=32, batch=8, targets=114),
  ),
}
MODELS_QUICK = {
  "tiny (2+2 layers, d_model 32)": (
    dict(vocab_size=96, d_model=32, d_ff=64, num_heads=2, d_kv=16, num_layers=2),
    dict(experts=4, sparse=1, rows=2, inputs=16, new=8, batch=2, targets=8),
  ),
}


def hf_and_switchjax(fields: dict, shape: dict, directory: str):
  """A random transformers SwitchTransformersForConditionalGeneration (seed 0) saved to
  `directory`, reloaded, and converted by switchjax.hf.from_hf: (hf model, model, params)."""
  import torch
  import transformers

  from switchjax.hf import from_hf

  config = transformers.SwitchTransformersConfig(
    **fields,
    **HF_COMMON,
    num_decoder_layers=fields["num_layers"],
    num_experts=shape["experts"],
    num_sparse_encoder_layers=shape["sparse"],
    num_sparse_decoder_layers=shape["sparse"],
  )
  torch.manual_seed(0)
  transformers.SwitchTransformersForConditionalGeneration(config).save_pretrained(directory)
  hf = transformers.SwitchTransformersForConditionalGeneration.from_pretrained(directory)
  model, params = from_hf(directory)
  return hf.eval(), model, jax.device_put(params)


def hf_generation(hf, model, params, shape, rng, reps, warmup) -> dict:
  """Greedy generation of both: the same tokens (EOS on), then the time of exactly `new`
  tokens per row (transformers min_new_tokens, switchjax with EOS disabled), interleaved."""
  import torch

  rows, new = shape["rows"], shape["new"]
  ids = rng.integers(2, model.config.vocab_size, (rows, shape["inputs"])).astype(np.int32)
  torch_ids = torch.tensor(ids, dtype=torch.long)

  def run_hf(**kwargs):
    with torch.no_grad():
      out = hf.generate(
        input_ids=torch_ids,
        attention_mask=torch.ones_like(torch_ids),
        do_sample=False,
        max_new_tokens=new,
        **kwargs,
      )
    return out.numpy()[:, 1:]  # without the start token

  expected = np.zeros((rows, new), np.int32)
  reference = run_hf()
  expected[:, : reference.shape[1]] = reference
  ours = np.asarray(generate(model, params, ids, new))
  after_eos = lambda t: np.cumsum(np.cumsum(t == 1, axis=1), axis=1) > 1
  expected = np.where(after_eos(expected), 0, expected)
  fns = {
    "transformers": lambda: run_hf(min_new_tokens=new),
    "switchjax": lambda: jax.block_until_ready(generate(model, params, ids, new, eos_id=-1)),
  }
  out = {"rows": rows, "input_tokens": shape["inputs"], "new_tokens": new}
  out["same_tokens"] = bool((ours == expected).all())
  out["token_agreement"] = float((ours == expected).mean())
  for name, (median, times) in time_interleaved(fns, reps, warmup).items():
    out[name] = {"s": median, "tokens_per_s": rows * new / median, "times_s": times}
  out["speedup"] = out["transformers"]["s"] / out["switchjax"]["s"]
  return out


def model_flops_per_step(model_config, batch: int, inputs: int, targets: int) -> float:
  """`train_flops_per_example` of a model at these lengths, times the batch."""
  data = DataConfig(inputs_length=inputs, targets_length=targets)
  return train_flops_per_example(Config(model=model_config, data=data)) * batch


def adamw_step(model, params, inputs, targets, coefficients):
  """switchjax's side of the comparison: a blocking call of one jitted AdamW step (lr 1e-4,
  weight decay 0.01; parameters and optimizer state donated) on the loss transformers computes
  (`losses.hf_loss` with its coefficients), returning the loss."""
  import optax

  decoder_inputs = make_batch(inputs, targets)["decoder_input_tokens"]  # shifted right

  def loss_fn(params):
    logits, state = model.apply(
      {"params": params}, inputs, decoder_inputs, enable_dropout=True, mutable=["intermediates"]
    )
    weights = jnp.ones(targets.shape)
    intermediates = state["intermediates"]
    return losses.hf_loss(logits, intermediates, targets, weights, model.config, *coefficients)

  tx = optax.adamw(1e-4, weight_decay=0.01)

  def update(state):
    params, opt_state = state
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  params = jax.tree.map(jnp.array, params)  # a copy: the step donates it
  holder = {"state": (params, tx.init(params))}
  step = jax.jit(update, donate_argnums=0).lower(holder["state"]).compile()

  def run():
    holder["state"], loss = step(holder["state"])
    return float(jax.block_until_ready(loss))

  return run


def hf_train_step(hf, model, params, shape, rng, reps, warmup, peak_tflops) -> dict:
  """One AdamW step (lr 1e-4, weight decay 0.01) of both on the same batch: cross-entropy plus
  transformers' router z- and load-balancing losses (output_router_logits=True, coefficients
  of its config), forward + backward + update; the first-step losses are reported too."""
  import torch

  batch, vocab = shape["batch"], model.config.vocab_size
  inputs = rng.integers(2, vocab, (batch, shape["inputs"])).astype(np.int32)
  targets = rng.integers(2, vocab, (batch, shape["targets"])).astype(np.int32)
  coefficients = (hf.config.router_z_loss_coef, hf.config.router_aux_loss_coef)

  hf.train()
  optimizer = torch.optim.AdamW(hf.parameters(), lr=1e-4, weight_decay=0.01)
  torch_batch = dict(
    input_ids=torch.tensor(inputs, dtype=torch.long),
    attention_mask=torch.ones(inputs.shape, dtype=torch.long),
    labels=torch.tensor(targets, dtype=torch.long),
    output_router_logits=True,
  )

  def hf_step():
    optimizer.zero_grad(set_to_none=True)
    loss = hf(**torch_batch).loss
    loss.backward()
    optimizer.step()
    return loss.item()

  fns = {
    "transformers": hf_step,
    "switchjax": adamw_step(model, params, inputs, targets, coefficients),
  }
  out = {"batch": batch, "input_tokens": shape["inputs"], "target_tokens": shape["targets"]}
  out["first_loss"] = {name: fn() for name, fn in fns.items()}
  tokens = batch * (shape["inputs"] + shape["targets"])
  out["flops_per_step"] = flops = model_flops_per_step(
    model.config, batch, shape["inputs"], shape["targets"]
  )
  for name, (median, times) in time_interleaved(fns, reps, warmup).items():
    out[name] = {"s": median, "tokens_per_s": tokens / median, "times_s": times}
    out[name]["mfu"] = flops / median / 1e12 / peak_tflops
  out["speedup"] = out["transformers"]["s"] / out["switchjax"]["s"]
  hf.eval()
  return out


def bench_vs_hf(*, quick: bool, reps: int, warmup: int, peak_tflops: float) -> dict:
  """Both comparisons for each model of MODELS (MODELS_QUICK with `quick`); prints the
  table. {'skipped': reason} when torch or transformers is missing."""
  try:
    import optax  # noqa: F401
    import torch  # noqa: F401
    import transformers
  except ImportError as e:
    print(f"\n## vs transformers: skipped ({e}; pip install torch==2.13.0 transformers)")
    return {"skipped": str(e)}
  transformers.utils.logging.set_verbosity_error()
  transformers.utils.logging.disable_progress_bar()
  out, rng = {}, np.random.default_rng(0)
  for name, (fields, shape) in (MODELS_QUICK if quick else MODELS).items():
    print(f"vs transformers: {name}: converting, then generation and train step", flush=True)
    with tempfile.TemporaryDirectory() as directory:
      hf, model, params = hf_and_switchjax(fields, shape, directory)
    out[name] = {
      "generate": hf_generation(hf, model, params, shape, rng, reps, warmup),
      "train_step": hf_train_step(hf, model, params, shape, rng, reps, warmup, peak_tflops),
    }
  print_vs_hf(out, reps)
  return out


HEADERS = [
  "model",
  "generate rows",
  "HF tokens/s",
  "switchjax tokens/s",
  "generate speed-up",
  "same tokens",
  "train batch",
  "HF ms/step",
  "switchjax ms/step",
  "train speed-up",
  "MFU HF / switchjax",
  "first loss HF / switchjax",
]


def _row(name: str, g: dict, t: dict) -> list:
  """One model's line: generation (g) and train step (t)."""
  return [
    name,
    f"{g['rows']}x{g['input_tokens']}",
    f"{g['transformers']['tokens_per_s']:,.1f}",
    f"{g['switchjax']['tokens_per_s']:,.1f}",
    f"{g['speedup']:.2f}",
    "yes" if g["same_tokens"] else f"{g['token_agreement']:.3f}",
    f"{t['batch']}x({t['input_tokens']}+{t['target_tokens']})",
    f"{t['transformers']['s'] * 1e3:,.0f}",
    f"{t['switchjax']['s'] * 1e3:,.0f}",
    f"{t['speedup']:.2f}",
    f"{t['transformers']['mfu']:.1%} / {t['switchjax']['mfu']:.1%}",
    f"{t['first_loss']['transformers']:.4f} / {t['first_loss']['switchjax']:.4f}",
  ]


def print_vs_hf(out: dict, reps: int) -> None:
  """The section's table: one line per model."""
  import torch
  import transformers

  rows = [_row(name, r["generate"], r["train_step"]) for name, r in out.items()]
  print(
    f"\n## vs transformers {transformers.__version__} (torch {torch.__version__}, "
    f"{torch.get_num_threads()} threads): the same random "
    "SwitchTransformersForConditionalGeneration, converted by switchjax.hf.from_hf\n"
  )
  print(format_table(HEADERS, rows))
  print(
    "(greedy: transformers generate(do_sample=False, min_new_tokens=max_new_tokens) under "
    "torch.no_grad vs switchjax.generate with EOS disabled, both exactly the new tokens per "
    "row; 'same tokens' compares both with EOS on. Train step: cross-entropy + router losses, "
    "AdamW, forward + backward + update, parameters donated; speed-ups: HF time over "
    f"switchjax's. Median of {reps} interleaved calls.)"
  )
