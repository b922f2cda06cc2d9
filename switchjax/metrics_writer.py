"""Training metrics to `metrics.jsonl` and TensorBoard event files (process 0 only)."""

from __future__ import annotations

import json
import pathlib
import sys


class MetricsWriter:
  """Appends one JSON line per write to workdir/metrics.jsonl and logs scalars to
  workdir/tensorboard. Disabled on every process but the first."""

  def __init__(self, workdir, enabled: bool = True):
    self.enabled = enabled
    if not enabled:
      return
    workdir = pathlib.Path(workdir)
    self._jsonl = open(workdir / "metrics.jsonl", "a")
    self._tb = _summary_writer_class()(str(workdir / "tensorboard"))

  def write(self, step: int, metrics: dict[str, float]) -> None:
    if not self.enabled:
      return
    self._jsonl.write(json.dumps({"step": int(step), **metrics}) + "\n")
    self._jsonl.flush()
    for name, value in metrics.items():
      self._tb.add_scalar(name, value, int(step))
    self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


def _summary_writer_class():
  """tensorboardX's SummaryWriter, imported without PyTorch: tensorboardX imports torch when it
  is installed, only to accept its tensors (2-5 s and ~300 MB in every training process that
  has the test extras); we log Python floats. A torch already imported is left as it is."""
  if "torch" in sys.modules:
    from tensorboardX import SummaryWriter
  else:
    sys.modules["torch"] = None  # type: ignore[assignment]  # `import torch` -> ImportError
    try:
      from tensorboardX import SummaryWriter
    finally:
      del sys.modules["torch"]
  return SummaryWriter
