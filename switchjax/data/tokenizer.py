"""SentencePiece tokenizer with T5's id layout and sentinel ids.

T5's vocabulary is a SentencePiece model whose first three pieces are fixed, followed by the
learned pieces, followed by `extra_ids` sentinels that are not in the SentencePiece model:

  0 <pad>, 1 </s> (eos), 2 <unk>, 3 .. P-1 learned pieces, P .. V-1 sentinels,

where P is the number of SentencePiece pieces and V = P + extra_ids. The sentinels count down
from the end: `<extra_id_k>` has id V - 1 - k (so <extra_id_0> = 32099 for T5's 32000 pieces).
Span corruption replaces the k-th noise span by <extra_id_k>.

Text may contain literal `<extra_id_N>` markers (N < extra_ids); they map to the sentinel ids
and the text between them is encoded segment by segment with SentencePiece. This gives the ids
of Hugging Face's `T5Tokenizer` in transformers 5.x, built with
`T5Tokenizer.from_pretrained(dir, extra_ids=100)` from `dir/spiece.model` (in 5.x,
`T5Tokenizer(vocab_file=...)` does not load the model, and there is no `legacy` switch). Its
pre-tokenizer is Metaspace(prepend_scheme="always"), the `legacy=True` behaviour of 4.x: the
text after a sentinel starts a new word ("a<extra_id_0>b" gives "▁a", <extra_id_0>, "▁b"; 4.x's
legacy=False would give "b"). seqio, which adds the sentinels to the SentencePiece model as
user-defined pieces "▁<extra_id_N>", agrees when each marker starts the text or follows a space
("a <extra_id_0> b"), which is how T5 writes them.
"""

from __future__ import annotations

import hashlib
import io
import os
import pathlib
import re
import threading
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import sentencepiece as spm

from switchjax.data.cache import atomic_write_bytes

PAD_ID = 0
EOS_ID = 1
UNK_ID = 2
PAD_PIECE, EOS_PIECE, UNK_PIECE = "<pad>", "</s>", "<unk>"

_SENTINEL_RE = re.compile(r"<extra_id_(\d+)>")


class VocabularyTooLargeError(ValueError):
  """The text cannot support the requested number of pieces; `limit` is the most it allows."""

  def __init__(self, message: str, limit: int):
    super().__init__(message)
    self.limit = limit


class EmptyTextError(ValueError):
  """train_tokenizer was given no text."""


class Tokenizer:
  """A T5-layout SentencePiece model plus `extra_ids` sentinel ids.

  Attributes:
    spm_path: the SentencePiece .model file.
    extra_ids: number of sentinels appended after the SentencePiece pieces.
    num_pieces: pieces in the SentencePiece model (P).
    vocab_size: P + extra_ids (V); ids are in [0, V).
    sentinel_ids: int32 array [extra_ids]; sentinel_ids[k] = V - 1 - k is <extra_id_k>.
  """

  def __init__(self, spm_path: str | os.PathLike, extra_ids: int = 100, *, setting: str = ""):
    """Loads `spm_path`; `setting` (e.g. 'data.spm_path', '--spm_path') names where the path
    came from in error messages."""
    if extra_ids < 0:
      raise ValueError(f"extra_ids={extra_ids} must be >= 0 (T5 uses 100).")
    path = pathlib.Path(spm_path)
    self.spm_path = str(path)
    self._model_bytes = _read_model(path, setting)
    self._sp = _parse_model(self._model_bytes, path, setting)
    check_t5_layout(self._sp, self.spm_path)
    self.extra_ids = extra_ids
    self.num_pieces = self._sp.get_piece_size()
    self.vocab_size = self.num_pieces + extra_ids
    self.sentinel_ids = np.arange(self.vocab_size - 1, self.num_pieces - 1, -1, dtype=np.int32)

  def __repr__(self) -> str:
    return (
      f"Tokenizer({self.spm_path!r}, extra_ids={self.extra_ids}) with "
      f"{self.num_pieces} pieces, vocab_size={self.vocab_size}"
    )

  pad_id = property(lambda self: PAD_ID, doc="Padding id (0); also the decoder's start id.")
  eos_id = property(lambda self: EOS_ID, doc="End of sequence id (1).")
  unk_id = property(lambda self: UNK_ID, doc="Unknown-piece id (2).")

  @property
  def fingerprint(self) -> str:
    """sha256 of the model file and extra_ids: names caches of text tokenized by this tokenizer."""
    h = hashlib.sha256(self._model_bytes)
    h.update(f"extra_ids={self.extra_ids}".encode())
    return h.hexdigest()

  def sentinel_id(self, k: int) -> int:
    """The id of <extra_id_k>: vocab_size - 1 - k."""
    if not 0 <= k < self.extra_ids:
      raise ValueError(
        f"<extra_id_{k}> does not exist: this tokenizer has extra_ids="
        f"{self.extra_ids} sentinels (<extra_id_0> .. "
        f"<extra_id_{self.extra_ids - 1}>)."
      )
    return self.vocab_size - 1 - k

  def is_sentinel(self, token_id: int) -> bool:
    return self.num_pieces <= token_id < self.vocab_size

  # ------------------------------------------------------------------------------------------
  # Encoding.

  def encode(self, text: str, add_eos: bool = False) -> list[int]:
    """Token ids of `text`; `<extra_id_N>` markers become sentinel ids; optionally eos (1)."""
    ids = []
    for segment in self._split_sentinels(text):
      ids += [segment] if isinstance(segment, int) else self._sp.encode(segment)
    return ids + [EOS_ID] if add_eos else ids

  def encode_batch(
    self, texts: Sequence[str], add_eos: bool = False, num_threads: int | None = None
  ) -> list[list[int]]:
    """`encode` of each text; texts without markers go through SentencePiece in parallel."""
    texts = list(texts)
    plain = [i for i, t in enumerate(texts) if "<extra_id_" not in t]
    out: list[list[int]] = [[] for _ in texts]
    encoded = self._sp.encode([texts[i] for i in plain], num_threads=num_threads or os.cpu_count())
    for i, ids in zip(plain, encoded):
      out[i] = ids
    for i, text in enumerate(texts):
      if "<extra_id_" in text:
        out[i] = self.encode(text)
    return [ids + [EOS_ID] for ids in out] if add_eos else out

  def _split_sentinels(self, text: str) -> list[str | int]:
    """Splits text into strings and sentinel ids (only markers with N < extra_ids count)."""
    parts: list[str | int] = []
    start = 0
    for match in _SENTINEL_RE.finditer(text):
      k = int(match.group(1))
      if k >= self.extra_ids:
        continue  # Not a sentinel of this vocabulary: ordinary text, like Hugging Face.
      parts += [text[start : match.start()], self.vocab_size - 1 - k]
      start = match.end()
    parts.append(text[start:])
    return [p for p in parts if p != ""]

  # ------------------------------------------------------------------------------------------
  # Decoding.

  def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
    """Text of `ids`.

    With skip_special_tokens (the default) decoding stops at the first eos and drops padding;
    otherwise they are rendered as </s> and <pad>. Sentinels are always rendered as
    <extra_id_N>, separated from the text around them by one space, so that `encode` of the
    result gives `ids` back.
    """
    parts, run = [], []

    def flush():
      if run:
        parts.append(self._sp.decode(run))
        run.clear()

    for token_id in _id_list(ids):
      if not 0 <= token_id < self.vocab_size:
        raise ValueError(f"token id {token_id} is outside the vocabulary [0, {self.vocab_size}).")
      if token_id in (PAD_ID, EOS_ID):
        if skip_special_tokens:
          if token_id == EOS_ID:
            break
          continue
        flush()
        parts.append(PAD_PIECE if token_id == PAD_ID else EOS_PIECE)
      elif token_id >= self.num_pieces:
        flush()
        parts.append(f"<extra_id_{self.vocab_size - 1 - token_id}>")
      else:
        run.append(token_id)
    flush()
    return " ".join(p for p in parts if p)

  def decode_batch(
    self, batch: Iterable[Iterable[int]], skip_special_tokens: bool = True
  ) -> list[str]:
    return [self.decode(ids, skip_special_tokens) for ids in batch]

  def id_to_piece(self, token_id: int) -> str:
    if self.is_sentinel(token_id):
      return f"<extra_id_{self.vocab_size - 1 - token_id}>"
    return self._sp.id_to_piece(int(token_id))


def _id_list(ids: Iterable[int]) -> list[int]:
  """A 1-D sequence of ids (list, tuple, NumPy or JAX array) as Python ints."""
  array = np.asarray(ids if hasattr(ids, "__len__") else list(ids))
  if array.ndim != 1:
    raise ValueError(
      f"decode takes one sequence of ids, got an array of shape {array.shape}; "
      "use decode_batch for a batch."
    )
  return array.astype(np.int64).tolist()


def _where(path: pathlib.Path, setting: str) -> str:
  return f"{setting}={str(path)!r}" if setting else f"SentencePiece model {str(path)!r}"


_MODEL_FIX = "give the path of a SentencePiece .model file (e.g. an HF checkpoint's spiece.model)"


def _read_model(path: pathlib.Path, setting: str) -> bytes:
  """The bytes of a model file; a missing, empty or unreadable one is a one-line ValueError."""
  where = _where(path, setting)
  if path.is_dir():
    raise ValueError(f"{where} is a directory, not a SentencePiece model; {_MODEL_FIX}.")
  if not path.is_file():
    raise ValueError(f"{where} does not exist; {_MODEL_FIX}.")
  try:
    data = path.read_bytes()
  except OSError as e:
    raise ValueError(f"{where} cannot be read ({e.strerror}); {_MODEL_FIX}.") from None
  if not data:
    raise ValueError(f"{where} is an empty file, not a SentencePiece model; {_MODEL_FIX}.")
  return data


def _parse_model(data: bytes, path: pathlib.Path, setting: str) -> spm.SentencePieceProcessor:
  """The loaded model; bytes SentencePiece cannot parse (a text file...) are a ValueError."""
  try:
    sp = spm.SentencePieceProcessor(model_proto=data)
  except RuntimeError:
    sp = None
  if sp is None or sp.get_piece_size() == 0:
    raise ValueError(
      f"{_where(path, setting)} is not a SentencePiece model (SentencePiece cannot parse "
      f"its {len(data):,} bytes); {_MODEL_FIX}."
    )
  return sp


def check_t5_layout(sp: spm.SentencePieceProcessor, name: str) -> None:
  """Raises ValueError unless the model has T5's pad 0, eos 1, unk 2."""
  got = {"pad": sp.pad_id(), "eos": sp.eos_id(), "unk": sp.unk_id()}
  if got != {"pad": PAD_ID, "eos": EOS_ID, "unk": UNK_ID}:
    have = ", ".join(f"{k}={v}" for k, v in got.items())
    raise ValueError(
      f"SentencePiece model {name} has {have} (-1 = none), but T5's layout needs pad=0, "
      "eos=1, unk=2. Use a T5 spiece.model, or train a T5-layout model with "
      "switchjax.data.train_tokenizer (pad_id=0, eos_id=1, unk_id=2, bos_id=-1), or leave "
      "data.spm_path unset to train one on the corpus."
    )


# --------------------------------------------------------------------------------------------
# Training.


def call_interruptibly(fn: Callable, *args, **kwargs):
  """fn(*args, **kwargs), run in a daemon thread while the main thread waits for it.

  SentencePiece's training and batch encoding release the GIL but keep the thread that calls
  them for as long as they run (minutes on a large corpus), and Python runs signal handlers in
  the main thread only: called from there, a SIGTERM or Ctrl-C would wait for the call to end.
  Waiting on the thread instead lets the handler run, and raise, at once. An interrupted call is
  abandoned: it finishes in the background and its result is dropped (the process is exiting).
  """
  if threading.current_thread() is not threading.main_thread():
    return fn(*args, **kwargs)
  outcome: dict = {}

  def target():
    try:
      outcome["value"] = fn(*args, **kwargs)
    except BaseException as e:  # noqa: BLE001  (re-raised in the caller's thread)
      outcome["error"] = e

  thread = threading.Thread(target=target, name="switchjax-sentencepiece", daemon=True)
  thread.start()
  thread.join()  # a signal handler that raises interrupts this wait
  if "error" in outcome:
    raise outcome["error"]
  return outcome["value"]


def _sentences(texts: Iterable[str], max_sentences: int, max_chars: int):
  """Non-empty lines of `texts`, long lines cut at spaces, at most `max_sentences` of them.

  SentencePiece's trainer silently skips lines over 4192 bytes, hence the cut. The cut walks an
  index along the line (it never copies the rest of the line), so a line of n characters takes
  O(n) time: a corpus that is one 50 MB line costs what 50 MB of ordinary lines cost.
  """
  count = 0
  for text in texts:
    for line in text.splitlines():
      for piece in _cut(line.strip(), max_chars):
        yield piece
        count += 1
        if count >= max_sentences:
          return


def _cut(line: str, max_chars: int):
  """`line` (stripped) in pieces of at most max_chars, cut at the last space before the limit
  (or at the limit if the piece has none); the whitespace at a cut is dropped."""
  start, end = 0, len(line)
  while start < end:
    if end - start <= max_chars:
      yield line[start:]
      return
    cut = line.rfind(" ", start, start + max_chars)
    cut = start + max_chars if cut <= start else cut
    yield line[start:cut]
    start = cut
    while start < end and line[start].isspace():
      start += 1


def train_tokenizer(
  texts: Iterable[str],
  vocab_size: int,
  model_prefix_or_path: str | os.PathLike,
  *,
  max_sentences: int = 300_000,
  character_coverage: float = 0.9995,
  num_threads: int = 4,
  seed: int = 0,
) -> str:
  """Trains a T5-layout unigram SentencePiece model and returns the path of the .model file.

  The model has pad 0, eos 1, unk 2 and no bos, like T5's. Training reads the lines of
  `texts` (documents or sentences) and stops after `max_sentences` lines, which keeps it fast
  on large corpora; the result depends only on those lines (deterministic). The file is written
  atomically, so an interrupted run never leaves a broken model behind.

  Args:
    texts: an iterable of texts; each line is a training sentence.
    vocab_size: number of SentencePiece pieces, including pad, eos and unk (the sentinels of
      `Tokenizer(extra_ids=...)` come on top).
    model_prefix_or_path: where to write: "dir/name" writes dir/name.model, as the
      SentencePiece trainer does; a path ending in .model is used as it is.
    max_sentences: cap on the number of training lines.
    character_coverage: SentencePiece's share of characters covered (rarer ones become unk).
    num_threads: trainer threads. The trained model depends on it (the EM sums are split by
      thread), so it is a fixed number, not the machine's core count: hosts that train their
      own copy must get the same model.
    seed: the trainer's random seed.
  """
  path = pathlib.Path(model_prefix_or_path)
  if path.suffix != ".model":
    path = path.with_name(path.name + ".model")
  sentences = list(_sentences(texts, max_sentences, max_chars=2000))
  if not sentences:
    raise EmptyTextError("cannot train a tokenizer: the texts are empty (no non-blank lines).")
  model = io.BytesIO()
  spm.set_random_generator_seed(seed)
  try:
    call_interruptibly(
      spm.SentencePieceTrainer.train,
      sentence_iterator=iter(sentences),
      model_writer=model,
      vocab_size=vocab_size,
      model_type="unigram",
      character_coverage=character_coverage,
      pad_id=PAD_ID,
      eos_id=EOS_ID,
      unk_id=UNK_ID,
      bos_id=-1,
      pad_piece=PAD_PIECE,
      eos_piece=EOS_PIECE,
      unk_piece=UNK_PIECE,
      input_sentence_size=max_sentences,
      shuffle_input_sentence=False,
      num_threads=num_threads,
      minloglevel=2,
    )
  except RuntimeError as e:
    limit = re.search(r"value <= (\d+)", str(e))
    if limit:
      raise VocabularyTooLargeError(
        f"SentencePiece could not train a {vocab_size}-piece model on {len(sentences)} lines "
        f"of text: this text allows at most {limit.group(1)} pieces. Lower the vocabulary "
        f"size (data.spm_vocab_size <= {limit.group(1)}) or give more text.",
        int(limit.group(1)),
      ) from None
    raise ValueError(
      f"SentencePiece could not train a {vocab_size}-piece model on "
      f"{len(sentences)} lines of text: {str(e).rstrip('.')}."
    ) from None
  path.parent.mkdir(parents=True, exist_ok=True)
  atomic_write_bytes(path, model.getvalue())
  return str(path)
