"""Tokenizer: T5 layout, sentinels, agreement with Hugging Face's T5Tokenizer, training."""

import io
import pathlib
import pydoc_data.topics
import shutil

import numpy as np
import pytest
import sentencepiece as spm
import transformers
from match import words

from switchjax.data import EOS_ID, PAD_ID, UNK_ID, Tokenizer, span_corruption, train_tokenizer
from switchjax.data.tokens import token_dtype

TEXTS = [
  "Hello world, this is a test.",
  "The quick brown fox jumps over the lazy dog.",
  "  Leading, trailing   and repeated   spaces  ",
  "tabs\tand\nnewlines\n\nare whitespace",
  "NFKC folds ligatures and full-width: \ufb01 \u2460 \uff21.",
  "Unknown characters: \u65e5\u672c\u8a9e \u2211 \u00fc.",
  "",
  "hello <extra_id_0> world",
  "a<extra_id_0>b<extra_id_1>",
  "<extra_id_3> starts with a sentinel",
  "<extra_id_0><extra_id_1> <extra_id_2>",
  "last sentinel <extra_id_99>.",
  "<extra_id_100> is not a sentinel with 100 extra ids",
]


def _topics_text():
  topics = pydoc_data.topics.topics
  return [topics[name] for name in sorted(topics)]


@pytest.fixture(scope="module")
def spm_path(tmp_path_factory):
  """A small T5-layout SentencePiece model trained on CPython's documentation topics."""
  return train_tokenizer(_topics_text(), 1000, tmp_path_factory.mktemp("spm") / "t5like")


@pytest.fixture(scope="module")
def tok(spm_path):
  return Tokenizer(spm_path, extra_ids=100)


@pytest.fixture(scope="module")
def hf_tok(spm_path, tmp_path_factory):
  # transformers 5.x: T5Tokenizer is the `tokenizers`-backed class; it reads a SentencePiece
  # model through from_pretrained(dir) with dir/spiece.model (T5Tokenizer(vocab_file=...) does
  # not load it). Its Metaspace pre-tokenizer prepends "▁" to every segment ("always"), i.e.
  # transformers 4.x's legacy=True behaviour around sentinels; there is no `legacy` switch.
  directory = tmp_path_factory.mktemp("hf")
  shutil.copy(spm_path, directory / "spiece.model")
  return transformers.T5Tokenizer.from_pretrained(str(directory), extra_ids=100)


def test_train_tokenizer_writes_t5_layout_model(spm_path):
  assert spm_path.endswith("t5like.model")
  sp = spm.SentencePieceProcessor(model_file=spm_path)
  assert sp.get_piece_size() == 1000
  assert (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id()) == (0, 1, 2, -1)
  assert [sp.id_to_piece(i) for i in range(3)] == ["<pad>", "</s>", "<unk>"]


def test_train_tokenizer_is_deterministic(spm_path, tmp_path):
  again = train_tokenizer(_topics_text(), 1000, tmp_path / "again.model")
  assert pathlib.Path(again).read_bytes() == pathlib.Path(spm_path).read_bytes()
  assert [p.name for p in tmp_path.iterdir()] == ["again.model"]  # No temporary files left.


def test_train_tokenizer_errors(tmp_path):
  with pytest.raises(ValueError, match="Lower the vocabulary size"):
    train_tokenizer(["only a few words here"], 5000, tmp_path / "big")
  with pytest.raises(ValueError, match="the texts are empty"):
    train_tokenizer(["", "  \n "], 100, tmp_path / "empty")
  assert not list(tmp_path.iterdir())


def test_layout_and_sentinel_ids(tok, hf_tok):
  assert (tok.pad_id, tok.eos_id, tok.unk_id) == (PAD_ID, EOS_ID, UNK_ID) == (0, 1, 2)
  assert tok.num_pieces == 1000 and tok.vocab_size == 1100 == len(hf_tok)
  assert tok.sentinel_id(0) == 1099 and tok.sentinel_id(99) == 1000
  np.testing.assert_array_equal(tok.sentinel_ids, np.arange(1099, 999, -1))
  for k in (0, 1, 50, 99):
    assert tok.sentinel_id(k) == hf_tok.convert_tokens_to_ids(f"<extra_id_{k}>")
    assert tok.is_sentinel(tok.sentinel_id(k)) and tok.id_to_piece(tok.sentinel_id(k)) == (
      f"<extra_id_{k}>"
    )
  assert (hf_tok.pad_token_id, hf_tok.eos_token_id, hf_tok.unk_token_id) == (0, 1, 2)
  with pytest.raises(ValueError, match="<extra_id_100> does not exist"):
    tok.sentinel_id(100)


def test_t5_vocabulary_sentinel_arithmetic(tmp_path):
  # T5's vocabulary: 32000 pieces + 100 extra ids, so <extra_id_0> = 32099. We cannot ship
  # T5's model, but the arithmetic only depends on the piece count.
  path = train_tokenizer(_topics_text(), 600, tmp_path / "m")
  tok = Tokenizer(path, extra_ids=100)
  assert tok.sentinel_id(0) == 600 + 100 - 1 and tok.sentinel_id(99) == 600


@pytest.mark.parametrize("add_eos", [False, True])
def test_ids_match_hugging_face(tok, hf_tok, add_eos):
  for text in TEXTS:
    ours = tok.encode(text, add_eos=add_eos)
    theirs = hf_tok(text, add_special_tokens=add_eos)["input_ids"]
    assert ours == theirs, text
  assert tok.encode_batch(TEXTS, add_eos=add_eos) == [tok.encode(t, add_eos) for t in TEXTS]


def test_hugging_face_ignores_the_legacy_flag(tok, hf_tok):
  # transformers 5.x has no legacy=False mode for T5: the flag is accepted and ignored.
  directory = pathlib.Path(hf_tok.name_or_path)
  non_legacy = transformers.T5Tokenizer.from_pretrained(str(directory), extra_ids=100, legacy=False)
  for text in TEXTS:
    assert non_legacy(text)["input_ids"] == tok.encode(text, add_eos=True), text


def test_sentinel_markers(tok):
  ids = tok.encode("hello <extra_id_0> world <extra_id_1>", add_eos=True)
  assert ids.count(tok.sentinel_id(0)) == 1 and ids[-2:] == [tok.sentinel_id(1), EOS_ID]
  # Text around a marker is encoded as separate words (T5's "▁" before each segment).
  assert tok.encode("a<extra_id_0>b") == tok.encode("a") + [tok.sentinel_id(0)] + tok.encode("b")
  # Markers beyond extra_ids are ordinary text.
  assert tok.sentinel_id(99) not in tok.encode("<extra_id_100>")


def test_decode_round_trip(tok, hf_tok):
  plain = ["Hello world, this is a test.", "The quick brown fox jumps over the lazy dog.", ""]
  for text in plain:
    ids = tok.encode(text, add_eos=True)
    assert tok.decode(ids) == text
    assert tok.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True)
  for text in TEXTS:  # Decoding then encoding gives the same ids back,
    ids = tok.encode(text)
    if UNK_ID not in ids:  # except for unknown characters, which decode to " ⁇ ".
      assert tok.encode(tok.decode(ids)) == ids, text
  ids = tok.encode("hello <extra_id_0> world")
  assert tok.decode(ids) == "hello <extra_id_0> world"
  assert tok.decode(tok.encode("a<extra_id_0>b<extra_id_1>")) == "a <extra_id_0> b <extra_id_1>"


def test_decode_stops_at_eos_and_drops_padding(tok):
  ids = tok.encode("hello world", add_eos=True)
  padded = np.array(ids + [PAD_ID, PAD_ID] + tok.encode("never shown"), dtype=np.int32)
  assert tok.decode(padded) == "hello world"
  assert tok.decode([PAD_ID] + ids) == "hello world"
  assert tok.decode(ids + [PAD_ID], skip_special_tokens=False) == "hello world </s> <pad>"
  assert tok.decode_batch([ids, ids[:-1]]) == ["hello world"] * 2
  with pytest.raises(ValueError, match="outside the vocabulary"):
    tok.decode([tok.vocab_size])
  with pytest.raises(ValueError, match="decode_batch"):
    tok.decode(np.zeros((2, 3), dtype=np.int32))


def test_layout_check_error(tmp_path):
  # SentencePiece's default layout (unk 0, bos 1, eos 2, no pad) is not T5's.
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
    sentence_iterator=iter(_topics_text()[:20]), model_writer=model, vocab_size=300, minloglevel=2
  )
  path = tmp_path / "default_layout.model"
  path.write_bytes(model.getvalue())
  with pytest.raises(ValueError) as e:
    Tokenizer(path)
  message = str(e.value)
  assert "has pad=-1, eos=2, unk=0" in message
  assert "T5's layout needs pad=0, eos=1, unk=2" in message
  assert "train_tokenizer" in message and str(path) in message


def test_missing_model_file(tmp_path):
  with pytest.raises(ValueError, match="does not exist"):
    Tokenizer(tmp_path / "nope.model")


def test_files_that_are_not_models(tmp_path, spm_path):
  fix = "give the path of a SentencePiece .model file (e.g. an HF checkpoint's spiece.model)."
  (tmp_path / "notes.txt").write_text("not a model")
  (tmp_path / "empty.model").write_bytes(b"")
  (tmp_path / "truncated.model").write_bytes(pathlib.Path(spm_path).read_bytes()[:100])
  for path, problem in (
    (tmp_path, "is a directory, not a SentencePiece model"),
    (tmp_path / "empty.model", "is an empty file, not a SentencePiece model"),
    (
      tmp_path / "notes.txt",
      "is not a SentencePiece model (SentencePiece cannot parse its 11 bytes)",
    ),
    (
      tmp_path / "truncated.model",
      "is not a SentencePiece model (SentencePiece cannot parse its 100 bytes)",
    ),
  ):
    with pytest.raises(ValueError, match=words(f"SentencePiece model {str(path)!r}", problem, fix)):
      Tokenizer(path)
  with pytest.raises(ValueError, match=words(f"--spm_path={str(tmp_path / 'notes.txt')!r} is not")):
    Tokenizer(tmp_path / "notes.txt", setting="--spm_path")


def test_tokenizer_without_sentinels(spm_path):
  tok = Tokenizer(spm_path, extra_ids=0)
  assert tok.vocab_size == tok.num_pieces == 1000 and len(tok.sentinel_ids) == 0
  assert max(tok.encode("x <extra_id_0> y")) < 1000  # The marker is ordinary text.
  with pytest.raises(
    ValueError, match="tokenizer has no sentinel ids; span corruption needs extra_ids >= 28"
  ):
    span_corruption(np.arange(3, 3 + 568), np.random.default_rng(0), tok)


def test_token_dtype():
  assert token_dtype(32128) == np.uint16 and token_dtype(65535) == np.uint16
  assert token_dtype(65536) == np.int32 and token_dtype(250_112) == np.int32
