"""Generation-based evaluation for fine-tuning: exact match of greedy outputs, and the best
checkpoint kept by it (or by the eval loss).

`ExactMatchEvaluator` is the fine-tuning run's evaluation hook: the teacher-forced eval loss and
accuracy of `Evaluator` every train.eval_every steps, plus exact match of greedily generated
targets every finetune.exact_match_every steps, at the start of a fresh run (the "before"
figure) and at the end. Whenever the chosen metric (finetune.keep_best) improves, the
parameters are saved to WORKDIR/best: a model directory (config.json, spiece.model,
checkpoints/) that generate.py and convert_hf.py read, with WORKDIR/best.json saying which step
and metrics it holds. `best` is a link to the directory best-<step>, which holds its own
best.json (WORKDIR/best.json links to it), swapped by one atomic rename: a kill at any moment
leaves a whole best and a record that agrees with it. A resumed run reads best.json, so "best"
spans the whole run; a resume that changes finetune.keep_best moves the old metric's best to
WORKDIR/best_by_<metric> and keeps the new metric's from then on.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil

import jax
import numpy as np

from switchjax import checkpoint
from switchjax.config import save_config
from switchjax.data.text_to_text import decode_generated
from switchjax.decoding import generate
from switchjax.model import SwitchTransformer
from switchjax.training import hooks as hooks_lib

BEST = "best"  # WORKDIR/best: the best parameters as a model directory
BEST_FILE = "best.json"  # WORKDIR/best.json: {"step", "metric", "value", "metrics"}


def normalize(text: str) -> str:
  """Whitespace-normalized text: what exact match compares."""
  return " ".join(text.split())


def greedy_texts(model, params, inputs, tokenizer, max_new_tokens, batch_size) -> list[str]:
  """The greedy output text (up to EOS) of each row of `inputs` [n, length], generated
  `batch_size` rows at a time (the last batch padded with empty rows: one compilation)."""
  texts = []
  for start in range(0, len(inputs), batch_size):
    rows = inputs[start : start + batch_size]
    padded = np.zeros((batch_size, inputs.shape[1]), np.int32)  # [batch, inputs_length]
    padded[: len(rows)] = rows
    outputs = np.asarray(generate(model, params, padded, max_new_tokens))  # [batch, new]
    texts += [decode_generated(tokenizer, output) for output in outputs[: len(rows)]]
  return texts


def exact_match(predictions: list[str], targets: list[str]) -> float:
  """Share of predictions equal to their target, whitespace-normalized."""
  return float(np.mean([normalize(p) == normalize(t) for p, t in zip(predictions, targets)]))


class ExactMatchEvaluator(hooks_lib.Evaluator):
  """Eval loss and accuracy every train.eval_every steps, exact match every
  finetune.exact_match_every steps (and at a fresh start and at the end), best kept."""

  def __init__(self):
    self.best: dict | None = None
    self.evaluated_at: int | None = None

  def start(self, run, state):
    if jax.process_index() == 0:
      repair_best(run.workdir)
    self.best = set_aside_other_metric(run.workdir, run.config.finetune.keep_best, run.say)
    if state.step == 0:  # the "before" figures
      run.stopwatch.pause(state)
      run.result.eval_metrics = self.evaluate(run, state, exact=True)
      run.stopwatch.resume()

  def after_step(self, run, state, metrics):
    every, exact_every = run.config.train.eval_every, run.config.finetune.exact_match_every
    exact = bool(exact_every) and state.step % exact_every == 0
    if exact or (every and state.step % every == 0):
      run.stopwatch.pause(state)
      run.result.eval_metrics = self.evaluate(run, state, exact)
      run.stopwatch.resume()

  def end(self, run, state):
    if run.result.stopped_by is None and self.evaluated_at != state.step:
      run.result.eval_metrics = self.evaluate(run, state, exact=True)

  def evaluate(self, run, state, exact: bool = False) -> dict[str, float]:
    metrics = super().evaluate(run, state)
    self.evaluated_at = state.step
    if exact:
      cfg = run.config
      inputs, targets = run.data.eval_inputs(cfg.finetune.exact_match_examples)
      model, batch = SwitchTransformer(cfg.model), cfg.train.batch_size
      predictions = greedy_texts(
        model, state.params, inputs, run.data.tokenizer, cfg.data.targets_length, batch
      )
      score = exact_match(predictions, targets)
      metrics["eval/exact_match"] = score
      run.writer.write(state.step, {"eval/exact_match": score})
      run.say(f"step {state.step}: exact match {score:.3f} ({len(targets)} eval examples)")
    self.keep_best(run, state, metrics)
    return metrics

  def keep_best(self, run, state, metrics: dict[str, float]) -> None:
    """Saves the parameters to WORKDIR/best if the chosen metric improved."""
    name = run.config.finetune.keep_best
    key = f"eval/{name}"
    if key not in metrics or state.step == 0:
      return
    value, best = metrics[key], self.best
    if best is None or (value > best["value"] if name == "exact_match" else value < best["value"]):
      self.best = save_best(run, state, name, value, metrics)
      run.say(f"step {state.step}: best {name} so far ({value:.4f}); saved to {run.workdir / BEST}")


def read_best(workdir: pathlib.Path) -> dict | None:
  """best.json of a workdir (None before any best was saved)."""
  path = pathlib.Path(workdir) / BEST_FILE
  return json.loads(path.read_text()) if path.is_file() else None


def repair_best(workdir: pathlib.Path) -> None:
  """Puts back the best checkpoint of an older switchjax's workdir killed between its renames
  (best moved to best.old, the new one not yet in place), then removes stale best-* copies."""
  best, old = workdir / BEST, workdir / f"{BEST}.old"
  if not best.exists() and not best.is_symlink() and old.is_dir():
    old.rename(best)
  if best.is_symlink():
    remove_stale_bests(workdir)


def set_aside_other_metric(workdir: pathlib.Path, name: str, say) -> dict | None:
  """The best record when it was kept by `name` (finetune.keep_best); a best kept by another
  metric (keep_best changed on resume) is never compared with the new one: it moves, whole, to
  WORKDIR/best_by_<metric> (process 0), and the new metric's best starts afresh."""
  best = read_best(workdir)
  if best is None or best.get("metric") == name:
    return best
  if jax.process_index() == 0:
    kept = workdir / f"{BEST}_by_{best['metric']}"
    shutil.rmtree(kept, ignore_errors=True)
    target = workdir / BEST
    source = target.resolve() if target.is_symlink() else target
    if source.is_dir():
      source.rename(kept)
    (kept / BEST_FILE).write_text(json.dumps(best, indent=1))
    for link in (workdir / BEST_FILE, target):
      if link.is_symlink() or link.is_file():
        link.unlink()
    say(
      f"finetune.keep_best is now {name} (was {best['metric']}): the best checkpoint by "
      f"{best['metric']} (step {best['step']}) moved to {kept}; {workdir / BEST} keeps the best "
      f"by {name} from now on."
    )
  return None


def _swap_name(workdir: pathlib.Path, step: int) -> pathlib.Path:
  """The directory a new best is written to: best-<step>, or best-<step>-2 when best points at
  best-<step> already (a step evaluated again after a resume). Every process computes it from
  the `best` link, read before the (synchronised) save."""
  link = workdir / BEST
  current = os.readlink(link) if link.is_symlink() else None
  return workdir / next(n for n in (f"{BEST}-{step}", f"{BEST}-{step}-2") if n != current)


def save_best(run, state, name: str, value: float, metrics: dict) -> dict:
  """Writes the parameters to a new directory best-<step> (a model directory with its own
  best.json), then points the link WORKDIR/best at it with one atomic rename; WORKDIR/best.json
  is a link to best/best.json. A kill at any moment leaves `best` whole (the old or the new
  one) and best.json naming the step it holds. Its config names no train.init_from and no
  data.spm_path, so that `--config=WORKDIR/best` starts from these parameters and tokenizer."""
  workdir, main = run.workdir, jax.process_index() == 0
  staging = _swap_name(workdir, state.step)
  if main:
    shutil.rmtree(staging, ignore_errors=True)
  store = checkpoint.CheckpointStore(staging, keep=1, async_save=False)
  store.save(state.step, state.params, meta={"metric": name, "value": value})
  store.close()
  record = {"step": state.step, "metric": name, "value": value, "metrics": metrics}
  if not main:
    return record
  train = dataclasses.replace(run.config.train, init_from=None)
  data = dataclasses.replace(run.config.data, spm_path=None)  # its own spiece.model travels
  config = dataclasses.replace(run.config, train=train, data=data)
  save_config(config, staging / checkpoint.CONFIG_FILE)
  shutil.copyfile(pathlib.Path(run.data.tokenizer.spm_path), staging / "spiece.model")
  (staging / BEST_FILE).write_text(json.dumps(record, indent=1))
  _point(workdir / BEST, staging.name)
  _point(workdir / BEST_FILE, f"{BEST}/{BEST_FILE}")
  remove_stale_bests(workdir)
  return record


def _point(link: pathlib.Path, target: str) -> None:
  """Makes `link` a relative symlink to `target` atomically (a new link renamed over it). A
  real directory or file found there (a workdir of an older switchjax) is moved aside first."""
  if link.is_symlink() and os.readlink(link) == target:
    return
  if link.exists() and not link.is_symlink():
    aside = link.with_name(f"{BEST}-{link.name}-older")
    if aside.exists():
      shutil.rmtree(aside, ignore_errors=True) if aside.is_dir() else aside.unlink()
    link.rename(aside)
  tmp = link.with_name(f".{link.name}.link")
  if tmp.is_symlink() or tmp.exists():
    tmp.unlink()
  os.symlink(target, tmp)
  tmp.replace(link)


def remove_stale_bests(workdir: pathlib.Path) -> None:
  """Removes the best-* directories `best` no longer points at (replaced ones, a save a kill
  interrupted, the staging directories of older switchjax)."""
  link = workdir / BEST
  current = os.readlink(link) if link.is_symlink() else None
  for path in workdir.glob(f"{BEST}[-.]*"):
    if path.name != current and path.name != BEST_FILE and not path.name.startswith("."):
      shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink()
