"""switchjax/metrics_writer.py: a JSON line and TensorBoard scalars per write, and no PyTorch
imported for them (tensorboardX imports torch when it is installed)."""

import json
import subprocess
import sys

CODE = """
import sys
from switchjax.metrics_writer import MetricsWriter
writer = MetricsWriter(sys.argv[1])
writer.write(3, {"loss": 1.5, "eval/accuracy": 0.25})
writer.close()
print("torch" in sys.modules)
"""


def test_writes_jsonl_and_tensorboard_events_without_importing_torch(tmp_path):
  out = subprocess.run(
    [sys.executable, "-c", CODE, str(tmp_path)], capture_output=True, text=True, check=True
  )
  assert out.stdout.split() == ["False"]
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(x) for x in lines] == [{"step": 3, "loss": 1.5, "eval/accuracy": 0.25}]
  (events,) = (tmp_path / "tensorboard").iterdir()
  assert events.name.startswith("events.out.tfevents.")
  data = events.read_bytes()
  assert b"loss" in data and b"eval/accuracy" in data  # the scalars' tags in the event records


def test_a_torch_already_imported_is_left_alone(tmp_path):
  code = "import torch\n" + CODE + "assert sys.modules['torch'] is torch\n"
  out = subprocess.run(
    [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True
  )
  assert out.stdout.split() == ["True"]
