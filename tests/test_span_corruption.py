"""T5 span corruption in NumPy: lengths, masks, sentinels, reconstruction."""

import numpy as np
import pytest

from switchjax.data import (
  EOS_ID,
  PAD_ID,
  noise_span_to_unique_sentinel,
  nonnoise_span_to_unique_sentinel,
  num_noise_spans,
  random_spans_helper,
  random_spans_noise_mask,
  reconstruct_tokens,
  span_corruption,
)

VOCAB = 32100  # T5: 32000 pieces + 100 sentinels.
SENTINELS = np.arange(VOCAB - 1, VOCAB - 101, -1)  # <extra_id_k> = 32099 - k


def _spans(mask):
  """(start, length, is_noise) of the runs of a boolean mask."""
  runs, start = [], 0
  for i in range(1, len(mask) + 1):
    if i == len(mask) or mask[i] != mask[start]:
      runs.append((start, i - start, bool(mask[start])))
      start = i
  return runs


def _brute_force_helper(inputs_length, density=0.15, mean=3.0):
  """The longest raw length whose corrupted inputs fit, by direct search."""

  def corrupted(n):
    noise = int(round(n * density))
    spans = int(round(noise / mean))
    return n - noise + spans + 1, noise + spans + 1

  n = max(n for n in range(1, 4 * inputs_length) if corrupted(n)[0] <= inputs_length)
  return n, corrupted(n)[1]


def test_random_spans_helper_values():
  assert random_spans_helper(512, 0.15, 3.0, 1, 1) == (568, 114)  # T5's pretraining lengths.
  assert random_spans_helper() == (568, 114)
  # 70 raw: round(10.5) = 10 noise (half to even) in round(3.3) = 3 spans: 60 + 3 + 1 = 64
  # inputs, 10 + 3 + 1 = 14 targets; 71 raw would give 60 + 4 + 1 = 65 inputs.
  assert random_spans_helper(64) == (70, 14)
  # 141 raw: 21 noise in 7 spans: 120 + 7 + 1 = 128 inputs, 21 + 7 + 1 = 29 targets.
  assert random_spans_helper(128) == (141, 29)
  # 1137 raw: round(170.55) = 171 noise in 57 spans: 966 + 57 + 1 = 1024, 171 + 57 + 1 = 229.
  assert random_spans_helper(1024) == (1137, 229)
  # Density 0.5: T5's hack trims one raw token so that targets (513) do not exceed inputs.
  assert random_spans_helper(512, 0.5, 3.0) == (766, 512)
  for length in (16, 32, 100, 256, 500, 2048):
    assert random_spans_helper(length) == _brute_force_helper(length), length


@pytest.mark.parametrize("length", [568, 190, 70, 10, 3, 2])
def test_noise_mask_structure(length):
  rng = np.random.default_rng(length)
  mask = random_spans_noise_mask(length, 0.15, 3.0, rng)
  assert mask.shape == (length,) and mask.dtype == bool
  expected_noise = {568: 85, 190: 29, 70: 10, 10: 2, 3: 1, 2: 1}[length]  # float32 rounding
  assert mask.sum() == expected_noise
  runs = _spans(mask)
  assert not runs[0][2] and runs[-1][2]  # Starts with non-noise, ends with noise.
  assert sum(r[2] for r in runs) == num_noise_spans(length) == max(1, round(expected_noise / 3))
  assert len(runs) == 2 * num_noise_spans(length)  # Strictly alternating.


def test_noise_mask_edge_cases():
  rng = np.random.default_rng(0)
  assert random_spans_noise_mask(1, 0.15, 3.0, rng).tolist() == [False]  # T5 truncates [F, T].
  assert not random_spans_noise_mask(10, 0.0, 3.0, rng).any()


def test_noise_mask_is_random_and_spread():
  masks = np.stack(
    [random_spans_noise_mask(568, 0.15, 3.0, np.random.default_rng(s)) for s in range(200)]
  )
  assert len({m.tobytes() for m in masks}) == 200
  per_position = masks.mean(axis=0)
  assert per_position[0] == 0 and per_position[-1] == 1  # Fixed by the interleaving.
  assert 0.10 < per_position[1:-1].mean() < 0.20


def test_unique_sentinels_reference_example():
  # T5's example: noise spans [10, 11] and [14] of [10 .. 15] with a 1000-token vocabulary.
  tokens = np.array([10, 11, 12, 13, 14, 15])
  mask = np.array([True, True, False, False, True, False])
  sentinels = [999, 998, 997]
  assert noise_span_to_unique_sentinel(tokens, mask, sentinels).tolist() == [999, 12, 13, 998, 15]
  assert nonnoise_span_to_unique_sentinel(tokens, mask, sentinels).tolist() == [
    10,
    11,
    999,
    14,
    998,
  ]


def _corrupt(length=568, seed=0, **kwargs):
  tokens = np.random.default_rng(1000 + seed).integers(3, 32000, size=length)
  inputs, targets = span_corruption(tokens, np.random.default_rng(seed), SENTINELS, **kwargs)
  return tokens, inputs, targets


def test_span_corruption_lengths_and_layout():
  tokens, inputs, targets = _corrupt(568, inputs_length=512, targets_length=114)
  assert inputs.shape == (512,) and targets.shape == (114,)
  assert inputs.dtype == targets.dtype == np.int32
  assert inputs[-1] == EOS_ID and targets[-1] == EOS_ID  # 511 + eos, 113 + eos: no padding.
  assert PAD_ID not in inputs and PAD_ID not in targets
  in_sentinels = inputs[inputs >= VOCAB - 100]
  out_sentinels = targets[targets >= VOCAB - 100]
  np.testing.assert_array_equal(in_sentinels, SENTINELS[:28])  # 32099, 32098, ... in order
  np.testing.assert_array_equal(out_sentinels, SENTINELS[:28])
  assert targets[0] == VOCAB - 1  # The targets start with <extra_id_0>.
  assert (targets[:-1] < VOCAB - 100).sum() == 85  # round(568 * 0.15) noise tokens.
  assert (inputs[:-1] < VOCAB - 100).sum() == 568 - 85


def test_span_corruption_reconstructs_the_tokens():
  for seed in range(20):
    tokens, inputs, targets = _corrupt(568, seed)
    np.testing.assert_array_equal(reconstruct_tokens(inputs, targets, SENTINELS), tokens)
    # Each sentinel's target span is exactly the tokens it replaced in the inputs.
    position = 0
    for t in inputs[:-1]:
      if t >= VOCAB - 100:
        span = targets[np.flatnonzero(targets == t)[0] + 1 :]
        span = span[: np.argmax((span >= VOCAB - 100) | (span == EOS_ID))]
        np.testing.assert_array_equal(tokens[position : position + len(span)], span)
        position += len(span)
      else:
        assert tokens[position] == t
        position += 1
    assert position == 568


def test_span_corruption_determinism():
  _, a_in, a_out = _corrupt(568, seed=7)
  _, b_in, b_out = _corrupt(568, seed=7)
  _, c_in, _ = _corrupt(568, seed=8)
  np.testing.assert_array_equal(a_in, b_in)
  np.testing.assert_array_equal(a_out, b_out)
  assert not np.array_equal(a_in[:400], c_in[:400])


def test_short_final_chunk_is_padded():
  tokens, inputs, targets = _corrupt(100, inputs_length=512, targets_length=114)
  noise, spans = 15, 5  # round(100 * 0.15), round(15 / 3)
  assert inputs.shape == (512,) and targets.shape == (114,)
  assert (inputs != PAD_ID).sum() == 100 - noise + spans + 1
  assert (targets != PAD_ID).sum() == noise + spans + 1
  assert not inputs[100 - noise + spans + 1 :].any() and not targets[noise + spans + 1 :].any()
  np.testing.assert_array_equal(reconstruct_tokens(inputs, targets, SENTINELS), tokens)
  _, inputs, targets = _corrupt(1)  # One token: no noise fits; T5 keeps it, with one sentinel.
  assert inputs.tolist()[-1] == EOS_ID and targets.tolist() == [VOCAB - 1, EOS_ID]


def test_span_corruption_errors():
  with pytest.raises(
    ValueError, match="tokenizer has no sentinel ids; span corruption needs extra_ids >= 28"
  ):
    span_corruption(np.arange(3, 571), np.random.default_rng(0), [])
  with pytest.raises(ValueError, match="only 10 sentinel ids.*extra_ids >= 28"):
    span_corruption(np.arange(3, 571), np.random.default_rng(0), SENTINELS[:10])
  with pytest.raises(ValueError, match="more than inputs_length=500"):
    _corrupt(568, inputs_length=500)
  with pytest.raises(ValueError, match="at least one token"):
    span_corruption([], np.random.default_rng(0), SENTINELS)
