"""The training loop: start a run (plan, data, state, compiled steps, hooks), then step.

`train(config, workdir)` resumes from the workdir's newest checkpoint (parameters, optimizer
state and data position) or starts fresh (or from train.init_from), runs the jit-compiled,
sharded steps and leaves logging, evaluation and checkpointing to its hooks. Checkpoints are
saved asynchronously every train.checkpoint_every steps, at the end, and on SIGTERM / Ctrl-C; a
non-finite loss stops the run without saving the broken state.
"""

from __future__ import annotations

import pathlib
import shutil
from collections.abc import Callable, Sequence

import jax

from switchjax import checkpoint, sharding
from switchjax.config import Config, format_config, save_config
from switchjax.metrics_writer import MetricsWriter
from switchjax.training import hooks as hooks_lib
from switchjax.training.flops import peak_tflops, train_flops_per_example
from switchjax.training.plan import plan_run
from switchjax.training.state import TrainState, make_train_state, state_layout
from switchjax.training.step import compile_steps


def train(
  config: Config,
  workdir,
  *,
  devices: Sequence[jax.Device] | None = None,
  progress: bool = True,
  log: Callable[[str], None] = print,
) -> hooks_lib.RunResult:
  """Trains `config` in `workdir` (resuming from its newest checkpoint) and returns a summary.

  Args:
    config: the run's Config (validated).
    workdir: checkpoints, metrics.jsonl, TensorBoard events and config.json go here.
    devices: devices of the mesh (default: all, over all processes).
    progress: show a progress bar (process 0).
    log: where process 0's messages go.
  """
  config.validate()
  with hooks_lib.StopSignals() as signals:  # a signal during start-up stops after one step
    run, state, hooks = start_run(config, pathlib.Path(workdir), devices, progress, log)
    with jax.set_mesh(run.steps.mesh), sharding.axis_rules():
      return run_loop(run, state, hooks, signals)


def run_loop(run: hooks_lib.Run, state: TrainState, hooks, signals) -> hooks_lib.RunResult:
  """Steps until train.num_train_steps or a stop signal, calling the hooks."""
  try:
    while state.step < run.config.train.num_train_steps:
      batch = sharding.host_local_to_global(run.steps.mesh, next(run.data.train))
      state, metrics = run.steps.train(state, batch)
      run.stop = signals.any_process()
      if run.stop:
        run.result.stopped_by = signals.received or "another process"
      for hook in hooks:
        hook.after_step(run, state, metrics)
      if run.stop:
        run.say(
          f"\nStopped by {run.result.stopped_by} at step {state.step}; checkpoint saved. Run the "
          "same command to resume."
        )
        break
    for hook in hooks:
      hook.end(run, state)
  finally:
    for hook in hooks:
      hook.close()
    run.store.close()
    run.writer.close()
  run.result.step = state.step
  return run.result


def start_run(config: Config, workdir: pathlib.Path, devices, progress: bool, log):
  """Plans the run on its devices, opens the data, makes the train state (restored or fresh),
  compiles the steps and makes the hooks: (Run, TrainState, hooks)."""
  from switchjax.data import make_pretraining_data  # local: keeps `import switchjax` light

  is_main = jax.process_index() == 0
  say = log if is_main else (lambda _: None)
  if is_main:
    workdir.mkdir(parents=True, exist_ok=True)
    say(f"Config {config.name}:\n{format_config(config)}")
  plan = plan_run(config, devices)
  config, tcfg = plan.config, plan.config.train
  for line in plan.describe():
    say(line)
  data = make_pretraining_data(
    config.data,
    tcfg.batch_size,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    model_vocab_size=config.model.vocab_size,
  )
  say(f"Data: {data.describe()}.")
  if is_main:
    keep_tokenizer(data.tokenizer, workdir)
  layout = state_layout(config, plan.mesh)
  say(f"Model: {layout.num_params:,} parameters.")
  store = checkpoint.CheckpointStore(workdir, keep=tcfg.keep_checkpoints)
  state, meta = make_train_state(layout, config, store, report=say)
  if is_main:  # after the restore's checks: an incompatible workdir keeps its own config
    save_config(config, workdir / checkpoint.CONFIG_FILE)
  if meta is not None:
    data.train.set_state(meta["data"])
    say(f"Resumed from {workdir / checkpoint.CHECKPOINTS} step {state.step}.")
  run = hooks_lib.Run(
    config,
    workdir,
    compile_steps(layout, tcfg),
    data,
    store,
    MetricsWriter(workdir, is_main),
    say,
    hooks_lib.RunResult(state.step, {}, {}),
    hooks_lib.Stopwatch(),
  )
  return run, state, make_hooks(run, state, progress and is_main)


def make_hooks(run: hooks_lib.Run, state: TrainState, progress: bool) -> list[hooks_lib.Hook]:
  """Progress bar (optional), metrics logger, evaluator, checkpointer, in that order."""
  tcfg = run.config.train
  bar = hooks_lib.ProgressBar(state.step, tcfg.num_train_steps) if progress else None
  flops = train_flops_per_example(run.config) * tcfg.batch_size
  peak = peak_tflops(run.steps.mesh.devices.flat[0], tcfg.peak_tflops_per_device)
  logger = hooks_lib.MetricsLogger(run, flops, peak, bar)
  return [h for h in (bar, logger, hooks_lib.Evaluator(), hooks_lib.Checkpointer()) if h]


def keep_tokenizer(tokenizer, workdir: pathlib.Path) -> None:
  """Copies the tokenizer's model into the workdir (spiece.model) for generation later."""
  target = workdir / "spiece.model"
  source = pathlib.Path(tokenizer.spm_path)
  if source.resolve() != target.resolve():
    shutil.copyfile(source, target)
