"""Helpers for the Hugging Face converter tests: tiny random transformers models saved in the
layouts found in the wild, one batch with padding, and both models' forward passes.

transformers is the reference: a model is built with `torch.manual_seed`, saved, and reloaded
with `from_pretrained` (a freshly constructed torch model can differ from its reloaded copy by
~4e-6 in the logits, so the reloaded one is what checkpoints give users).
"""

from __future__ import annotations

import functools
import json
import pathlib
import re
import shutil

import jax
import numpy as np
import torch
import transformers
from safetensors.numpy import load_file

from switchjax import losses

transformers.utils.logging.disable_progress_bar()

TINY = dict(
  vocab_size=64,
  d_model=16,
  d_ff=32,
  d_kv=4,
  num_heads=4,
  num_experts=4,
  expert_capacity=3,
  decoder_start_token_id=0,
)
BATCH, INPUT_LENGTH, TARGET_LENGTH = 2, 10, 6


def build_hf_checkpoint(directory: pathlib.Path, seed: int = 0, **overrides):
  """Saves a random tiny SwitchTransformersForConditionalGeneration to `directory` and returns
  the model reloaded from it (eval mode).

  Untied models get encoder/decoder.embed_tokens equal to shared.weight (as in the released
  4.x checkpoints; transformers 5.x would otherwise initialise them independently); a router
  bias is randomised so that it matters.
  """
  config = transformers.SwitchTransformersConfig(**{**TINY, **overrides})
  torch.manual_seed(seed)
  model = transformers.SwitchTransformersForConditionalGeneration(config).eval()
  with torch.no_grad():
    model.encoder.embed_tokens.weight.copy_(model.shared.weight)
    model.decoder.embed_tokens.weight.copy_(model.shared.weight)
    for name, p in model.named_parameters():
      if name.endswith("router.classifier.bias"):
        p.normal_(0.0, 1.0)
  model.save_pretrained(directory)
  return load_hf(directory)


def load_hf(directory):
  return transformers.SwitchTransformersForConditionalGeneration.from_pretrained(directory).eval()


@functools.cache
def batch() -> dict[str, np.ndarray]:
  """One batch: encoder inputs with end padding (token 0), labels with -100 at the end, and
  the decoder inputs both models use (labels shifted right with 0, -100 -> 0)."""
  rng = np.random.default_rng(0)
  input_ids = rng.integers(2, TINY["vocab_size"], (BATCH, INPUT_LENGTH))
  input_ids[1, 7:] = 0
  labels = rng.integers(2, TINY["vocab_size"], (BATCH, TARGET_LENGTH))
  labels[1, 4:] = -100
  decoder_input_ids = np.zeros_like(labels)
  decoder_input_ids[:, 1:] = np.where(labels[:, :-1] == -100, 0, labels[:, :-1])
  return {
    "input_ids": input_ids,
    "labels": labels,
    "decoder_input_ids": decoder_input_ids,
    "targets": np.where(labels == -100, 0, labels),
    "weights": (labels != -100).astype(np.float32),
  }


def hf_forward(model, output_router_logits: bool = True, labels: bool = False):
  """transformers' outputs on `batch()` (attention mask = input_ids != 0)."""
  b = batch()
  kwargs = (
    {"labels": torch.tensor(b["labels"])}
    if labels
    else {"decoder_input_ids": torch.tensor(b["decoder_input_ids"])}
  )
  with torch.no_grad():
    return model(
      input_ids=torch.tensor(b["input_ids"]),
      attention_mask=torch.tensor(b["input_ids"] != 0),
      output_router_logits=output_router_logits,
      **kwargs,
    )


def hf_gradients(model) -> tuple[float, dict[str, np.ndarray | None]]:
  """transformers' training loss on `batch()` (labels, output_router_logits=True; the model
  in eval mode, so no dropout and no router jitter) and its gradient per named parameter
  (None where autograd left none: an expert that received no token)."""
  b = batch()
  model.zero_grad(set_to_none=True)
  loss = model(
    input_ids=torch.tensor(b["input_ids"]),
    attention_mask=torch.tensor(b["input_ids"] != 0),
    labels=torch.tensor(b["labels"]),
    output_router_logits=True,
  ).loss
  loss.backward()
  grads = {
    name: None if p.grad is None else p.grad.numpy().copy() for name, p in model.named_parameters()
  }
  model.zero_grad(set_to_none=True)
  return loss.item(), grads


def jax_forward(model, params):
  """(logits, intermediates) of a switchjax model on `batch()`."""
  b = batch()
  apply = jax.jit(functools.partial(model.apply, mutable=["intermediates"]))
  logits, state = apply({"params": params}, b["input_ids"], b["decoder_input_ids"])
  return np.asarray(logits), state["intermediates"]


def router_logits(intermediates, stack: str) -> list[np.ndarray]:
  """Sown router logits [batch, length, experts] of a stack's MoE layers, in layer order."""
  layers = losses.moe_layer_metrics(intermediates)
  paths = sorted(
    (p for p in layers if p.startswith(stack)),
    key=lambda p: int(re.search(r"layers_(\d+)", p).group(1)),
  )
  return [np.asarray(layers[p]["router_logits"]) for p in paths]


def state_dict(directory) -> dict[str, np.ndarray]:
  return load_file(str(pathlib.Path(directory) / "model.safetensors"))


def copy_checkpoint(source, target) -> pathlib.Path:
  """A fresh copy of a checkpoint directory, to damage or re-save."""
  target = pathlib.Path(target)
  shutil.rmtree(target, ignore_errors=True)
  shutil.copytree(source, target)
  return target


def edit_config(directory, **changes) -> None:
  """Changes (value None: removes) entries of a directory's config.json."""
  path = pathlib.Path(directory) / "config.json"
  config = json.loads(path.read_text())
  for key, value in changes.items():
    if value is None:
      config.pop(key, None)
    else:
      config[key] = value
  path.write_text(json.dumps(config, indent=2))


def full_torch_state(directory) -> dict[str, torch.Tensor]:
  """The state dict with the tied copies 4.x checkpoints contain (lm_head, embed_tokens)."""
  state = {k: torch.from_numpy(v) for k, v in state_dict(directory).items()}
  for name in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight"):
    state.setdefault(name, state["shared.weight"].clone())
  return state
