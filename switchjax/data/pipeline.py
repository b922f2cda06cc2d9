"""The pretraining input pipeline: span-corrupted batches of a tokenized corpus.

Everything is defined on global indices, so the data depend on the seed and the global batch
size only, never on the number of hosts:

- the corpus's chunks (`TokenChunks`) are split once, by a fixed pseudo-random permutation, into
  an eval set (a share `eval_fraction`, at least one chunk) and a training set; the split does
  not depend on the seed;
- training example g (g = 0, 1, 2, ...) is training chunk perm_e(g mod N) of epoch e = g // N,
  where perm_e is a pseudo-random permutation of the N training chunks drawn anew for each
  epoch from (seed, e); its noise mask is drawn from a generator seeded with (seed, g);
- global batch `step` is examples [step * B, (step + 1) * B), and host p of P computes only its
  rows [p * B / P, (p + 1) * B / P) of it;
- eval example k is eval chunk k mod N_eval, in a fixed order, with noise seeded from its eval
  index, so every evaluation sees the same batches whatever the seed.

The permutations are Grain's `index_shuffle` (a Feistel-network bijection: O(1) memory however
large the corpus). The rest is index arithmetic rather than a Grain `DataLoader`: Grain shards a
dataset across hosts (each host reads its own part of the data), whereas a global batch has to
be the same for 1 and for P hosts. Resuming needs only the position in the example stream:
`TrainIterator.get_state()` is a small JSON-able dict for the checkpoint.

Batches are dicts of NumPy arrays, as T5X feeds its encoder-decoder models:
  encoder_input_tokens   int32 [b, inputs_length]
  decoder_target_tokens  int32 [b, targets_length]
  decoder_input_tokens   int32 [b, targets_length]   targets shifted right, 0 (pad) first
  decoder_loss_weights   float32 [b, targets_length] 1.0 where the target is not padding
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Iterator
from typing import Any

import grain
import numpy as np

from switchjax.data import cache
from switchjax.data import prepared as prepared_lib
from switchjax.data.corpus import TokenChunks, get_tokenizer, open_corpus
from switchjax.data.prefetch import Prefetcher
from switchjax.data.span_corruption import (
  check_sentinels,
  num_noise_spans,
  random_spans_helper,
  span_corruption,
)
from switchjax.data.tokenizer import PAD_ID, Tokenizer
from switchjax.data.tokens import tokenize_corpus

log = logging.getLogger(__name__)

SPLIT_SEED = 2019  # Fixed, so that the eval set is the same for every data seed.
EVAL_NOISE_SEED = 2021
_TRAIN, _EVAL = 0, 1  # Stream tags mixed into the noise seeds.
_STATE_VERSION = 1


def _permute(index: int, length: int, seed: int) -> int:
  """Position `index` of a pseudo-random permutation of range(length)."""
  return grain.experimental.index_shuffle(index, max_index=length - 1, seed=seed, rounds=4)


@functools.lru_cache(maxsize=64)
def _epoch_seed(seed: int, epoch: int) -> int:
  """A 32-bit seed for the permutation of `epoch` (hashed: seed s, epoch 1 != seed s + 1)."""
  return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


# --------------------------------------------------------------------------------------------
# Examples.


@dataclasses.dataclass(frozen=True)
class ChunkSplit:
  """Held-out evaluation chunks: the first num_eval of a fixed permutation of all chunks."""

  num_chunks: int
  num_eval: int

  @property
  def num_train(self) -> int:
    return self.num_chunks - self.num_eval

  def eval_chunk(self, e: int) -> int:
    """Chunk index of eval example e (0 <= e < num_eval)."""
    return _permute(e, self.num_chunks, SPLIT_SEED)

  def train_chunk(self, t: int) -> int:
    """Chunk index of training chunk t (0 <= t < num_train)."""
    return _permute(self.num_eval + t, self.num_chunks, SPLIT_SEED)


@dataclasses.dataclass(frozen=True)
class SpanCorruptionTask:
  """Turns chunks of raw tokens into (inputs, targets) of fixed lengths."""

  chunks: TokenChunks
  sentinel_ids: np.ndarray  # [extra_ids]
  inputs_length: int
  targets_length: int
  noise_density: float
  mean_noise_span_length: float

  def example(self, chunk: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    return span_corruption(
      self.chunks[chunk],
      rng,
      self.sentinel_ids,
      noise_density=self.noise_density,
      mean_noise_span_length=self.mean_noise_span_length,
      inputs_length=self.inputs_length,
      targets_length=self.targets_length,
    )

  def batch(self, chunks_and_seeds) -> dict[str, np.ndarray]:
    """The batch of (chunk, noise seed) pairs."""
    pairs = [self.example(c, np.random.default_rng(s)) for c, s in chunks_and_seeds]
    return make_batch(np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs]))


def make_batch(inputs: np.ndarray, targets: np.ndarray) -> dict[str, np.ndarray]:
  """The model's features from inputs [b, Li] and targets [b, Lt] (T5X's layout)."""
  targets = targets.astype(np.int32)
  decoder_inputs = np.zeros_like(targets)  # [b, Lt]
  decoder_inputs[:, 1:] = targets[:, :-1]  # Shift right; the decoder starts from pad (0).
  return {
    "encoder_input_tokens": inputs.astype(np.int32),  # [b, Li]
    "decoder_target_tokens": targets,  # [b, Lt]
    "decoder_input_tokens": decoder_inputs,  # [b, Lt]
    "decoder_loss_weights": (targets != PAD_ID).astype(np.float32),  # [b, Lt]
  }


def _host_rows(first: int, global_batch_size: int, process_index: int, process_count: int) -> range:
  """Global example indices of this host's rows of the global batch starting at `first`."""
  local = global_batch_size // process_count
  start = first + process_index * local
  return range(start, start + local)


# --------------------------------------------------------------------------------------------
# Iterators.


class TrainIterator:
  """Host-local training batches, repeating forever, reshuffled every epoch; resumable.

  `next()` returns this host's rows of the next global batch. `get_state()` / `set_state()`
  save and restore the position, so a resumed run sees exactly the batches of an uninterrupted
  one (with any number of hosts).
  """

  def __init__(
    self,
    task: SpanCorruptionTask,
    split: ChunkSplit,
    global_batch_size: int,
    process_index: int,
    process_count: int,
    seed: int,
  ):
    self.task, self.split, self.seed = task, split, seed
    self.global_batch_size = global_batch_size
    self.process_index, self.process_count = process_index, process_count
    self.step = 0  # Global batches consumed.
    self.next_example = 0  # Global index of the first example of the next global batch.

  def chunk_index(self, g: int) -> int:
    """Chunk of training example g: the epoch's permutation of the training chunks."""
    epoch, i = divmod(g, self.split.num_train)
    return self.split.train_chunk(_permute(i, self.split.num_train, _epoch_seed(self.seed, epoch)))

  def noise_seed(self, g: int) -> list[int]:
    return [self.seed, _TRAIN, g]

  def __iter__(self) -> TrainIterator:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    rows = _host_rows(
      self.next_example, self.global_batch_size, self.process_index, self.process_count
    )
    batch = self.task.batch((self.chunk_index(g), self.noise_seed(g)) for g in rows)
    self.step += 1
    self.next_example += self.global_batch_size
    return batch

  def get_state(self) -> dict[str, Any]:
    """The position as a JSON-serialisable dict (save it with the checkpoint)."""
    return {
      "version": _STATE_VERSION,
      "step": self.step,
      "next_example": self.next_example,
      "seed": self.seed,
      "num_train_chunks": self.split.num_train,
      "global_batch_size": self.global_batch_size,
    }

  def set_state(self, state: dict[str, Any]) -> None:
    """Continues from a `get_state()` position.

    The seed and the training chunks must be those of the saved run (else the order would
    differ); a different global batch size is allowed and continues from the next unseen
    example.
    """
    if not isinstance(state, dict) or "next_example" not in state or "step" not in state:
      raise ValueError(f"not a data pipeline state (from TrainIterator.get_state()): {state!r}")
    for key in ("seed", "num_train_chunks"):
      saved = state.get(key)
      current = self.seed if key == "seed" else self.split.num_train
      if saved != current:
        raise ValueError(
          f"cannot resume the data pipeline: the checkpoint's {key} is {saved}, this run's is "
          f"{current}, so the training order would differ. Use the checkpoint's data config "
          "(seed, corpus, tokenizer, lengths, eval_fraction), or pass --restart_data "
          "(train(..., restart_data=True)) to continue the model on the data from its start."
        )
    self.step = int(state["step"])
    self.next_example = int(state["next_example"])


def host_eval_batches(
  task: SpanCorruptionTask,
  split: ChunkSplit,
  global_batch_size: int,
  process_index: int,
  process_count: int,
  num_batches: int | None,
) -> Iterator[dict[str, np.ndarray]]:
  """This host's eval examples in a fixed order, cycling through the eval chunks; the same every
  call."""
  step = 0
  while num_batches is None or step < num_batches:
    rows = _host_rows(step * global_batch_size, global_batch_size, process_index, process_count)
    yield task.batch(
      (split.eval_chunk(k % split.num_eval), [EVAL_NOISE_SEED, _EVAL, k % split.num_eval])
      for k in rows
    )
    step += 1


# --------------------------------------------------------------------------------------------
# Entry point.


def _num_eval(num_chunks: int, eval_fraction: float) -> int:
  """Held-out chunks: round(eval_fraction * num_chunks), at least 1 unless the fraction is 0."""
  return 0 if eval_fraction == 0 else max(1, round(num_chunks * eval_fraction))


@dataclasses.dataclass
class PretrainingData:
  """What the training loop needs from the data package.

  Attributes:
    tokenizer: the Tokenizer (vocab_size, sentinels, decode).
    train: the host-local training iterator (`next()`, `get_state()`, `set_state()`).
    task: chunks, sentinels and lengths of the examples.
    split: the train/eval split of the chunks.
    raw_length: raw tokens per chunk (568 for inputs_length 512).
    num_tokens: tokens in the corpus.
  """

  tokenizer: Tokenizer
  train: TrainIterator
  task: SpanCorruptionTask
  split: ChunkSplit
  raw_length: int
  num_tokens: int

  @property
  def num_train_chunks(self) -> int:
    return self.split.num_train

  @property
  def num_eval_chunks(self) -> int:
    return self.split.num_eval

  def prefetch(self, depth: int = 2) -> None:
    """Makes the training batches up to `depth` ahead in a background thread from now on
    (switchjax.data.prefetch): the same batches and positions, off the step's critical path."""
    self.train = Prefetcher(self.train, depth)

  def eval_batches(self, num_batches: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Host-local eval batches from the start of the eval set (forever if num_batches is None)."""
    if self.split.num_eval == 0:
      raise ValueError(
        "there is no eval split: data.eval_fraction=0; set it above 0 (e.g. "
        "0.01) to hold out chunks for evaluation."
      )
    return host_eval_batches(
      self.task,
      self.split,
      self.train.global_batch_size,
      self.train.process_index,
      self.train.process_count,
      num_batches,
    )

  def describe(self) -> str:
    return (
      f"{self.num_tokens} tokens (vocab {self.tokenizer.vocab_size}) in "
      f"{self.num_train_chunks} train + {self.num_eval_chunks} eval chunks of "
      f"{self.raw_length} tokens -> {self.task.inputs_length} inputs / "
      f"{self.task.targets_length} targets"
    )


def make_pretraining_data(
  data_cfg,
  global_batch_size: int,
  *,
  process_index: int = 0,
  process_count: int = 1,
  seed: int | None = None,
  tokenizer: Tokenizer | None = None,
  model_vocab_size: int | None = None,
) -> PretrainingData:
  """The span-corruption pretraining data of a DataConfig.

  Args:
    data_cfg: switchjax.config.DataConfig.
    global_batch_size: B, sequences per step over all hosts.
    process_index, process_count: this host and the number of hosts (jax.process_index(),
      jax.process_count()); each host gets B / process_count rows of every global batch.
    seed: order and noise seed (default data_cfg.shuffle_seed).
    tokenizer: use this tokenizer instead of the one of data_cfg (spm_path or trained).
    model_vocab_size: if given, checked to hold every token id (model.vocab_size).

  The first call for a corpus trains its tokenizer (unless data.spm_path is set) and tokenizes
  it; both are cached (see switchjax.data.cache). With data.prepared set, the tokenizer and the
  tokens come from that prepared corpus (switchjax.data.prepared) instead, read lazily.
  """
  data_cfg.validate()
  seed = data_cfg.shuffle_seed if seed is None else seed
  _check_batch_arguments(seed, global_batch_size, process_index, process_count)
  raw_length = _raw_chunk_length(data_cfg)

  if data_cfg.prepared:  # tokens read from shared storage, chunk by chunk
    corpus, tokenizer, tokens = prepared_lib.load_prepared(data_cfg, tokenizer)
  else:
    corpus = open_corpus(data_cfg)
    tokenizer = tokenizer or get_tokenizer(data_cfg, corpus)
  check_sentinels(
    tokenizer, num_noise_spans(raw_length, data_cfg.noise_density, data_cfg.mean_noise_span_length)
  )
  _check_model_vocab(tokenizer, model_vocab_size)
  if not data_cfg.prepared:
    tokens = tokenize_corpus(corpus, tokenizer, cache.cache_dir(data_cfg.cache_dir))
  chunks = TokenChunks(tokens, raw_length)
  split = _split_chunks(len(chunks), data_cfg, global_batch_size, raw_length, corpus, len(tokens))

  task = SpanCorruptionTask(
    chunks,
    tokenizer.sentinel_ids,
    data_cfg.inputs_length,
    data_cfg.targets_length,
    data_cfg.noise_density,
    data_cfg.mean_noise_span_length,
  )
  train = TrainIterator(task, split, global_batch_size, process_index, process_count, int(seed))
  data = PretrainingData(tokenizer, train, task, split, raw_length, len(tokens))
  log.info("Data: %s: %s.", corpus.description, data.describe())
  return data


def _check_batch_arguments(seed, global_batch_size: int, process_index: int, process_count: int):
  """The seed, the global batch and this host's share of it, or a ValueError naming the fix."""
  if not (isinstance(seed, (int, np.integer)) and seed >= 0):
    raise ValueError(f"seed={seed!r}: the data seed must be an integer >= 0.")
  if global_batch_size < 1:
    raise ValueError(f"global batch size {global_batch_size} must be >= 1.")
  if not 0 <= process_index < process_count:
    raise ValueError(
      f"process_index={process_index} must be in [0, process_count={process_count})."
    )
  if global_batch_size % process_count:
    raise ValueError(
      f"global batch size {global_batch_size} is not divisible by the "
      f"{process_count} processes; use a multiple of {process_count}."
    )


def _raw_chunk_length(data_cfg) -> int:
  """Raw tokens per chunk that span corruption turns into inputs_length input tokens; checks
  that targets_length holds the targets they make."""
  raw_length, targets_needed = random_spans_helper(
    data_cfg.inputs_length, data_cfg.noise_density, data_cfg.mean_noise_span_length
  )
  if data_cfg.targets_length < targets_needed:
    raise ValueError(
      f"data.targets_length={data_cfg.targets_length} is too short: span corruption of "
      f"data.inputs_length={data_cfg.inputs_length} makes {targets_needed} target tokens "
      f"(chunks of {raw_length} raw tokens); set data.targets_length={targets_needed}."
    )
  return raw_length


def _check_model_vocab(tokenizer: Tokenizer, model_vocab_size: int | None) -> None:
  """The model's embedding holds every id of the tokenizer (sentinels included)."""
  if model_vocab_size is not None and tokenizer.vocab_size > model_vocab_size:
    rounded = -(-tokenizer.vocab_size // 128) * 128
    raise ValueError(
      f"the tokenizer has {tokenizer.vocab_size} ids ({tokenizer.num_pieces} SentencePiece "
      f"pieces + {tokenizer.extra_ids} sentinels) but model.vocab_size={model_vocab_size}; "
      f"set model.vocab_size >= {tokenizer.vocab_size} (e.g. {rounded}) or train a smaller "
      "tokenizer (data.spm_vocab_size)."
    )


def _split_chunks(
  num_chunks: int, data_cfg, global_batch_size: int, raw_length: int, corpus, num_tokens: int
) -> ChunkSplit:
  """Chunks held out for evaluation and the rest for training, which must fill one batch."""
  size = (
    f"{corpus.description} has {num_tokens} tokens, which make {num_chunks} chunks of "
    f"{raw_length} tokens (for data.inputs_length={data_cfg.inputs_length})"
  )
  if num_chunks == 0:
    raise ValueError(
      f"the corpus is too small to make one chunk: {size}. Add text or lower data.inputs_length."
    )
  num_eval = _num_eval(num_chunks, data_cfg.eval_fraction)
  if num_chunks - num_eval < global_batch_size:
    needed = global_batch_size
    while needed - _num_eval(needed, data_cfg.eval_fraction) < global_batch_size:
      needed += 1
    raise ValueError(
      f"the corpus is too small for one batch: {size}, {num_eval} of them held out for "
      f"evaluation (data.eval_fraction={data_cfg.eval_fraction}), but a global batch of "
      f"{global_batch_size} needs {global_batch_size} training chunks: {needed} chunks, "
      f"{needed * raw_length} tokens. Add text, or lower the batch size or "
      "data.inputs_length."
    )
  return ChunkSplit(num_chunks, num_eval)
