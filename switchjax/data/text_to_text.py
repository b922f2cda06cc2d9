"""Supervised text-to-text data for fine-tuning: (input, target) pairs from TSV or JSON Lines
files, tokenized once, batched like the pretraining data.

A TSV file has one example per line, `input<TAB>target` (a first line equal to the field names
is a header and skipped); a JSON Lines file has one object per line with the input and target
fields (`finetune.input_field`, `finetune.target_field`). Inputs and targets get EOS, as T5's
tasks do, and are truncated (and counted) beyond data.inputs_length / data.targets_length.

The batches, their order and their resumable position are the pretraining pipeline's
(`TrainIterator`): example g of the stream is training pair perm_e(g mod N) of epoch e.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import pathlib
import re
from collections.abc import Iterator

import numpy as np

from switchjax.data.corpus import default_documents
from switchjax.data.pipeline import TrainIterator, host_eval_batches, make_batch
from switchjax.data.tokenizer import EOS_ID, Tokenizer

SUFFIXES = (".tsv", ".jsonl", ".json")


def read_pairs(path, input_field: str = "input", target_field: str = "target") -> list[tuple]:
  """The (input, target) text pairs of a .tsv or .jsonl file; ValueError naming the file, the
  line and the fix for anything else (a missing column or field, an empty target, bad JSON)."""
  path = pathlib.Path(path)
  if path.suffix not in SUFFIXES:
    raise ValueError(f"{path}: use a .tsv (input<TAB>target) or .jsonl file of examples.")
  try:
    lines = path.read_text(encoding="utf-8-sig").splitlines()  # a BOM is no text
  except (OSError, UnicodeDecodeError) as e:
    raise ValueError(f"{path} cannot be read as UTF-8 text ({e}).") from None
  read = _tsv_pair if path.suffix == ".tsv" else _json_pair
  pairs = []
  for number, line in enumerate(lines, 1):
    if not line.strip() or (number == 1 and line.split("\t") == [input_field, target_field]):
      continue
    source, target = read(line, input_field, target_field, f"{path}:{number}")
    if not target.strip():
      raise ValueError(f"{path}:{number}: the target is empty; every example needs a target.")
    pairs.append((source, target))
  if not pairs:
    raise ValueError(f"{path} holds no examples.")
  return pairs


def _tsv_pair(line: str, input_field: str, target_field: str, where: str) -> tuple[str, str]:
  columns = line.split("\t")
  if len(columns) != 2:
    raise ValueError(
      f"{where}: expected 2 tab-separated columns ({input_field}, {target_field}), found "
      f"{len(columns)}; escape tabs inside the text or use a .jsonl file."
    )
  return columns[0], columns[1]


def _json_pair(line: str, input_field: str, target_field: str, where: str) -> tuple[str, str]:
  try:
    record = json.loads(line)
  except json.JSONDecodeError as e:
    raise ValueError(f"{where}: not a JSON object ({e.msg}).") from None
  if not isinstance(record, dict):
    raise ValueError(f"{where}: expected a JSON object with {input_field!r} and {target_field!r}.")
  missing = [f for f in (input_field, target_field) if not isinstance(record.get(f), str)]
  if missing:
    raise ValueError(
      f"{where}: no text field {missing[0]!r} (fields: {', '.join(record)}); set "
      f"finetune.input_field / finetune.target_field."
    )
  return record[input_field], record[target_field]


@dataclasses.dataclass(frozen=True)
class PairSplit:
  """Training pairs 0..num_train-1 then eval pairs: the split is the two files."""

  num_train: int
  num_eval: int

  def train_chunk(self, t: int) -> int:
    return t

  def eval_chunk(self, e: int) -> int:
    return self.num_train + e


@dataclasses.dataclass(frozen=True)
class TextToTextTask:
  """Tokenized pairs, padded and truncated to fixed lengths."""

  inputs: list  # [num_pairs] of int arrays (with EOS)
  targets: list
  inputs_length: int
  targets_length: int

  def batch(self, chunks_and_seeds) -> dict[str, np.ndarray]:
    """The batch of the pairs with these indices (the seeds are unused: no noise)."""
    rows = [i for i, _ in chunks_and_seeds]
    return make_batch(
      _pad([self.inputs[i] for i in rows], self.inputs_length),
      _pad([self.targets[i] for i in rows], self.targets_length),
    )


def _pad(sequences, length: int) -> np.ndarray:
  out = np.zeros((len(sequences), length), np.int32)
  for row, ids in enumerate(sequences):
    ids = ids[:length]
    out[row, : len(ids)] = ids
  return out


@dataclasses.dataclass
class SupervisedData:
  """What the training loop needs, for text-to-text examples (see PretrainingData).

  Attributes:
    tokenizer: the Tokenizer.
    train: the host-local training iterator (resumable).
    task: the tokenized pairs.
    split: train pairs then eval pairs.
    eval_pairs: the eval (input, target) texts, for exact match.
    truncated: examples whose input or target was cut to the lengths.
  """

  tokenizer: Tokenizer
  train: TrainIterator
  task: TextToTextTask
  split: PairSplit
  eval_pairs: list
  truncated: int

  @property
  def num_eval_chunks(self) -> int:
    return self.split.num_eval

  def eval_batches(self, num_batches: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    it = self.train
    return host_eval_batches(
      self.task, self.split, it.global_batch_size, it.process_index, it.process_count, num_batches
    )

  def eval_inputs(self, count: int) -> tuple[np.ndarray, list[str]]:
    """The first `count` eval inputs [count, inputs_length] and their target texts."""
    count = min(count, self.split.num_eval)
    rows = [(self.split.eval_chunk(e), None) for e in range(count)]
    return self.task.batch(rows)["encoder_input_tokens"], [t for _, t in self.eval_pairs[:count]]

  def describe(self) -> str:
    return (
      f"{self.split.num_train} training + {self.split.num_eval} eval examples (vocab "
      f"{self.tokenizer.vocab_size}) -> {self.task.inputs_length} inputs / "
      f"{self.task.targets_length} targets, {self.truncated} truncated"
    )


def make_supervised_data(
  train_pairs: list,
  eval_pairs: list,
  tokenizer: Tokenizer,
  data_cfg,
  global_batch_size: int,
  *,
  process_index: int = 0,
  process_count: int = 1,
) -> SupervisedData:
  """Tokenized, batched and resumable text-to-text data (order seed data.shuffle_seed)."""
  if len(train_pairs) < global_batch_size:
    raise ValueError(
      f"{len(train_pairs)} training examples cannot fill a global batch of {global_batch_size}; "
      "add examples or lower train.batch_size."
    )
  pairs = list(train_pairs) + list(eval_pairs)
  inputs, targets = (
    [np.asarray(ids, np.int32) for ids in tokenizer.encode_batch(texts, add_eos=True)]
    for texts in ([s for s, _ in pairs], [t for _, t in pairs])
  )
  truncated = sum(
    len(i) > data_cfg.inputs_length or len(t) > data_cfg.targets_length
    for i, t in zip(inputs, targets)
  )
  task = TextToTextTask(inputs, targets, data_cfg.inputs_length, data_cfg.targets_length)
  split = PairSplit(len(train_pairs), len(eval_pairs))
  train = TrainIterator(
    task, split, global_batch_size, process_index, process_count, data_cfg.shuffle_seed
  )
  return SupervisedData(tokenizer, train, task, split, list(eval_pairs), truncated)


def decode_generated(tokenizer: Tokenizer, ids) -> str:
  """Text of generated ids up to EOS (0-padding and ids beyond the tokenizer dropped)."""
  ids = list(ids)
  ids = ids[: ids.index(EOS_ID)] if EOS_ID in ids else ids
  return tokenizer.decode([i for i in ids if 0 < i < tokenizer.vocab_size]).strip()


# --------------------------------------------------------------------------------------------
# The bundled task.

_WORD = re.compile(r"^[A-Za-z]{4,12}$")


def fill_in_the_blank(num_train: int = 4000, num_eval: int = 200, seed: int = 0, words: int = 200):
  """(train pairs, eval pairs) made from the embedded corpus: a sentence of 6-24 words with one
  of the corpus's `words` most frequent words (4-12 letters) replaced by <extra_id_0>, and that
  word as the target. A closed set of answers keeps the task learnable by a small model (and
  gives it a majority-word baseline). Deterministic for a seed; eval sentences never occur in
  training."""
  sentences = _corpus_sentences()
  counts = collections.Counter(w for s in sentences for w in s.split() if _WORD.match(w))
  answers = {w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:words]}
  rng = np.random.default_rng(seed)
  rng.shuffle(sentences)
  pairs = []
  for sentence in sentences:
    split = sentence.split()
    candidates = [i for i, w in enumerate(split) if w in answers]
    if candidates:
      i = candidates[rng.integers(len(candidates))]
      pairs.append((" ".join(split[:i] + ["<extra_id_0>"] + split[i + 1 :]), split[i]))
    if len(pairs) == num_train + num_eval:
      break
  if len(pairs) < num_train + num_eval:
    raise ValueError(f"the embedded corpus makes only {len(pairs)} fill-in-the-blank examples.")
  return pairs[:num_train], pairs[num_train:]


def _corpus_sentences() -> list[str]:
  """The embedded corpus's sentences of 6-24 words, whitespace-normalized, sorted, unique."""
  return sorted(
    {
      " ".join(s.split())
      for doc in default_documents()
      for s in re.split(r"(?<=[.!?])\s+", doc)
      if 6 <= len(s.split()) <= 24 and "\t" not in s
    }
  )


BUNDLED_TASKS = {"fill_in_the_blank": fill_in_the_blank}  # config.FINETUNE_TASKS names them


def write_pairs(pairs, path) -> pathlib.Path:
  """Writes pairs as a TSV file (input<TAB>target per line)."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("".join(f"{s}\t{t}\n" for s, t in pairs), encoding="utf-8")
  return path
