"""Prepared corpora: parts + manifest equal the in-process token stream; batches from them are
bit-identical to today's pipeline for any host count; reruns; one-line errors."""

import gzip
import json
import re
import types

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tiny import doc_paragraphs

from switchjax.config import DataConfig
from switchjax.data import corpus as corpus_lib
from switchjax.data import make_pretraining_data, open_corpus, read_documents, train_tokenizer
from switchjax.data import prepared as prepared_lib
from switchjax.data import tokens as tokens_lib
from switchjax.data.corpus import Block
from switchjax.data.tokenizer import Tokenizer

INPUTS, TARGETS = 64, 14
BLOCK = 24_000  # bytes: the larger files are cut into several parts


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
  """A corpus of ~300 KB in five files of four formats, and a small tokenizer."""
  root = tmp_path_factory.mktemp("prepared")
  docs = doc_paragraphs(2000)
  quarters = [docs[i::4] for i in range(4)]
  (root / "a.txt").write_text("\n\n".join(quarters[0]) + "\n")
  lines = "".join(json.dumps({"text": d, "n": i}) + "\n" for i, d in enumerate(quarters[1]))
  (root / "b.jsonl").write_text(lines)
  with gzip.open(root / "c.jsonl.gz", "wt") as f:
    f.write("".join(json.dumps({"text": d}) + "\n" for d in quarters[2][:200]))
  table = pa.table({"text": quarters[2][200:]})
  pq.write_table(table, root / "d.parquet", row_group_size=40)
  (root / "e.json").write_text("".join(json.dumps({"text": d}) + "\n" for d in quarters[3]))
  paths = tuple(str(root / n) for n in ("a.txt", "b.jsonl", "c.jsonl.gz", "d.parquet", "e.json"))
  spm = train_tokenizer(docs, 500, root / "spm")
  return types.SimpleNamespace(root=root, docs=docs, paths=paths, spm=spm)


def _cfg(ws, **kwargs):
  defaults = dict(
    paths=ws.paths,
    spm_path=ws.spm,
    cache_dir=str(ws.root / "cache"),
    inputs_length=INPUTS,
    targets_length=TARGETS,
    eval_fraction=0.05,
  )
  return DataConfig(**{**defaults, **kwargs})


@pytest.fixture(scope="module")
def prepared(ws):
  out = ws.root / "prepared"
  prepared_lib.prepare(_cfg(ws), out, block_bytes=BLOCK)
  return out


def _files(directory):
  return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def _in_process_tokens(cfg):
  corpus = open_corpus(cfg)
  tokenizer = corpus_lib.get_tokenizer(cfg, corpus)
  return tokens_lib.tokenize_corpus(corpus, tokenizer, cfg.cache_dir)


# ------------------------------------------------------------------------------------------
# The token stream.


def test_blocks_of_a_file_give_the_documents_of_the_whole_file(tmp_path):
  """Blocks cut anywhere (mid-line, mid-paragraph, in \\r\\n) read the file's documents."""
  text = "a b\r\nc\n\n  \nd é\n\t\ne\rf\n\n\ng\nh" * 7
  for name, content in (("x.txt", text), ("y.jsonl", _jsonl(text.split("\n")))):
    path = tmp_path / name
    path.write_bytes(content.encode())
    whole = list(read_documents(path))
    for size in (1, 2, 3, 5, 8, 13, 40):
      starts = range(0, path.stat().st_size, size)
      blocks = [Block(s, min(s + size, path.stat().st_size)) for s in starts]
      assert [d for b in blocks for d in read_documents(path, block=b)] == whole, (name, size)


def _jsonl(texts):
  return "".join(json.dumps({"text": t}) + "\n" for t in texts if t.strip())


def test_parts_concatenated_equal_the_in_process_tokens(ws, prepared):
  manifest = json.loads((prepared / "manifest.json").read_text())
  assert len(manifest["parts"]) > len(ws.paths)  # large files were cut into blocks
  expected = _in_process_tokens(_cfg(ws))
  got = prepared_lib.concatenated_tokens(str(prepared))
  assert got.dtype == expected.dtype == np.uint16
  assert got.tobytes() == np.asarray(expected).tobytes()
  assert manifest["num_tokens"] == len(expected)
  ends = [np.fromfile(prepared / f"{p['name']}.ends", np.int64) for p in manifest["parts"]]
  assert (
    sum(len(e) for e in ends)
    == manifest["num_documents"]
    == len(list(open_corpus(_cfg(ws)).documents()))
  )
  assert all(e[-1] == p["num_tokens"] for e, p in zip(ends, manifest["parts"]) if len(e))


@pytest.mark.parametrize("process_count", [1, 2, 4])
def test_batches_are_bit_identical_to_the_in_process_pipeline(ws, prepared, process_count):
  cfg = _cfg(ws)
  reference = make_pretraining_data(cfg, 8)
  expected = [next(reference.train) for _ in range(3)] + list(reference.eval_batches(2))
  hosts = []
  for p in range(process_count):
    data = make_pretraining_data(
      _cfg(ws, prepared=str(prepared)), 8, process_index=p, process_count=process_count
    )
    assert data.num_tokens == reference.num_tokens
    hosts.append([next(data.train) for _ in range(3)] + list(data.eval_batches(2)))
  for step, batch in enumerate(expected):
    for key in batch:
      got = np.concatenate([h[step][key] for h in hosts])
      np.testing.assert_array_equal(got, batch[key], err_msg=f"{key} of batch {step}")


def test_a_prepared_corpus_needs_no_data_paths_and_no_input_files(ws, prepared):
  data = make_pretraining_data(_cfg(ws, paths=(), spm_path=None, prepared=str(prepared)), 8)
  reference = make_pretraining_data(_cfg(ws), 8)
  assert data.tokenizer.fingerprint == reference.tokenizer.fingerprint
  np.testing.assert_array_equal(
    next(data.train)["encoder_input_tokens"], next(reference.train)["encoder_input_tokens"]
  )


def test_trained_tokenizer_is_the_one_a_run_trains(ws, tmp_path):
  cfg = _cfg(ws, spm_path=None, spm_vocab_size=300, cache_dir=str(tmp_path / "cache"))
  prepared_lib.prepare(cfg, tmp_path / "out", block_bytes=BLOCK)
  trained = corpus_lib.get_tokenizer(cfg)
  assert (tmp_path / "out" / "spiece.model").read_bytes() == open(trained.spm_path, "rb").read()
  tokens = prepared_lib.concatenated_tokens(str(tmp_path / "out"))
  assert tokens.tobytes() == np.asarray(_in_process_tokens(cfg)).tobytes()


# ------------------------------------------------------------------------------------------
# Reruns.


def test_rerun_after_removing_a_part_gives_the_same_bytes(ws, prepared, tmp_path):
  out = tmp_path / "out"
  prepared_lib.prepare(_cfg(ws), out, block_bytes=BLOCK)
  before = _files(out)
  assert before == _files(prepared)  # deterministic: another directory, the same bytes
  for suffix in (".tokens", ".json"):
    (out / f"part-00002{suffix}").unlink()
  (out / "part-00004.tokens").write_bytes(b"\0\0")  # truncated: rewritten too
  prepared_lib.prepare(_cfg(ws), out, block_bytes=BLOCK)
  assert _files(out) == before
  prepared_lib.prepare(_cfg(ws), out, block_bytes=BLOCK)  # finished: nothing changes
  assert _files(out) == before


def test_a_failed_worker_leaves_no_partial_part(ws, prepared, tmp_path, monkeypatch):
  out = tmp_path / "out"
  real = prepared_lib.encode_part

  def failing(spec, *args):
    if spec.index == 3:
      raise RuntimeError("worker killed")
    return real(spec, *args)

  monkeypatch.setattr(prepared_lib, "encode_part", failing)
  with pytest.raises(RuntimeError, match="worker killed"):
    prepared_lib.prepare(_cfg(ws), out, block_bytes=BLOCK)
  assert not list(out.glob("part-00003*")) and not list(out.glob(".*"))
  with pytest.raises(ValueError, match="still being prepared.*rerun it with the same settings"):
    make_pretraining_data(_cfg(ws, prepared=str(out)), 8)
  monkeypatch.setattr(prepared_lib, "encode_part", real)
  prepared_lib.prepare(_cfg(ws), out, block_bytes=BLOCK)
  assert _files(out) == _files(prepared)


# ------------------------------------------------------------------------------------------
# Errors.


def test_error_output_not_empty(ws, tmp_path):
  (tmp_path / "notes.txt").write_text("mine")
  with pytest.raises(ValueError, match="is not empty and holds no preparation"):
    prepared_lib.prepare(_cfg(ws), tmp_path, block_bytes=BLOCK)


def test_error_output_holds_another_preparation(ws, prepared, tmp_path):
  out = tmp_path / "out"
  prepared_lib.prepare(_cfg(ws, paths=ws.paths[:2]), out, block_bytes=BLOCK)
  with pytest.raises(ValueError, match="holds the preparation of another corpus"):
    prepared_lib.prepare(_cfg(ws), out, block_bytes=BLOCK)
  with pytest.raises(ValueError, match="holds the preparation of another tokenizer"):
    prepared_lib.prepare(_cfg(ws, paths=ws.paths[:2], extra_ids=50), out, block_bytes=BLOCK)


def test_error_run_with_another_tokenizer(ws, prepared, tmp_path):
  other = train_tokenizer(ws.docs[:300], 200, tmp_path / "other")
  with pytest.raises(ValueError, match="tokenized with another tokenizer than data.spm_path"):
    make_pretraining_data(_cfg(ws, spm_path=other, prepared=str(prepared)), 8)
  with pytest.raises(ValueError, match="tokenized with another tokenizer than the run's"):
    make_pretraining_data(_cfg(ws, prepared=str(prepared)), 8, tokenizer=Tokenizer(other))


@pytest.mark.parametrize(
  "setting, value, words",
  [
    ("paths", ("x.jsonl",), r"data.paths=\('x.jsonl',\) disagrees with data.prepared"),
    ("text_field", "body", "data.text_field='body' disagrees"),
    ("extra_ids", 50, "data.extra_ids=50 disagrees.*set data.extra_ids=100"),
  ],
)
def test_error_run_settings_disagree(ws, prepared, setting, value, words):
  with pytest.raises(ValueError, match=words):
    make_pretraining_data(_cfg(ws, prepared=str(prepared), **{setting: value}), 8)


def test_error_spm_vocab_size_disagrees_with_a_trained_tokenizer(ws, tmp_path):
  cfg = _cfg(ws, paths=ws.paths[:1], spm_path=None, spm_vocab_size=300)
  prepared_lib.prepare(cfg, tmp_path / "out")
  with pytest.raises(ValueError, match="data.spm_vocab_size=400 disagrees"):
    make_pretraining_data(
      _cfg(ws, paths=(), spm_path=None, spm_vocab_size=400, prepared=str(tmp_path / "out")), 8
    )


def test_error_corpus_changed_since_preparation(ws, tmp_path):
  source = tmp_path / "a.txt"
  source.write_text("\n\n".join(ws.docs[:400]))
  cfg = _cfg(ws, paths=(str(source),))
  prepared_lib.prepare(cfg, tmp_path / "out")
  source.write_text("\n\n".join(ws.docs[:401]))
  with pytest.raises(ValueError, match="prepared from another corpus: the files of data.paths"):
    make_pretraining_data(_cfg(ws, paths=(str(source),), prepared=str(tmp_path / "out")), 8)


def _edit_manifest(directory, edit):
  manifest = json.loads((directory / "manifest.json").read_text())
  edit(manifest)
  (directory / "manifest.json").write_text(json.dumps(manifest))


def _copy(prepared, tmp_path):
  out = tmp_path / "copy"
  out.mkdir()
  for name, data in _files(prepared).items():
    (out / name).write_bytes(data)
  return out


@pytest.mark.parametrize(
  "damage, words",
  [
    (lambda d: (d / "part-00001.tokens").unlink(), "part-00001.tokens is missing; rerun"),
    (lambda d: (d / "part-00001.tokens").write_bytes(b"12"), "has 2 bytes, not .* .truncated"),
    (lambda d: (d / "manifest.json").unlink(), "still being prepared, or its preparation was"),
    (
      lambda d: (d / "preparation.json").unlink() or (d / "manifest.json").unlink(),
      "is not a prepared corpus .no manifest.json",
    ),
    (lambda d: (d / "spiece.model").write_bytes(b"x"), "spiece.model is missing or is another"),
    (lambda d: _edit_manifest(d, lambda m: m["tokenizer"].pop("trained")), "lacks or garbles"),
  ],
)
def test_error_damaged_prepared_corpus(ws, prepared, tmp_path, damage, words):
  out = _copy(prepared, tmp_path)
  damage(out)
  cfg = _cfg(ws, spm_path=None, prepared=str(out), cache_dir=str(tmp_path / "cache"))
  with pytest.raises(ValueError, match=words):
    data = make_pretraining_data(cfg, 8)
    for _ in range(30):  # parts are opened (and checked) when first read
      next(data.train)


def test_error_prepared_does_not_exist(ws, tmp_path):
  with pytest.raises(ValueError, match="does not exist; prepare the corpus there first"):
    make_pretraining_data(_cfg(ws, prepared=str(tmp_path / "nowhere")), 8)


# ------------------------------------------------------------------------------------------
# The preparation job.


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["beam", "processes"])
def test_job_with_two_workers_gives_the_same_bytes(ws, prepared, tmp_path, engine):
  from switchjax.data.prepare_job import prepare_corpus

  prepare_corpus(_cfg(ws), str(tmp_path / "out"), num_workers=2, engine=engine, block_bytes=BLOCK)
  assert _files(tmp_path / "out") == _files(prepared)


def test_script_errors_are_one_line(ws, tmp_path, capsys):
  import importlib.util
  import pathlib

  path = pathlib.Path(__file__).parents[1] / "scripts" / "prepare_data.py"
  spec = importlib.util.spec_from_file_location("prepare_data", path)
  script = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(script)
  (tmp_path / "notes.txt").write_text("mine")
  argv = ["--config=tiny", f"--set=data.paths={ws.paths[0]}", f"--set=data.spm_path={ws.spm}"]
  assert script.main([*argv, f"--output={tmp_path}", "--engine=processes"]) == 1
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and re.match(r"error: --output=.* is not empty", err)
  assert script.main([*argv, f"--output={tmp_path / 'out'}", "--engine=processes"]) == 0
  assert "Prepared" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------
# Prefetching.


def test_prefetched_batches_and_positions_are_the_iterators(ws, prepared):
  cfg = _cfg(ws, prepared=str(prepared))
  plain, ahead = make_pretraining_data(cfg, 8), make_pretraining_data(cfg, 8)
  ahead.prefetch(depth=3)
  for _ in range(4):
    expected, got = next(plain.train), next(ahead.train)
    for key in expected:
      np.testing.assert_array_equal(got[key], expected[key])
    assert ahead.train.get_state() == plain.train.get_state()  # taken, not made ahead
  assert ahead.train.input_rate() > 0
  saved = ahead.train.get_state()
  next(ahead.train)
  ahead.train.set_state(saved)  # a resume: continues from the saved position
  np.testing.assert_array_equal(
    next(ahead.train)["encoder_input_tokens"], next(plain.train)["encoder_input_tokens"]
  )
  ahead.train.close()


def test_prefetch_raises_the_iterators_error_in_the_consumer(ws, prepared, tmp_path):
  out = _copy(prepared, tmp_path)
  data = make_pretraining_data(_cfg(ws, prepared=str(out)), 8)
  data.prefetch()
  for part in out.glob("part-*.tokens"):
    part.unlink()
  with pytest.raises(ValueError, match="is missing; rerun scripts/prepare_data.py"):
    next(data.train)


# ------------------------------------------------------------------------------------------
# Training.


def _losses(workdir):
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


@pytest.mark.slow
def test_tiny_trains_from_a_prepared_corpus_as_from_its_files(ws, prepared, tmp_path):
  """An in-process workdir resumed with data.prepared continues as a run that read the
  prepared corpus from its start (prefetching included): the same losses at every step."""
  from switchjax.config import load_config
  from switchjax.training import train

  data = [f"data.paths={','.join(ws.paths)}", f"data.spm_path={ws.spm}"]
  data += [f"data.cache_dir={ws.root / 'cache'}"]
  settings = ["train.log_every=1", "train.eval_every=0", "train.checkpoint_every=1", *data]

  def run(workdir, steps, *more):
    config = load_config("tiny", [*settings, f"train.num_train_steps={steps}", *more])
    train(config, workdir, progress=False, log=lambda _: None)

  run(tmp_path / "files", 2)
  run(tmp_path / "files", 3, f"data.prepared={prepared}")
  run(tmp_path / "prepared", 3, f"data.prepared={prepared}")
  assert _losses(tmp_path / "files") == _losses(tmp_path / "prepared")
  assert sorted(_losses(tmp_path / "prepared")) == [1, 2, 3]


def test_resume_with_another_host_count_continues_the_batches(ws, prepared):
  cfg = _cfg(ws, prepared=str(prepared))
  single = make_pretraining_data(cfg, 8)
  expected = [next(single.train) for _ in range(4)]
  two = [make_pretraining_data(cfg, 8, process_index=p, process_count=2) for p in range(2)]
  for data in two:
    next(data.train), next(data.train)
  state = two[0].train.get_state()
  four = [make_pretraining_data(cfg, 8, process_index=p, process_count=4) for p in range(4)]
  for data in four:
    data.prefetch()
    data.train.set_state(state)
  for batch in expected[2:]:
    rows = [next(d.train) for d in four]
    for key in batch:
      np.testing.assert_array_equal(np.concatenate([r[key] for r in rows]), batch[key])
  for data in four:
    data.train.close()


def test_rerun_with_the_tokenizer_file_elsewhere_is_the_same_preparation(ws, prepared, tmp_path):
  out, moved = _copy(prepared, tmp_path), tmp_path / "moved.model"
  moved.write_bytes(open(ws.spm, "rb").read())
  prepared_lib.prepare(_cfg(ws, spm_path=str(moved)), out, block_bytes=BLOCK)
  assert _files(out) == _files(prepared)


def test_reading_through_etils_epath_as_for_urls(ws, prepared, monkeypatch):
  """The gs:// code path (etils.epath, seek and read) on a local directory."""
  reference = make_pretraining_data(_cfg(ws), 8)
  monkeypatch.setattr(prepared_lib, "is_url", lambda location: True)
  data = make_pretraining_data(_cfg(ws, prepared=str(prepared)), 8)
  assert not isinstance(data.task.chunks.tokens._handle(0), np.ndarray)  # a file object
  for _ in range(3):
    expected, got = next(reference.train), next(data.train)
    for key in expected:
      np.testing.assert_array_equal(got[key], expected[key])


def test_writing_through_etils_epath_as_for_urls(ws, prepared, tmp_path, monkeypatch):
  monkeypatch.setattr(prepared_lib, "is_url", lambda location: True)
  prepared_lib.prepare(_cfg(ws), str(tmp_path / "out"), block_bytes=BLOCK)
  prepared_lib.prepare(_cfg(ws), str(tmp_path / "out"), block_bytes=BLOCK)  # a rerun
  assert _files(tmp_path / "out") == _files(prepared)
