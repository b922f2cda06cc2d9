"""The pretraining pipeline: corpora, caching, global batches, host sharding, resuming, errors."""

import gzip
import json
import logging
import pydoc_data.topics
import re
import types

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from match import words
from tiny import doc_paragraphs

from switchjax.config import DataConfig
from switchjax.data import (
  EOS_ID,
  FileCorpus,
  Tokenizer,
  make_pretraining_data,
  open_corpus,
  read_documents,
  reconstruct_tokens,
  train_tokenizer,
)
from switchjax.data import corpus as corpus_lib
from switchjax.data import tokenizer as tokenizer_lib
from switchjax.data import tokens as tokens_lib

INPUTS, TARGETS, RAW = 64, 14, 70  # random_spans_helper(64) == (70, 14): 3 spans per chunk.


def _write_jsonl(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return path


@pytest.fixture(scope="session")
def ws(tmp_path_factory):
  """A corpus in three formats and a small tokenizer trained once for the whole session."""
  root = tmp_path_factory.mktemp("data")
  docs = doc_paragraphs(2500)
  (root / "corpus.txt").write_text("\n\n".join(docs) + "\n")
  _write_jsonl(root / "corpus.jsonl", [{"id": i, "text": d} for i, d in enumerate(docs)])
  pq.write_table(pa.table({"body": docs, "n": list(range(len(docs)))}), root / "corpus.parquet")
  spm_path = train_tokenizer(docs, 500, root / "spm")
  return types.SimpleNamespace(root=root, docs=docs, spm=spm_path, cache=root / "cache")


def _cfg(ws, **kwargs):
  defaults = dict(
    paths=(str(ws.root / "corpus.jsonl"),),
    spm_path=ws.spm,
    cache_dir=str(ws.cache),
    inputs_length=INPUTS,
    targets_length=TARGETS,
    eval_fraction=0.05,
  )
  return DataConfig(**{**defaults, **kwargs})


def _batches(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def _concat_hosts(host_batches):
  return {k: np.concatenate([b[k] for b in host_batches]) for k in host_batches[0]}


# ------------------------------------------------------------------------------------------
# Batches.


def test_batch_format_and_sentinel_layout(ws):
  data = make_pretraining_data(_cfg(ws), 8)
  assert data.raw_length == RAW and data.tokenizer.vocab_size == 600
  assert data.num_train_chunks + data.num_eval_chunks == data.num_tokens // RAW
  batch = next(data.train)
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
    "encoder_input_tokens": ((8, INPUTS), np.int32),
    "decoder_target_tokens": ((8, TARGETS), np.int32),
    "decoder_input_tokens": ((8, TARGETS), np.int32),
    "decoder_loss_weights": ((8, TARGETS), np.float32),
  }
  targets = batch["decoder_target_tokens"]
  assert (batch["decoder_input_tokens"][:, 0] == 0).all()
  np.testing.assert_array_equal(batch["decoder_input_tokens"][:, 1:], targets[:, :-1])
  np.testing.assert_array_equal(batch["decoder_loss_weights"], targets != 0)
  sentinels = data.tokenizer.sentinel_ids
  for row in range(8):
    inputs = batch["encoder_input_tokens"][row]
    assert inputs[-1] == EOS_ID and targets[row, -1] == EOS_ID  # Full chunks: no padding.
    np.testing.assert_array_equal(inputs[inputs >= 500], sentinels[:3])  # 599, 598, 597
    np.testing.assert_array_equal(targets[row][targets[row] >= 500], sentinels[:3])
    chunk = data.task.chunks[data.train.chunk_index(row)]
    np.testing.assert_array_equal(reconstruct_tokens(inputs, targets[row], sentinels), chunk)


def test_chunks_are_the_concatenated_documents(ws):
  data = make_pretraining_data(_cfg(ws), 8)
  expected = [i for ids in data.tokenizer.encode_batch(ws.docs) for i in ids]  # No separators.
  assert data.num_tokens == len(expected)
  assert data.task.chunks.tokens.dtype == np.uint16
  np.testing.assert_array_equal(data.task.chunks[3], expected[3 * RAW : 4 * RAW])


def test_determinism_and_seeds(ws):
  a = _batches(make_pretraining_data(_cfg(ws), 8).train, 3)
  b = _batches(make_pretraining_data(_cfg(ws), 8, seed=0).train, 3)
  c = _batches(make_pretraining_data(_cfg(ws, shuffle_seed=1), 8).train, 3)
  d = _batches(make_pretraining_data(_cfg(ws), 8, seed=1).train, 3)
  _assert_batches_equal(a, b)
  _assert_batches_equal(c, d)
  assert not np.array_equal(a[0]["encoder_input_tokens"], c[0]["encoder_input_tokens"])


def test_every_epoch_is_a_new_permutation_of_the_training_chunks(ws):
  data = make_pretraining_data(_cfg(ws), 8)
  n, split = data.num_train_chunks, data.split
  train_chunks = sorted(split.train_chunk(t) for t in range(n))
  epoch0 = [data.train.chunk_index(g) for g in range(n)]
  epoch1 = [data.train.chunk_index(g) for g in range(n, 2 * n)]
  assert sorted(epoch0) == sorted(epoch1) == train_chunks
  assert epoch0 != epoch1
  # The same chunk gets new noise in the next epoch (seeded by the global example index).
  g1 = n + epoch1.index(epoch0[0])
  a = data.task.example(epoch0[0], np.random.default_rng(data.train.noise_seed(0)))
  b = data.task.example(epoch0[0], np.random.default_rng(data.train.noise_seed(g1)))
  assert not np.array_equal(a[0], b[0])


def test_exact_resume(ws):
  cfg = _cfg(ws)
  uninterrupted = make_pretraining_data(cfg, 8).train
  expected = _batches(uninterrupted, 8)[5:]

  first = make_pretraining_data(cfg, 8).train
  _batches(first, 5)
  state = json.loads(json.dumps(first.get_state()))  # As saved in a checkpoint.
  assert state["step"] == 5 and state["next_example"] == 40

  resumed = make_pretraining_data(cfg, 8).train
  resumed.set_state(state)
  _assert_batches_equal(_batches(resumed, 3), expected)
  assert resumed.get_state()["step"] == 8

  # A run resumed on 2 hosts sees the same global batches.
  hosts = [make_pretraining_data(cfg, 8, process_index=p, process_count=2).train for p in (0, 1)]
  for host in hosts:
    host.set_state(state)
  _assert_batches_equal([_concat_hosts([next(h) for h in hosts]) for _ in range(3)], expected)


def test_resume_refuses_a_different_seed_or_corpus(ws):
  state = make_pretraining_data(_cfg(ws), 8).train.get_state()
  other = make_pretraining_data(_cfg(ws), 8, seed=3).train
  with pytest.raises(ValueError, match="cannot resume the data pipeline: the checkpoint's seed"):
    other.set_state(state)
  other = make_pretraining_data(_cfg(ws, eval_fraction=0.1), 8).train
  with pytest.raises(ValueError, match="checkpoint's num_train_chunks"):
    other.set_state(state)


@pytest.mark.parametrize("process_count", [2, 4])
def test_host_sharding(ws, process_count):
  cfg = _cfg(ws)
  single = make_pretraining_data(cfg, 8)
  hosts = [
    make_pretraining_data(cfg, 8, process_index=p, process_count=process_count)
    for p in range(process_count)
  ]
  expected = _batches(single.train, 3)
  for step in range(3):
    local = [next(h.train) for h in hosts]
    assert local[0]["encoder_input_tokens"].shape == (8 // process_count, INPUTS)
    _assert_batches_equal([_concat_hosts(local)], [expected[step]])
  expected_eval = list(single.eval_batches(2))
  host_eval = [list(h.eval_batches(2)) for h in hosts]
  _assert_batches_equal([_concat_hosts([e[s] for e in host_eval]) for s in range(2)], expected_eval)


def test_train_and_eval_are_disjoint(ws):
  data = make_pretraining_data(_cfg(ws), 8)
  split = data.split
  num_chunks = split.num_chunks
  assert split.num_eval == round(0.05 * num_chunks) >= 1
  train = {split.train_chunk(t) for t in range(split.num_train)}
  evals = {split.eval_chunk(e) for e in range(split.num_eval)}
  assert not train & evals and train | evals == set(range(num_chunks))
  # Eval batches: the eval chunks in a fixed order, the same on every call and for every seed.
  first = list(data.eval_batches(2))
  _assert_batches_equal(first, list(data.eval_batches(2)))
  _assert_batches_equal(first, list(make_pretraining_data(_cfg(ws), 8, seed=5).eval_batches(2)))
  batch = first[1]
  for row in range(8):
    tokens = reconstruct_tokens(
      batch["encoder_input_tokens"][row], batch["decoder_target_tokens"][row], data.tokenizer
    )
    np.testing.assert_array_equal(tokens, data.task.chunks[split.eval_chunk(8 + row)])


def test_eval_repeats_when_the_eval_set_is_small(ws):
  data = make_pretraining_data(_cfg(ws, eval_fraction=0.001), 8)
  assert data.num_eval_chunks == 2
  batch = next(data.eval_batches())
  np.testing.assert_array_equal(
    batch["encoder_input_tokens"][0::2][1:], batch["encoder_input_tokens"][0::2][:-1]
  )


# ------------------------------------------------------------------------------------------
# Corpora and caching.


def test_jsonl_txt_and_parquet_give_the_same_documents(ws):
  assert list(read_documents(ws.root / "corpus.jsonl")) == ws.docs
  assert list(read_documents(ws.root / "corpus.txt")) == ws.docs
  assert list(read_documents(ws.root / "corpus.parquet", "body")) == ws.docs
  batches = []
  for name, field in (
    ("corpus.jsonl", "text"),
    ("corpus.txt", "ignored"),
    ("corpus.parquet", "body"),
  ):
    data = make_pretraining_data(_cfg(ws, paths=(str(ws.root / name),), text_field=field), 8)
    batches.append(next(data.train))
  _assert_batches_equal(batches[:1], batches[1:2])
  _assert_batches_equal(batches[:1], batches[2:])


def test_gzipped_files(ws, tmp_path):
  for name in ("corpus.jsonl", "corpus.txt"):
    (tmp_path / (name + ".gz")).write_bytes(gzip.compress((ws.root / name).read_bytes()))
    assert list(read_documents(tmp_path / (name + ".gz"))) == ws.docs


def test_globs_and_multiple_files(ws, tmp_path):
  for i in range(3):
    _write_jsonl(tmp_path / f"part-{i}.jsonl", [{"text": d} for d in ws.docs[i::3]])
  corpus = open_corpus(_cfg(ws, paths=(str(tmp_path / "part-*.jsonl"),)))
  assert isinstance(corpus, FileCorpus)
  assert [p.name for p in corpus.files] == ["part-0.jsonl", "part-1.jsonl", "part-2.jsonl"]
  assert len(list(corpus.documents())) == len(ws.docs)
  both = open_corpus(_cfg(ws, paths=(str(tmp_path / "part-2.jsonl"), str(tmp_path / "*.jsonl"))))
  assert [p.name for p in both.files] == ["part-2.jsonl", "part-0.jsonl", "part-1.jsonl"]


def test_tokenizer_trained_at_first_use_and_cached(ws, tmp_path, monkeypatch):
  _write_jsonl(tmp_path / "small.jsonl", [{"text": d} for d in ws.docs[:800]])
  cache = tmp_path / "cache"
  cfg = _cfg(
    ws,
    paths=(str(tmp_path / "small.jsonl"),),
    spm_path=None,
    spm_vocab_size=300,
    cache_dir=str(cache),
  )
  data = make_pretraining_data(cfg, 4)
  assert data.tokenizer.num_pieces == 300 and data.tokenizer.vocab_size == 400
  (model,) = (cache / "tokenizers").iterdir()
  (tokens,) = (cache / "tokens").iterdir()
  assert model.suffix == ".model" and tokens.suffix == ".npy"
  first = next(data.train)

  def fail(*args, **kwargs):
    raise AssertionError("the cache was not used")

  monkeypatch.setattr(corpus_lib, "train_tokenizer", fail)
  monkeypatch.setattr(tokens_lib, "_write_tokens", fail)
  again = make_pretraining_data(cfg, 4)
  assert again.tokenizer.spm_path == str(model)
  _assert_batches_equal([first], [next(again.train)])
  assert sorted(p.name for p in cache.rglob("*")) == sorted(
    ["tokenizers", "tokens", model.name, tokens.name]
  )  # No temporary files.


def test_cache_follows_the_environment_variable(ws, tmp_path, monkeypatch):
  monkeypatch.setenv("SWITCHJAX_CACHE", str(tmp_path / "env_cache"))
  make_pretraining_data(_cfg(ws, cache_dir=None), 8)
  assert len(list((tmp_path / "env_cache" / "tokens").glob("tokens-*.npy"))) == 1


def test_interrupted_tokenization_leaves_no_cache_entry(ws, tmp_path, monkeypatch):
  calls = []

  def encode_batch(self, texts, add_eos=False, num_threads=None):
    calls.append(1)
    if len(calls) > 1:
      raise KeyboardInterrupt  # As if the run were killed half-way.
    return [[5] * 10 for _ in texts]

  monkeypatch.setattr(Tokenizer, "encode_batch", encode_batch)
  with pytest.raises(KeyboardInterrupt):
    make_pretraining_data(_cfg(ws, cache_dir=str(tmp_path)), 8)
  assert len(calls) == 2 and not [p for p in tmp_path.rglob("*") if p.is_file()]


@pytest.mark.slow
def test_default_corpus():
  # The session's cache: the tiny preset's runs train the same tokenizer.
  cfg = DataConfig(spm_vocab_size=500, inputs_length=INPUTS, targets_length=TARGETS)
  data = make_pretraining_data(cfg, 4)
  assert data.tokenizer.vocab_size == 600 and data.num_train_chunks > 1000
  batch = next(data.train)
  assert batch["encoder_input_tokens"].shape == (4, INPUTS)
  assert batch["decoder_target_tokens"].shape == (4, TARGETS)
  targets = batch["decoder_target_tokens"][0]
  assert targets[0] == data.tokenizer.sentinel_id(0) == 599
  text = data.tokenizer.decode(batch["encoder_input_tokens"][0])
  assert "<extra_id_0>" in text and "<extra_id_2>" in text
  docs = list(open_corpus(cfg).documents())
  assert docs[0] == pydoc_data.topics.topics[sorted(pydoc_data.topics.topics)[0]]
  assert len(docs) > 1000 and docs == list(open_corpus(cfg).documents())  # Deterministic.


# ------------------------------------------------------------------------------------------
# Errors.


def test_error_path_matches_nothing(ws):
  with pytest.raises(
    ValueError,
    match=re.escape("no files match data.paths='/nonexistent/*.jsonl'; check the path or glob"),
  ):
    make_pretraining_data(_cfg(ws, paths=("/nonexistent/*.jsonl",)), 8)
  with pytest.raises(ValueError, match="no files match data.paths='/nonexistent/a.txt'"):
    make_pretraining_data(_cfg(ws, paths=("/nonexistent/a.txt",)), 8)


def test_error_unsupported_extension(ws, tmp_path):
  (tmp_path / "data.csv").write_text("text\nhello\n")
  with pytest.raises(
    ValueError,
    match=r"data.csv: unsupported file type '.csv'; data.paths "
    r"takes .txt",
  ):
    make_pretraining_data(_cfg(ws, paths=(str(tmp_path / "data.csv"),)), 8)


def test_error_jsonl_line_without_the_text_field(ws, tmp_path):
  path = _write_jsonl(
    tmp_path / "bad.jsonl",
    [{"text": "fine"}, {"text": "also fine"}, {"body": "wrong field", "id": 3}],
  )
  with pytest.raises(ValueError) as e:
    make_pretraining_data(_cfg(ws, paths=(str(path),)), 8)
  message = str(e.value)
  assert f"{path}, line 3: no field 'text'" in message
  assert "'body', 'id'" in message and "--set data.text_field=" in message


def test_error_parquet_without_the_text_column(ws):
  with pytest.raises(
    ValueError,
    match=r"no column 'text' \(columns: body, n\); set --set "
    r"data.text_field=",
  ):
    make_pretraining_data(_cfg(ws, paths=(str(ws.root / "corpus.parquet"),)), 8)


def test_error_empty_corpus(ws, tmp_path):
  path = _write_jsonl(tmp_path / "empty.jsonl", [{"text": ""}, {"text": "  \n"}])
  for spm_path in (ws.spm, None):  # Tokenizing or training the tokenizer finds no text.
    with pytest.raises(
      ValueError,
      match=r"the corpus is empty: data.paths=.*empty.jsonl.* "
      r"holds no text",
    ):
      make_pretraining_data(
        _cfg(ws, paths=(str(path),), spm_path=spm_path, cache_dir=str(tmp_path)), 8
      )


def test_error_corpus_too_small(ws, tmp_path):
  path = _write_jsonl(tmp_path / "tiny.jsonl", [{"text": "Just a few words."}])
  with pytest.raises(
    ValueError,
    match=r"too small to make one chunk: .* has \d+ tokens, which "
    r"make 0 chunks of 70 tokens",
  ):
    make_pretraining_data(_cfg(ws, paths=(str(path),)), 8)
  path = _write_jsonl(tmp_path / "small.jsonl", [{"text": d} for d in ws.docs[:40]])
  with pytest.raises(ValueError) as e:
    make_pretraining_data(_cfg(ws, paths=(str(path),)), 256)
  message = str(e.value)
  assert "too small for one batch" in message and "needs 256 training chunks" in message
  assert "269 chunks, 18830 tokens" in message  # 256 train + round(0.05 * 269) = 13 eval


def test_error_tokenizer_without_sentinels(ws):
  with pytest.raises(
    ValueError, match="tokenizer has no sentinel ids; span corruption needs extra_ids >= 3"
  ):
    make_pretraining_data(_cfg(ws), 8, tokenizer=Tokenizer(ws.spm, extra_ids=0))
  with pytest.raises(ValueError, match="extra_ids >= 28"):
    make_pretraining_data(
      _cfg(ws, inputs_length=512, targets_length=114), 8, tokenizer=Tokenizer(ws.spm, extra_ids=10)
    )


def test_error_missing_spm_path(ws):
  with pytest.raises(
    ValueError, match=re.escape("data.spm_path='/no/spiece.model' does not exist")
  ):
    make_pretraining_data(_cfg(ws, spm_path="/no/spiece.model"), 8)


def test_error_vocabulary(ws, tmp_path):
  with pytest.raises(
    ValueError,
    match=r"the tokenizer has 600 ids \(500 SentencePiece pieces \+ "
    r"100 sentinels\) but model.vocab_size=512; set "
    r"model.vocab_size >= 600 \(e.g. 640\)",
  ):
    make_pretraining_data(_cfg(ws), 8, model_vocab_size=512)
  path = _write_jsonl(tmp_path / "few.jsonl", [{"text": d} for d in ws.docs[:50]])
  with pytest.raises(
    ValueError,
    match=r"could not train a 8000-piece model.*allows at most "
    r"\d+ pieces. Lower the vocabulary size "
    r"\(data.spm_vocab_size <= \d+\)",
  ):
    make_pretraining_data(
      _cfg(ws, paths=(str(path),), spm_path=None, spm_vocab_size=8000, cache_dir=str(tmp_path)), 8
    )


def test_error_batch_and_hosts(ws):
  with pytest.raises(
    ValueError, match="global batch size 6 is not divisible by the 4 processes; use a multiple of 4"
  ):
    make_pretraining_data(_cfg(ws), 6, process_index=0, process_count=4)
  with pytest.raises(ValueError, match="process_index=2 must be in"):
    make_pretraining_data(_cfg(ws), 8, process_index=2, process_count=2)


def test_error_lengths(ws):
  with pytest.raises(
    ValueError, match="data.targets_length=10 is too short.*set data.targets_length=14"
  ):
    make_pretraining_data(_cfg(ws, targets_length=10), 8)
  longer = make_pretraining_data(_cfg(ws, targets_length=20), 8)  # Longer targets are padded.
  assert (next(longer.train)["decoder_target_tokens"][:, 14:] == 0).all()


def test_no_eval_split(ws):
  data = make_pretraining_data(_cfg(ws, eval_fraction=0.0), 8)
  assert data.num_eval_chunks == 0
  with pytest.raises(ValueError, match="there is no eval split: data.eval_fraction=0"):
    data.eval_batches(1)


@pytest.mark.slow
def test_default_corpus_caps_an_oversized_vocabulary(tmp_path, caplog):
  # Presets made for real corpora (32,000 pieces) still run on the embedded corpus.
  from switchjax.config import DataConfig
  from switchjax.data.corpus import get_tokenizer

  cfg = DataConfig(spm_vocab_size=32000, cache_dir=str(tmp_path))
  with caplog.at_level(logging.WARNING):
    tokenizer = get_tokenizer(cfg)
  assert 8000 < tokenizer.num_pieces < 32000
  assert tokenizer.vocab_size == tokenizer.num_pieces + 100
  assert (
    f"supports at most {tokenizer.num_pieces} SentencePiece pieces; training "
    f"{tokenizer.num_pieces} instead of data.spm_vocab_size=32000"
  ) in caplog.text


# ------------------------------------------------------------------------------------------
# Long lines and files that cannot be read.


def _words_text(num_chars, seed=0):
  """num_chars of space-separated random words from a 300-word vocabulary (no newlines)."""
  rng = np.random.default_rng(seed)
  letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
  vocab = ["".join(rng.choice(letters, rng.integers(2, 10))) for _ in range(300)]
  words = rng.choice(vocab, num_chars // 5)
  return " ".join(words)[:num_chars].strip()


class _CountingStr(str):
  """A str that counts the characters its slices copy (the work of cutting a line)."""

  copied = 0

  def __getitem__(self, key):
    piece = super().__getitem__(key)
    if isinstance(key, slice):  # indexing one character is not a copy of the line
      _CountingStr.copied += len(piece)
    return _CountingStr(piece)


def test_cutting_a_long_line_copies_each_character_once():
  # Cutting a long line for the tokenizer trainer once copied the rest of the line at each
  # cut: quadratic, minutes for 50 MB. The work is counted (characters copied by slicing), not
  # timed: cutting a 6 MB line copies each character at most once, and the pieces are the
  # line's words in order, each at most max_chars long.
  text = _words_text(6_000_000)
  _CountingStr.copied = 0
  pieces = list(tokenizer_lib._cut(_CountingStr(text), 2000))
  assert _CountingStr.copied <= len(text)
  assert max(map(len, pieces)) <= 2000 and len(pieces) >= len(text) // 2000
  assert " ".join(pieces).split() == text.split()


def test_one_long_line_trains_a_tokenizer_and_tokenizes(tmp_path):
  # A corpus that is one 6 MB line: the tokenizer trains on its cut pieces (none over
  # SentencePiece's 4192-byte limit, which it skips silently) and the whole line is tokenized.
  text = _words_text(6_000_000)
  (tmp_path / "one_line.txt").write_text(text + "\n")
  cfg = DataConfig(
    paths=(str(tmp_path / "one_line.txt"),), spm_vocab_size=300, cache_dir=str(tmp_path)
  )
  corpus = open_corpus(cfg)
  tokenizer = corpus_lib.get_tokenizer(cfg, corpus)
  tokens = tokens_lib.tokenize_corpus(corpus, tokenizer, tmp_path)
  assert len(tokens) > 500_000
  assert tokenizer.decode(tokens[:2000].tolist()).split()[:50] == text.split()[:50]


def test_error_bad_utf8_names_the_file_and_line(ws, tmp_path):
  good = b"fine text\n"
  for name, data in (
    ("latin1.txt", good * 2 + "caf\xe9 au lait\n".encode("latin-1")),
    ("latin1.jsonl", b'{"text": "fine"}\n' + '{"text": "caf\xe9"}\n'.encode("latin-1")),
    ("latin1.txt.gz", gzip.compress(good * 2 + "caf\xe9\n".encode("latin-1"))),
  ):
    (tmp_path / name).write_bytes(data)
    line = 2 if name.endswith(".jsonl") else 3
    offset = 13 if name.endswith(".jsonl") else 3
    match = words(tmp_path / name, f"line {line}", "not valid UTF-8", "0xe9", offset, "iconv")
    with pytest.raises(ValueError, match=match):
      list(read_documents(tmp_path / name))


def test_line_ends_and_blank_lines_as_in_text_mode(tmp_path):
  (tmp_path / "ends.txt").write_bytes(b"a\r\nb\r\n\r\nc\rd\r\re\n\nf")
  assert list(read_documents(tmp_path / "ends.txt")) == ["a\nb", "c\nd", "e", "f"]


def test_error_invalid_json_and_non_objects(ws, tmp_path):
  path = tmp_path / "bad.jsonl"
  path.write_text('{"text": "fine"}\n\n{"text": "unterminated}\n')
  with pytest.raises(ValueError, match=words(path, "line 3", "not valid JSON", "JSON Lines")):
    list(read_documents(path))
  path.write_text('{"text": "fine"}\n["a", "list"]\n')
  match = words(path, "line 2", "a JSON list, not an object", "JSON Lines", "data.text_field")
  with pytest.raises(ValueError, match=match):
    list(read_documents(path))


def test_error_unreadable_files_are_named(ws, tmp_path):
  gz = gzip.compress(b'{"text": "hello"}\n' * 1000)
  for name, data in (("plain.jsonl.gz", b"not gzip"), ("cut.jsonl.gz", gz[: len(gz) // 2])):
    (tmp_path / name).write_bytes(data)
    cfg = _cfg(ws, paths=(str(tmp_path / name),), cache_dir=str(tmp_path))
    match = words(tmp_path / name, "cannot read the file", "complete, readable gzip file")
    with pytest.raises(ValueError, match=match + r"[^\n]*\Z"):  # one line
      make_pretraining_data(cfg, 8)


def test_error_unreadable_parquet(ws, tmp_path):
  whole = (ws.root / "corpus.parquet").read_bytes()
  for name, data, problem in (
    (
      "text.parquet",
      b"this is not parquet",
      "Parquet magic bytes not found in footer. Either the file is corrupted or this is not a "
      "parquet file.",
    ),
    ("empty.parquet", b"", "Parquet file size is 0 bytes"),
    ("cut.parquet", whole[: len(whole) // 2] + whole[-300:], None),
  ):
    (tmp_path / name).write_bytes(data)
    with pytest.raises(ValueError) as e:
      list(read_documents(tmp_path / name, "body"))
    message = str(e.value)
    assert message.startswith(f"{tmp_path / name}: not a readable Parquet file (")
    assert message.endswith(
      "); check the file (a complete Parquet file), or give the text as .txt or .jsonl files."
    )
    assert problem is None or f"({problem})" in message
  match = words(ws.root / "corpus.parquet", "column 'n' holds int64", "data.text_field=NAME")
  with pytest.raises(ValueError, match=match):
    list(read_documents(ws.root / "corpus.parquet", "n"))


@pytest.mark.parametrize("kind", ["text", "empty", "directory"])
def test_error_spm_path_is_not_a_sentencepiece_model(ws, tmp_path, kind):
  path = tmp_path / "spiece.model"
  if kind == "directory":
    path.mkdir()
    problem = "is a directory, not a SentencePiece model"
  elif kind == "empty":
    path.write_bytes(b"")
    problem = "is an empty file, not a SentencePiece model"
  else:
    path.write_text("these are notes, not a model\n")
    problem = "is not a SentencePiece model (SentencePiece cannot parse its 29 bytes)"
  match = words(f"data.spm_path={str(path)!r} {problem}", "give the path of a SentencePiece")
  with pytest.raises(ValueError, match=match):
    make_pretraining_data(_cfg(ws, spm_path=str(path)), 8)
