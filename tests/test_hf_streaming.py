"""Streaming conversion: bounded memory both ways, exact values, and restoring onto a mesh.

A random transformers Switch model of 284 MiB in float32 (32 experts of d_model 512 and d_ff
1024 in 1 + 1 sparse layers; its largest stacked tensor is 64 MiB) is converted by
scripts/convert_hf.py both ways in subprocesses whose peak resident memory (ru_maxrss) must
stay within 1.2 times the largest stacked tensor above the interpreter's baseline (python
importing jax, orbax and switchjax); the parameters must equal the source tensors bit for bit.
Restoring it onto a (1, 4, 2) mesh from two processes of four emulated devices must add less
than the model's size to each process and give the logits of a plain restore. Output
directories that are not empty or overlap the input are refused before a byte changes.
Run with `-s` to see the measured figures.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys
import tempfile

import hf_utils as U
import jax
import ml_dtypes
import numpy as np
import pytest
import tiny
import torch
import transformers
from safetensors.numpy import load_file

from switchjax import checkpoint, hf, model_loading
from switchjax.checkpoint import LazyArray
from switchjax.config import Config
from switchjax.model import SwitchTransformer

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONVERT = ROOT / "scripts" / "convert_hf.py"
MIB = 2**20
# 74.5M parameters, 284 MiB in float32; experts are 90% of it.
MEDIUM = dict(
  vocab_size=4096,
  d_model=512,
  d_ff=1024,
  d_kv=32,
  num_heads=8,
  num_layers=2,
  num_decoder_layers=2,
  num_sparse_encoder_layers=1,
  num_sparse_decoder_layers=1,
  num_experts=32,
  expert_capacity=8,
  decoder_start_token_id=0,
)
LARGEST = 32 * 512 * 1024 * 4  # bytes of one layer's stacked wi (or wo) in float32


# Runs a command and writes its peak resident KiB to argv[1]. The measured process must be a
# child of this small launcher: a child forked from pytest itself would count pytest's pages.
LAUNCHER = (
  "import resource, subprocess, sys; status = subprocess.call(sys.argv[2:]); "
  "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)); "
  "sys.exit(status)"
)


def run(*args, env=None) -> tuple[int, str, float]:
  """(exit status, output, peak resident MiB) of `python *args`."""
  with tempfile.TemporaryDirectory() as tmp:
    peak = pathlib.Path(tmp) / "peak"
    done = subprocess.run(
      [sys.executable, "-c", LAUNCHER, str(peak), sys.executable, *map(str, args)],
      capture_output=True,
      text=True,
      cwd=ROOT,
      env={**os.environ, **(env or {})},
      timeout=600,
    )
    return done.returncode, done.stdout + done.stderr, int(peak.read_text()) / 1024


def snapshot(*dirs) -> dict:
  """Every file under `dirs` with its bytes (what a refused command must leave alone)."""
  return {
    p: p.read_bytes()
    for d in dirs
    if pathlib.Path(d).exists()
    for p in sorted(pathlib.Path(d).rglob("*"))
    if p.is_file()
  }


@pytest.fixture(scope="module")
def medium(tmp_path_factory):
  """The 284 MiB model saved by transformers in 100 MB safetensors shards, converted by the
  script: (hf_dir, switchjax dir, peak MiB of the conversion, baseline MiB)."""
  root = tmp_path_factory.mktemp("medium")
  torch.manual_seed(0)
  config = transformers.SwitchTransformersConfig(**MEDIUM)
  transformers.SwitchTransformersForConditionalGeneration(config).save_pretrained(
    root / "hf", max_shard_size="100MB"
  )
  status, out, baseline = run(
    "-c", "import jax, orbax.checkpoint, switchjax.hf, switchjax.checkpoint; jax.devices()"
  )
  assert status == 0, out
  status, out, peak = run(CONVERT, "--hf_dir", root / "hf", "--output_dir", root / "ckpt")
  assert status == 0, out
  return root / "hf", root / "ckpt", peak, baseline


def source_tensors(hf_dir) -> dict[str, np.ndarray]:
  return {k: v for f in sorted(hf_dir.glob("*.safetensors")) for k, v in load_file(f).items()}


@pytest.mark.slow
def test_conversion_memory_is_bounded_and_values_exact(medium):
  hf_dir, out, peak, baseline = medium
  size = sum(f.stat().st_size for f in hf_dir.glob("*.safetensors"))
  print(
    f"\nfrom_hf: peak {peak:.0f} MiB, baseline {baseline:.0f} MiB, checkpoint {size / MIB:.0f}"
    f" MiB, largest stacked tensor {LARGEST / MIB:.0f} MiB"
  )
  assert peak - baseline <= 1.2 * LARGEST / MIB
  config, params = model_loading.load_model(out)
  assert config.model.param_dtype == "float32"
  source = source_tensors(hf_dir)
  for spec in hf.tensor_specs(config.model):
    x = np.asarray(hf.get_path(params, spec.path))
    x = x if spec.expert is None else x[spec.expert]
    expected = source[spec.name].T.reshape(spec.jax_shape) if spec.transpose else source[spec.name]
    assert np.array_equal(x, expected), spec.name


@pytest.mark.slow
def test_experts_are_stored_one_per_chunk(medium):
  _, stored = checkpoint.lazy_params(medium[1])
  wi = stored["encoder"]["layers_1"]["mlp"]["wi"]
  assert wi.shape == (32, 512, 1024) and wi.block == 1
  assert stored["token_embedder"]["embedding"].block == hf.BLOCK_BYTES // (512 * 4)


@pytest.mark.slow
def test_to_hf_memory_is_bounded_and_round_trip_exact(medium, tmp_path):
  hf_dir, ckpt, _, baseline = medium
  status, out, peak = run(
    CONVERT, "--checkpoint", ckpt, "--hf_output_dir", tmp_path, "--max_shard_size", "100MB"
  )
  assert status == 0, out
  print(f"\nto_hf: peak {peak:.0f} MiB, baseline {baseline:.0f} MiB")
  assert peak - baseline <= 1.2 * LARGEST / MIB
  index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
  assert len(set(index["weight_map"].values())) >= 3
  written, source = source_tensors(tmp_path), source_tensors(hf_dir)
  assert set(written) == set(source) == set(index["weight_map"])
  assert all(np.array_equal(written[k], source[k]) for k in source)
  assert all(f.stat().st_size <= 100e6 for f in tmp_path.glob("*.safetensors"))


def test_lazy_arrays_save_block_by_block(tmp_path):
  """Blocks along either axis, a last short block, 1-D and in-memory leaves restore exactly."""
  rng = np.random.default_rng(0)
  arrays = {
    "rows": rng.normal(size=(10, 3)).astype(np.float32),
    "cols": rng.normal(size=(4, 9)).astype(ml_dtypes.bfloat16),
    "vector": rng.normal(size=(5,)).astype(np.float32),
    "memory": rng.normal(size=(2, 2)).astype(np.float32),
  }
  params = {
    "rows": LazyArray((10, 3), np.float32, lambda a, b: arrays["rows"][a:b], 0, 4),
    "cols": LazyArray((4, 9), arrays["cols"].dtype, lambda a, b: arrays["cols"][:, a:b], 1, 2),
    "vector": LazyArray((5,), np.float32, lambda a, b: arrays["vector"][a:b], 0, 2),
    "memory": arrays["memory"],
  }
  checkpoint.save_model(tmp_path, Config(), params)
  _, stored = checkpoint.lazy_params(tmp_path)
  assert stored["rows"].block == 4 and stored["vector"].block == 2
  for name, x in arrays.items():
    assert stored[name].dtype == x.dtype
    assert np.array_equal(np.asarray(stored[name]), x), name
  handlers = json.loads((tmp_path / "checkpoints/0/_CHECKPOINT_METADATA").read_text())
  assert handlers["item_handlers"]["params"].endswith("StandardCheckpointHandler")


# --------------------------------------------------------------------------------------------
# dtypes


@pytest.fixture(scope="module")
def bf16_hf(tmp_path_factory):
  """A tiny untied model saved in bfloat16 by transformers, with its float32 conversion."""
  root = tmp_path_factory.mktemp("bf16")
  U.build_hf_checkpoint(
    root / "f32", seed=3, num_layers=2, num_sparse_encoder_layers=1, tie_word_embeddings=False
  )
  U.load_hf(root / "f32").to(torch.bfloat16).save_pretrained(root / "bf16")
  return root / "bf16"


@pytest.mark.slow
def test_bfloat16_stays_bfloat16_and_casts_on_restore(bf16_hf, tmp_path):
  config = hf.convert_from_hf(bf16_hf, tmp_path / "ckpt")
  assert config.model.param_dtype == "bfloat16"
  _, stored = checkpoint.lazy_params(tmp_path / "ckpt")
  assert {x.dtype.name for x in jax.tree.leaves(stored)} == {"bfloat16"}
  loaded_config, params = model_loading.load_model(tmp_path / "ckpt")
  _, reference = hf.from_hf(bf16_hf, dtype="bfloat16")
  assert loaded_config.model.param_dtype == "bfloat16"
  assert checkpoint.params_equal(params, reference)
  f32_config, f32 = model_loading.load_model(tmp_path / "ckpt", dtype="float32")
  assert f32_config.model.param_dtype == "float32"
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(f32))
  assert checkpoint.params_equal(f32, hf.from_hf(bf16_hf)[1])
  # Back to HF: bfloat16 tensors equal to the source, config dtype bfloat16.
  hf.to_hf(loaded_config, stored, tmp_path / "back")
  back, source = U.state_dict(tmp_path / "back"), U.state_dict(bf16_hf)
  assert json.loads((tmp_path / "back/config.json").read_text())["dtype"] == "bfloat16"
  assert all(back[k].dtype == ml_dtypes.bfloat16 for k in back)
  assert all(np.array_equal(back[k], source[k]) for k in source)
  logits = U.hf_forward(U.load_hf(tmp_path / "back")).logits
  assert torch.equal(logits, U.hf_forward(U.load_hf(bf16_hf)).logits)


@pytest.mark.slow
def test_dtype_flag_casts(bf16_hf, tmp_path):
  status, out, _ = run(
    CONVERT, "--hf_dir", bf16_hf, "--output_dir", tmp_path / "f32", "--dtype", "float32"
  )
  assert status == 0 and "float32" in out, out
  config, params = model_loading.load_model(tmp_path / "f32")
  assert config.model.param_dtype == "float32"
  assert checkpoint.params_equal(params, hf.from_hf(bf16_hf)[1])


def test_sharded_output_loads_in_transformers(tmp_path):
  directory = tmp_path / "hf"
  reference = U.build_hf_checkpoint(directory, seed=5, num_layers=2, num_sparse_encoder_layers=1)
  model, params = hf.from_hf(directory)
  hf.to_hf(model, params, tmp_path / "out", max_shard_size="20KB")
  files = sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
  assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
  logits = U.hf_forward(U.load_hf(tmp_path / "out")).logits
  assert torch.equal(logits, U.hf_forward(reference).logits)
  assert hf.parse_size("5GB") == 5 * 10**9 and hf.parse_size("2GiB") == 2 * 2**30
  with pytest.raises(ValueError, match="max_shard_size"):
    hf.parse_size("big")


# --------------------------------------------------------------------------------------------
# Output directories: refused before anything is written.


@pytest.fixture(scope="module")
def small(tmp_path_factory):
  """A tiny HF checkpoint and its switchjax conversion."""
  root = tmp_path_factory.mktemp("small")
  U.build_hf_checkpoint(root / "hf", seed=1, num_layers=2, num_sparse_encoder_layers=1)
  hf.convert_from_hf(root / "hf", root / "ckpt")
  return root / "hf", root / "ckpt"


REFUSED = {
  "hf_into_itself": (lambda h, c, t: ["--hf_dir", h, "--output_dir", h], "overlap the input"),
  "hf_into_subdir": (lambda h, c, t: ["--hf_dir", h, "--output_dir", h / "x"], "overlap"),
  "ckpt_into_itself": (
    lambda h, c, t: ["--checkpoint", c, "--hf_output_dir", c],
    "overlap the input",
  ),
  "hf_not_empty": (lambda h, c, t: ["--hf_dir", h, "--output_dir", t], "--overwrite"),
  "ckpt_not_empty": (lambda h, c, t: ["--checkpoint", c, "--hf_output_dir", t], "--overwrite"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_outputs_change_no_byte(small, tmp_path, case):
  hf_dir, ckpt = small
  (tmp_path / "notes.txt").write_text("keep me")
  args, fragment = REFUSED[case]
  before = snapshot(hf_dir, ckpt, tmp_path)
  status, out, _ = run(CONVERT, *args(hf_dir, ckpt, tmp_path))
  assert status == 1 and fragment in out and "Traceback" not in out, out
  assert len(out.strip().splitlines()) == 1
  assert snapshot(hf_dir, ckpt, tmp_path) == before


def test_api_refuses_input_and_non_empty_outputs(small, tmp_path):
  hf_dir, ckpt = small
  model, params = hf.lazy_from_hf(hf_dir)
  with pytest.raises(ValueError, match="overlap the input"):
    hf.to_hf(model, params, hf_dir, overwrite=True)  # lazy leaves know where they come from
  (tmp_path / "x").write_text("x")
  with pytest.raises(ValueError, match=r"not empty.*overwrite=True"):
    hf.convert_from_hf(hf_dir, tmp_path)
  assert [p.name for p in tmp_path.iterdir()] == ["x"]


def test_overwrite_replaces_previous_outputs_only(small, tmp_path):
  hf_dir, ckpt = small
  (tmp_path / "model.safetensors").write_bytes(b"stale")  # transformers would prefer it
  (tmp_path / "notes.txt").write_text("keep me")
  status, out, _ = run(
    CONVERT,
    "--checkpoint",
    ckpt,
    "--hf_output_dir",
    tmp_path,
    "--overwrite",
    "--max_shard_size",
    "40KB",
  )
  assert status == 0, out
  assert not (tmp_path / "model.safetensors").exists()
  assert (tmp_path / "notes.txt").read_text() == "keep me"
  assert hf.from_hf(tmp_path)[0].config == hf.from_hf(hf_dir)[0].config
  status, out, _ = run(CONVERT, "--hf_dir", hf_dir, "--output_dir", ckpt, "--overwrite")
  assert status == 0, out
  assert checkpoint.CheckpointStore(ckpt).steps() == [0]


# --------------------------------------------------------------------------------------------
# Restoring onto a mesh.


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_restore_their_shards_only(medium, tmp_path):
  """Each of two processes (4 emulated devices each, mesh data 1 x expert 4 x model 2) holds
  its devices' slices: its parameters and its peak memory during the restore stay below the
  model's size, every slice equals the stored one, and the logits equal a plain restore's (up
  to float32 sums in another order)."""
  _, ckpt, _, _ = medium
  port, report = free_port(), tmp_path / "report"
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  procs = [
    subprocess.Popen(
      [
        sys.executable,
        str(ROOT / "tests" / "restore_on_mesh.py"),
        str(ckpt),
        str(report),
        "--mesh=1,4,2",
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
  outputs = [p.communicate(timeout=300)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), outputs[0][-3000:] + outputs[1][-3000:]
  config, params = model_loading.load_model(ckpt)
  size = sum(x.nbytes for x in jax.tree.leaves(params)) / MIB
  for i in range(2):
    r = json.loads(pathlib.Path(f"{report}.{i}.json").read_text())
    print(
      f"\nprocess {i}: parameters on its devices {r['local_param_mib']:.0f} MiB, peak "
      f"{r['peak_mib']:.0f} MiB from {r['rss_before_mib']:.0f} MiB; model {size:.0f} MiB"
    )
    assert r["shards_equal_stored"] and r["devices"] == 4
    assert r["local_param_mib"] < 0.7 * size
    assert r["peak_mib"] - r["rss_before_mib"] < size
  from restore_on_mesh import batch

  # Every restored slice equals the stored one (above); the logits differ from the plain
  # restore's only by float32 sums taken in another order (across devices and processes).
  inputs, targets = batch(config.model.vocab_size)
  plain = np.asarray(SwitchTransformer(config.model).apply({"params": params}, inputs, targets))
  sharded = np.load(f"{report}.logits.npy")
  diff, scale = np.abs(sharded - plain).max(), np.abs(plain).max()
  print(f"max |mesh logits - plain restore's| = {diff:.3g} (max |logit| {scale:.3g})")
  assert diff <= 1e-5 * scale


@pytest.mark.slow
def test_generate_on_a_mesh_matches_one_device(tmp_path):
  """scripts/generate.py --set mesh.*: restored onto 8 devices, the same text."""
  sentences = ["the cat sat on the mat", "a dog ran in the park", "birds sing in the morning"]
  (tmp_path / "spiece.model").write_bytes(tiny.tiny_spm(sentences * 20, vocab_size=24))
  cfg = tiny.tiny_config(
    vocab_size=160,
    d_model=32,
    d_ff=64,
    num_heads=4,
    moe=dict(num_experts=4, eval_capacity_factor=4.0),
  )
  params = tiny.random_params(SwitchTransformer(cfg))
  checkpoint.save_model(tmp_path, Config(model=cfg), params)
  command = [ROOT / "scripts/generate.py", "--checkpoint", tmp_path, "--max_new_tokens", "6"]
  command += ["--input", "the cat sat", "--input", "a dog ran"]
  plain = run(*command)
  mesh = run(*command, "--set", "mesh.expert=2", "--set", "mesh.model=4")
  assert plain[0] == 0 and mesh[0] == 0, plain[1] + mesh[1]
  lines = plain[1].splitlines()[-2:]
  assert len(lines) == 2 and mesh[1].splitlines()[-2:] == lines
