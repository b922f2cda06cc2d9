"""Nothing a user does loses or mislabels a run, round 2 (issue 32): the newer paths (starting
from a checkpoint, conversion, upcycling, fine-tuning, generation) and stale inputs."""

import pathlib
import shutil
import subprocess
import sys

import pytest

from switchjax import checkpoint, hf, model_loading, upcycle
from switchjax.config import apply_overrides, load_config
from switchjax.training import train
from switchjax.training import workdir as workdir_lib

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
