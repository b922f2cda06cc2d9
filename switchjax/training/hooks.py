"""What the training loop does around its steps, as hooks: the progress bar, logging, evaluation
and checkpointing, plus the stop signals and the step timer they share.

Each hook sees the `Run` (what the loop knows) and is called with `start(state)` before the
first step, `after_step(state, metrics)` right after a step was dispatched (the arrays may
still be computing), `end(state)` when the loop is done and `close()` always.
"""

from __future__ import annotations

import contextlib
import dataclasses
import pathlib
import signal
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from switchjax import checkpoint, sharding
from switchjax.metrics_writer import MetricsWriter
from switchjax.training.state import TrainState
from switchjax.training.step import Steps


class NonFiniteLossError(RuntimeError):
  """The loss became NaN or infinite; the last good checkpoint is kept."""


class StartupInterrupted(BaseException):
  """SIGTERM or Ctrl-C during start-up: the run stops at once (a BaseException, so that no
  `except Exception` on the way, e.g. around a checkpoint restore, mistakes it for a failure)."""

  def __init__(self, signal_name: str):
    super().__init__(
      f"Stopped by {signal_name} during start-up, before the first step; nothing was trained "
      "or saved. Run the same command to start again."
    )
    self.signal_name = signal_name


@dataclasses.dataclass
class RunResult:
  """What a run did: the step reached, the logged training losses by step, the last eval."""

  step: int
  losses: dict[int, float]
  eval_metrics: dict[str, float]
  stopped_by: str | None = None


@dataclasses.dataclass
class Run:
  """What the loop and its hooks share.

  Attributes:
    config: the run's config (microbatches resolved).
    workdir: where checkpoints, metrics and the config live.
    steps: the compiled train and eval steps.
    data: the input pipeline (train iterator, eval batches).
    store: the workdir's checkpoints.
    writer: metrics.jsonl and TensorBoard (process 0).
    say: prints on process 0 only.
    result: what the run did so far.
    stop: set when a stop signal reached any process.
  """

  config: Any
  workdir: pathlib.Path
  steps: Steps
  data: Any
  store: checkpoint.CheckpointStore
  writer: MetricsWriter
  say: Callable[[str], None]
  result: RunResult
  stopwatch: Stopwatch
  stop: bool = False
  unchecked: list = dataclasses.field(default_factory=list)  # [(step, finite flag)]
  claim: Any = None  # the workdir.Workdir this run holds (its lock)

  def write(self, step: int, metrics: dict[str, float]) -> None:
    """Metrics to metrics.jsonl and TensorBoard; a failed write stops the run with a WriteError
    naming the last complete checkpoint."""
    try:
      self.writer.write(step, metrics)
    except OSError as e:
      raise checkpoint.WriteError(
        f"Could not write the metrics of step {step} to {self.workdir} ({e.strerror or e}). "
        f"The last complete checkpoint ({self.store.describe_last()}) is kept: free space on "
        "that disk (or make it writable) and run the same command to resume."
      ) from None

  def close(self, hooks, failing: bool = False) -> None:
    """Closes the hooks, the checkpoints (waiting for the last save), the metrics and the
    workdir's lock; when `failing`, errors of closing do not hide the error being raised."""
    try:
      for hook in hooks:
        hook.close()
      getattr(self.data.train, "close", lambda: None)()  # a prefetching thread
      self.store.close()
      self.writer.close()
    except Exception:
      if not failing:
        raise
    finally:
      if self.claim is not None:
        self.claim.release()

  def check_finite(self) -> None:
    """Raises NonFiniteLossError if any step since the last check had a non-finite loss or
    gradient (waits for those steps)."""
    flags, self.unchecked = self.unchecked, []
    for step, finite in zip([s for s, _ in flags], jax.device_get([f for _, f in flags])):
      if not finite:
        with contextlib.suppress(checkpoint.WriteError):
          self.store.wait()  # a save in flight (of an earlier, finite step) completes first
        raise NonFiniteLossError(
          f"Non-finite loss or gradient at step {step}; stopping without saving. The last good "
          f"checkpoint ({self.store.describe_last()}) is kept in {self.workdir}. Lower "
          "train.learning_rate, raise train.router_z_loss_factor or check the data."
        )


class Hook:
  """A no-op hook; subclasses override what they need."""

  def start(self, run: Run, state: TrainState) -> None:
    pass

  def after_step(self, run: Run, state: TrainState, metrics: dict) -> None:
    pass

  def end(self, run: Run, state: TrainState) -> None:
    pass

  def close(self) -> None:
    pass


class Stopwatch:
  """Wall time of training steps only: evaluation and checkpointing are left out."""

  def __init__(self):
    self.seconds, self._start = 0.0, time.time()

  def pause(self, state: TrainState) -> None:
    jax.block_until_ready((state.params, state.opt_state))  # the steps so far have finished
    self.seconds += time.time() - self._start

  def resume(self) -> None:
    self._start = time.time()

  def read_and_reset(self) -> float:
    seconds = self.seconds + time.time() - self._start
    self.seconds, self._start = 0.0, time.time()
    return max(seconds, 1e-9)


class ProgressBar(Hook):
  """A progress bar that counts finished steps: after each dispatch it waits for the previous
  step's result, so at most one step is in flight and the rate and ETA are the real ones."""

  def __init__(self, start: int, total: int):
    from tqdm.auto import tqdm

    self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)
    self.previous = None

  def after_step(self, run, state, metrics):
    self._finish_previous()
    self.previous = metrics["finite"]

  def _finish_previous(self) -> None:
    if self.previous is not None:
      jax.block_until_ready(self.previous)
      self.bar.update(1)
      self.previous = None

  def write(self, text: str) -> None:
    self.bar.write(text)  # above the bar

  def end(self, run, state):
    self._finish_previous()

  def close(self):
    self.bar.close()


class MetricsLogger(Hook):
  """Every train.log_every steps (and at the last): mean metrics of the steps since the last
  log, throughput and MFU, to the console, metrics.jsonl and TensorBoard."""

  def __init__(self, run: Run, flops_per_step: float, peak: float | None, bar: ProgressBar | None):
    cfg = run.config
    self.flops, self.peak, self.bar = flops_per_step, peak, bar
    self.tokens_per_step = cfg.train.batch_size * (cfg.data.inputs_length + cfg.data.targets_length)
    self.pending: list[dict] = []

  def after_step(self, run, state, metrics):
    self.pending.append(metrics)
    run.unchecked.append((state.step, metrics["finite"]))
    if (
      state.step % run.config.train.log_every == 0 or state.step == run.config.train.num_train_steps
    ):
      self.log(run, state.step)

  def log(self, run: Run, step: int) -> None:
    count, values = len(self.pending), jax.device_get(self.pending)  # waits for the steps
    self.pending = []
    run.check_finite()
    logged = {k: float(np.mean([v[k] for v in values])) for k in values[0] if k != "finite"}
    elapsed = run.stopwatch.read_and_reset()
    devices = run.steps.mesh.devices.size
    logged["tokens_per_second"] = self.tokens_per_step * count / elapsed
    logged["seconds_per_step"] = elapsed / count
    logged["model_tflops_per_device"] = self.flops * count / elapsed / 1e12 / devices
    if self.peak:
      logged["mfu"] = logged["model_tflops_per_device"] / self.peak
    logged["examples_per_second"] = run.config.train.batch_size * count / elapsed
    input_rate = getattr(run.data.train, "input_rate", lambda: None)()
    if input_rate:  # what the input pipeline can make: this host's rate times the hosts
      logged["input_examples_per_second"] = input_rate * jax.process_count()
    run.write(step, logged)
    run.result.losses[step] = logged["loss"]
    (self.bar.write if self.bar else run.say)(format_log(step, logged))


class Evaluator(Hook):
  """Evaluates every train.eval_every steps, and at the end unless just done or stopped."""

  def after_step(self, run, state, metrics):
    every = run.config.train.eval_every
    if every and state.step % every == 0 and run.data.num_eval_chunks:
      run.stopwatch.pause(state)
      run.result.eval_metrics = self.evaluate(run, state)
      run.stopwatch.resume()

  def end(self, run, state):
    every = run.config.train.eval_every
    if (
      run.result.stopped_by is None
      and run.data.num_eval_chunks
      and (not every or state.step % every)
    ):
      run.result.eval_metrics = self.evaluate(run, state)

  def evaluate(self, run: Run, state: TrainState) -> dict[str, float]:
    totals: dict[str, list] = {}
    batches = 0
    for batch in run.data.eval_batches(run.config.train.eval_steps):
      metrics = run.steps.eval(state.params, sharding.host_local_to_global(run.steps.mesh, batch))
      batches += 1
      for k, v in metrics.items():
        totals.setdefault(k, []).append(v)
    metrics = {
      f"eval/{k}": float(np.mean(jax.device_get(v)))
      for k, v in totals.items()
      if not k.startswith("layers/")
    }
    read, held_out = batches * run.config.train.batch_size, run.data.num_eval_chunks
    metrics["eval/examples"] = min(read, held_out)
    run.say(
      f"step {state.step}: eval loss {metrics['eval/loss']:.4f}, cross-entropy "
      f"{metrics['eval/cross_entropy']:.4f}, accuracy {metrics['eval/accuracy']:.3f} "
      f"({coverage(read, held_out)})"
    )
    run.write(state.step, metrics)
    return metrics


def coverage(read: int, held_out: int) -> str:
  """What an evaluation covered, honestly: 'all 200 eval examples' (and whether some were read
  twice to fill the last batches) or '80 of 200 eval examples' and how to cover them all."""
  if read < held_out:
    return f"the first {read} of {held_out} eval examples; raise train.eval_steps to cover all"
  if read > held_out:
    return f"all {held_out} eval examples, cycled to fill {read} rows"
  return f"all {held_out} eval examples"


class Checkpointer(Hook):
  """Saves every train.checkpoint_every steps, at the last step and when stopped; never a
  state after a non-finite step."""

  def after_step(self, run, state, metrics):
    cfg = run.config.train
    if state.step % cfg.checkpoint_every == 0 or state.step == cfg.num_train_steps or run.stop:
      run.stopwatch.pause(state)
      self.save(run, state)
      run.stopwatch.resume()

  def save(self, run: Run, state: TrainState) -> None:
    run.check_finite()
    meta = {"data_position": state.data_position, "data": run.data.train.get_state()}
    run.store.save(state.step, state.params, state.opt_state, meta)


class StopSignals:
  """SIGTERM and SIGINT (Ctrl-C) from the first line of a run on.

  During start-up (data preparation, restoring, before the first step) a signal stops the run
  at once: the handler raises StartupInterrupted, except inside `deferred()` (writing the
  workdir's files), after which it is raised. Once `started()`, a signal is recorded, and the
  loop saves a checkpoint and stops after the current step; a second Ctrl-C stops at once.
  """

  def __init__(self):
    self.received: str | None = None
    self.starting = True
    self._deferring = False
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    name = signal.Signals(signum).name
    if self.starting and not self._deferring:
      self.received = name
      raise StartupInterrupted(name)
    if self.received is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.received = name

  @contextlib.contextmanager
  def deferred(self):
    """Signals wait until the block is done (it writes files that must be whole)."""
    self._deferring = True
    try:
      yield
    finally:
      self._deferring = False
    if self.starting and self.received is not None:
      raise StartupInterrupted(self.received)

  def started(self) -> None:
    """From now on a signal stops the loop after its step, with a checkpoint."""
    self.starting = False

  def any_process(self) -> bool:
    """True if a signal reached any process (all processes must agree to save and stop)."""
    flag = self.received is not None
    if jax.process_count() == 1:
      return flag
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.array(flag))))

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def format_log(step: int, m: dict[str, float]) -> str:
  """One console line of logged training metrics."""
  text = (
    f"step {step}: loss {m['loss']:.4f}, cross-entropy {m['cross_entropy']:.4f}, "
    f"aux {m.get('auxiliary_loss', 0.0):.4f}, router z {m.get('router_z_loss', 0.0):.3f}, "
    f"dropped {m.get('fraction_tokens_left_behind', 0.0):.3f}, lr "
    f"{m['learning_rate']:.2e}, grad norm {m['grad_norm']:.3f}, "
    f"{m['tokens_per_second']:.0f} tokens/s"
  )
  text += f", MFU {m['mfu']:.1%}" if "mfu" in m else ""
  if "input_examples_per_second" in m:
    text += (
      f", input {m['input_examples_per_second']:.0f} examples/s (the step takes "
      f"{m['examples_per_second']:.0f})"
    )
  return text
