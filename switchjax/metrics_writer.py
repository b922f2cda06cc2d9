"""Training metrics to `metrics.jsonl` and TensorBoard event files (process 0 only)."""

from __future__ import annotations

import json
import pathlib


class MetricsWriter:
  """Appends one JSON line per write to workdir/metrics.jsonl and logs scalars to
  workdir/tensorboard. Disabled on every process but the first."""

  def __init__(self, workdir, enabled: bool = True):
    self.enabled = enabled
    if not enabled:
      return
    workdir = pathlib.Path(workdir)
    self._jsonl = open(workdir / "metrics.jsonl", "a")
    from tensorboardX import SummaryWriter

    self._tb = SummaryWriter(str(workdir / "tensorboard"))

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
