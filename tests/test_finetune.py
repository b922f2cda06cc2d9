"""Supervised fine-tuning: reading pairs (and refusing bad ones), the bundled task, the recipe,
exact match against known predictions, the best checkpoint, and exact resume."""

import json
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from switchjax import checkpoint, model_loading
from switchjax.config import FINETUNE_TASKS, load_config
from switchjax.data import text_to_text
from switchjax.data.text_to_text import read_pairs, write_pairs
from switchjax.data.tokenizer import EOS_ID
from switchjax.model import SwitchTransformer
from switchjax.training import train
from switchjax.training.exact_match import BEST, BEST_FILE, exact_match, greedy_texts
from switchjax.training.finetune import finetune, finetune_config, finetune_data
from switchjax.training.workdir import WorkdirError

ROOT = pathlib.Path(__file__).resolve().parents[1]
QUIET = {"progress": False, "log": lambda _: None}


def write(path, text):
  path = pathlib.Path(path)
  path.write_text(text, encoding="utf-8")
  return path


# --------------------------------------------------------------------------------------------
# Reading pairs.


def test_read_pairs_tsv_and_jsonl(tmp_path):
  tsv = write(tmp_path / "a.tsv", "input\ttarget\nHello <extra_id_0>.\tworld\n\nsecond\tline 2\n")
  assert read_pairs(tsv) == [("Hello <extra_id_0>.", "world"), ("second", "line 2")]
  jsonl = write(tmp_path / "a.jsonl", '{"q": "2+2?", "a": "4", "id": 7}\n{"q": "x", "a": "y"}\n')
  assert read_pairs(jsonl, "q", "a") == [("2+2?", "4"), ("x", "y")]


@pytest.mark.parametrize(
  "name, text, fields, message",
  [
    ("a.csv", "a,b\n", (), "a.csv: use a .tsv (input<TAB>target) or .jsonl file of examples."),
    (
      "a.tsv",
      "x\ty\none column\n",
      (),
      "a.tsv:2: expected 2 tab-separated columns (input, target), found 1; escape tabs inside "
      "the text or use a .jsonl file.",
    ),
    ("a.tsv", "x\t \n", (), "a.tsv:1: the target is empty; every example needs a target."),
    ("a.tsv", "\n\n", (), "a.tsv holds no examples."),
    (
      "a.jsonl",
      '{"input": "x", "answer": "y"}\n',
      (),
      "a.jsonl:1: no text field 'target' (fields: input, answer); set finetune.input_field / "
      "finetune.target_field.",
    ),
    ("a.jsonl", "{oops\n", (), "a.jsonl:1: not a JSON object (Expecting property name"),
    (
      "a.jsonl",
      '["x", "y"]\n',
      (),
      "a.jsonl:1: expected a JSON object with 'input' and 'target'.",
    ),
  ],
)
def test_read_pairs_refuses_bad_files(tmp_path, name, text, fields, message):
  path = write(tmp_path / name, text)
  with pytest.raises(ValueError) as e:
    read_pairs(path, *fields)
  assert str(e.value).startswith(f"{tmp_path}/{message}")


def test_bundled_task_is_deterministic_and_disjoint():
  assert tuple(text_to_text.BUNDLED_TASKS) == FINETUNE_TASKS
  train_pairs, eval_pairs = text_to_text.fill_in_the_blank(num_train=300, num_eval=50)
  assert (train_pairs, eval_pairs) == text_to_text.fill_in_the_blank(num_train=300, num_eval=50)
  assert len(train_pairs) == 300 and len(eval_pairs) == 50
  assert not {s for s, _ in train_pairs} & {s for s, _ in eval_pairs}
  for source, target in train_pairs + eval_pairs:
    assert source.count("<extra_id_0>") == 1 and target.isalpha() and 4 <= len(target) <= 12
    assert 6 <= len(source.split()) <= 24


# --------------------------------------------------------------------------------------------
# Config and data.


def test_recipe_then_overrides():
  config = finetune_config(load_config("tiny"), overrides=["train.learning_rate=0.0003"])
  assert (config.model.dropout_rate, config.model.expert_dropout) == (0.1, 0.4)
  assert (config.train.schedule, config.train.learning_rate) == ("constant", 0.0003)
  assert config.finetune.task == "fill_in_the_blank" and config.finetune.train_file is None


def test_files_go_together(tmp_path):
  with pytest.raises(ValueError, match=r"finetune.train_file and finetune.eval_file go together"):
    finetune_config(load_config("tiny"), train_file=tmp_path / "a.tsv")
  with pytest.raises(ValueError, match=r"finetune.keep_best='bleu'; use 'exact_match' or 'loss'"):
    finetune_config(load_config("tiny"), overrides=["finetune.keep_best=bleu"])


def test_batches_hold_the_tokenized_pairs(tmp_path):
  pairs = [(f"sentence number {i} <extra_id_0>.", f"word{i}") for i in range(10)]
  config = finetune_config(
    load_config("tiny", ["train.batch_size=4"]),
    write_pairs(pairs[:8], tmp_path / "train.tsv"),
    write_pairs(pairs[8:], tmp_path / "eval.tsv"),
  )
  data = finetune_data(config)
  tok = data.tokenizer
  encoded = [(tok.encode(s, add_eos=True), tok.encode(t, add_eos=True)) for s, t in pairs[:8]]
  batch = next(data.train)
  for row in range(4):
    source, target = (batch[k][row] for k in ("encoder_input_tokens", "decoder_target_tokens"))
    assert (list(source[source > 0]), list(target[target > 0])) in encoded
    assert target[list(target).index(EOS_ID) + 1 :].sum() == 0
    np.testing.assert_array_equal(batch["decoder_input_tokens"][row, 1:], target[:-1])
  inputs, targets = data.eval_inputs(5)
  assert targets == ["word8", "word9"] and inputs.shape == (2, config.data.inputs_length)
  assert list(inputs[0][inputs[0] > 0]) == tok.encode(pairs[8][0], add_eos=True)


def test_too_few_examples_and_a_foreign_tokenizer(tmp_path):
  pairs = [("a b c", "d")] * 3
  files = [write_pairs(pairs, tmp_path / f"{n}.tsv") for n in ("train", "eval")]
  with pytest.raises(ValueError, match=r"^3 training examples cannot fill a global batch of 8"):
    finetune_data(finetune_config(load_config("tiny"), *files))
  small_vocab = load_config("tiny", ["model.vocab_size=128"])
  with pytest.raises(ValueError, match=r"ids but model.vocab_size is 128; use the model's own"):
    finetune_data(finetune_config(small_vocab, *files))


# --------------------------------------------------------------------------------------------
# Runs: exact match, best checkpoint, resume.


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  """A tiny model pretrained for a few steps: the checkpoint fine-tuning starts from."""
  workdir = tmp_path_factory.mktemp("pretrained")
  train(load_config("tiny", ["train.num_train_steps=10"]), workdir, **QUIET)
  return workdir


@pytest.fixture(scope="module")
def talkative(pretrained, tmp_path_factory):
  """The pretrained model with the embeddings of pad and EOS zeroed, so that greedy decoding
  says something (the 10-step model, like a fresh one, says pad): a converted-style model
  directory (config.json, spiece.model, parameters only)."""
  config, params = model_loading.load_model(pretrained)
  embedding = np.array(params["token_embedder"]["embedding"])  # [vocab, d_model]
  embedding[:2] = 0
  params["token_embedder"]["embedding"] = embedding
  directory = tmp_path_factory.mktemp("talkative")
  checkpoint.save_model(directory, config, params)
  shutil.copyfile(pretrained / "spiece.model", directory / "spiece.model")
  return directory


@pytest.mark.slow
def test_exact_match_scores_known_predictions(talkative, tmp_path):
  """Eval targets made from the model's own greedy outputs for every other example: the
  step-0 exact match must be exactly the share of those."""
  base = finetune_config(load_config(str(talkative)))
  data = finetune_data(base)
  inputs, _ = data.eval_inputs(16)
  config_, params = model_loading.load_model(talkative)
  batch = base.train.batch_size
  model = SwitchTransformer(config_.model)
  predictions = greedy_texts(model, params, inputs, data.tokenizer, base.data.targets_length, batch)
  sources = [s for s, _ in data.eval_pairs[:16]]
  targets = [p if i % 2 == 0 and p else "no such output" for i, p in enumerate(predictions)]
  expected = sum(t != "no such output" for t in targets) / 16
  assert expected > 0
  train_file = write_pairs(text_to_text.fill_in_the_blank(64, 1)[0], tmp_path / "train.tsv")
  eval_file = write_pairs(list(zip(sources, targets)), tmp_path / "eval.tsv")
  config = finetune_config(
    load_config(str(talkative)),
    train_file,
    eval_file,
    ["train.num_train_steps=1", "finetune.exact_match_examples=16"],
  )
  finetune(config, tmp_path / "run", **QUIET)
  records = map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
  scores = {r["step"]: r["eval/exact_match"] for r in records if "eval/exact_match" in r}
  assert scores[0] == expected
  assert exact_match(["a  b", "c"], [" a b", "d"]) == 0.5


@pytest.mark.slow
def test_finetune_keeps_the_best_and_resumes_exactly(pretrained, tmp_path):
  overrides = [
    "train.eval_every=4",
    "finetune.exact_match_every=4",
    "finetune.exact_match_examples=8",
    "finetune.keep_best=loss",
    "train.log_every=2",
  ]
  config = lambda steps: finetune_config(
    load_config(str(pretrained)), overrides=[*overrides, f"train.num_train_steps={steps}"]
  )
  whole = finetune(config(12), tmp_path / "whole", **QUIET)
  finetune(config(8), tmp_path / "parts", **QUIET)
  resumed = finetune(config(12), tmp_path / "parts", **QUIET)
  assert resumed.losses == {k: v for k, v in whole.losses.items() if k > 8}
  assert resumed.eval_metrics == whole.eval_metrics

  for workdir in (tmp_path / "whole", tmp_path / "parts"):
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["eval/loss"] for r in records if "eval/loss" in r}
    best = json.loads((workdir / BEST_FILE).read_text())
    assert set(losses) == {0, 4, 8, 12}
    assert best["value"] == min(v for k, v in losses.items() if k > 0)
    assert best["step"] == min((v, k) for k, v in losses.items() if k > 0)[1]
    assert {r["step"] for r in records if "eval/exact_match" in r} == {0, 4, 8, 12}
    saved_config, params = model_loading.load_model(workdir / BEST)
    assert saved_config.train.init_from is None and saved_config.data.spm_path is None
    assert checkpoint.CheckpointStore(workdir / BEST).steps() == [best["step"]]
  assert json.loads((tmp_path / "whole" / BEST_FILE).read_text()) == json.loads(
    (tmp_path / "parts" / BEST_FILE).read_text()
  )
  other = write_pairs(text_to_text.fill_in_the_blank(64, 8, seed=1)[0], tmp_path / "t.tsv")
  changed = finetune_config(
    load_config(str(pretrained)), other, other, [*overrides, "train.num_train_steps=16"]
  )
  before = sorted(p.stat().st_mtime_ns for p in (tmp_path / "parts").rglob("*"))
  with pytest.raises(WorkdirError, match=r"finetune.train_file=.*--restart_data"):
    finetune(changed, tmp_path / "parts", **QUIET)
  assert sorted(p.stat().st_mtime_ns for p in (tmp_path / "parts").rglob("*")) == before


@pytest.mark.slow
def test_script_runs_the_bundled_task_offline(pretrained, tmp_path):
  out = subprocess.run(
    [
      sys.executable,
      "scripts/finetune.py",
      f"--config={pretrained}",
      f"--workdir={tmp_path / 'run'}",
      "--no_progress",
      "--set=train.num_train_steps=4",
      "--set=finetune.exact_match_examples=8",
    ],
    capture_output=True,
    text=True,
    cwd=ROOT,
  )
  assert out.returncode == 0, out.stderr
  assert "4000 training + 200 eval examples" in out.stdout
  assert f"Fine-tuned to step 4 in {tmp_path / 'run'}: eval loss" in out.stdout
  assert (tmp_path / "run" / BEST / "spiece.model").is_file()
  bad = subprocess.run(
    [sys.executable, "scripts/finetune.py", f"--config={pretrained}", "--train=x.tsv"],
    capture_output=True,
    text=True,
    cwd=ROOT,
  )
  assert bad.returncode == 1
  assert bad.stderr.startswith("error: finetune.train_file and finetune.eval_file go together")
