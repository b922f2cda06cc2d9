"""Decoding: greedy and beam search equal Hugging Face's `generate`, the KV cache equals
recomputing the prefix, sampling filters behave, rows stop at EOS, and scripts/generate.py runs.

The Hugging Face model is tiny and random, with an untied output layer whose EOS row is scaled
up so that some rows end early and others run to max_new_tokens. Its expert_capacity (64) is
larger than any decoded sequence (12 tokens), so no token is ever dropped: a full pass over a
prefix and a one-token cached step route identically.
"""

import importlib.util
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
import tiny
import torch

from switchjax.decoding import filter_logits, generate

REPO = pathlib.Path(__file__).resolve().parent.parent
MAX_NEW = 12
INPUT_LENGTHS = (9, 5, 7, 3)  # real tokens (EOS included) of each row; the rest is padding


def _hf_model(path):
  """A tiny random SwitchTransformersForConditionalGeneration saved to `path` (and reloaded)."""
  from transformers import SwitchTransformersConfig, SwitchTransformersForConditionalGeneration

  torch.manual_seed(0)
  cfg = SwitchTransformersConfig(
    vocab_size=96,
    d_model=32,
    d_ff=64,
    d_kv=8,
    num_heads=4,
    num_layers=2,
    num_decoder_layers=2,
    num_sparse_encoder_layers=1,
    num_sparse_decoder_layers=1,
    num_experts=4,
    expert_capacity=64,
    tie_word_embeddings=False,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=20,
    decoder_start_token_id=0,
    pad_token_id=0,
    eos_token_id=1,
  )
  model = SwitchTransformersForConditionalGeneration(cfg).eval()
  with torch.no_grad():
    model.lm_head.weight[1] *= 3.0  # EOS more likely: some rows stop early
    # transformers 5.x leaves the stacks' embeddings untied from `shared` when the logits are
    # untied; switchjax has one embedding, so make them equal.
    model.encoder.embed_tokens.weight.copy_(model.shared.weight)
    model.decoder.embed_tokens.weight.copy_(model.shared.weight)
  model.save_pretrained(path)
  # The reloaded model is the reference: it computes from exactly the saved tensors.
  return SwitchTransformersForConditionalGeneration.from_pretrained(path).eval()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """(hf model, switchjax model, params, input ids [4, 9], attention mask)."""
  from switchjax.hf import from_hf

  path = tmp_path_factory.mktemp("hf_switch")
  hf = _hf_model(path)
  model, params = from_hf(path)
  rng = np.random.default_rng(0)
  ids = rng.integers(3, 96, (len(INPUT_LENGTHS), max(INPUT_LENGTHS)))
  for row, length in enumerate(INPUT_LENGTHS):
    ids[row, length - 1] = 1
    ids[row, length:] = 0
  return hf, model, params, ids.astype(np.int32), (ids > 0).astype(np.int64)


def _hf_generate(setup, **kwargs):
  """HF's output without the start token, with 0 after each row's first EOS (HF's beam
  search fills with EOS there), padded to MAX_NEW; and sequences_scores (beam only)."""
  hf, _, _, ids, mask = setup
  with torch.no_grad():
    out = hf.generate(
      input_ids=torch.tensor(ids, dtype=torch.long),
      attention_mask=torch.tensor(mask),
      max_new_tokens=MAX_NEW,
      do_sample=False,
      return_dict_in_generate=True,
      output_scores=True,
      **kwargs,
    )
  seqs = out.sequences.numpy()
  assert (seqs[:, 0] == 0).all()  # decoder start token
  tokens = np.zeros((len(seqs), MAX_NEW), np.int32)
  tokens[:, : seqs.shape[1] - 1] = seqs[:, 1:]
  return _pad_after_eos(tokens), getattr(out, "sequences_scores", None)


def _pad_after_eos(tokens):
  """Zeros after each row's first EOS."""
  after = np.cumsum(np.cumsum(tokens == 1, axis=1), axis=1) > 1
  return np.where(after, 0, tokens)


def _eos_positions(tokens):
  """Index of each row's first EOS, or -1."""
  return [int(np.argmax(row == 1)) if (row == 1).any() else -1 for row in tokens]


def _run(setup, **kwargs):
  _, model, params, ids, _ = setup
  return np.asarray(generate(model, params, ids, MAX_NEW, **kwargs))


def _run_with_scores(setup, **kwargs):
  _, model, params, ids, _ = setup
  tokens, scores = generate(model, params, ids, MAX_NEW, return_scores=True, **kwargs)
  return np.asarray(tokens), np.asarray(scores)


def test_greedy_equals_hugging_face(setup):
  ours = _run(setup)
  expected, _ = _hf_generate(setup)
  assert ours.shape == (4, MAX_NEW) and ours.dtype == np.int32
  np.testing.assert_array_equal(ours, expected)  # 48 tokens
  ends = _eos_positions(ours)
  assert -1 in ends and any(0 <= e < MAX_NEW - 1 for e in ends), ends  # both kinds of rows


def test_cache_equals_recomputing_the_prefix(setup):
  for kwargs in (
    dict(method="greedy"),
    dict(method="sample", temperature=2.0, rng=jax.random.key(3)),
  ):
    cached, cached_scores = _run_with_scores(setup, use_cache=True, **kwargs)
    full, full_scores = _run_with_scores(setup, use_cache=False, **kwargs)
    np.testing.assert_array_equal(cached, full, err_msg=str(kwargs))
    np.testing.assert_allclose(cached_scores, full_scores, atol=1e-5, err_msg=str(kwargs))


@pytest.mark.parametrize(
  "num_beams,length_penalty,early_stopping", [(3, 1.0, True), (4, 0.6, False)]
)
@pytest.mark.slow
def test_beam_search_equals_hugging_face(setup, num_beams, length_penalty, early_stopping):
  ours, scores = _run_with_scores(
    setup,
    method="beam",
    num_beams=num_beams,
    length_penalty=length_penalty,
    early_stopping=early_stopping,
  )
  expected, hf_scores = _hf_generate(
    setup, num_beams=num_beams, length_penalty=length_penalty, early_stopping=early_stopping
  )
  np.testing.assert_array_equal(ours, expected)
  np.testing.assert_allclose(scores, hf_scores.numpy(), atol=1e-5)


def test_beam_search_differs_from_greedy_and_scores_at_least_as_well(setup):
  greedy, greedy_scores = _run_with_scores(setup, length_penalty=1.0)
  beam, beam_scores = _run_with_scores(setup, method="beam", num_beams=3)
  assert (beam != greedy).any()  # the tests above compare a real search, not greedy twice
  assert (beam_scores >= greedy_scores - 1e-6).all()


def test_sampling_filters_and_seeds(setup):
  greedy = _run(setup)
  sample = lambda **kw: _run(setup, method="sample", **kw)
  np.testing.assert_array_equal(sample(top_k=1, temperature=3.0, rng=1), greedy)
  np.testing.assert_array_equal(sample(top_p=1e-6, temperature=3.0, rng=1), greedy)
  hot = sample(temperature=3.0, rng=7)
  np.testing.assert_array_equal(sample(temperature=3.0, rng=jax.random.key(7)), hot)
  assert (sample(temperature=3.0, rng=8) != hot).any()
  assert (hot != greedy).any()


def test_filter_logits():
  logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], np.float32))
  kept = lambda **kw: np.isfinite(
    np.asarray(filter_logits(logits, kw.get("t", 1.0), kw.get("k", 0), kw.get("p", 1.0)))
  )[0].tolist()
  assert kept() == [True] * 4
  assert kept(k=2) == [True, True, False, False]
  assert kept(p=0.5) == [True, False, False, False]  # 0.5 already reaches 0.5
  assert kept(p=0.7) == [True, True, False, False]
  assert kept(p=0.81) == [True, True, True, False]
  assert kept(k=2, p=0.99) == [True, True, False, False]
  np.testing.assert_allclose(np.asarray(filter_logits(logits, 2.0, 0, 1.0)), logits / 2.0)


def test_rows_stop_at_eos_and_are_padded(setup):
  for kwargs in (
    dict(),
    dict(method="sample", temperature=3.0, rng=5),
    dict(method="beam", num_beams=3),
  ):
    tokens = _run(setup, **kwargs)
    np.testing.assert_array_equal(tokens, _pad_after_eos(tokens), err_msg=str(kwargs))
  # A batch whose rows all end early (so the loop exits before max_new_tokens) still gives
  # the full shape, padded.
  _, model, params, ids, _ = setup
  row = 1  # ends early
  batched = _run(setup)
  same = np.asarray(generate(model, params, np.repeat(ids[row : row + 1], len(ids), 0), MAX_NEW))
  assert 0 <= _eos_positions(batched)[row] < MAX_NEW - 1
  np.testing.assert_array_equal(same, np.repeat(batched[row : row + 1], len(ids), 0))


def test_bad_arguments(setup):
  _, model, params, ids, _ = setup
  for kwargs, message in (
    (dict(method="topk"), "method"),
    (dict(method="sample", temperature=0.0), "temperature"),
    (dict(method="beam", num_beams=0), "num_beams"),
  ):
    with pytest.raises(ValueError, match=message):
      generate(model, params, ids, MAX_NEW, **kwargs)


# --------------------------------------------------------------------------------------------
# A native (flaxformer-mode) checkpoint and scripts/generate.py

SENTENCES = [
  "The capital of France is Paris.",
  "Berlin is the capital of Germany.",
  "Rome is an old city in Italy.",
  "Madrid is the largest city of Spain.",
  "The river flows through the city.",
  "A quick brown fox jumps over the lazy dog.",
  "Mixture of experts models route tokens.",
  "Each expert is a small network.",
] * 4
SCRIPT_INPUTS = ["The capital of France is <extra_id_0>.", "Berlin is the capital of"]
SCRIPT_NEW = 8


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
  """A tiny random native switchjax checkpoint with its spiece.model.

  Its eval capacity factor 4.0 makes every expert's capacity the whole routing group, so no
  token is dropped in a full decoder pass (whose zero padding is routed too) either.
  """
  from switchjax.checkpoint import save_model
  from switchjax.config import Config
  from switchjax.model import SwitchTransformer

  directory = tmp_path_factory.mktemp("switch_ckpt")
  (directory / "spiece.model").write_bytes(tiny.tiny_spm(SENTENCES, vocab_size=60))
  cfg = tiny.tiny_config(
    vocab_size=160,
    d_model=32,
    d_ff=64,
    num_heads=4,
    relative_attention_num_buckets=8,
    moe=dict(num_experts=4, eval_capacity_factor=4.0),
  )
  params = tiny.random_params(SwitchTransformer(cfg))
  save_model(directory, Config(model=cfg), params)
  return directory


def _native_generate(checkpoint_dir, **kwargs):
  """In-process generation for SCRIPT_INPUTS: (token ids [2, SCRIPT_NEW], tokenizer)."""
  from switchjax.data.tokenizer import Tokenizer
  from switchjax.model import SwitchTransformer
  from switchjax.model_loading import load_model

  config, params = load_model(checkpoint_dir)
  tokenizer = Tokenizer(checkpoint_dir / "spiece.model", extra_ids=100)
  ids = [tokenizer.encode(text, add_eos=True) for text in SCRIPT_INPUTS]
  batch = np.zeros((len(ids), max(map(len, ids))), np.int32)  # padded with 0
  for row, seq in enumerate(ids):
    batch[row, : len(seq)] = seq
  out = generate(SwitchTransformer(config.model), params, batch, SCRIPT_NEW, **kwargs)
  return np.asarray(out), tokenizer


@pytest.mark.slow
def test_native_model_cache_equals_recomputing_the_prefix(checkpoint_dir):
  cached, _ = _native_generate(checkpoint_dir)
  full, _ = _native_generate(checkpoint_dir, use_cache=False)
  np.testing.assert_array_equal(cached, full)


@pytest.mark.slow
def test_script_generates_one_line_per_input(checkpoint_dir):
  command = [
    sys.executable,
    str(REPO / "scripts/generate.py"),
    "--checkpoint",
    str(checkpoint_dir),
    "--max_new_tokens",
    str(SCRIPT_NEW),
  ]
  for text in SCRIPT_INPUTS:
    command += ["--input", text]
  result = subprocess.run(command, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert len(lines) == len(SCRIPT_INPUTS), result.stdout
  # The same text as generating in-process with the same checkpoint and tokenizer.
  tokens, tokenizer = _native_generate(checkpoint_dir)
  assert lines == [
    tokenizer.decode([t for t in row if t < tokenizer.vocab_size]) for row in tokens.tolist()
  ]


def test_script_errors_are_one_line(checkpoint_dir, tmp_path, capsys):
  spec = importlib.util.spec_from_file_location("generate_script", REPO / "scripts/generate.py")
  script = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(script)
  assert script.main(["--checkpoint", str(tmp_path / "missing"), "--input", "x"]) == 1
  assert (
    script.main(
      [
        "--checkpoint",
        str(checkpoint_dir),
        "--input",
        "x",
        "--spm_path",
        str(tmp_path / "none.model"),
      ]
    )
    == 1
  )
  errors = capsys.readouterr().err.splitlines()
  assert len(errors) == 2 and all(e.startswith("generate.py: error:") for e in errors), errors
  assert "not a switchjax checkpoint" in errors[0] and "none.model" in errors[1]


def test_script_spm_path_that_is_not_a_model(checkpoint_dir, tmp_path, capsys):
  spec = importlib.util.spec_from_file_location("generate_script", REPO / "scripts/generate.py")
  script = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(script)
  (tmp_path / "notes.txt").write_text("not a model")
  (tmp_path / "empty.model").write_bytes(b"")
  for path in (tmp_path / "notes.txt", tmp_path / "empty.model", tmp_path):
    args = ["--checkpoint", str(checkpoint_dir), "--input", "x", "--spm_path", str(path)]
    assert script.main(args) == 1
  not_a_model = "is not a SentencePiece model (SentencePiece cannot parse its 11 bytes)"
  errors = capsys.readouterr().err.splitlines()
  assert errors == [
    f"generate.py: error: --spm_path={str(path)!r} {problem}; give the path of a SentencePiece "
    ".model file (e.g. an HF checkpoint's spiece.model)."
    for path, problem in (
      (tmp_path / "notes.txt", not_a_model),
      (tmp_path / "empty.model", "is an empty file, not a SentencePiece model"),
      (tmp_path, "is a directory, not a SentencePiece model"),
    )
  ]
