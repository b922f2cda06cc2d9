"""What an ordinary user does to a workdir loses or mislabels nothing: refused resumes change no
byte, converted checkpoints stay inputs, one run at a time, checksummed checkpoints, prompt
signals and one-line errors for unusable workdirs (the reliability issue's cases 1-8)."""

import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from match import words

from switchjax import checkpoint, model_loading
from switchjax.config import load_config
from switchjax.training import NonFiniteLossError, WorkdirError, resume_rules, train
from switchjax.training import workdir as workdir_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PRETRAIN = str(ROOT / "scripts" / "pretrain.py")
SETTINGS = ["train.checkpoint_every=1", "train.log_every=1", "train.eval_every=0"]


def tiny(*overrides):
  return load_config("tiny", [*SETTINGS, *overrides])


def run(config, workdir, **kwargs):
  return train(config, workdir, progress=False, log=lambda _: None, **kwargs)


def snapshot(directory: pathlib.Path) -> dict:
  """Every file and directory under `directory`, with the bytes of the files."""
  return {
    str(p.relative_to(directory)): p.read_bytes() if p.is_file() else None
    for p in sorted(directory.rglob("*"))
  }


def pretrain(*args, setup: str = ""):
  """scripts/pretrain.py with `args`, in a process that first runs `setup` (Python: resource
  limits, capabilities; run before exec, so that the test process need not fork)."""
  launch = f"import os, sys\n{setup}\nos.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
  return subprocess.run(
    [sys.executable, "-c", launch, PRETRAIN, "--no_progress", "--config=tiny", *args],
    capture_output=True,
    text=True,
    cwd=ROOT,
    timeout=300,
  )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A tiny run of 2 steps with checkpoints 1 and 2 (copied by each test that changes it)."""
  workdir = tmp_path_factory.mktemp("trained") / "run"
  run(tiny("train.num_train_steps=2"), workdir)
  return workdir


@pytest.fixture(scope="module")
def converted(trained, tmp_path_factory):
  """What convert_hf.py writes: config.json, spiece.model and the parameters as step 0."""
  directory = tmp_path_factory.mktemp("converted") / "model"
  config, params = model_loading.load_model(trained)
  checkpoint.save_model(directory, config, params)
  shutil.copyfile(trained / "spiece.model", directory / "spiece.model")
  return directory.resolve()


@pytest.fixture
def work(trained, tmp_path):
  return pathlib.Path(shutil.copytree(trained, tmp_path / "work")).resolve()


# --------------------------------------------------------------------------------------------
# 1, 5: resumes that would change the model, its tokenizer or the data order are refused and
# change no byte; the others are noted and recorded.


REFUSALS = {  # case -> the essential words of the refusal, in order
  "data.paths": (
    "{corpus} (was ()) in {w}/config.json",
    "would change the order of its training data",
    "--restart_data",
    "new --workdir",
  ),
  "data.spm_vocab_size=450": (
    "{w} holds a model trained with another tokenizer",
    "data.spm_vocab_size=450 (was 500)",
    "piece and sentinel ids cannot change",
    "new --workdir",
  ),
  "data.extra_ids=50": (
    "{w} holds a model trained with another tokenizer",
    "data.extra_ids=50 (was 100)",
    "piece and sentinel ids cannot change",
    "new --workdir",
  ),
  "data.spm_path": (
    "data.spm_path={other} is another tokenizer than {w}/spiece.model",
    "Leave data.spm_path unset",
    "new --workdir",
  ),
  "model.d_ff=128": (
    "{w} holds a run of another model or optimizer",
    "model.d_ff=128 (was 64)",
    "--config={w}/config.json",
    "--set train.init_from={w}",
  ),
  "train.optimizer=adamw": (
    "{w} holds a run of another model or optimizer",
    "train.optimizer='adamw' (was 'adafactor')",
    "--config={w}/config.json",
    "--set train.init_from={w}",
  ),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refused_resume_changes_no_byte(work, tmp_path, case):
  other = tmp_path / "other.model"
  other.write_bytes(b"another tokenizer")
  corpus = f"data.paths=('{tmp_path / 'corpus.txt'}',)"
  override = {"data.paths": corpus, "data.spm_path": f"data.spm_path={other}"}.get(case, case)
  before = snapshot(work)
  match = words(*(f.format(w=work, other=other, corpus=corpus) for f in REFUSALS[case]))
  with pytest.raises(WorkdirError, match=match):
    run(tiny("train.num_train_steps=4", override), work)
  assert snapshot(work) == before


@pytest.mark.slow
def test_allowed_changes_are_noted_and_recorded_and_data_restarts_on_request(work, tmp_path):
  import pydoc_data.topics

  corpus = tmp_path / "corpus.txt"
  corpus.write_text("\n\n".join(list(pydoc_data.topics.topics.values())[:40]))
  with open(work / "metrics.jsonl", "a") as f:  # what a run killed after step 2 leaves
    f.write('{"step": 7, "loss": 1.0}\n{"step": 8, "lo')
  tokenizer, messages = (work / "spiece.model").read_bytes(), []
  config = tiny("train.num_train_steps=3", "train.learning_rate=0.01", f"data.paths={corpus}")
  result = train(config, work, progress=False, log=messages.append, restart_data=True)
  assert (
    f"Resuming {work} with changed settings (recorded in config_history.jsonl): data.paths () "
    f"-> ('{corpus}',), train.learning_rate 0.02 -> 0.01, train.num_train_steps 2 -> 3."
  ) in messages
  assert (
    f"Resumed from {work}/checkpoints step 2; the data starts again from its first example."
  ) in messages
  assert sorted(result.losses) == [3]
  assert (work / "spiece.model").read_bytes() == tokenizer  # the model's, not retrained
  meta = json.loads((work / "checkpoints" / "3" / "meta" / "metadata").read_text())
  assert meta["data_position"] == 8 and meta["data"]["next_example"] == 8
  first, last = [json.loads(x) for x in (work / "config_history.jsonl").read_text().splitlines()]
  assert first["config"]["train"]["learning_rate"] == 0.02 and first["changes"] == {}
  assert (last["step"], last["resumed"], last["restart_data"]) == (2, True, True)
  assert last["changes"] == {
    "data.paths": [[], [str(corpus)]],
    "train.learning_rate": [0.02, 0.01],
    "train.num_train_steps": [2, 3],
  }
  assert json.loads((work / "config.json").read_text())["train"]["learning_rate"] == 0.01
  records = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]  # each step once: the
  assert [r["step"] for r in records if "eval/loss" in r] == [2, 3]  # killed run's are aside
  superseded = (work / "metrics_superseded.jsonl").read_text()
  assert superseded == '{"step": 7, "loss": 1.0}\n{"step": 8, "lo\n'


def test_resume_rules_of_the_readme_table():
  """Batch size, lr and seeds: noted on resume (the issue's case 5), data order needs
  --restart_data, tokenizer and model refused; from train.init_from only the model (and the
  sentinels) must stay."""
  changed = [
    "train.batch_size=4",
    "train.seed=3",
    "train.learning_rate=0.01",
    "train.num_train_steps=9",
    "train.optimizer=adamw",
    "data.shuffle_seed=1",
    "data.extra_ids=50",
    "model.d_ff=128",
    "model.remat=full",
    "model.moe.train_capacity_factor=2.0",
    "model.moe.expert_capacity=4",
  ]
  found = resume_rules.changes(tiny(), tiny(*changed))
  assert [(c.field, c.old, c.new, c.rule) for c in found] == [
    ("data.extra_ids", 100, 50, "tokenizer"),
    ("data.shuffle_seed", 0, 1, "data"),
    ("model.d_ff", 64, 128, "model"),
    ("model.moe.expert_capacity", None, 4, "model"),
    ("model.moe.train_capacity_factor", 1.25, 2.0, "optimisation"),
    ("model.remat", "none", "full", "free"),
    ("train.batch_size", 8, 4, "optimisation"),
    ("train.learning_rate", 0.02, 0.01, "optimisation"),
    ("train.num_train_steps", 40, 9, "free"),
    ("train.optimizer", "adafactor", "adamw", "model"),
    ("train.seed", 0, 3, "optimisation"),
  ]
  kept = resume_rules.changes(tiny(), tiny(*changed), starting_from=True)
  assert [c.field for c in kept if c.rule != "free"] == [
    "data.extra_ids",
    "model.d_ff",
    "model.moe.expert_capacity",
  ]
  # The decoder's MoE settings follow the encoder's when unset: the same rules.
  assert resume_rules.rule_of("model.decoder_moe.expert_capacity") == "model"
  assert resume_rules.rule_of("model.decoder_moe.jitter_noise") == "optimisation"


@pytest.mark.slow
def test_resume_with_another_batch_size_is_noted_and_continues_the_data(work):
  messages = []
  train(
    tiny("train.num_train_steps=3", "train.batch_size=16"),
    work,
    progress=False,
    log=messages.append,
  )
  assert (
    f"Resuming {work} with changed settings (recorded in config_history.jsonl): "
    "train.batch_size 8 -> 16, train.num_train_steps 2 -> 3."
  ) in messages
  meta = json.loads((work / "checkpoints" / "3" / "meta" / "metadata").read_text())
  assert meta["data"]["next_example"] == 2 * 8 + 16  # from the next unseen example on
  history = [json.loads(x) for x in (work / "config_history.jsonl").read_text().splitlines()]
  assert history[0]["config"]["train"]["batch_size"] == 8  # the original settings are kept
  assert history[-1]["changes"]["train.batch_size"] == [8, 16]


# --------------------------------------------------------------------------------------------
# 2, 5: a converted checkpoint is an input; a run started from one keeps its model settings,
# sentinels and tokenizer.


def test_converted_checkpoint_is_not_a_workdir_unless_asked(converted, tmp_path):
  model = pathlib.Path(shutil.copytree(converted, tmp_path / "model")).resolve()
  before = snapshot(model)
  match = words(model, "holds a converted model", "read-only input", f"--config={model}")
  with pytest.raises(WorkdirError, match=match + ".*--allow_converted_workdir"):
    run(tiny("train.num_train_steps=1"), model)
  assert snapshot(model) == before
  _, params = model_loading.load_model(model)  # what generate.py reads: intact
  assert checkpoint.params_equal(params, model_loading.load_model(converted)[1])
  messages = []
  train(
    tiny("train.num_train_steps=1"),
    model,
    progress=False,
    log=messages.append,
    allow_converted_workdir=True,
  )
  assert (
    f"Training in the converted model {model} (--allow_converted_workdir), from its parameters."
  ) in messages
  assert f"Initialised parameters from {model}." in messages
  assert checkpoint.CheckpointStore(model).steps() == [0, 1]
  history = [json.loads(x) for x in (model / "config_history.jsonl").read_text().splitlines()]
  assert history[0]["found"] and history[0]["config"] == json.loads(before["config.json"])


INIT_FROM_REFUSALS = {
  "model.mlp_activations=gelu": "model.mlp_activations=('gelu',) (was ('relu',))",
  "model.moe.expert_capacity=4": "model.moe.expert_capacity=4 (was None)",
  "data.extra_ids=50": "data.extra_ids=50 (was 100)",
}


@pytest.mark.parametrize("override", sorted(INIT_FROM_REFUSALS))
def test_init_from_keeps_the_models_own_settings(converted, tmp_path, override):
  setting = f"train.init_from={converted} holds a model with other settings"
  match = words(setting, INIT_FROM_REFUSALS[override], f"--config={converted}", "--set each")
  with pytest.raises(WorkdirError, match=match):
    run(tiny(f"train.init_from={converted}", override), tmp_path / "new")
  assert not (tmp_path / "new").exists()


def test_init_from_takes_the_checkpoints_tokenizer(converted, tmp_path):
  config = workdir_lib.check_init_from(tiny(f"train.init_from={converted}"), say=lambda _: None)
  assert config.data.spm_path == str(converted / "spiece.model")
  other = tmp_path / "other.model"
  other.write_bytes(b"another tokenizer")
  with pytest.raises(WorkdirError, match=r"^data.spm_path=.* is another tokenizer than "):
    workdir_lib.check_init_from(tiny(f"train.init_from={converted}", f"data.spm_path={other}"))
  via_dir = load_config(str(converted))  # --config=DIR: its tokenizer travels with it
  assert via_dir.data.spm_path == str(converted / "spiece.model")


def test_generate_uses_the_checkpoints_sentinel_count(converted, tmp_path):
  import argparse
  import importlib.util

  model = pathlib.Path(shutil.copytree(converted, tmp_path / "model"))
  saved = json.loads((model / "config.json").read_text())
  saved["data"]["extra_ids"] = 50
  (model / "config.json").write_text(json.dumps(saved))
  spec = importlib.util.spec_from_file_location("generate_script", ROOT / "scripts/generate.py")
  generate = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(generate)
  args = argparse.Namespace(checkpoint=str(model), spm_path=None)
  tokenizer = generate.load_tokenizer(args, checkpoint.read_checkpoint_config(model))
  assert (tokenizer.extra_ids, tokenizer.encode("<extra_id_0>")) == (50, [500 + 50 - 1])


# --------------------------------------------------------------------------------------------
# 3: one run at a time; the lock of a killed run is gone with it.


def test_one_run_at_a_time_and_a_killed_run_holds_no_lock(work):
  holder = subprocess.Popen(
    [
      sys.executable,
      "-c",
      "import pathlib, sys, time\n"
      "from switchjax.training.workdir import WorkdirLock\n"
      "lock = WorkdirLock(pathlib.Path(sys.argv[1]))\n"
      "print('locked', flush=True)\n"
      "time.sleep(600)\n",
      str(work),
    ],
    stdout=subprocess.PIPE,
    text=True,
  )
  try:
    assert holder.stdout.readline() == "locked\n"
    before = snapshot(work)
    match = words(work, f"is in use by another run (process {holder.pid})", "another --workdir")
    with pytest.raises(WorkdirError, match=match):
      run(tiny("train.num_train_steps=4"), work)
    assert snapshot(work) == before
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  workdir_lib.WorkdirLock(work).release()  # the kernel released the killed holder's lock


# --------------------------------------------------------------------------------------------
# 7: checksums: a checkpoint whose bytes changed (same size) is detected and the previous one
# used; the non-finite-loss message names the checkpoint really restored.


@pytest.mark.slow
@pytest.mark.parametrize("where", ["largest file", "OCDBT index"])
def test_changed_bytes_are_detected_and_the_previous_checkpoint_used(work, where):
  # Which file is largest varies between saves; the top-level d/ holds the OCDBT index that
  # reading any metadata goes through: checksums must be verified before anything is read.
  data = work / "checkpoints" / "2" / "params"
  top = data if where == "largest file" else data / "d"
  target = max((p for p in top.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
  changed = bytearray(target.read_bytes())
  changed[len(changed) // 2] ^= 0xFF
  target.write_bytes(bytes(changed))
  _, params = model_loading.load_model(work)  # generate.py: the newest step that verifies
  assert checkpoint.params_equal(params, checkpoint.lazy_params(work, 1)[1])
  messages = []
  with pytest.raises(NonFiniteLossError) as error:
    config = tiny("train.num_train_steps=6", "train.learning_rate=1e30")
    train(config, work, progress=False, log=messages.append)
  assert (
    f"Checkpoint step 2 in {work}/checkpoints could not be restored (CorruptCheckpointError: "
    f"the bytes of {target.relative_to(work / 'checkpoints' / '2')} changed since it was saved "
    "(sha256 mismatch)); trying the previous one."
  ) in messages
  assert f"Resumed from {work}/checkpoints step 1." in messages
  assert re.search(  # step 2 had a finite loss (and the update that overflowed)
    words("Non-finite loss or gradient at step 3", "(step 2, saved by this run)", work),
    str(error.value),
  )
  assert checkpoint.CheckpointStore(work).steps() == [1, 2]
  assert [p.name.split("-")[0] for p in (work / "checkpoints_broken").iterdir()] == ["2"]


def test_every_saved_step_has_checksums(trained):
  for step in (1, 2):
    step_dir = trained / "checkpoints" / str(step)
    manifest = json.loads((step_dir / checkpoint.MANIFEST).read_text())["files"]
    assert "params/_METADATA" in manifest and "opt_state/_METADATA" in manifest
    assert checkpoint.verify_manifest(step_dir) is None


# --------------------------------------------------------------------------------------------
# 8: workdirs that cannot be used, one line each.


def test_unusable_workdirs_are_refused_in_one_line(tmp_path, monkeypatch):
  file = tmp_path / "file"
  file.write_text("x")
  foreign = tmp_path / "foreign"
  foreign.mkdir()
  (foreign / "notes.txt").write_text("mine")
  hf = tmp_path / "hf"
  hf.mkdir()
  (hf / "config.json").write_text('{"model_type": "switch_transformers"}')
  cases = {
    file: words(f"--workdir {file} is a file, not a directory", "another --workdir"),
    foreign: words(foreign, "holds no switchjax run", "notes.txt", "new or empty --workdir"),
    hf: words(f"{hf}/config.json is not a switchjax config", "model_type", "new or empty"),
  }
  for workdir, match in cases.items():
    before = snapshot(tmp_path)
    with pytest.raises(WorkdirError, match=match + r"[^\n]*\Z"):  # one line
      run(tiny(), workdir)
    assert snapshot(tmp_path) == before
  usage = shutil.disk_usage(tmp_path)
  monkeypatch.setattr(workdir_lib.shutil, "disk_usage", lambda _: usage._replace(free=1000))
  with pytest.raises(
    WorkdirError,
    match=r"^the disk of .*/new has 0\.0 MiB free, but one checkpoint of this run takes "
    r"\d+\.\d MiB: free space or choose another --workdir\.$",
  ):
    run(tiny(), tmp_path / "new")
  assert not (tmp_path / "new").exists()  # made by the refused run, removed again


# Drops the capabilities that let root ignore file permissions from the bounding set, which is
# what root keeps across exec (nothing to drop for other users): a read-only directory is then
# read-only to the run.
WITHOUT_ROOT_FILE_ACCESS = """
import ctypes
if os.geteuid() == 0:
  for capability in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
    assert ctypes.CDLL(None).prctl(24, capability, 0, 0, 0) == 0  # PR_CAPBSET_DROP
"""


def test_read_only_workdir_is_one_line(tmp_path):
  read_only = tmp_path / "read_only"
  read_only.mkdir()
  read_only.chmod(0o555)
  done = pretrain(f"--workdir={read_only}", setup=WITHOUT_ROOT_FILE_ACCESS)
  assert done.returncode == 1
  last = done.stderr.splitlines()[-1]
  assert re.match(words(f"error: cannot write to the workdir {read_only}", "writable"), last)
  assert "Traceback" not in done.stderr and not list(read_only.iterdir())


@pytest.mark.slow
def test_full_disk_during_a_run_keeps_the_last_checkpoint_and_resumes(work):
  """A disk that fills up: every file may grow to 100 kB only (RLIMIT_FSIZE, which the kernel
  enforces on every write, Orbax's and tensorstore's included; the failing write gets EFBIG,
  'File too large', where a full disk gives ENOSPC: the same code path). The first checkpoint
  of the resumed run (step 3) cannot be written."""

  small_files = "import resource\nresource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))"
  args = [f"--workdir={work}", *[f"--set={s}" for s in SETTINGS], "--set=train.num_train_steps=4"]
  done = pretrain(*args, setup=small_files)
  assert done.returncode == 1, done.stderr[-2000:]
  saved = "The last complete checkpoint (step 2, which this run resumed from) is kept"
  match = words(f"error: Could not save checkpoint step 3 in {work}/checkpoints", "errno 27", saved)
  assert re.match(match + ".*free space.*resume", done.stderr.splitlines()[-1])
  assert "Traceback" not in done.stderr
  assert checkpoint.CheckpointStore(work).steps() == [1, 2]
  messages = []
  train(tiny("train.num_train_steps=4"), work, progress=False, log=messages.append)
  assert f"Resumed from {work}/checkpoints step 2." in messages
  assert checkpoint.CheckpointStore(work).steps() == [3, 4]  # train.keep_checkpoints=2
  assert not list((work / "checkpoints").glob("*tmp*"))


# --------------------------------------------------------------------------------------------
# 6: signals from the first line: SentencePiece training stops within seconds.


@pytest.mark.slow
def test_sigterm_during_tokenizer_training_exits_within_seconds(tmp_path):
  rng = np.random.default_rng(0)
  codes = rng.integers(97, 123, (100_000, 8), dtype=np.uint8)
  vocabulary = [bytes(row[: 3 + i % 6]).decode() for i, row in enumerate(codes)]
  rows = rng.integers(0, len(vocabulary), (300_000, 12))  # ~30 s of SentencePiece training here
  corpus = tmp_path / "corpus.txt"
  corpus.write_text("\n".join(" ".join(vocabulary[i] for i in row) for row in rows))
  cache, workdir = tmp_path / "cache", tmp_path / "run"
  proc = subprocess.Popen(
    [sys.executable, PRETRAIN, "--no_progress", "--config=tiny", f"--workdir={workdir}"]
    + [f"--set=data.paths={corpus}"],
    cwd=ROOT,
    env={**os.environ, "SWITCHJAX_CACHE": str(cache)},
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  for line in proc.stdout:
    if line.startswith("Preparing the data"):
      break
  time.sleep(5)  # reading the corpus takes ~1 s, training the tokenizer ~30 s
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)  # a hang guard, not a timing: see the .model below
  assert proc.returncode == 130, err[-2000:]
  stopped = words("Stopped by SIGTERM during start-up", "nothing was trained or saved", "again")
  assert re.match(stopped, err.splitlines()[-1])
  assert "Traceback" not in err
  assert not workdir.exists()  # made at start-up, left empty, removed
  # The tokenizer's training (~30 s) was cut short, not waited for: no model was written.
  assert not list(cache.rglob("*.model"))


# --------------------------------------------------------------------------------------------
# 3 end to end: a second run of the same command is refused at once and changes nothing; a
# run killed with SIGKILL leaves no lock, and the next one resumes it.


@pytest.mark.slow
def test_second_run_on_a_busy_workdir_and_resume_after_kill(tmp_path):
  workdir = tmp_path / "run"
  args = [f"--workdir={workdir}", *[f"--set={s}" for s in SETTINGS]]
  first = subprocess.Popen(
    [sys.executable, PRETRAIN, "--no_progress", "--config=tiny", *args]
    + ["--set=train.num_train_steps=100000", "--set=train.log_every=10"],
    cwd=ROOT,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  try:
    deadline = time.time() + 300
    while time.time() < deadline and not (workdir / "checkpoints" / "10").exists():
      time.sleep(0.1)
    config = (workdir / "config.json").read_bytes()
    second = pretrain(*args, "--set=train.num_train_steps=15")
    assert second.returncode == 1
    busy = words(f"error: {workdir} is in use by another run (process {first.pid})", "--workdir")
    assert re.match(busy, second.stderr.splitlines()[-1])
    assert (workdir / "config.json").read_bytes() == config
  finally:
    first.send_signal(signal.SIGKILL)
    first.wait()
  last = checkpoint.CheckpointStore(workdir).steps()[-1]
  third = pretrain(*args, f"--set=train.num_train_steps={last + 2}")
  assert third.returncode == 0, third.stderr[-2000:]
  assert f"Resumed from {workdir}/checkpoints step {last}." in third.stdout
  records = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
  logged = [r["step"] for r in records if "loss" in r]
  assert logged == sorted(set(logged)) and logged[-1] == last + 2  # each step once
  assert not list((workdir / "checkpoints").glob("*tmp*"))
