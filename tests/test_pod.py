"""The train step compiled for emulated pods: expert parallelism by all-to-all, no gathered
activations, per-device memory that does not grow with the devices."""

import json
import pathlib
import subprocess
import sys

import pytest

import switchjax
from switchjax import pod

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_collectives_are_counted_and_token_sized_gathers_found():
  hlo = "\n".join(
    [
      "  %all-to-all.1 = (f32[1,640,768]{2,1,0}) all-to-all(%a), channel_id=1",
      "  %ag = f32[32,4096,768]{2,1,0} all-gather(%x), channel_id=2, dimensions={0}",
      "  %ag.2 = f32[768,3072]{1,0} all-gather-start(%w), channel_id=3",
      "  %ar = f32[] all-reduce(%l), channel_id=4",
    ]
  )
  assert pod.count_collectives(hlo) == {
    "all-to-all": 1,
    "all-gather": 2,
    "all-reduce": 1,
    "reduce-scatter": 0,
    "collective-permute": 0,
  }
  assert pod.all_gather_shapes(hlo) == ["f32[32,4096,768]", "f32[768,3072]"]
  config = switchjax.load_config("base8", ["train.batch_size=256", "train.num_microbatches=1"])
  sizes = pod.token_sizes(config, 32)  # 32 groups of 4096 encoder tokens, 512-token inputs
  assert {4096, 512, 114, 256, 32} <= sizes and 768 not in sizes and 3072 not in sizes
  assert pod._per_token("f32[32,4096,768]", sizes) == 768  # hidden activations
  assert pod._per_token("f32[768,3072]", sizes) == 0  # a parameter
  assert pod._per_token("s32[8,512,2]", sizes) == 2  # an argmax across 2 'model' shards


@pytest.mark.slow
@pytest.mark.parametrize("microbatches", [1, 2])
def test_tiny_on_eight_devices_routes_by_all_to_all(microbatches):
  config = switchjax.load_config(
    "tiny", ["train.batch_size=32", f"train.num_microbatches={microbatches}"]
  )
  report = pod.simulate(config, (2, 4, 1))
  # One sparse layer per stack: dispatch and combine, forward and backward.
  assert report.collectives["all-to-all"] == 2 * 2 * 2
  # Microbatches are strided over the devices' rows: no tokens are gathered to split them.
  assert report.token_sized_all_gathers == [] and report.collectives["all-gather"] == 0
  assert report.replications == 0 and report.num_microbatches == microbatches


def test_a_mesh_the_fixed_group_count_cannot_split_is_refused():
  config = switchjax.load_config("tiny", ["train.batch_size=16", "model.moe.group_multiple=4"])
  with pytest.raises(
    ValueError,
    match=r"moe.group_multiple=4 gives 4 routing groups, which do "
    r"not split over the 8 data x expert devices",
  ):
    pod.simulate(config, (2, 4, 1))


@pytest.mark.slow
def test_base8_on_a_32_device_pod(tmp_path):
  """base8's widths and batch of 256 (2 + 2 of its 12 + 12 layers, so one sparse layer per
  stack: the compile is what takes time) on 1 x 8 (4 microbatches of 8 sequences per device)
  and on 4 x 8 emulated devices (one): one all-to-all pair per sparse layer forward and
  backward, no token-sized all-gather, and no more temporary memory per device on 32 devices
  than on 8."""
  out = tmp_path / "pod.json"
  subprocess.run(
    [
      sys.executable,
      str(ROOT / "scripts" / "simulate_pod.py"),
      "--config=base8",
      "--mesh",
      "1,8,1",
      "--mesh",
      "4,8,1",
      "--batch",
      "256",
      "--set",
      "model.num_layers=2",
      "--set",
      "model.num_decoder_layers=2",
      "--set",
      "model.num_sparse_encoder_layers=1",
      "--set",
      "model.num_sparse_decoder_layers=1",
      "--json",
      str(out),
    ],
    check=True,
    capture_output=True,
    text=True,
  )
  small, pod_run = json.loads(out.read_text())
  assert (small["num_microbatches"], pod_run["num_microbatches"]) == (4, 1)
  sparse_layers = 1 + 1
  for report in (small, pod_run):
    assert report["collectives"]["all-to-all"] == 2 * 2 * sparse_layers
    assert report["token_sized_all_gathers"] == [] and report["replications"] == 0
  assert pod_run["temp_bytes"] <= small["temp_bytes"]
