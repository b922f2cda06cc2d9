"""Supervised fine-tuning: the Switch paper's recipe on text-to-text pairs, around the same
train state, loss and loop as pretraining.

`finetune_config` turns a checkpoint or preset into a fine-tuning run (dropout 0.1, expert
dropout 0.4, a constant learning rate; evaluation at the model's eval capacity factor);
`finetune_data` reads the pairs (or makes the bundled task) with the model's own tokenizer;
`ExactMatchEvaluator` adds generation-based exact match to the teacher-forced eval loss and
accuracy, and keeps the best checkpoint in WORKDIR/best (a model directory that generate.py,
convert_hf.py and further fine-tuning read). `finetune(config, workdir)` runs it all.
"""

from __future__ import annotations

import dataclasses
import pathlib

import jax

from switchjax.config import Config, FinetuneConfig, apply_overrides
from switchjax.data import text_to_text
from switchjax.data.corpus import get_tokenizer
from switchjax.data.text_to_text import make_supervised_data
from switchjax.data.tokenizer import Tokenizer
from switchjax.training import hooks as hooks_lib
from switchjax.training.exact_match import ExactMatchEvaluator
from switchjax.training.loop import train

# The Switch paper's fine-tuning recipe (Fedus et al. 2022, section 4.1: dropout 0.1, expert
# dropout 0.4) with T5X's fine-tuning optimizer (Adafactor at a constant 1e-3).
RECIPE = (
  "model.dropout_rate=0.1",
  "model.expert_dropout_rate=0.4",
  "train.schedule=constant",
  "train.learning_rate=0.001",
)


def finetune_config(
  base: Config, train_file=None, eval_file=None, overrides=(), task: str | None = None
) -> Config:
  """`base` (a checkpoint's config, with train.init_from set, or a preset) with the fine-tuning
  recipe, the data files, then the user's overrides (which win)."""
  files = {"train_file": _path_or_none(train_file), "eval_file": _path_or_none(eval_file)}
  finetune = dataclasses.replace(base.finetune or FinetuneConfig(), **files)
  if task:
    finetune = dataclasses.replace(finetune, task=task)
  config = apply_overrides(dataclasses.replace(base, finetune=finetune), RECIPE)
  return apply_overrides(config, overrides).validate()


def _path_or_none(path) -> str | None:
  return None if path is None else str(pathlib.Path(path).resolve())


def finetune_tokenizer(config: Config):
  """The model's own tokenizer: spiece.model of train.init_from, else data.spm_path, else the
  one trained on data.paths (what a from-scratch pretraining run of the preset uses)."""
  init = config.train.init_from
  if init and (pathlib.Path(init) / "spiece.model").is_file():
    path = pathlib.Path(init) / "spiece.model"
    return Tokenizer(path, extra_ids=config.data.extra_ids, setting="train.init_from")
  return get_tokenizer(config.data)


def finetune_pairs(cfg: FinetuneConfig) -> tuple[list, list]:
  """(train pairs, eval pairs): the two files, or the bundled task."""
  if cfg.train_file is None:
    return text_to_text.BUNDLED_TASKS[cfg.task]()
  return tuple(
    text_to_text.read_pairs(path, cfg.input_field, cfg.target_field)
    for path in (cfg.train_file, cfg.eval_file)
  )


def finetune_data(config: Config, tokenizer=None):
  """The run's SupervisedData: this host's rows of each batch, tokenized by `tokenizer` (a
  resumed run's own) or the model's (which must fit in model.vocab_size)."""
  tokenizer = tokenizer or finetune_tokenizer(config)
  if tokenizer.vocab_size > config.model.vocab_size:
    raise ValueError(
      f"the tokenizer ({tokenizer.spm_path}) has {tokenizer.vocab_size} ids but "
      f"model.vocab_size is {config.model.vocab_size}; use the model's own spiece.model."
    )
  train_pairs, eval_pairs = finetune_pairs(config.finetune)
  return make_supervised_data(
    train_pairs,
    eval_pairs,
    tokenizer,
    config.data,
    config.train.batch_size,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )


def finetune(config: Config, workdir, **kwargs) -> hooks_lib.RunResult:
  """Fine-tunes `config` (made by finetune_config) in `workdir`, resuming as pretraining does;
  keyword arguments go to `training.train`."""
  if config.finetune is None:
    raise ValueError("config.finetune is not set: make the config with finetune_config().")
  return train(config, workdir, make_data=finetune_data, evaluator=ExactMatchEvaluator(), **kwargs)
