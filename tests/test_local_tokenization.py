"""Tokenizing a corpus on the local cores (tokens.py, workers.py): worker processes give the
bytes and the cache key of one process; the embedded corpus's documents are the same from the
pool; errors are the readers' one line; an interruption stops the workers and leaves no file."""

import gzip
import json
import multiprocessing
import os
import pydoc_data.topics
import signal
import types

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tiny import doc_paragraphs

from switchjax.config import DataConfig
from switchjax.data import corpus as corpus_lib
from switchjax.data import open_corpus, train_tokenizer, workers
from switchjax.data import parts as parts_lib
from switchjax.data import tokens as tokens_lib
from switchjax.data.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
  """Five files of four formats (~150 KB) and a small tokenizer."""
  root = tmp_path_factory.mktemp("local")
  docs = doc_paragraphs(1200)
  fifths = [docs[i::5] for i in range(5)]
  (root / "a.txt").write_text("\n\n".join(fifths[0]) + "\n")
  (root / "b.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in fifths[1]))
  with gzip.open(root / "c.jsonl.gz", "wt") as f:
    f.write("".join(json.dumps({"text": d}) + "\n" for d in fifths[2]))
  pq.write_table(pa.table({"text": fifths[3]}), root / "d.parquet", row_group_size=40)
  (root / "e.json").write_text("".join(json.dumps({"text": d}) + "\n" for d in fifths[4]))
  paths = tuple(str(root / n) for n in ("a.txt", "b.jsonl", "c.jsonl.gz", "d.parquet", "e.json"))
  tokenizer = Tokenizer(train_tokenizer(docs, 400, root / "spm"))
  return types.SimpleNamespace(root=root, paths=paths, tokenizer=tokenizer)


def _tokenize(ws, cache, paths=None, num_workers=None):
  corpus = open_corpus(DataConfig(paths=paths or ws.paths))
  return tokens_lib.tokenize_corpus(corpus, ws.tokenizer, cache, num_workers=num_workers)


def _files(directory):
  return sorted(p.relative_to(directory) for p in directory.rglob("*") if p.is_file())


def test_two_workers_give_the_bytes_and_cache_key_of_one(ws, tmp_path):
  assert len(parts_lib.plan_parts(open_corpus(DataConfig(paths=ws.paths)))) == 5
  one = _tokenize(ws, tmp_path / "one", num_workers=1)
  two = _tokenize(ws, tmp_path / "two", num_workers=2)
  assert one.dtype == two.dtype == np.uint16 and len(one) > 30_000
  assert np.asarray(two).tobytes() == np.asarray(one).tobytes()
  assert _files(tmp_path / "one") == _files(tmp_path / "two")  # tokens/tokens-KEY.npy only
  assert len(_files(tmp_path / "two")) == 1


def test_the_workers_read_and_encode_not_this_process(ws, tmp_path, monkeypatch):
  """This process's readers and encoder fail if called: the tokens come from the workers
  (spawned: they do not see the monkeypatch)."""
  expected = np.asarray(_tokenize(ws, tmp_path / "one", num_workers=1)).tobytes()

  def fail(*args, **kwargs):
    raise AssertionError("read or encoded in the calling process")

  monkeypatch.setattr(Tokenizer, "encode_batch", fail)
  monkeypatch.setattr(parts_lib.PartSpec, "documents", fail)
  monkeypatch.setattr(workers, "LOCAL_WORKERS", 2)
  assert np.asarray(_tokenize(ws, tmp_path / "two")).tobytes() == expected


@pytest.mark.slow  # parses the standard library twice: ~10 s here
def test_default_documents_from_the_pool_equal_the_serial_ones(monkeypatch):
  parts = corpus_lib.default_parts()
  assert len(parts) == corpus_lib.DEFAULT_PARTS and parts[0][0] == 0
  assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))  # contiguous ranges of sources
  assert parts[-1][1] == len(corpus_lib._stdlib_files()) + 1
  specs = parts_lib.plan_parts(corpus_lib.DefaultCorpus())
  assert [(s.source, s.block) for s in specs] == [("default", p) for p in parts]
  monkeypatch.setattr(workers, "LOCAL_WORKERS", 2)
  corpus_lib.default_documents.cache_clear()
  pooled = corpus_lib.default_documents()
  serial = tuple(d for p in parts for d in corpus_lib.default_part_documents(*p))
  assert pooled == serial and len(pooled) > 1000
  topics = pydoc_data.topics.topics
  assert pooled[0] == topics[sorted(topics)[0]]


def test_a_bad_file_is_the_same_one_line_error_with_two_workers(ws, tmp_path):
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"text": "fine"}\n\n{"text": "unterminated}\n')
  paths = (*ws.paths[:3], str(bad), ws.paths[3])
  messages = []
  for workers_count in (1, 2):
    cache = tmp_path / f"cache{workers_count}"
    with pytest.raises(ValueError) as e:
      _tokenize(ws, cache, paths, num_workers=workers_count)
    assert e.value.__cause__ is None and e.value.__suppress_context__  # no remote traceback
    messages.append(str(e.value))
    assert _files(cache) == []  # nothing saved
  assert messages[0] == messages[1]
  assert messages[0].startswith(f"{bad}, line 3: not valid JSON") and "\n" not in messages[0]


def test_a_worker_that_dies_is_a_one_line_error():
  with pytest.raises(ValueError, match=r"a local data worker process stopped unexpectedly"):
    list(workers.ordered_map(os._exit, [3, 4], 2))
  assert multiprocessing.active_children() == []


def test_an_interrupt_stops_the_workers_and_leaves_no_file(ws, tmp_path):
  """Ctrl-C (SIGINT's KeyboardInterrupt) while the workers write their parts: raised in this
  process, the workers terminated, no cache entry and no temporary file left."""
  seen = []

  def interrupt(signum, frame):
    children = multiprocessing.active_children()
    writing = list(tmp_path.glob("tokens/.*.part-*"))
    if children and writing:  # the workers are tokenizing: interrupt now
      seen.append((len(children), len(writing)))
      signal.setitimer(signal.ITIMER_REAL, 0)
      raise KeyboardInterrupt

  previous = signal.signal(signal.SIGALRM, interrupt)
  signal.setitimer(signal.ITIMER_REAL, 0.01, 0.01)
  try:
    with pytest.raises(KeyboardInterrupt):
      _tokenize(ws, tmp_path, num_workers=2)
  finally:
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, previous)
  assert seen and seen[0][0] >= 1
  assert multiprocessing.active_children() == []
  assert _files(tmp_path) == []
