"""Nothing a user does loses or mislabels a run, round 2 (issue 32): the newer paths (starting
from a checkpoint, conversion, upcycling, fine-tuning, generation) and stale inputs."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from switchjax import checkpoint, hf, model_loading, upcycle
from switchjax.config import apply_overrides, load_config
from switchjax.data import cache
from switchjax.data.text_to_text import read_pairs, write_pairs
from switchjax.training import train
from switchjax.training import workdir as workdir_lib
from switchjax.training.exact_match import BEST, BEST_FILE, read_best
from switchjax.training.finetune import finetune, finetune_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
SETTINGS = ["train.checkpoint_every=1", "train.log_every=1", "train.eval_every=0"]


def tiny(*overrides):
  return load_config("tiny", [*SETTINGS, *overrides])


def run(config, workdir, log=None):
  return train(config, workdir, progress=False, log=log or (lambda _: None))


def snapshot(directory: pathlib.Path) -> dict:
  """Every file and directory under `directory`, with the bytes of the files."""
  return {
    str(p.relative_to(directory)): p.read_bytes() if p.is_file() else None
    for p in sorted(directory.rglob("*"))
  }


def hf_model(directory):
  """A checkpoint's config (with the fixed capacity HF needs) and parameters."""
  config, params = model_loading.load_model(directory)
  return apply_overrides(config, ["model.moe.expert_capacity=8"]), params


def flip_a_byte(step_dir: pathlib.Path) -> None:
  """Changes one byte (same size) of the largest file of a checkpoint step's parameters."""
  target = max(
    (p for p in (step_dir / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size
  )
  changed = bytearray(target.read_bytes())
  changed[len(changed) // 2] ^= 0xFF
  target.write_bytes(bytes(changed))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A tiny run of 2 steps with checkpoints 1 and 2 (copied by each test that changes it)."""
  workdir = tmp_path_factory.mktemp("trained") / "run"
  run(tiny("train.num_train_steps=2"), workdir)
  return workdir.resolve()


@pytest.fixture
def work(trained, tmp_path):
  return pathlib.Path(shutil.copytree(trained, tmp_path / "work")).resolve()


# --------------------------------------------------------------------------------------------
# 1: --config=DIR starts from DIR's trained parameters, even when DIR's run itself started from
# train.init_from.


@pytest.mark.slow
def test_config_dir_starts_from_its_own_parameters_not_its_parent(trained, tmp_path):
  child = tmp_path / "child"
  run(load_config(str(trained), ["train.num_train_steps=1", *SETTINGS]), child)
  assert checkpoint.read_checkpoint_config(child).train.init_from == str(trained)
  config = load_config(str(child), ["train.num_train_steps=1", *SETTINGS])
  assert config.train.init_from == str(child.resolve())
  assert config.data.spm_path == str((child / "spiece.model").resolve())
  messages = []
  run(config, tmp_path / "grandchild", log=messages.append)
  assert f"Initialised parameters from {child.resolve()}." in messages
  _, trained_child = model_loading.load_model(child)
  _, parent = model_loading.load_model(trained)
  assert not checkpoint.params_equal(trained_child, parent)


# --------------------------------------------------------------------------------------------
# 2: a conversion's --overwrite honours the workdir lock and never replaces a run's checkpoints.


@pytest.mark.slow
def test_overwrite_into_a_live_run_is_refused(work, tmp_path, trained):
  converted = tmp_path / "converted"
  hf_dir = tmp_path / "hf"
  config, params = hf_model(trained)
  checkpoint.save_model(converted, config, params)
  hf.to_hf(config, params, hf_dir)
  before = snapshot(converted)
  lock = workdir_lib.WorkdirLock(converted)  # what a training run in it holds
  try:
    with pytest.raises(ValueError, match=r"in use by a running run.*Wait for it to finish"):
      hf.convert_from_hf(hf_dir, converted, overwrite=True)
    with pytest.raises(ValueError, match=r"in use by a running run.*choose another --output_dir"):
      upcycle.upcycle(hf_dir, config, converted, overwrite=True)
  finally:
    lock.release()
  assert snapshot(converted) == before
  hf.convert_from_hf(hf_dir, converted, overwrite=True)  # the lock released: allowed again


def test_overwrite_never_replaces_a_training_runs_checkpoints(work, tmp_path):
  config, params = hf_model(work)
  hf_dir = hf.to_hf(config, params, tmp_path / "hf")
  before = snapshot(work)
  with pytest.raises(ValueError, match=r"holds a training run .*choose another --output_dir"):
    hf.convert_from_hf(hf_dir, work, overwrite=True)
  with pytest.raises(ValueError, match=r"holds a training run .*choose another --hf_output_dir"):
    hf.to_hf(config, params, work, overwrite=True)
  assert snapshot(work) == before


def test_convert_script_refuses_a_live_workdir_in_one_line(work, tmp_path):
  config, params = model_loading.load_model(work)
  converted = tmp_path / "converted"
  checkpoint.save_model(converted, config, params)
  lock = workdir_lib.WorkdirLock(converted)
  try:
    out = subprocess.run(
      [
        sys.executable,
        "scripts/convert_hf.py",
        f"--checkpoint={work}",
        f"--hf_output_dir={converted}",
        "--overwrite",
      ],
      capture_output=True,
      text=True,
      cwd=ROOT,
    )
  finally:
    lock.release()
  assert out.returncode == 1
  assert out.stderr.startswith(f"error: {converted} is in use by a running run")
  assert len(out.stderr.splitlines()) == 1


# --------------------------------------------------------------------------------------------
# 3: checksums are verified on every read of a switchjax checkpoint.


def test_corrupt_checkpoint_is_never_converted_or_upcycled(work, tmp_path):
  flip_a_byte(work / "checkpoints" / "2")
  with pytest.raises(checkpoint.CorruptCheckpointError, match=r"step 2 .* is corrupt"):
    checkpoint.lazy_params(work)
  with pytest.raises(checkpoint.CorruptCheckpointError, match=r"sha256 mismatch"):
    upcycle.read_dense(work)
  out = subprocess.run(
    [
      sys.executable,
      "scripts/convert_hf.py",
      f"--checkpoint={work}",
      f"--hf_output_dir={tmp_path / 'hf'}",
    ],
    capture_output=True,
    text=True,
    cwd=ROOT,
  )
  assert out.returncode == 1 and len(out.stderr.splitlines()) == 1
  assert "checkpoint step 2" in out.stderr and "is corrupt" in out.stderr
  assert not (tmp_path / "hf").exists()
  assert checkpoint.lazy_params(work, 1)[1]  # an intact step still reads
  _, params = model_loading.load_model(work)  # steps back over the corrupt one, and says so
  assert checkpoint.params_equal(params, checkpoint.lazy_params(work, 1)[1])


# --------------------------------------------------------------------------------------------
# 5: fine-tuning keeps its own guarantees.

FINETUNE = [
  "train.eval_every=2",
  "train.eval_steps=1",
  "train.log_every=2",
  "finetune.exact_match_every=0",
  "finetune.exact_match_examples=4",
]
QUIET = {"progress": False, "log": lambda _: None}


def finetuned(trained, steps, *overrides):
  return finetune_config(
    load_config(str(trained)), overrides=[*FINETUNE, f"train.num_train_steps={steps}", *overrides]
  )


def test_tsv_with_a_byte_order_mark_skips_its_header(tmp_path):
  tsv = tmp_path / "a.tsv"
  tsv.write_bytes("input\ttarget\nHello.\tworld\n".encode("utf-8-sig"))
  assert read_pairs(tsv) == [("Hello.", "world")]


@pytest.mark.slow
def test_best_is_a_whole_checkpoint_its_record_agrees_with(trained, tmp_path):
  workdir = tmp_path / "run"
  messages = []
  finetune(
    finetuned(trained, 4, "finetune.keep_best=loss"), workdir, progress=False, log=messages.append
  )
  assert_best_agrees(workdir)
  assert any("eval examples" in m and "eval loss" in m for m in messages)


def assert_best_agrees(workdir: pathlib.Path) -> dict:
  """`best` is whole, and best.json names the step and metric it holds."""
  record = read_best(workdir)
  assert record is not None and (workdir / BEST / BEST_FILE).is_file()
  assert checkpoint.CheckpointStore(workdir / BEST, create=False).steps() == [record["step"]]
  assert json.loads((workdir / BEST / BEST_FILE).read_text()) == record
  model_loading.load_model(workdir / BEST)
  return record


@pytest.mark.slow
def test_changing_keep_best_on_resume_keeps_the_old_best_aside(trained, tmp_path):
  workdir = tmp_path / "run"
  finetune(finetuned(trained, 2, "finetune.keep_best=loss"), workdir, **QUIET)
  by_loss = read_best(workdir)
  assert by_loss["metric"] == "loss"
  messages = []
  config = finetuned(trained, 4, "finetune.keep_best=exact_match", "finetune.exact_match_every=2")
  finetune(config, workdir, progress=False, log=messages.append)
  assert any("finetune.keep_best is now exact_match (was loss)" in m for m in messages)
  kept = workdir / "best_by_loss"
  assert json.loads((kept / BEST_FILE).read_text()) == by_loss
  assert checkpoint.CheckpointStore(kept, create=False).steps() == [by_loss["step"]]
  assert assert_best_agrees(workdir)["metric"] == "exact_match"


KILLER = """
import os, signal, sys
from switchjax.config import load_config
from switchjax.training import exact_match
from switchjax.training.finetune import finetune, finetune_config

calls, kill_at = [0], int(sys.argv[3])
point = exact_match._point

def killing_point(link, target):
  calls[0] += 1
  if calls[0] == kill_at:
    os.kill(os.getpid(), signal.SIGKILL)
  point(link, target)
  if calls[0] == kill_at - 100:
    os.kill(os.getpid(), signal.SIGKILL)

exact_match._point = killing_point
overrides = sys.argv[4:]
config = finetune_config(load_config(sys.argv[1]), overrides=overrides)
finetune(config, sys.argv[2], progress=False, log=lambda _: None)
"""


@pytest.fixture(scope="module")
def two_steps_with_a_best(trained, tmp_path_factory):
  """A fine-tuning run of 2 steps that keeps the best by loss (each kill test copies it)."""
  workdir = tmp_path_factory.mktemp("best") / "run"
  finetune(
    finetuned(trained, 2, "finetune.keep_best=loss", "train.learning_rate=0.01"), workdir, **QUIET
  )
  return workdir


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", [3, 103, 104])  # before / after the link swap of a 2nd best
def test_sigkill_while_swapping_best_leaves_a_whole_best(
  trained, two_steps_with_a_best, tmp_path, kill_at
):
  workdir = tmp_path / "run"
  overrides = [
    *FINETUNE,
    "train.num_train_steps=6",
    "finetune.keep_best=loss",
    "train.learning_rate=0.01",
  ]
  shutil.copytree(two_steps_with_a_best, workdir, symlinks=True)
  first = assert_best_agrees(workdir)
  out = subprocess.run(
    [sys.executable, "-c", KILLER, str(trained), str(workdir), str(kill_at), *overrides],
    capture_output=True,
    text=True,
    cwd=ROOT,
    timeout=600,
  )
  assert out.returncode == -9, out.stderr
  after = assert_best_agrees(workdir)
  assert after["step"] >= first["step"]
  finetune(
    finetuned(trained, 6, "finetune.keep_best=loss", "train.learning_rate=0.01"), workdir, **QUIET
  )
  assert_best_agrees(workdir)
  assert sorted(p.name for p in workdir.glob("best*") if p.is_dir() and not p.is_symlink()) == [
    os.readlink(workdir / BEST)
  ]


# --------------------------------------------------------------------------------------------
# 6: bad inputs are one line, checked before anything is allocated or any work starts.


def script(*args, timeout=300):
  """A script's (status, stderr without the lines libtpu prints)."""
  out = subprocess.run(
    [sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout
  )
  noise = ("TPU", "Logging before", "Source Location", "libtpu", "common_lib", "usage:", "  ")
  lines = [line for line in out.stderr.splitlines() if line and not line.startswith(noise)]
  return out.returncode, lines


def test_generate_refuses_a_prompt_too_long_to_fit(trained):
  status, err = script(
    "scripts/generate.py", f"--checkpoint={trained}", "--input=" + "word " * 24000
  )
  assert status == 1 and len(err) == 1
  assert "GiB free; shorten the input" in err[0] and "attention needs about" in err[0]


@pytest.mark.parametrize(
  "flag, message",
  [
    ("--max_new_tokens=0", "--max_new_tokens=0 must be >= 1"),
    ("--top_p=2", r"--top_p=2.0 must be in \(0, 1\]"),
    ("--num_beams=0", "--num_beams=0 must be >= 1"),
  ],
)
def test_generate_checks_its_arguments_first(flag, message):
  import runpy

  generate = runpy.run_path(str(ROOT / "scripts" / "generate.py"), run_name="generate")
  args = generate["parse_args"](["--checkpoint=/nonexistent", "--input=x", flag])
  with pytest.raises(ValueError, match=message):
    generate["check_arguments"](args)


@pytest.mark.parametrize(
  "change, message",
  [
    ({"num_experts": 10_000_000}, r"num_experts=10000000 but the weights hold 4 experts"),
    ({"num_experts": 4.5}, r"num_experts=4.5: it must be a whole number >= 1"),
    ({"num_layers": -1}, r"num_layers=-1: it must be a whole number >= 1"),
    ({"d_ff": None}, r"d_ff=None: it must be a whole number"),
  ],
)
def test_odd_hf_config_is_refused_before_allocating(trained, tmp_path, change, message):
  config, params = hf_model(trained)
  hf_dir = hf.to_hf(config, params, tmp_path / "hf")
  settings = json.loads((hf_dir / "config.json").read_text())
  (hf_dir / "config.json").write_text(json.dumps({**settings, **change}))
  with pytest.raises(ValueError, match=message):
    hf.convert_from_hf(hf_dir, tmp_path / "out")
  assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
  "args, message",
  [
    (
      ["scripts/simulate_pod.py", "--config=tiny", "--mesh=1000,1000,1000"],
      "asks for 1,000,000,000 emulated CPU devices",
    ),
    (
      ["scripts/simulate_pod.py", "--config=tiny", "--mesh=1,2,1", "--json=/nonexistent/x.json"],
      "--json=/nonexistent/x.json: the directory /nonexistent does not exist",
    ),
    (["scripts/benchmark.py", "train", "--quick", "--reps=-1"], "--reps=-1: give a whole number"),
    (
      ["scripts/benchmark.py", "moe", "train", "--quick", "--mesh=1,3,1"],
      "the expert axis 3 does not divide the 4 experts",
    ),
    (
      ["scripts/benchmark.py", "moe", "--quick", "--json=/nonexistent/x.json"],
      "the directory /nonexistent does not exist",
    ),
  ],
)
def test_pod_and_benchmark_check_arguments_before_any_work(args, message):
  status, err = script(*args, timeout=120)
  assert status in (1, 2) and len(err) == 1 and message in err[0], err


@pytest.mark.slow
def test_scaling_refuses_a_bad_variant_before_training_the_good_ones(tmp_path):
  common = ["scripts/scaling.py", f"--workdir={tmp_path / 'sweep'}", "--steps=2", "--seeds=0"]
  status, err = script(*common, "--eval_every=1", "--experts=2", "--table_experts=2", "--top_k=3")
  assert status == 1 and len(err) == 1
  assert "num_selected_experts=3 must be between 1 and model.moe.num_experts=2" in err[0]
  assert not (tmp_path / "sweep").exists()
  status, err = script(*common, "--eval_every=1", "--output=/nonexistent/r.json")
  assert status == 1 and "--output=/nonexistent/r.json" in err[0]
  assert not (tmp_path / "sweep").exists()


# --------------------------------------------------------------------------------------------
# 4: stale inputs: a content fingerprint where a path and a clock are not enough; a workdir
# missing the files that say what its checkpoints are is refused.


def test_token_cache_key_follows_the_content_not_the_clock(tmp_path):
  corpus = tmp_path / "corpus.txt"
  corpus.write_text("the first text\n")
  before = os.stat(corpus)
  key = cache.file_stats([corpus])
  corpus.write_text("the other text\n")  # same size, then the same modification time
  os.utime(corpus, ns=(before.st_atime_ns, before.st_mtime_ns))
  assert os.stat(corpus).st_size == before.st_size
  assert cache.file_stats([corpus]) != key
  assert cache.file_stats([corpus]) == cache.file_stats([corpus])


@pytest.mark.parametrize(
  "missing, message",
  [
    ("config.json", r"no config.json, so its settings cannot be checked: restore it from"),
    ("spiece.model", r"no spiece.model, the tokenizer its model was trained with: put"),
  ],
)
def test_resume_without_config_or_tokenizer_is_refused(work, missing, message):
  (work / missing).unlink()
  before = snapshot(work)
  with pytest.raises(workdir_lib.WorkdirError, match=message):
    run(tiny("train.num_train_steps=3", "model.moe.num_selected_experts=2"), work)
  assert snapshot(work) == before


@pytest.mark.slow
def test_finetune_file_rewritten_with_as_many_examples_is_refused_on_resume(trained, tmp_path):
  pairs = [(f"sentence {i} <extra_id_0>.", f"word{i}") for i in range(40)]
  train_file = write_pairs(pairs[:32], tmp_path / "train.tsv")
  eval_file = write_pairs(pairs[32:], tmp_path / "eval.tsv")
  config = lambda steps: finetune_config(  # noqa: E731
    load_config(str(trained)), train_file, eval_file, [*FINETUNE, f"train.num_train_steps={steps}"]
  )
  workdir = tmp_path / "run"
  finetune(config(2), workdir, **QUIET)
  stat = os.stat(train_file)
  write_pairs([(s, t.replace("word", "term")) for s, t in pairs[:32]], train_file)
  os.utime(train_file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
  before = snapshot(workdir)
  with pytest.raises(
    workdir_lib.WorkdirError, match=r"train.tsv changed since the run .*--restart_data"
  ):
    finetune(config(4), workdir, **QUIET)
  assert snapshot(workdir) == before
  finetune(config(4), workdir, restart_data=True, **QUIET)  # asked for: continues on the new file


def test_corpus_rewritten_in_place_is_refused_on_resume(trained, tmp_path):
  corpus = tmp_path / "corpus.txt"
  lines = [f"Document number {i} tells of {i % 7} things and more." for i in range(400)]
  corpus.write_text("\n".join(lines) + "\n")
  spm = f"data.spm_path={trained / 'spiece.model'}"
  workdir = tmp_path / "run"
  run(tiny("train.num_train_steps=1", f"data.paths={corpus}", spm), workdir)
  stat = os.stat(corpus)
  corpus.write_text("\n".join(line.replace("things", "stones") for line in lines) + "\n")
  os.utime(corpus, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # cp -p, rsync -t
  assert os.stat(corpus).st_size == stat.st_size
  before = snapshot(workdir)
  with pytest.raises(workdir_lib.WorkdirError, match=r"corpus.txt changed since the run"):
    run(tiny("train.num_train_steps=2", f"data.paths={corpus}", spm), workdir)
  assert snapshot(workdir) == before
