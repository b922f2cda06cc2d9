"""Autoregressive decoding: greedy, sampling (temperature, top-k, top-p) and beam search.

`generate(model, params, encoder_input_tokens, max_new_tokens)` encodes the inputs once, then
runs the decoder one token at a time inside a `jax.lax.while_loop` (static shapes, one compile
per model and settings). With `use_cache=True` (the default) each step feeds one token through
the model's decode mode: cross-attention reads the encoder keys/values computed once when the
cache is made, self-attention appends to a key/value cache. `use_cache=False` recomputes the
whole prefix every step (a teacher-forced decoder pass over the tokens so far, zero-padded to
the maximum length) and takes the logits at the current position: slow, but a reference.

Conventions (T5 / Hugging Face): the decoder starts from token 0 (pad), generation of a row
stops at its first EOS (id 1), and positions after it hold 0. The loop stops early once every
row has finished. Returned tokens do not include the start token.

Scores (`return_scores=True`) are length-penalised log-probabilities, as Hugging Face's
`sequences_scores`:

  score = sum_{t=1..n} log p(y_t | y_<t, x) / n ** length_penalty

where n counts the generated tokens up to and including the first EOS (or all of them when
there is none). Beam search ranks finished hypotheses by this score; for greedy and sampling it
is reported for the chosen tokens under the model's unfiltered distribution (temperature 1).

A cached step costs what its tokens cost: the encoder ran once, the cross-attention keys and
values were computed once into the cache, and each MoE layer sends each token to its top-k
experts without capacity buffers (MoeLayer's decode mode: the sorted, dropless path).

When cached and uncached decoding differ:
- Mixture-of-Experts capacity. A cached step never drops a token. In Hugging Face capacity mode
  (`moe.expert_capacity`, one group per sequence) the step is what the capacity path computes,
  while a full pass over a long prefix can drop tokens beyond the capacity. In flaxformer mode
  the step's tokens would form a group whose capacity could overflow; the full pass routes the
  zero-padded [batch, max_length] decoder input, whose padding takes expert slots too (as
  all-zero tokens). They agree when the full pass drops nothing (e.g. eval_capacity_factor =
  num_experts).
- mask_padding_activations (flaxformer configs): if the model generates the pad id 0, the full
  pass masks that position as padding while no real token follows it; a cached step does not.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from switchjax import scan

Array = jax.Array
NEG = -1.0e9  # Hugging Face's score of impossible beams (kept for identical arithmetic)
METHODS = ("greedy", "sample", "beam")


# --------------------------------------------------------------------------------------------
# The decoder, one step at a time.


class StepDecoder(NamedTuple):
  """What a decoding loop needs to ask for next-token logits.

  Attributes:
    model: the SwitchTransformer.
    params: its parameters.
    encoded: encoder output [rows, input_length, d_model] (rows = batch * beams for beams).
    encoder_input_tokens: [rows, input_length], for the cross-attention padding mask.
    use_cache: step with the KV cache, or recompute the whole prefix each step.
  """

  model: nn.Module
  params: dict
  encoded: Array
  encoder_input_tokens: Array
  use_cache: bool

  def init_state(self, max_length: int):
    """The decoding state: the model's cache for `max_length` positions, or {} without it."""
    if not self.use_cache:
      return {}
    return init_cache(self.model, self.params, self.encoded, self.encoder_input_tokens, max_length)

  def next_logits(self, state, tokens: Array, i: Array):
    """Logits [rows, vocab] of the token after position `i`, and the new state.

    tokens: [rows, max_length + 1], the start token 0 then the tokens generated so far; only
    tokens[:, :i + 1] are read (later positions hold 0).
    """
    if self.use_cache:
      token = jax.lax.dynamic_slice_in_dim(tokens, i, 1, axis=1)  # [rows, 1]
      logits, variables = self.model.apply(
        {"params": self.params, "cache": state},
        None,
        self.encoder_input_tokens,
        token,
        decode=True,
        mutable=["cache"],
        method=self.model.decode,
      )
      return logits[:, 0], variables["cache"]
    # Whole prefix, zero-padded to max_length; the causal mask hides the padding from
    # position i.
    logits = self.model.apply(
      {"params": self.params},
      self.encoded,
      self.encoder_input_tokens,
      tokens[:, :-1],
      method=self.model.decode,
    )  # [rows, max_len, V]
    return jax.lax.dynamic_index_in_dim(logits, i, axis=1, keepdims=False), state


def init_cache(
  model: nn.Module, params, encoded: Array, encoder_input_tokens: Array, max_length: int
):
  """The model's decoding cache for `max_length` decoder positions.

  One decode-mode call on a dummy [rows, max_length] decoder input creates it: zero
  self-attention keys/values, every cross-attention's keys/values of `encoded` (computed once
  here), the decoder's next 'position' (0) and 'key_positions'.
  """
  dummy = jnp.zeros((encoded.shape[0], max_length), jnp.int32)
  _, variables = model.apply(
    {"params": params},
    encoded,
    encoder_input_tokens,
    dummy,
    decode=True,
    mutable=["cache"],
    method=model.decode,
  )
  return variables["cache"]


def reorder_cache(cache, rows: Array):
  """Takes cache rows `rows` (beam search follows each kept beam's source). Every leaf has the
  batch as its leading axis except the decoder's scalar 'position' and 'key_positions', and
  the scanned layers' (model.scan_layers), whose leading axis is the layer block."""

  def take(path, x):
    names = [str(getattr(p, "key", "")) for p in path]
    if names[-1] in ("position", "key_positions"):
      return x
    scanned = any(scan.SCAN_NAME.match(n) for n in names)
    return jnp.take(x, rows, axis=1 if scanned else 0)

  return jax.tree_util.tree_map_with_path(take, cache)


def length_penalties(max_new_tokens: int, length_penalty: float) -> Array:
  """[max_new_tokens] float32, entry n - 1 = n ** length_penalty (computed in float64 and
  rounded, as Hugging Face divides float32 scores by a Python float)."""
  lengths = np.arange(1, max_new_tokens + 1, dtype=np.float64)
  return jnp.asarray(lengths**length_penalty, jnp.float32)


# --------------------------------------------------------------------------------------------
# Greedy and sampling.


def filter_logits(logits: Array, temperature: Array, top_k: Array, top_p: Array) -> Array:
  """Hugging Face's warpers in their order: logits / temperature, then top-k (keep the k best;
  0 = off), then top-p (keep the most probable tokens until their mass reaches top_p, at least
  one; 1 = off). Removed tokens get -inf. All three may be traced (no recompile per value)."""
  vocab = logits.shape[-1]
  logits = logits / temperature
  ranks = jnp.arange(vocab)
  sorted_logits = -jnp.sort(-logits, axis=-1)  # [batch, vocab], descending
  k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
  in_top_k = ranks < k  # [vocab]
  probs = jax.nn.softmax(jnp.where(in_top_k, sorted_logits, -jnp.inf), axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs  # of the strictly better-ranked tokens
  keep = in_top_k & ((mass_before < top_p) | (top_p >= 1.0))  # a prefix, never empty
  num_kept = jnp.sum(keep, axis=-1, keepdims=True)  # [batch, 1]
  threshold = jnp.take_along_axis(sorted_logits, num_kept - 1, axis=-1)
  return jnp.where(logits >= threshold, logits, -jnp.inf)


def _sample_loop(
  decoder: StepDecoder, max_new_tokens: int, choose, rng: Array, length_penalty: float, eos_id: int
):
  """Generates one token per row per step with `choose(logits, rng) -> tokens` until every row
  has produced EOS or max_new_tokens. Returns tokens [batch, max_new_tokens] and scores."""
  batch = decoder.encoded.shape[0]
  penalties = length_penalties(max_new_tokens, length_penalty)

  def cond(carry):
    i, _, finished, *_ = carry
    return (i < max_new_tokens) & ~jnp.all(finished)

  def body(carry):
    i, tokens, finished, log_prob, length, state = carry
    logits, state = decoder.next_logits(state, tokens, i)  # [batch, vocab]
    token = choose(logits, jax.random.fold_in(rng, i)).astype(jnp.int32)
    token = jnp.where(finished, 0, token)  # finished rows are padded with 0
    token_log_prob = jnp.take_along_axis(jax.nn.log_softmax(logits), token[:, None], axis=-1)
    log_prob = log_prob + jnp.where(finished, 0.0, token_log_prob[:, 0])
    length = length + (~finished).astype(jnp.int32)
    tokens = jax.lax.dynamic_update_slice_in_dim(tokens, token[:, None], i + 1, axis=1)
    finished = finished | (token == eos_id)
    return i + 1, tokens, finished, log_prob, length, state

  carry = (
    jnp.int32(0),
    jnp.zeros((batch, max_new_tokens + 1), jnp.int32),  # [batch, 1 + new tokens]
    jnp.zeros((batch,), jnp.bool_),
    jnp.zeros((batch,), jnp.float32),
    jnp.zeros((batch,), jnp.int32),
    decoder.init_state(max_new_tokens),
  )
  _, tokens, _, log_prob, length, _ = jax.lax.while_loop(cond, body, carry)
  return tokens[:, 1:], log_prob / penalties[length - 1]


# --------------------------------------------------------------------------------------------
# Beam search (Hugging Face's vectorised algorithm, transformers >= 4.50).


def _gather_beams(x: Array, indices: Array) -> Array:
  """x [batch, beams, ...] -> [batch, len(indices[0]), ...] along the beam axis."""
  indices = indices.reshape(indices.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, indices, axis=1)


class BeamState(NamedTuple):
  """The beam search loop's carry (B rows, K beams, L = max_new_tokens)."""

  step: Array  # int32 scalar: tokens generated so far
  running: Array  # [B, K, 1 + L] running hypotheses (start token 0, then tokens, then 0)
  running_scores: Array  # [B, K] their summed log-probabilities
  finished: Array  # [B, K, 1 + L] finished hypotheses, best first
  scores: Array  # [B, K] their length-penalised scores (NEG in empty slots)
  is_finished: Array  # [B, K] the slot holds a finished hypothesis
  improvable: Array  # [B] the row may still accept better hypotheses
  cache: dict  # the decoding state of the B * K running beams
  go: Array  # bool scalar: some row may still change


def _add_finished(s: BeamState, seqs, penalised, just_finished, stop_when_full: bool):
  """The K best of the finished set and the hypotheses that just finished ([B, 2K] `seqs`
  with length-penalised scores `penalised`), unless their row is closed (full with
  early_stopping=True, or not improvable): (finished, scores, is_finished)."""
  K = s.scores.shape[1]
  row_full = jnp.all(s.is_finished, axis=-1, keepdims=True) & stop_when_full
  candidates = penalised + row_full.astype(jnp.float32) * NEG
  candidates += (~s.improvable[:, None]).astype(jnp.float32) * NEG
  candidates += (~just_finished).astype(jnp.float32) * NEG
  merged_scores = jnp.concatenate([s.scores, candidates], axis=1)  # [B, 3K]
  best = jax.lax.top_k(merged_scores, K)[1]  # [B, K]
  finished = _gather_beams(jnp.concatenate([s.finished, seqs], axis=1), best)
  scores = _gather_beams(merged_scores, best)
  is_finished = _gather_beams(jnp.concatenate([s.is_finished, just_finished], axis=1), best)
  return finished, scores, is_finished


def _beam_search(
  decoder: StepDecoder,
  max_new_tokens: int,
  num_beams: int,
  length_penalty: float,
  early_stopping: bool | str,
  eos_id: int,
):
  """Beam search over `num_beams` running hypotheses per row; `decoder` has batch * num_beams
  rows (beam k of row b is row b * num_beams + k).

  Each step (as Hugging Face's `_beam_search`): take the 2 * num_beams best continuations of
  all beams by summed log-probability; those ending in EOS (or at max length) that rank in the
  first num_beams join the finished set with score sum / length ** length_penalty, the best
  num_beams others keep running. A row stops accepting hypotheses when its finished set is full
  (early_stopping=True) or when no running beam can beat its worst finished one (False:
  estimated at the current length; 'never': at max length when length_penalty > 0). The loop
  ends when no row can improve, or every row is full (early_stopping=True), or at max length.
  Returns the best finished hypothesis [batch, max_new_tokens] and its score per row.
  """
  rows, L, K = decoder.encoded.shape[0], max_new_tokens, num_beams
  batch = rows // K
  penalties = length_penalties(L, length_penalty)
  first_k = jnp.arange(2 * K) < K  # [2K]: only these may finish in a step
  stop_when_full = early_stopping is True

  def step(s: BeamState) -> BeamState:
    i = s.step
    logits, cache = decoder.next_logits(s.cache, s.running.reshape(rows, L + 1), i)
    vocab = logits.shape[-1]
    log_probs = jax.nn.log_softmax(logits).reshape(batch, K, vocab)
    log_probs = log_probs + s.running_scores[:, :, None]  # [B, K, vocab]

    # The 2K best continuations of all beams.
    topk_scores, topk_index = jax.lax.top_k(log_probs.reshape(batch, K * vocab), 2 * K)
    topk_beam, topk_token = topk_index // vocab, topk_index % vocab  # [B, 2K]
    topk_seqs = _gather_beams(s.running, topk_beam)  # [B, 2K, 1 + L]
    topk_seqs = jax.lax.dynamic_update_slice_in_dim(topk_seqs, topk_token[..., None], i + 1, axis=2)
    stops = (topk_token == eos_id) | (i + 1 >= L)  # [B, 2K]

    # The K best that did not stop keep running; the cache follows their source beams.
    alive_scores = topk_scores + stops.astype(jnp.float32) * NEG
    keep = jax.lax.top_k(alive_scores, K)[1]  # [B, K]
    running = _gather_beams(topk_seqs, keep)
    running_scores = _gather_beams(alive_scores, keep)
    source_rows = jnp.arange(batch)[:, None] * K + _gather_beams(topk_beam, keep)  # [B, K]
    cache = reorder_cache(cache, source_rows.reshape(-1))

    # Those that stopped among the first K join the finished set if they beat its worst.
    just_finished = stops & first_k[None, :]  # [B, 2K]
    finished, scores, is_finished = _add_finished(
      s, topk_seqs, topk_scores / penalties[i], just_finished, stop_when_full
    )

    # Can the best running beam still beat the worst finished one?
    length = L if early_stopping == "never" and length_penalty > 0.0 else i + 1
    best_running = running_scores[:, :1] / penalties[length - 1]  # [B, 1]
    worst_finished = jnp.where(is_finished, jnp.min(scores, axis=1, keepdims=True), NEG)
    improvable = s.improvable & jnp.any(best_running > worst_finished, axis=-1)  # [B]
    go = jnp.any(improvable) & ~(jnp.all(is_finished) & stop_when_full) & ~jnp.all(stops)
    return BeamState(
      i + 1, running, running_scores, finished, scores, is_finished, improvable, cache, go
    )

  state = BeamState(
    step=jnp.int32(0),
    running=jnp.zeros((batch, K, L + 1), jnp.int32),
    # Only beam 0 starts alive, so the first step does not pick the same token K times.
    running_scores=jnp.zeros((batch, K), jnp.float32).at[:, 1:].set(NEG),
    finished=jnp.zeros((batch, K, L + 1), jnp.int32),
    scores=jnp.full((batch, K), NEG, jnp.float32),
    is_finished=jnp.zeros((batch, K), jnp.bool_),
    improvable=jnp.ones((batch,), jnp.bool_),
    cache=decoder.init_state(L),
    go=jnp.bool_(True),
  )
  state = jax.lax.while_loop(lambda s: (s.step < L) & s.go, step, state)
  return state.finished[:, 0, 1:], state.scores[:, 0]


# --------------------------------------------------------------------------------------------
# Entry point.


@functools.partial(
  jax.jit,
  static_argnames=(
    "model",
    "max_new_tokens",
    "method",
    "num_beams",
    "length_penalty",
    "early_stopping",
    "eos_id",
    "use_cache",
  ),
)
def _generate(
  model,
  params,
  encoder_input_tokens,
  rng,
  temperature,
  top_k,
  top_p,
  *,
  max_new_tokens,
  method,
  num_beams,
  length_penalty,
  early_stopping,
  eos_id,
  use_cache,
):
  """The jit-compiled body of `generate` (compiled once per model, shapes and static settings;
  temperature, top_k and top_p are traced)."""
  encoded = model.apply({"params": params}, encoder_input_tokens, method=model.encode)
  if method == "beam":
    # Every beam gets its own copy of the row's encoder output (and, in the cache, of the
    # cross-attention keys and values).
    encoded = jnp.repeat(encoded, num_beams, axis=0)  # [batch * beams, length, d_model]
    encoder_input_tokens = jnp.repeat(encoder_input_tokens, num_beams, axis=0)
    decoder = StepDecoder(model, params, encoded, encoder_input_tokens, use_cache)
    return _beam_search(decoder, max_new_tokens, num_beams, length_penalty, early_stopping, eos_id)
  decoder = StepDecoder(model, params, encoded, encoder_input_tokens, use_cache)
  if method == "greedy":
    choose = lambda logits, _: jnp.argmax(logits, axis=-1)
  else:
    choose = lambda logits, key: jax.random.categorical(
      key, filter_logits(logits, temperature, top_k, top_p), axis=-1
    )
  return _sample_loop(decoder, max_new_tokens, choose, rng, length_penalty, eos_id)


def generate(
  model: nn.Module,
  params,
  encoder_input_tokens,
  max_new_tokens: int = 32,
  *,
  method: str = "greedy",
  temperature: float = 1.0,
  top_k: int = 0,
  top_p: float = 1.0,
  num_beams: int = 4,
  length_penalty: float = 1.0,
  early_stopping: bool | str = True,
  eos_id: int = 1,
  rng: int | Array | None = 0,
  use_cache: bool = True,
  return_scores: bool = False,
):
  """Generates up to `max_new_tokens` tokens per input sequence.

  Args:
    model: a SwitchTransformer (e.g. from `switchjax.hf.from_hf`).
    params: its parameters.
    encoder_input_tokens: <int>[batch, input_length], padded with 0.
    max_new_tokens: tokens generated per row (the output's length).
    method: 'greedy', 'sample' or 'beam'.
    temperature, top_k, top_p: sampling: logits / temperature, keep the top_k best (0 = all),
      keep the smallest set of best tokens whose probability reaches top_p (1.0 = all).
    num_beams, length_penalty, early_stopping: beam search, as Hugging Face's `generate`
      (length-penalised score = sum of log-probs / length ** length_penalty; early_stopping
      True stops a row once it has num_beams finished hypotheses).
    eos_id: end of sequence; rows stop there and are padded with 0 after it.
    rng: a PRNG key or an int seed (sampling only); equal keys give equal samples.
    use_cache: step with the KV cache (fast) or recompute the prefix each step (reference).
    return_scores: also return the length-penalised log-probability of each output.

  Returns:
    tokens <int32>[batch, max_new_tokens] (the best beam for beam search), and with
    return_scores float32 scores [batch].
  """
  tokens = jnp.asarray(encoder_input_tokens, jnp.int32)
  if tokens.ndim != 2:
    raise ValueError(f"encoder_input_tokens must be [batch, length], got shape {tokens.shape}.")
  _check_settings(method, max_new_tokens, temperature, top_k, top_p, num_beams)
  if early_stopping != "never":
    early_stopping = bool(early_stopping)
  if method != "beam":  # beam-only settings: one compile for greedy / sampling
    num_beams, early_stopping = 1, True
  if rng is None or isinstance(rng, (int, np.integer)):
    rng = jax.random.key(0 if rng is None else int(rng))
  out, scores = _generate(
    model,
    params,
    tokens,
    rng,
    jnp.float32(temperature),
    jnp.int32(top_k),
    jnp.float32(top_p),
    max_new_tokens=int(max_new_tokens),
    method=method,
    num_beams=int(num_beams),
    length_penalty=float(length_penalty),
    early_stopping=early_stopping,
    eos_id=int(eos_id),
    use_cache=bool(use_cache),
  )
  return (out, scores) if return_scores else out


def _check_settings(method, max_new_tokens, temperature, top_k, top_p, num_beams) -> None:
  """generate()'s settings, or a ValueError naming the bad one and its range."""
  if method not in METHODS:
    raise ValueError(f"method={method!r}; use one of {', '.join(METHODS)}.")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1.")
  if method == "sample":
    if not temperature > 0:
      raise ValueError(
        f"temperature={temperature} must be > 0 (use method='greedy' for the temperature-0 limit)."
      )
    if not 0 < top_p <= 1:
      raise ValueError(f"top_p={top_p} must be in (0, 1]; 1.0 turns nucleus filtering off.")
    if top_k < 0:
      raise ValueError(f"top_k={top_k} must be >= 0; 0 turns top-k filtering off.")
  if method == "beam" and num_beams < 1:
    raise ValueError(f"num_beams={num_beams} must be >= 1.")
