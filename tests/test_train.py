"""Pretraining end to end on the tiny preset: learning, exact resume, mesh and multi-host
equivalence, interrupted saves, non-finite losses and bad input."""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from switchjax import checkpoint, model_loading
from switchjax.config import load_config
from switchjax.training import NonFiniteLossError, train

ROOT = pathlib.Path(__file__).resolve().parents[1]
PRETRAIN = str(ROOT / "scripts" / "pretrain.py")


def tiny(*overrides):
  return load_config("tiny", list(overrides))


def run(config, workdir, devices=None):
  return train(config, workdir, devices=devices, progress=False, log=lambda _: None)


def logged_losses(workdir) -> dict[int, float]:
  lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
  return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def script(args, env=None, **kw):
  return subprocess.run(
    [sys.executable, PRETRAIN, "--no_progress", *args],
    capture_output=True,
    text=True,
    env={**os.environ, **(env or {})},
    cwd=ROOT,
    **kw,
  )


# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_tiny_config_learns(tmp_path):
  result = run(tiny("train.num_train_steps=40", "train.log_every=5"), tmp_path)
  first, last = result.losses[5], result.losses[40]
  assert last < first - 1.5, result.losses
  assert result.eval_metrics["eval/loss"] < first - 1.0
  # Everything a run promises is in the workdir.
  assert (tmp_path / "config.json").exists() and (tmp_path / "spiece.model").exists()
  assert checkpoint.CheckpointStore(tmp_path).steps() == [20, 40]
  record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
  for name in (
    "loss",
    "cross_entropy",
    "z_loss",
    "auxiliary_loss",
    "router_z_loss",
    "expert_usage",
    "fraction_tokens_left_behind",
    "router_confidence",
    "learning_rate",
    "grad_norm",
    "tokens_per_second",
    "model_tflops_per_device",
    "layers/encoder/layers_1/mlp/router_confidence",
  ):
    assert name in record, name
  assert list((tmp_path / "tensorboard").iterdir())


@pytest.mark.slow
def test_resume_is_exact(tmp_path):
  settings = ["train.log_every=1", "train.eval_every=0", "train.checkpoint_every=4"]
  straight = run(tiny("train.num_train_steps=8", *settings), tmp_path / "straight")
  first = run(tiny("train.num_train_steps=4", *settings), tmp_path / "resumed")
  second = run(tiny("train.num_train_steps=8", *settings), tmp_path / "resumed")
  assert first.step == 4 and second.step == 8
  assert {**first.losses, **second.losses} == straight.losses  # bit-identical
  _, params_straight = model_loading.load_model(tmp_path / "straight")
  _, params_resumed = model_loading.load_model(tmp_path / "resumed")
  assert checkpoint.params_equal(params_straight, params_resumed)


@pytest.mark.slow
def test_eight_device_mesh_matches_one_device(tmp_path):
  assert jax.device_count() == 8
  settings = ["train.num_train_steps=6", "train.log_every=1", "train.eval_every=0"]
  one = run(tiny("mesh.data=1", *settings), tmp_path / "one", devices=jax.devices()[:1])
  eight = run(tiny("mesh.data=2", "mesh.expert=4", *settings), tmp_path / "eight")
  for step in one.losses:
    np.testing.assert_allclose(eight.losses[step], one.losses[step], atol=1e-5, rtol=0)


@pytest.mark.slow
def test_two_processes_match_one_process_with_eight_devices(tmp_path):
  settings = [
    "--config=tiny",
    "--set",
    "mesh.data=2",
    "--set",
    "mesh.expert=4",
    "--set",
    "train.num_train_steps=6",
    "--set",
    "train.log_every=1",
    "--set",
    "train.eval_every=0",
  ]
  reference = run(
    tiny(
      "mesh.data=2",
      "mesh.expert=4",
      "train.num_train_steps=6",
      "train.log_every=1",
      "train.eval_every=0",
    ),
    tmp_path / "single",
  )
  port = free_port()
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0"}
  procs = [
    subprocess.Popen(
      [
        sys.executable,
        PRETRAIN,
        "--no_progress",
        *settings,
        f"--workdir={tmp_path / 'multi'}",
        f"--coordinator_address=127.0.0.1:{port}",
        "--num_processes=2",
        f"--process_id={i}",
      ],
      cwd=ROOT,
      env={**os.environ, **env},
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(2)
  ]
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  assert "(2 processes" in outputs[0]
  multi = logged_losses(tmp_path / "multi")
  assert sorted(multi) == sorted(reference.losses)
  for step, loss in reference.losses.items():
    np.testing.assert_allclose(multi[step], loss, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_run_killed_while_saving_resumes_from_last_complete_checkpoint(tmp_path):
  workdir = tmp_path / "run"
  args = [
    f"--workdir={workdir}",
    "--config=tiny",
    "--set",
    "train.num_train_steps=100000",
    "--set",
    "train.checkpoint_every=1",
    "--set",
    "train.keep_checkpoints=100",
    "--set",
    "train.eval_every=0",
    "--set",
    "train.log_every=10",
  ]
  proc = subprocess.Popen(
    [sys.executable, PRETRAIN, "--no_progress", *args],
    cwd=ROOT,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  ckpt_dir = workdir / "checkpoints"
  killed_during_save = False
  deadline = time.time() + 300
  try:
    while time.time() < deadline and proc.poll() is None:
      entries = [p.name for p in ckpt_dir.iterdir()] if ckpt_dir.exists() else []
      complete = [e for e in entries if e.isdigit()]
      in_progress = [e for e in entries if "tmp" in e]
      if len(complete) >= 3 and in_progress:
        proc.send_signal(signal.SIGKILL)
        killed_during_save = True
        break
      time.sleep(0.002)
  finally:
    if proc.poll() is None:
      proc.kill()
    proc.wait()
  assert killed_during_save, "never caught the run in the middle of a save"
  left = sorted(int(e.name) for e in ckpt_dir.iterdir() if e.name.isdigit())
  # The interrupted save left an unfinished directory behind, never a half-written step.
  assert any("tmp" in e.name for e in ckpt_dir.iterdir())
  resumed = script(
    [
      *args[:1],
      "--config=tiny",
      "--set",
      f"train.num_train_steps={left[-1] + 3}",
      "--set",
      "train.checkpoint_every=1",
      "--set",
      "train.eval_every=0",
      "--set",
      "train.log_every=1",
    ],
    timeout=300,
  )
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"Resumed from {ckpt_dir} step {left[-1]}." in resumed.stdout
  assert max(logged_losses(workdir)) == left[-1] + 3


@pytest.mark.slow
def test_corrupt_newest_checkpoint_is_reported_and_previous_used(tmp_path):
  run(tiny("train.num_train_steps=4", "train.checkpoint_every=2", "train.eval_every=0"), tmp_path)
  for f in (tmp_path / "checkpoints" / "4" / "params").rglob("*"):
    if f.is_file():
      f.write_bytes(b"garbage")
  messages = []
  result = train(
    tiny(
      "train.num_train_steps=6",
      "train.checkpoint_every=2",
      "train.eval_every=0",
      "train.log_every=1",
    ),
    tmp_path,
    progress=False,
    log=messages.append,
  )
  text = "\n".join(messages)
  assert "Checkpoint step 4 in" in text and "could not be restored" in text
  assert "Resumed from" in text and "step 2." in text
  assert sorted(result.losses) == [3, 4, 5, 6]


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  run(tiny("train.num_train_steps=2", "train.checkpoint_every=2", "train.eval_every=0"), tmp_path)
  with pytest.raises(
    NonFiniteLossError,
    match=r"Non-finite loss or gradient at step \d+; "
    r"stopping without saving. The last good "
    r"checkpoint \(step 2, which this run resumed from\) is kept",
  ):
    run(
      tiny(
        "train.num_train_steps=8",
        "train.checkpoint_every=2",
        "train.eval_every=0",
        "train.learning_rate=1e30",
      ),
      tmp_path,
    )
  assert checkpoint.CheckpointStore(tmp_path).steps() == [2]


# --------------------------------------------------------------------------------------------
# Bad input gets one clear line, no traceback.


BAD_INPUTS = [
  (
    ["--set", "train.batchsize=4"],
    "Unknown config field 'train.batchsize'. Nearest valid names: train.batch_size",
  ),
  (["--set", "train.batch_size=four"], "--set train.batch_size=four: expected int."),
  (["--config=base9"], "Unknown config 'base9'. Did you mean base8"),
  (["--set", "data.paths=/nonexistent/corpus/*.jsonl"], "no files match data.paths"),
  (["--set", "mesh.expert=3"], "mesh.data=-1, mesh.expert=3, mesh.model=1 do not fit 8 devices"),
  (
    ["--set", "mesh.data=1", "--set", "mesh.expert=8"],
    "mesh.expert=8 does not divide moe.num_experts=4",
  ),
  (["--set", "data.extra_ids=0"], "tokenizer has no sentinel ids"),
  (
    ["--num_processes=2"],
    "error: Multi-host runs need all of --coordinator_address, --num_processes and "
    "--process_id (or none of them, to read the cluster environment).",
  ),
]
# Every bad input through the script's main() in one child process (a Python and JAX start-up
# each would cost more than the checks): (exit status, stderr) per input, a traceback if main()
# raised.
MAINS = """
import contextlib, io, json, sys, traceback
sys.path.insert(0, sys.argv[1])
import pretrain
results = []
for argv in json.loads(sys.argv[2]):
  err = io.StringIO()
  with contextlib.redirect_stderr(err):
    try:
      status = pretrain.main(["--no_progress", *argv])
    except BaseException:
      traceback.print_exc()
      status = None
  results.append([status, err.getvalue()])
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def bad_input_results(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("bad_inputs")
  argvs = [
    ["--config=tiny", f"--workdir={workdir / str(i)}", *a] for i, (a, _) in enumerate(BAD_INPUTS)
  ]
  out = subprocess.run(
    [sys.executable, "-c", MAINS, str(ROOT / "scripts"), json.dumps(argvs)],
    capture_output=True,
    text=True,
    cwd=ROOT,
    timeout=600,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.splitlines()[-1])


@pytest.mark.parametrize("case", range(len(BAD_INPUTS)), ids=[m for _, m in BAD_INPUTS])
def test_bad_flags_and_data_give_clear_errors(bad_input_results, case):
  status, stderr = bad_input_results[case]
  assert status == 1, stderr
  assert BAD_INPUTS[case][1] in stderr, stderr
  assert "Traceback" not in stderr


def test_empty_corpus_is_an_error(tmp_path):
  (tmp_path / "empty.txt").write_text("\n\n")
  result = script(
    [
      "--config=tiny",
      f"--workdir={tmp_path / 'w'}",
      "--set",
      f"data.paths={tmp_path / 'empty.txt'}",
    ],
    timeout=300,
  )
  assert result.returncode == 1 and "Traceback" not in result.stderr
  assert "empty" in result.stderr.lower(), result.stderr


# --------------------------------------------------------------------------------------------
# Sharding of the optimizer state, microbatches, changing meshes, SIGTERM.


def test_adafactor_state_of_expert_kernels_is_sharded_over_experts():
  from jax.sharding import PartitionSpec as P

  from switchjax.optimizers import opt_state_specs

  shapes = {
    "wi": jax.ShapeDtypeStruct((8, 256, 512), np.float32),
    "scale": jax.ShapeDtypeStruct((256,), np.float32),
  }
  axes = {"wi": P("expert", "embed", "expert_mlp"), "scale": P("embed")}
  state = opt_state_specs(tiny().train, shapes, axes)
  assert state.v_row["wi"] == P("expert", None)  # [E, d_model], statistics per expert
  assert state.v_col["wi"] == P("expert", "model")  # [E, d_ff]
  assert state.v["scale"] == P(None)


@pytest.mark.slow
def test_microbatches_give_the_full_batch_update(tmp_path):
  # The tiny preset's routing groups (8 tokens) never straddle sequences and 2 microbatches of
  # 4 sequences keep them (with fewer tokens than 8 x E, groups would shrink), so splitting
  # the batch changes nothing but the summation order.
  settings = ["mesh.data=1", "train.num_train_steps=3", "train.log_every=1", "train.eval_every=0"]
  one = jax.devices()[:1]
  whole = run(tiny(*settings), tmp_path / "whole", devices=one)
  split = run(tiny("train.num_microbatches=2", *settings), tmp_path / "split", devices=one)
  for step, loss in whole.losses.items():
    np.testing.assert_allclose(split.losses[step], loss, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_checkpoint_restores_onto_another_mesh(tmp_path):
  settings = ["train.log_every=1", "train.eval_every=0", "train.checkpoint_every=3"]
  straight = run(
    tiny("mesh.data=1", "train.num_train_steps=6", *settings),
    tmp_path / "straight",
    devices=jax.devices()[:1],
  )
  run(
    tiny("mesh.data=1", "train.num_train_steps=3", *settings),
    tmp_path / "moved",
    devices=jax.devices()[:1],
  )
  moved = run(
    tiny("mesh.data=2", "mesh.expert=4", "train.num_train_steps=6", *settings), tmp_path / "moved"
  )
  for step in (4, 5, 6):
    np.testing.assert_allclose(moved.losses[step], straight.losses[step], atol=1e-5, rtol=0)


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits(tmp_path):
  workdir = tmp_path / "run"
  proc = subprocess.Popen(
    [
      sys.executable,
      PRETRAIN,
      "--no_progress",
      "--config=tiny",
      f"--workdir={workdir}",
      "--set",
      "train.num_train_steps=100000",
      "--set",
      "train.checkpoint_every=100000",
      "--set",
      "train.eval_every=0",
      "--set",
      "train.log_every=1",
    ],
    cwd=ROOT,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )
  deadline = time.time() + 300
  metrics = workdir / "metrics.jsonl"
  while time.time() < deadline and not (metrics.exists() and metrics.read_text()):
    time.sleep(0.1)
  proc.send_signal(signal.SIGTERM)
  output = proc.communicate(timeout=300)[0]
  assert proc.returncode == 130, output[-2000:]
  stopped = int(output.split("Stopped by SIGTERM at step ")[1].split(";")[0])
  assert "checkpoint saved. Run the same command to resume." in output
  assert checkpoint.CheckpointStore(workdir).steps() == [stopped]


@pytest.mark.slow
def test_training_starts_from_a_converted_hugging_face_checkpoint(tmp_path):
  from hf_utils import build_hf_checkpoint

  build_hf_checkpoint(
    tmp_path / "hf",
    vocab_size=640,
    num_layers=2,
    num_decoder_layers=2,
    num_sparse_encoder_layers=1,
    num_sparse_decoder_layers=1,
    expert_capacity=8,
  )
  converted = tmp_path / "converted"
  subprocess.run(
    [
      sys.executable,
      str(ROOT / "scripts" / "convert_hf.py"),
      f"--hf_dir={tmp_path / 'hf'}",
      f"--output_dir={converted}",
    ],
    check=True,
    cwd=ROOT,
    capture_output=True,
  )
  config = load_config(
    str(converted),
    [
      "data.spm_vocab_size=500",
      "data.inputs_length=32",
      "data.targets_length=8",
      "train.batch_size=8",
      "train.num_train_steps=2",
      "train.log_every=1",
      "train.eval_every=0",
      "train.learning_rate=1e-3",
      "train.schedule=constant",
      "mesh.data=1",
    ],
  )
  assert config.train.init_from == str(converted.resolve())
  messages = []
  result = train(
    config, tmp_path / "finetune", devices=jax.devices()[:1], progress=False, log=messages.append
  )
  assert f"Initialised parameters from {converted.resolve()}." in messages
  assert result.step == 2 and all(np.isfinite(v) for v in result.losses.values())
  _, start = model_loading.load_model(converted)
  _, end = model_loading.load_model(tmp_path / "finetune")
  assert jax.tree.structure(start) == jax.tree.structure(end)
  assert not checkpoint.params_equal(start, end)  # trained from there
