"""The training loop: start a run (plan, workdir, data, state, compiled steps, hooks), then step.

`train(config, workdir)` resumes from the workdir's newest checkpoint (parameters, optimizer
state and data position) or starts fresh (or from train.init_from), runs the jit-compiled,
sharded steps and leaves logging, evaluation and checkpointing to its hooks. The workdir is
claimed and checked before anything is written (`workdir.py`); checkpoints are saved
asynchronously every train.checkpoint_every steps, at the end, and on SIGTERM / Ctrl-C (which
stop start-up at once); a non-finite loss stops the run without saving the broken state.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable, Sequence

import jax
import numpy as np

from switchjax import checkpoint, sharding
from switchjax.config import Config, format_config
from switchjax.data import Tokenizer, make_pretraining_data
from switchjax.metrics_writer import MetricsWriter
from switchjax.training import hooks as hooks_lib
from switchjax.training import workdir as workdir_lib
from switchjax.training.flops import peak_tflops, train_flops_per_example
from switchjax.training.plan import RunPlan, plan_run
from switchjax.training.state import TrainState, make_train_state, state_layout
from switchjax.training.step import compile_steps


def train(
  config: Config,
  workdir,
  *,
  devices: Sequence[jax.Device] | None = None,
  progress: bool = True,
  log: Callable[[str], None] = print,
  restart_data: bool = False,
  allow_converted_workdir: bool = False,
  make_data: Callable | None = None,
  evaluator: hooks_lib.Hook | None = None,
) -> hooks_lib.RunResult:
  """Trains `config` in `workdir` (resuming from its newest checkpoint) and returns a summary.

  Args:
    config: the run's Config (validated).
    workdir: checkpoints, metrics.jsonl, TensorBoard events and config.json go here.
    devices: devices of the mesh (default: all, over all processes).
    progress: show a progress bar (process 0).
    log: where process 0's messages go.
    restart_data: resume the model and optimizer but start the data again from its first
      example (what resuming with settings that change the data order, e.g. data.paths, needs).
    allow_converted_workdir: train in a directory holding a converted model (parameters only),
      starting from its parameters; otherwise such a directory is refused as a workdir.
    make_data: make_data(config, tokenizer) -> the input pipeline, where tokenizer is the
      workdir's own when resuming, else None (default: span-corruption pretraining data of
      config.data); fine-tuning passes its text-to-text data.
    evaluator: the evaluation hook (default: teacher-forced eval every train.eval_every).

  Raises workdir.WorkdirError (refused: nothing written), hooks.StartupInterrupted,
  NonFiniteLossError and checkpoint.WriteError (the last complete checkpoint is kept).
  """
  config.validate()
  options = {"restart_data": restart_data, "allow_converted": allow_converted_workdir}
  task = (make_data or pretraining_data, evaluator or hooks_lib.Evaluator())
  with hooks_lib.StopSignals() as signals:  # during start-up a signal stops at once
    run, state, hooks = start_run(
      config, pathlib.Path(workdir), devices, progress, log, signals, options, task
    )
    with jax.set_mesh(run.steps.mesh), sharding.axis_rules():
      return run_loop(run, state, hooks, signals)


def run_loop(run: hooks_lib.Run, state: TrainState, hooks, signals) -> hooks_lib.RunResult:
  """Steps until train.num_train_steps or a stop signal, calling the hooks."""
  try:
    for hook in hooks:
      hook.start(run, state)
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
  except BaseException:
    run.close(hooks, failing=True)
    raise
  run.close(hooks)
  run.result.step = state.step
  return run.result


def start_run(
  config: Config, workdir: pathlib.Path, devices, progress: bool, log, signals, options, task
):
  """Plans the run, claims and checks the workdir (nothing is written yet), prepares the data
  and the train state (restored or fresh), then writes the workdir's files and makes the steps
  and hooks: (Run, TrainState, hooks). A refused or interrupted start-up leaves the workdir as
  it was. `task` is (make_data, evaluator)."""
  is_main = jax.process_index() == 0
  say = log if is_main else (lambda _: None)
  plan = plan_run(config, devices)
  notes = []  # what the workdir's checks noticed, said after the config
  claim, config = workdir_lib.open_workdir(workdir, plan.config, say=notes.append, **options)
  try:
    say(f"Config {config.name}:\n{format_config(config)}")
    for line in plan.describe() + notes:
      say(line)
    make_data, evaluator = task
    run, state = prepare(dataclasses.replace(plan, config=config), claim, signals, say, make_data)
    return run, state, make_hooks(run, state, progress and is_main, evaluator)
  except BaseException:
    claim.release()
    raise


def prepare(plan: RunPlan, claim, signals, say, make_data) -> tuple[hooks_lib.Run, TrainState]:
  """The data, the train state and (once both are ready) the workdir's files."""
  config, tcfg = plan.config, plan.config.train
  layout = state_layout(config, plan.mesh)
  workdir_lib.check_free_space(claim, state_bytes(layout))
  spm = claim.tokenizer_path(config)
  say("Preparing the data (at first use a tokenizer is trained and the corpus tokenized).")
  data = make_data(config, Tokenizer(spm, config.data.extra_ids) if spm else None)
  say(f"Data: {data.describe()}.")
  say(f"Model: {layout.num_params:,} parameters.")
  store = checkpoint.CheckpointStore(claim.path, keep=tcfg.keep_checkpoints, create=False)
  state, meta = make_train_state(layout, config, store, report=say)
  if meta is not None and claim.restart_data:
    state.data_position = 0
  elif meta is not None:
    data.train.set_state(meta["data"])
  with signals.deferred():  # the workdir's files are written whole
    workdir_lib.commit(claim, config, data.tokenizer, store, state.step, say)
  signals.started()
  if meta is not None:
    again = "; the data starts again from its first example" if claim.restart_data else ""
    say(f"Resumed from {claim.path / checkpoint.CHECKPOINTS} step {state.step}{again}.")
  run = hooks_lib.Run(
    config,
    claim.path,
    compile_steps(layout, tcfg),
    data,
    store,
    MetricsWriter(claim.path, jax.process_index() == 0),
    say,
    hooks_lib.RunResult(state.step, {}, {}),
    hooks_lib.Stopwatch(),
    claim=claim,
  )
  return run, state


def state_bytes(layout) -> int:
  """Bytes of the parameters and optimizer state (about one checkpoint, uncompressed)."""
  leaves = jax.tree.leaves((layout.params, layout.opt_state))
  return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in leaves)


def pretraining_data(config: Config, tokenizer=None):
  """The span-corruption pretraining data of config.data, this host's rows of each batch."""
  data = make_pretraining_data(
    config.data,
    config.train.batch_size,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    model_vocab_size=config.model.vocab_size,
    tokenizer=tokenizer,
  )
  data.prefetch()  # batches made in a thread while the step runs
  return data


def make_hooks(
  run: hooks_lib.Run, state: TrainState, progress: bool, evaluator: hooks_lib.Hook
) -> list[hooks_lib.Hook]:
  """Progress bar (optional), metrics logger, evaluator, checkpointer, in that order."""
  tcfg = run.config.train
  bar = hooks_lib.ProgressBar(state.step, tcfg.num_train_steps) if progress else None
  flops = train_flops_per_example(run.config) * tcfg.batch_size
  peak = peak_tflops(run.steps.mesh.devices.flat[0], tcfg.peak_tflops_per_device)
  logger = hooks_lib.MetricsLogger(run, flops, peak, bar)
  return [h for h in (bar, logger, evaluator, hooks_lib.Checkpointer()) if h]
