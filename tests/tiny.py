"""The tests' tiny Switch model, shared: its config, a tokenizer and random parameters.

`tiny_config()` is two encoder and two decoder layers (one sparse each) of width 16 with two
experts; tests override what they study (`tiny_config(d_model=32, moe=dict(num_experts=4))`).
Small enough to compile in seconds on one CPU core; no test should need a bigger model.
"""

import io
import pydoc_data.topics
import re

import jax
import numpy as np
import sentencepiece as spm

from switchjax import sharding
from switchjax.config import ModelConfig, MoeConfig
from switchjax.model import abstract_params

MOE = dict(num_experts=2, max_group_size=16, eval_capacity_factor=4.0)


def tiny_config(**overrides) -> ModelConfig:
  """The tiny ModelConfig with `overrides`; `moe` (a dict or MoeConfig) replaces MOE whole."""
  moe = overrides.pop("moe", MOE)
  fields = dict(
    vocab_size=64,
    d_model=16,
    d_ff=32,
    num_heads=2,
    d_kv=8,
    num_layers=2,
    num_decoder_layers=2,
    num_sparse_encoder_layers=1,
    num_sparse_decoder_layers=1,
    dtype="float32",
    dropout_rate=0.0,
  )
  moe = moe if isinstance(moe, MoeConfig) else MoeConfig(**moe)
  return ModelConfig(**{**fields, **overrides, "moe": moe})


def tiny_spm(sentences, vocab_size: int) -> bytes:
  """A T5-layout unigram SentencePiece model (pad 0, eos 1, unk 2, no bos) of `sentences`."""
  writer = io.BytesIO()
  spm.SentencePieceTrainer.train(
    sentence_iterator=iter(sentences),
    model_writer=writer,
    vocab_size=vocab_size,
    pad_id=0,
    eos_id=1,
    unk_id=2,
    bos_id=-1,
    model_type="unigram",
    minloglevel=2,
  )
  return writer.getvalue()


def random_params(model, scale: float = 0.5, seed: int = 0):
  """Normal(0, scale) float32 parameters of `model`, drawn with NumPy (no `model.init` compile)."""
  rng = np.random.default_rng(seed)
  shapes = sharding.unbox(abstract_params(model))
  return jax.tree.map(lambda s: rng.normal(0.0, scale, s.shape).astype(np.float32), shapes)


def doc_paragraphs(limit: int) -> list[str]:
  """The first `limit` paragraphs of CPython's pydoc topics (blank lines removed): a small
  offline corpus of real text, in a fixed order, without blank lines inside or trailing spaces
  (so a .txt file round-trips them)."""
  topics = pydoc_data.topics.topics
  out = []
  for name in sorted(topics):
    for block in re.split(r"\n\s*\n", topics[name]):
      lines = [line.rstrip() for line in block.splitlines() if line.strip()]
      if lines:
        out.append("\n".join(lines))
  return out[:limit]
