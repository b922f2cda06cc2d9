"""Training in small parts (t5x's trainer and MaxText are the models):

state.py      TrainState; its layout on a mesh; made there fresh or restored
objective.py  loss_fn: the one loss of training, evaluation, fine-tuning and benchmarks
step.py       gradient accumulation, the optimizer update, the compiled train/eval steps
plan.py       the mesh, microbatches and routing groups of a run
hooks.py      progress, logging, evaluation, checkpointing and stop signals around the loop
workdir.py    the workdir: one run at a time (a lock), one model, checks before any write
resume_rules.py  what a change of each setting means on resume (the README's resume table)
loop.py       train(): start a run, then step
flops.py      model FLOPs and device peaks (MFU)
"""

from switchjax.training.flops import peak_tflops, train_flops_per_example
from switchjax.training.hooks import NonFiniteLossError, RunResult, StartupInterrupted
from switchjax.training.loop import train
from switchjax.training.objective import loss_fn
from switchjax.training.plan import RunPlan, plan_run, resolve_microbatches, routing_summary
from switchjax.training.state import StateLayout, TrainState, make_train_state, state_layout
from switchjax.training.step import (
  Steps,
  abstract_batch,
  accumulate_gradients,
  apply_update,
  compile_steps,
  lower_eval_step,
  lower_train_step,
  make_eval_step,
  make_train_step,
)
from switchjax.training.workdir import WorkdirError
