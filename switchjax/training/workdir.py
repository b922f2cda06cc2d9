"""A run's workdir: owned by one run at a time, holding one model, changed only once every check
has passed.

`open_workdir` is the first thing a run does to its workdir. Process 0 makes sure the directory
can be written and locks it: an exclusive `flock` on the directory, held for the run's lifetime
and released by the kernel when the process ends however it ends (kill -9 included), so a lock
is never stale. Then every process reads what is there (config.json, the checkpoints,
spiece.model) and compares the requested config with it by `resume_rules.RULES` (the README's
resume table): changes that keep the model and the data order are allowed, noted and recorded
in config_history.jsonl; changes of the data order need `restart_data` (--restart_data);
changes of the model, its optimizer or its tokenizer are refused. A directory holding a
converted model (parameters only) is a read-only input unless `allow_converted`. A run started
from train.init_from gets the same checks against that checkpoint's model and tokenizer. Every
refusal is a WorkdirError, one line naming the setting and the fix, raised before a byte is
written: the run's own files are written by `Workdir.commit`, once the data and the train state
are ready.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import json
import os
import pathlib
import shutil
import tempfile

import jax
import numpy as np

from switchjax import checkpoint
from switchjax import config as config_lib
from switchjax.checkpoint.output_dir import lock_holder
from switchjax.config import Config
from switchjax.data import cache, corpus
from switchjax.errors import one_line
from switchjax.training.resume_rules import (
  DATA,
  FREE,
  MODEL,
  TOKENIZER,
  Change,
  changes,
  listed,
)

HISTORY = "config_history.jsonl"
SPM = "spiece.model"
METRICS = "metrics.jsonl"
SUPERSEDED = "metrics_superseded.jsonl"
INPUTS = "inputs.json"  # sha256 of each input file the run reads, checked on resume


class WorkdirError(ValueError):
  """A run refused before it wrote anything: one line naming the setting and the fix."""


# --------------------------------------------------------------------------------------------
# The lock.


class WorkdirLock:
  """An exclusive flock on the workdir itself (no lock file: a refused run leaves no byte)."""

  def __init__(self, path: pathlib.Path):
    self.fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
      fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(self.fd)
      raise WorkdirError(
        f"{path} is in use by another run{_holder(path)}: one run at a time may write a "
        "workdir. Wait for it to finish (or stop it), or choose another --workdir."
      ) from None

  def release(self) -> None:
    if self.fd is not None:
      os.close(self.fd)
      self.fd = None


def _holder(path: pathlib.Path) -> str:
  """' (process 1234)' when /proc/locks names the holder of the directory's lock."""
  return lock_holder(path)


# --------------------------------------------------------------------------------------------
# Opening a workdir.


@dataclasses.dataclass
class Workdir:
  """A workdir claimed by this run.

  Attributes:
    path: the directory (resolved).
    lock: process 0's lock (None on the other processes).
    created: this run created the directory (removed again if the run stops before writing).
    saved: the config.json found there (None: a new workdir).
    resuming: the workdir holds a training checkpoint, which the run resumes.
    changes: settings that differ from `saved` (all allowed, or the run was refused).
    restart_data: the data starts again from its first example.
  """

  path: pathlib.Path
  lock: WorkdirLock | None
  created: bool
  saved: Config | None = None
  resuming: bool = False
  changes: list[Change] = dataclasses.field(default_factory=list)
  restart_data: bool = False
  committed: bool = False

  def tokenizer_path(self, config: Config) -> str | None:
    """The workdir's spiece.model when resuming a run whose config names no tokenizer file:
    the model's tokenizer travels with it (never retrained on changed data)."""
    spm = self.path / SPM
    return str(spm) if self.resuming and not config.data.spm_path and spm.is_file() else None

  def release(self) -> None:
    """Unlocks; a directory this run created and left empty is removed."""
    if self.lock is not None:
      self.lock.release()
      self.lock = None
      if self.created and not self.committed:
        with contextlib.suppress(OSError):  # not empty: stays
          self.path.rmdir()


def open_workdir(
  path, config: Config, *, restart_data: bool = False, allow_converted: bool = False, say=print
) -> tuple[Workdir, Config]:
  """Claims `path` for a run of `config` and checks it (nothing is written but the directory
  itself when it is new). Returns the Workdir and the config to run (train.init_from and
  data.spm_path filled in when they come from a checkpoint). Raises WorkdirError on every
  process when any process refuses."""
  path = pathlib.Path(path)
  workdir, error = None, None
  try:
    lock, created = _claim(path) if jax.process_index() == 0 else (None, False)
    workdir = Workdir(path.resolve(), lock, created, restart_data=restart_data)
    config = _inspect(workdir, config, allow_converted, say)
  except WorkdirError as e:
    error = e
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    failed = multihost_utils.process_allgather(np.array(error is not None))
    if error is None and np.any(failed):
      error = WorkdirError(f"another process of this run refused {path}; see its error.")
  if error is not None:
    if workdir is not None:
      workdir.release()
    raise error
  return workdir, config


def _claim(path: pathlib.Path) -> tuple[WorkdirLock, bool]:
  """Creates the directory if needed, checks that it can be written, and locks it."""
  if path.exists() and not path.is_dir():
    raise WorkdirError(f"--workdir {path} is a file, not a directory; choose another --workdir.")
  created = not path.exists()
  try:
    path.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=path):  # O_TMPFILE: no name, nothing left behind
      pass
  except OSError as e:
    if created:
      with contextlib.suppress(OSError):  # not empty: stays
        path.rmdir()
    verb = "create" if created else "write to"
    raise WorkdirError(
      f"cannot {verb} the workdir {path} ({e.strerror or e}); make it writable or choose "
      "another --workdir."
    ) from None
  return WorkdirLock(path), created


def _inspect(workdir: Workdir, config: Config, allow_converted: bool, say) -> Config:
  """Reads what the workdir holds and checks the config against it (see the module doc)."""
  path = workdir.path
  store = checkpoint.CheckpointStore(path, async_save=False, create=False)
  steps, training = store.steps(), store.training_steps()
  store.manager.close()
  config_file = path / checkpoint.CONFIG_FILE
  if config_file.is_file():
    workdir.saved = _read_saved(config_file)
  elif not steps and (names := sorted(p.name for p in path.iterdir() if p.name[0] != ".")):
    raise WorkdirError(
      f"{path} is not empty and holds no switchjax run (no config.json; it has "
      f"{', '.join(names[:5])}{', ...' if len(names) > 5 else ''}): choose a new or empty "
      "--workdir."
    )
  if steps and not training:
    config = _converted(workdir, config, allow_converted, say)
  workdir.resuming = bool(training)
  if workdir.resuming:
    _check_run_files(workdir, training[-1])
  if workdir.resuming and workdir.saved is not None:
    _check_resume(workdir, config, say)
  elif not workdir.resuming and config.train.init_from:
    config = check_init_from(config, say)
  if workdir.restart_data and not workdir.resuming:
    say("--restart_data: nothing to restart, this run starts afresh.")
  return config


def _check_run_files(workdir: Workdir, step: int) -> None:
  """A run's checkpoints are resumed only with the files that say what they are: without
  config.json the resume rules could not be applied (a routing change would pass), without
  spiece.model another tokenizer could come in. Refused, naming the file and how to get it
  back (config_history.jsonl holds every config the run started with)."""
  path = workdir.path
  history = path / HISTORY
  if workdir.saved is None:
    fix = (
      f'restore it from the last record of {history} (its "config")'
      if history.is_file()
      else "restore it from a copy"
    )
    raise WorkdirError(
      f"{path} holds a training run (checkpoint step {step}) but no config.json, so its "
      f"settings cannot be checked: {fix}, or start a new run in a new --workdir (--set "
      f"train.init_from={path} starts it from these parameters)."
    )
  if not (path / SPM).is_file():
    raise WorkdirError(
      f"{path} holds a training run (checkpoint step {step}) but no {SPM}, the tokenizer its "
      f"model was trained with: put that file back in {path} (a copy, or the data.spm_path its "
      "config.json names), or start a new run in a new --workdir."
    )


def _read_saved(config_file: pathlib.Path) -> Config:
  try:
    return config_lib.read_config(config_file)
  except (ValueError, TypeError, KeyError, AttributeError, UnicodeDecodeError) as e:
    raise WorkdirError(
      f"{config_file} is not a switchjax config ({one_line(e)[:120]}), so "
      f"{config_file.parent} is not a switchjax workdir (a Hugging Face checkpoint?): choose a "
      "new or empty --workdir."
    ) from None


def _converted(workdir: Workdir, config: Config, allow: bool, say) -> Config:
  """A converted model (parameters only) is an input: trained in only when the user says so,
  starting from its parameters (kept as they are) with a new optimizer state."""
  path = workdir.path
  if not allow:
    raise WorkdirError(
      f"{path} holds a converted model (parameters only, as convert_hf.py and save_model "
      f"write), a read-only input: start a run from it in a new workdir with --config={path} "
      f"--workdir=NEW (or --set train.init_from={path}), or pass --allow_converted_workdir to "
      "train in it."
    )
  say(f"Training in the converted model {path} (--allow_converted_workdir), from its parameters.")
  return dataclasses.replace(config, train=dataclasses.replace(config.train, init_from=str(path)))


def _check_resume(workdir: Workdir, config: Config, say) -> None:
  """Refuses changes of the model, the tokenizer and (without restart_data) the data order;
  notes the others."""
  path, found = workdir.path, changes(workdir.saved, config)
  by_rule = {rule: [c for c in found if c.rule == rule] for rule in (MODEL, TOKENIZER, DATA)}
  if by_rule[MODEL]:
    raise WorkdirError(
      f"{path} holds a run of another model or optimizer: {listed(by_rule[MODEL])} in its "
      f"config.json. Resume "
      f"it with its own settings (--config={path / checkpoint.CONFIG_FILE}), or start a new run "
      f"in a new --workdir (--set train.init_from={path} starts it from these parameters)."
    )
  _check_tokenizer_file(config, path / SPM, f"the model in {path} was trained with")
  if by_rule[TOKENIZER]:
    raise WorkdirError(
      f"{path} holds a model trained with another tokenizer: {listed(by_rule[TOKENIZER])} in "
      "its config.json; "
      f"its piece and sentinel ids cannot change. Keep the workdir's settings, or start a new "
      "run in a new --workdir."
    )
  if by_rule[DATA] and not workdir.restart_data:
    raise WorkdirError(
      f"{listed(by_rule[DATA])} in {path / checkpoint.CONFIG_FILE}: this would change the "
      "order of its training data. Pass --restart_data to continue its model on this data from "
      "its first example, keep the workdir's setting to resume where it stopped, or use a new "
      "--workdir."
    )
  if not workdir.restart_data:
    _check_inputs(path, config)
  workdir.changes = found
  noted = [c for c in found if c.field != "name"]
  if noted:
    say(
      f"Resuming {path} with changed settings (recorded in {HISTORY}): "
      + ", ".join(f"{c.field} {c.old!r} -> {c.new!r}" for c in noted)
      + "."
    )


def _input_files(config: Config) -> list[pathlib.PurePath]:
  """The files a run reads its examples from: data.paths (pretraining), the fine-tuning files."""
  files = []
  with contextlib.suppress(ValueError):  # unreadable paths: the data pipeline says so
    files += corpus.resolve_paths(config.data.paths) if config.data.paths else []
  finetune = config.finetune
  for name in (finetune.train_file, finetune.eval_file) if finetune else ():
    if name and pathlib.Path(name).is_file():
      files.append(pathlib.Path(name))
  return files


def input_digests(config: Config) -> dict[str, str]:
  """{absolute path or URL: sha256 of its content} of the run's input files."""
  return {path: digest for path, _, digest in cache.file_stats(_input_files(config))}


def _check_inputs(path: pathlib.Path, config: Config) -> None:
  """Refuses a resume whose input files changed content since the run recorded them (a
  corpus or a --train file rewritten in place, whatever its size, example count and dates)."""
  record = path / INPUTS
  try:
    saved = json.loads(record.read_text()) if record.is_file() else {}
  except (OSError, ValueError):
    saved = {}
  for name, digest in input_digests(config).items():
    if name in saved and saved[name] != digest:
      raise WorkdirError(
        f"{name} changed since the run in {path} read it (its content differs, whatever its "
        "size and dates): resuming would continue on other examples. Put the original back, "
        "pass --restart_data to continue this model on the new content from its first "
        "example, or use a new --workdir."
      )


def check_init_from(config: Config, say=print) -> Config:
  """A new run started from train.init_from keeps that checkpoint's model settings (shapes,
  activations, routing and capacity mode) and tokenizer (sentinel count, spiece.model, taken
  from the checkpoint when data.spm_path is unset); anything else is refused."""
  source = pathlib.Path(config.train.init_from)
  found = changes(checkpoint.read_checkpoint_config(source), config, starting_from=True)
  refused = [c for c in found if c.rule != FREE]
  if refused:
    raise WorkdirError(
      f"train.init_from={source} holds a model with other settings: {listed(refused)} in its "
      "config.json. "
      f"Start from its own settings with --config={source}, or --set each to the "
      "checkpoint's value."
    )
  spm = source / SPM
  if spm.is_file() and not config.data.spm_path:
    say(f"Tokenizer: {spm}, the one the parameters of train.init_from were trained with.")
    data = dataclasses.replace(config.data, spm_path=str(spm.resolve()))
    return dataclasses.replace(config, data=data)
  _check_tokenizer_file(config, spm, f"the parameters of train.init_from={source} belong to")
  return config


def _check_tokenizer_file(config: Config, reference: pathlib.Path, whose: str) -> None:
  """Refuses a data.spm_path whose bytes differ from `reference` (the model's own)."""
  given = config.data.spm_path
  if not given or not reference.is_file():
    return
  given_path = pathlib.Path(given).expanduser()
  if given_path.is_file() and given_path.read_bytes() != reference.read_bytes():
    raise WorkdirError(
      f"data.spm_path={given} is another tokenizer than {reference}, which {whose}: its piece "
      f"and sentinel ids would change. Leave data.spm_path unset (or point it at {reference}), "
      "or start a new run in a new --workdir."
    )


# --------------------------------------------------------------------------------------------
# Writing, once every check has passed.


def commit(workdir: Workdir, config: Config, tokenizer, store, step: int, say=print) -> None:
  """Writes the run's own files (process 0): broken steps set aside, unfinished saves of dead
  runs removed, config.json, spiece.model, a config_history.jsonl record, and metrics.jsonl
  cut back to the step the run starts from (the later records move to
  metrics_superseded.jsonl: those steps are trained again)."""
  store.set_aside_broken(say)  # every process: synchronised
  if jax.process_index() == 0:
    path = workdir.path
    try:
      _remove_unfinished_saves(path / checkpoint.CHECKPOINTS, say)
      _append_history(workdir, config, step)
      _write_atomically(path / checkpoint.CONFIG_FILE, _config_text(config))
      spm = pathlib.Path(tokenizer.spm_path)
      if spm.resolve() != (path / SPM).resolve():
        _write_atomically(path / SPM, spm.read_bytes())
      _supersede_metrics(path, step)
      _write_atomically(path / INPUTS, json.dumps(input_digests(config), indent=1) + "\n")
      (path / checkpoint.CHECKPOINTS).mkdir(exist_ok=True)
    except OSError as e:
      raise checkpoint.WriteError(
        f"cannot write {getattr(e, 'filename', None) or path} ({e.strerror or e}): free space "
        f"on the disk of {path} (or make it writable) and run the same command again."
      ) from None
  workdir.committed = True


def _config_text(config: Config) -> str:
  return json.dumps(config_lib.to_dict(config), indent=2) + "\n"


def _write_atomically(path: pathlib.Path, data) -> None:
  tmp = path.with_name(f".{path.name}.tmp")
  if isinstance(data, str):
    tmp.write_text(data)
  else:
    tmp.write_bytes(data)
  tmp.replace(path)


def _now(seconds: float | None = None) -> str:
  utc = datetime.UTC
  moment = (
    datetime.datetime.now(utc) if seconds is None else datetime.datetime.fromtimestamp(seconds, utc)
  )
  return moment.isoformat(timespec="seconds")


def _append_history(workdir: Workdir, config: Config, step: int) -> None:
  """One record per run started: the time, the step, the changes and the whole config; the
  first record keeps a config.json found without a history (a converted model, an older run)."""
  history = workdir.path / HISTORY
  records = []
  if workdir.saved is not None and not history.exists():
    mtime = (workdir.path / checkpoint.CONFIG_FILE).stat().st_mtime
    records.append(
      {"time": _now(mtime), "found": True, "config": config_lib.to_dict(workdir.saved)}
    )
  records.append(
    {
      "time": _now(),
      "step": step,
      "resumed": workdir.resuming,
      "restart_data": workdir.restart_data and workdir.resuming,
      "changes": {c.field: [c.old, c.new] for c in workdir.changes},
      "config": config_lib.to_dict(config),
    }
  )
  with open(history, "a") as f:
    f.write("".join(json.dumps(r) + "\n" for r in records))


def _remove_unfinished_saves(directory: pathlib.Path, say) -> None:
  """Removes the temporary directories of saves a killed run left (the lock says no run is
  writing them now)."""
  for tmp in sorted(directory.glob("*.orbax-checkpoint-tmp*")) if directory.is_dir() else ():
    shutil.rmtree(tmp, ignore_errors=True)
    say(f"Removed {tmp}, the unfinished save of an interrupted run.")


def _supersede_metrics(path: pathlib.Path, step: int) -> None:
  """Keeps in metrics.jsonl the records of steps up to `step`; later ones (and a line cut by a
  kill) move to metrics_superseded.jsonl."""
  metrics = path / METRICS
  if not metrics.is_file():
    return
  keep, later = [], []
  for line in metrics.read_text().splitlines(keepends=True):
    try:
      current = json.loads(line)["step"] <= step and line.endswith("\n")
    except (ValueError, KeyError, TypeError):
      current = False
    (keep if current else later).append(line)
  if later:
    with open(path / SUPERSEDED, "a") as f:
      f.write("".join(x if x.endswith("\n") else x + "\n" for x in later))
    _write_atomically(metrics, "".join(keep))


def check_free_space(workdir: Workdir, checkpoint_bytes: int) -> None:
  """Refuses a workdir whose disk cannot hold one checkpoint of the run."""
  if workdir.lock is None:
    return
  free = shutil.disk_usage(workdir.path).free
  if free < checkpoint_bytes:
    raise WorkdirError(
      f"the disk of {workdir.path} has {free / 2**20:,.1f} MiB free, but one checkpoint of "
      f"this run takes {checkpoint_bytes / 2**20:,.1f} MiB: free space or choose another "
      "--workdir."
    )
