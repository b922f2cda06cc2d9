"""data.paths as URLs (gs://, through etils.epath): offline, on local directories that
`paths.is_url` is patched to call URLs, so that the etils.epath code runs on them (as
test_prepared_data.py does for a prepared corpus read from a URL)."""

import gzip
import importlib.util
import json
import os
import pathlib
import re
import shutil
import types

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from etils import epath
from tiny import doc_paragraphs

from switchjax.config import DataConfig
from switchjax.data import cache, open_corpus, paths, read_documents, resolve_paths, train_tokenizer
from switchjax.data import parts as parts_lib
from switchjax.data import prepared as prepared_lib
from switchjax.data.prepare_job import prepare_corpus

BLOCK = 16_000  # bytes: the larger files are cut into several parts
NAMES = ("a.txt", "b.jsonl", "c.jsonl.gz", "d.parquet", "e.json", "f.txt.gz", "g.json.gz")


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
  """A corpus of ~200 KB in seven files of every format (alone in `root`), a small tokenizer."""
  root, other = tmp_path_factory.mktemp("url_inputs"), tmp_path_factory.mktemp("url_spm")
  docs = doc_paragraphs(1400)
  texts = [docs[i :: len(NAMES)] for i in range(len(NAMES))]
  lines = lambda ts: "".join(json.dumps({"text": t, "n": i}) + "\n" for i, t in enumerate(ts))
  (root / "a.txt").write_text("\n\n".join(texts[0]) + "\n")
  (root / "b.jsonl").write_text(lines(texts[1]))
  with gzip.open(root / "c.jsonl.gz", "wt") as f:
    f.write(lines(texts[2]))
  pq.write_table(pa.table({"text": texts[3]}), root / "d.parquet", row_group_size=20)
  (root / "e.json").write_text(lines(texts[4]))
  with gzip.open(root / "f.txt.gz", "wt") as f:
    f.write("\n\n".join(texts[5]) + "\n")
  with gzip.open(root / "g.json.gz", "wt") as f:
    f.write(lines(texts[6]))
  spm = train_tokenizer(docs, 400, other / "spm")
  return types.SimpleNamespace(root=root, docs=docs, spm=spm, cache=other / "cache")


def _copy(ws, directory: pathlib.Path) -> tuple[str, ...]:
  """The corpus's files copied into `directory`: their paths, in NAMES order."""
  directory.mkdir()
  for name in NAMES:
    shutil.copyfile(ws.root / name, directory / name)
  return tuple(str(directory / name) for name in NAMES)


def _as_urls(monkeypatch, directory) -> None:
  """Locations under `directory` are URLs from now on: read through etils.epath."""
  prefix = str(directory)
  monkeypatch.setattr(paths, "is_url", lambda location: str(location).startswith(prefix))


def _cfg(ws, inputs, **kwargs):
  defaults = dict(paths=tuple(inputs), spm_path=ws.spm, cache_dir=str(ws.cache))
  return DataConfig(**{**defaults, **kwargs})


# ------------------------------------------------------------------------------------------
# Reading.


def test_documents_through_urls_equal_the_local_ones(ws, monkeypatch):
  local = {name: list(read_documents(ws.root / name)) for name in NAMES}
  local_files = resolve_paths([str(ws.root / "*")])
  _as_urls(monkeypatch, ws.root)
  gpath = type(paths.file_path(ws.root / "a.txt"))
  assert issubclass(gpath, epath.Path)  # the URL code runs: files opened through epath
  opened = []
  monkeypatch.setattr(
    gpath, "open", lambda self, *a, _open=gpath.open: opened.append(self.name) or _open(self, *a)
  )
  for name in NAMES:
    assert list(read_documents(str(ws.root / name))) == local[name], name
  assert opened == list(NAMES)
  files = resolve_paths([str(ws.root / "*")])
  assert all(isinstance(f, epath.Path) for f in files)
  assert list(map(str, files)) == list(map(str, local_files))  # the same files, sorted
  assert sum(len(docs) for docs in local.values()) == len(ws.docs)


def test_blocks_of_large_files_through_urls_equal_the_local_ones(ws, monkeypatch):
  inputs = [str(ws.root / name) for name in NAMES]
  local = parts_lib.plan_parts(open_corpus(_cfg(ws, inputs)), BLOCK)
  local_docs = [list(spec.documents("text")) for spec in local]
  _as_urls(monkeypatch, ws.root)
  specs = parts_lib.plan_parts(open_corpus(_cfg(ws, inputs)), BLOCK)
  cut = {pathlib.Path(s.source).name for s in specs if s.block}
  assert {"a.txt", "b.jsonl", "d.parquet"} <= cut  # text, JSON Lines and row-group blocks
  assert [(s.index, s.source, s.block) for s in specs] == [
    (s.index, s.source, s.block) for s in local
  ]
  assert [list(spec.documents("text")) for spec in specs] == local_docs


def test_fingerprint_of_urls_follows_the_content(ws, tmp_path, monkeypatch):
  inputs = _copy(ws, tmp_path / "in")
  local = cache.file_stats([pathlib.Path(p) for p in inputs])
  _as_urls(monkeypatch, tmp_path / "in")
  corpus = open_corpus(_cfg(ws, inputs))
  stats = cache.file_stats(corpus.files)
  assert [s[0] for s in stats] == list(inputs)  # the URL itself, not a resolved path
  assert [s[1:] for s in stats] == [s[1:] for s in local]  # epath's size, the same sha256
  before = corpus.fingerprint()
  assert corpus.fingerprint() == before  # read again: the same
  path = pathlib.Path(inputs[1])
  stat, text = os.stat(path), path.read_text()
  path.write_text(text.replace("a", "b", 1))  # the same size, then the same times
  os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
  assert open_corpus(_cfg(ws, inputs)).fingerprint() != before
  path.write_text(text)
  assert open_corpus(_cfg(ws, inputs)).fingerprint() == before


# ------------------------------------------------------------------------------------------
# The preparation job, and a run's checks.


def test_prepared_from_urls_equals_prepared_from_local_files(ws, tmp_path, monkeypatch):
  inputs = [str(ws.root / name) for name in NAMES]
  prepare_corpus(_cfg(ws, inputs), str(tmp_path / "local"), engine="processes", block_bytes=BLOCK)
  urls = _copy(ws, tmp_path / "in")
  _as_urls(monkeypatch, tmp_path / "in")
  cfg = _cfg(ws, urls)
  manifest = prepare_corpus(cfg, str(tmp_path / "url"), engine="processes", block_bytes=BLOCK)
  assert len(manifest["parts"]) > len(NAMES)  # blocks of the large files
  assert all(p["source"].startswith(str(tmp_path / "in")) for p in manifest["parts"])
  assert _parts(tmp_path / "url") == _parts(tmp_path / "local")
  local = json.loads((tmp_path / "local" / "manifest.json").read_text())
  assert manifest["num_tokens"] == local["num_tokens"] > 0
  assert _script()._input_bytes(cfg) == sum(os.path.getsize(p) for p in inputs)
  run = _cfg(ws, urls, prepared=str(tmp_path / "url"))
  prepared_lib.check_settings(prepared_lib.open_prepared(run.prepared), run)  # the same files
  with gzip.open(urls[2], "at") as f:
    f.write(json.dumps({"text": "one more document"}) + "\n")
  with pytest.raises(ValueError, match="was prepared from another corpus: the files of"):
    prepared_lib.check_settings(prepared_lib.open_prepared(run.prepared), run)


def _parts(directory: pathlib.Path) -> dict[str, bytes]:
  """{name: bytes} of the parts' .tokens and .ends files."""
  return {p.name: p.read_bytes() for p in directory.glob("part-*") if p.suffix != ".json"}


def _script():
  path = pathlib.Path(__file__).parents[1] / "scripts" / "prepare_data.py"
  spec = importlib.util.spec_from_file_location("prepare_data", path)
  script = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(script)
  return script


# ------------------------------------------------------------------------------------------
# Errors: one line, naming the problem and the fix.


def _one_line_error(call, *args) -> str:
  with pytest.raises(ValueError) as info:
    call(*args)
  error = info.value
  assert "\n" not in str(error)
  assert error.__context__ is None or error.__suppress_context__  # no chained traceback
  return str(error)


def test_url_errors_are_one_line(ws, monkeypatch):
  _as_urls(monkeypatch, ws.root)
  pattern = str(ws.root / "*.nothing")
  message = _one_line_error(resolve_paths, [pattern])
  assert message == f"no files match data.paths={pattern!r}; check the path or glob."
  missing = str(ws.root / "missing.jsonl")
  assert _one_line_error(resolve_paths, [missing]).startswith("no files match data.paths=")
  read = lambda path: list(read_documents(path))
  message = _one_line_error(read, missing)
  assert re.match(rf"{re.escape(missing)}: cannot read it \(.*\); check the URL", message)
  message = _one_line_error(read, str(ws.root / "missing.parquet"))
  assert "cannot read it" in message and "check the URL" in message
  recursive = _one_line_error(resolve_paths, [str(ws.root / "**" / "*.txt")])
  assert "give the directories with * instead of **" in recursive


def test_gs_urls_reach_the_etils_backend_without_network():
  url = "gs://bucket/dir/c.jsonl.gz"
  path = paths.file_path(url)
  assert isinstance(path, epath.Path) and str(path) == url and paths.is_url(url)
  assert (path.name, path.suffixes) == ("c.jsonl.gz", [".jsonl", ".gz"])
  message = _one_line_error(resolve_paths, ["http://example.com/a.txt"])
  assert "etils.epath does not read http:// URLs" in message
  if importlib.util.find_spec("gcsfs") is not None:
    pytest.skip("gcsfs is installed: listing gs:// would use the network")
  read = lambda path: list(read_documents(path))
  listed = _one_line_error(resolve_paths, ["gs://bucket/dir/*.jsonl"])
  for message in (listed, _one_line_error(read, url)):
    assert message.startswith("gs://bucket/dir/") and message.endswith("pip install gcsfs.")
  opened = _one_line_error(prepared_lib.open_prepared, "gs://bucket/prepared")
  assert opened.startswith("gs://bucket/prepared: cannot read gs:// URLs here")
  assert opened.endswith("pip install gcsfs.")
