"""T5's span corruption objective in NumPy.

A chunk of raw tokens is split into alternating non-noise and noise spans (starting with
non-noise). Each noise span is replaced in the inputs by one sentinel, <extra_id_0> for the first
span, <extra_id_1> for the second, ...; the targets are each sentinel followed by the tokens of
its span. Both get eos appended:

  raw      The  cat  sat  on  the  mat  today
  noise     .    x    x    .   .    x     .
  inputs   The  <0>  on  the  <1>  today  </s>
  targets  <0>  cat  sat  <1>  mat  </s>

With noise density 0.15 and mean span length 3, a 568-token chunk has 85 noise tokens in 28
spans: 483 + 28 + 1 = 512 inputs and 85 + 28 + 1 = 114 targets, which is why T5 cuts its corpus
into 568-token chunks for (512, 114) (`random_spans_helper`).

This follows google-research/text-to-text-transfer-transformer t5/data/preprocessors.py
(`random_spans_helper`, `random_spans_noise_mask`, `noise_span_to_unique_sentinel`,
`nonnoise_span_to_unique_sentinel`). Differences: the random segmentation draws from a NumPy
generator, not TF's stateless random ops, so masks are equally distributed but not bit-identical
to T5's; output longer than `inputs_length`/`targets_length` is an error rather than silently
trimmed; and a chunk with more noise spans than sentinel ids is an error, where T5 would use
ordinary pieces below the sentinels.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from switchjax.data.tokenizer import EOS_ID, PAD_ID


def random_spans_helper(
  inputs_length: int = 512,
  noise_density: float = 0.15,
  mean_noise_span_length: float = 3.0,
  extra_tokens_per_span_inputs: int = 1,
  extra_tokens_per_span_targets: int = 1,
) -> tuple[int, int]:
  """(raw tokens per chunk, targets length) so that the inputs fill `inputs_length` exactly.

  T5's function: the largest raw length whose corrupted inputs (non-noise tokens, one sentinel
  per noise span, eos) fit in `inputs_length`, and the length of its targets (noise tokens, one
  sentinel per span, eos). 512 -> (568, 114). Uses Python's round (half to even) as T5 does.
  """

  def lengths(tokens_length):
    num_noise_tokens = int(round(tokens_length * noise_density))
    num_nonnoise_tokens = tokens_length - num_noise_tokens
    num_noise_spans = int(round(num_noise_tokens / mean_noise_span_length))
    return (
      num_nonnoise_tokens + num_noise_spans * extra_tokens_per_span_inputs + 1,
      num_noise_tokens + num_noise_spans * extra_tokens_per_span_targets + 1,
    )

  tokens_length = inputs_length - 1
  while lengths(tokens_length + 1)[0] <= inputs_length:
    tokens_length += 1
  inputs_length, targets_length = lengths(tokens_length)
  # T5's "minor hack" to make the targets as long as the inputs at density 0.5.
  if noise_density == 0.5 and targets_length > inputs_length:
    tokens_length -= 1
    targets_length -= 1
  return tokens_length, targets_length


def _noise_counts(
  length: int, noise_density: float, mean_noise_span_length: float
) -> tuple[int, int]:
  """(noise tokens, noise spans) of a chunk of `length` >= 2 tokens, as T5 computes them.

  T5 computes these in float32 (tf.round of float32 products), and so do we: float64 differs
  when the product lands near .5 (190 * 0.15 is 28.500002 in float32 -> 29 noise tokens, but
  28.499999999999996 in float64 -> 28).
  """
  num_noise_tokens = int(np.round(np.float32(length) * np.float32(noise_density)))
  num_noise_tokens = min(max(num_noise_tokens, 1), length - 1)  # Both kinds non-empty.
  num_noise_spans = int(np.round(np.float32(num_noise_tokens) / np.float32(mean_noise_span_length)))
  return num_noise_tokens, max(num_noise_spans, 1)


def num_noise_spans(
  length: int, noise_density: float = 0.15, mean_noise_span_length: float = 3.0
) -> int:
  """Noise spans (= sentinels needed) in a chunk of `length` tokens: 28 for 568."""
  return _noise_counts(max(length, 2), noise_density, mean_noise_span_length)[1]


def _random_segmentation(num_items: int, num_segments: int, rng: np.random.Generator) -> np.ndarray:
  """Random positive segment lengths summing to num_items; all segmentations equally likely."""
  first_in_segment = np.zeros(num_items, dtype=np.int64)  # [num_items]
  first_in_segment[1:] = rng.permutation(np.arange(num_items - 1) < num_segments - 1)
  segment_id = np.cumsum(first_in_segment)  # [num_items], 0 .. num_segments - 1
  return np.bincount(segment_id, minlength=num_segments)  # [num_segments]


def random_spans_noise_mask(
  length: int, noise_density: float, mean_noise_span_length: float, rng: np.random.Generator
) -> np.ndarray:
  """Boolean noise mask [length] of alternating non-noise / noise spans (T5's algorithm).

  num_noise_tokens = round(length * noise_density) and num_noise_spans =
  round(num_noise_tokens / mean_noise_span_length), each at least 1 (and the noise at most
  length - 1). Noise and non-noise tokens are each split into num_noise_spans random non-empty
  spans, interleaved starting with non-noise; subject to that, all masks are equally likely.
  """
  if noise_density == 0.0:
    return np.zeros(length, dtype=bool)
  orig_length, length = length, max(length, 2)  # As in T5, avoid degenerate lengths.
  num_noise_tokens, num_spans = _noise_counts(length, noise_density, mean_noise_span_length)
  noise_span_lengths = _random_segmentation(num_noise_tokens, num_spans, rng)
  nonnoise_span_lengths = _random_segmentation(length - num_noise_tokens, num_spans, rng)
  interleaved = np.stack([nonnoise_span_lengths, noise_span_lengths], axis=1).reshape(-1)
  span_starts = np.cumsum(interleaved)[:-1]  # [2 * num_spans - 1]
  span_start_indicator = np.zeros(length, dtype=np.int64)
  span_start_indicator[span_starts] = 1
  span_num = np.cumsum(span_start_indicator)  # [length]: 0 for the first (non-noise) span
  is_noise = span_num % 2 == 1
  return is_noise[:orig_length]


def noise_span_to_unique_sentinel(
  tokens: np.ndarray, noise_mask: np.ndarray, sentinel_ids: Sequence[int]
) -> np.ndarray:
  """Replaces the k-th run of noise tokens by sentinel_ids[k] (T5: vocab_size - 1 - k)."""
  tokens = np.asarray(tokens)
  prev_token_is_noise = np.concatenate([[False], noise_mask[:-1]])
  first_noise_tokens = noise_mask & ~prev_token_is_noise
  subsequent_noise_tokens = noise_mask & prev_token_is_noise
  span_index = np.cumsum(first_noise_tokens) - 1  # [length]: k for the tokens of span k
  sentinels = np.asarray(sentinel_ids, dtype=tokens.dtype)
  out = np.where(first_noise_tokens, sentinels[np.maximum(span_index, 0)], tokens)
  return out[~subsequent_noise_tokens]


def nonnoise_span_to_unique_sentinel(
  tokens: np.ndarray, noise_mask: np.ndarray, sentinel_ids: Sequence[int]
) -> np.ndarray:
  """Replaces the k-th run of non-noise tokens by sentinel_ids[k]: the targets."""
  return noise_span_to_unique_sentinel(tokens, ~noise_mask, sentinel_ids)


def _sentinel_array(sentinels) -> np.ndarray:
  """Sentinel ids from a Tokenizer (its .sentinel_ids) or a sequence of ids."""
  return np.asarray(getattr(sentinels, "sentinel_ids", sentinels), dtype=np.int64).reshape(-1)


def check_sentinels(sentinels, needed: int) -> None:
  """Raises ValueError unless there are at least `needed` sentinel ids."""
  have = len(_sentinel_array(sentinels))
  if have == 0:
    raise ValueError(
      f"tokenizer has no sentinel ids; span corruption needs extra_ids >= {needed} (T5 uses 100)."
    )
  if have < needed:
    raise ValueError(
      f"tokenizer has only {have} sentinel ids, but span corruption makes "
      f"{needed} noise spans per chunk; it needs extra_ids >= {needed} (or "
      "shorter inputs)."
    )


def _pad(ids: np.ndarray, length: int | None, what: str) -> np.ndarray:
  if length is None:
    return ids
  if len(ids) > length:
    raise ValueError(
      f"span corruption made {len(ids)} {what} tokens, more than "
      f"{what}_length={length}; cut the raw tokens into chunks of "
      "random_spans_helper(inputs_length, ...)[0] tokens."
    )
  return np.pad(ids, (0, length - len(ids)), constant_values=PAD_ID)


def span_corruption(
  tokens: Sequence[int],
  rng: np.random.Generator,
  sentinels,
  *,
  noise_density: float = 0.15,
  mean_noise_span_length: float = 3.0,
  inputs_length: int | None = None,
  targets_length: int | None = None,
  eos_id: int = EOS_ID,
) -> tuple[np.ndarray, np.ndarray]:
  """T5 span corruption of one chunk of raw tokens.

  Args:
    tokens: the raw token ids of a chunk [length] (without eos).
    rng: NumPy generator drawing the noise mask.
    sentinels: a Tokenizer, or the sentinel ids (sentinels[k] replaces the k-th noise span).
    noise_density, mean_noise_span_length: T5's 0.15 and 3.0.
    inputs_length, targets_length: if given, pad with 0 to these lengths (an error if longer).
    eos_id: appended to both sequences.

  Returns:
    (inputs, targets), int32 arrays: inputs = the tokens with each noise span replaced by its
    sentinel, then eos; targets = each sentinel followed by its noise span, then eos.
  """
  tokens = np.asarray(tokens, dtype=np.int32).reshape(-1)  # [length]
  if len(tokens) == 0:
    raise ValueError("span corruption needs at least one token.")
  sentinel_ids = _sentinel_array(sentinels)
  check_sentinels(sentinel_ids, num_noise_spans(len(tokens), noise_density, mean_noise_span_length))
  noise_mask = random_spans_noise_mask(len(tokens), noise_density, mean_noise_span_length, rng)
  eos = np.array([eos_id], dtype=np.int32)
  inputs = np.concatenate([noise_span_to_unique_sentinel(tokens, noise_mask, sentinel_ids), eos])
  targets = np.concatenate(
    [nonnoise_span_to_unique_sentinel(tokens, noise_mask, sentinel_ids), eos]
  )
  return _pad(inputs, inputs_length, "inputs"), _pad(targets, targets_length, "targets")


def reconstruct_tokens(inputs: np.ndarray, targets: np.ndarray, sentinels) -> np.ndarray:
  """Undoes span corruption: the raw tokens from (inputs, targets) (for tests and debugging).

  Each sentinel in the inputs is replaced by the tokens that follow the same sentinel in the
  targets; eos and padding are dropped.
  """
  sentinel_ids = set(_sentinel_array(sentinels).tolist())
  spans, current = {}, None
  for t in np.asarray(targets).tolist():
    if t in (EOS_ID, PAD_ID):
      break
    if t in sentinel_ids:
      current = spans.setdefault(t, [])
    elif current is not None:
      current.append(t)
  out = []
  for t in np.asarray(inputs).tolist():
    if t in (EOS_ID, PAD_ID):
      break
    out += spans.get(t, []) if t in sentinel_ids else [t]
  return np.asarray(out, dtype=np.int32)
