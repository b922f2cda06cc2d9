"""Loading configs: presets, config files that fail, and sizes no machine can hold.

Every problem is one ValueError line naming the file or the setting and the fix; the scripts
print it as `error: ...` and exit with status 1.
"""

import dataclasses
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import switchjax
from switchjax.config import (
  MAX_PARAMETERS,
  Config,
  available_configs,
  estimate_parameters,
  load_config,
)
from switchjax.model import SwitchTransformer

ROOT = pathlib.Path(__file__).resolve().parents[1]
GOOD = "from switchjax.config import Config\n\n\ndef get_config():\n  return Config(name='mine')\n"


def _error(name_or_path, overrides=()) -> str:
  with pytest.raises(ValueError) as e:
    load_config(str(name_or_path), list(overrides))
  message = str(e.value)
  assert "\n" not in message
  return message


# --------------------------------------------------------------------------------------------
# Presets and config files.


def test_presets_are_the_files_of_configs():
  assert available_configs() == sorted(
    p.stem for p in (ROOT / "configs").glob("*.py") if not p.stem.startswith("_")
  )
  assert load_config("base8").name == "base8" and switchjax.load_config("tiny").name == "tiny"


def test_a_python_file_with_get_config(tmp_path):
  (tmp_path / "mine.py").write_text(GOOD)
  config = load_config(str(tmp_path / "mine.py"), ["train.batch_size=4"])
  assert (config.name, config.train.batch_size) == ("mine", 4)


@pytest.mark.parametrize(
  "source,problem",
  [
    (
      "def get_config():\n  return Config(\n",
      "syntax error at line 2: '(' was never closed; fix the file.",
    ),
    (
      "import switchjax.no_such_module\n",
      "an import failed (No module named 'switchjax.no_such_module'); fix the import or install "
      "what it needs.",
    ),
    (
      "from switchjax.config import NoSuchThing\n",
      "an import failed (cannot import name 'NoSuchThing' from 'switchjax.config' (",
    ),
    (
      "VALUE = 1 / 0\n",
      "running the file raised ZeroDivisionError: division by zero; fix the file.",
    ),
    (
      "def get_config():\n  raise KeyError('d_model')\n",
      "get_config() raised KeyError: 'd_model'; fix the file.",
    ),
    (
      "def get_config():\n  return {'model': {}}\n",
      "get_config() returned a builtins.dict, not a switchjax.config.Config; return a Config "
      "(see configs/small.py).",
    ),
    (
      "def get_config():\n  pass\n",
      "get_config() returned a builtins.NoneType, not a switchjax.config.Config; return a "
      "Config (see configs/small.py).",
    ),
    (
      "import dataclasses\nfrom switchjax.config import Config, ModelConfig\n\n\n"
      "def get_config():\n  return Config(model=ModelConfig(d_model='768'))\n",
      "get_config() returned a Config whose model.d_model='768' is a str, expected int; fix the "
      "file.",
    ),
    (
      "from switchjax.config import Config, ModelConfig\n\n\n"
      "def get_config():\n  return Config(model=ModelConfig(mlp_activations='relu'))\n",
      "get_config() returned a Config whose model.mlp_activations='relu' is a str, expected a "
      "tuple of str; fix the file.",
    ),
    ("CONFIG = 1\n", "has no get_config() function returning a switchjax Config."),
  ],
  ids=[
    "syntax",
    "missing-module",
    "missing-name",
    "raises-on-import",
    "get-config-raises",
    "returns-dict",
    "returns-none",
    "wrong-field-type",
    "wrong-tuple-type",
    "no-get-config",
  ],
)
def test_config_file_problems_are_one_line(tmp_path, source, problem):
  path = tmp_path / "bad.py"
  path.write_text(source)
  message = _error(path)
  assert message.startswith(f"{path}: {problem}") or message == f"{path} {problem}", message


def test_missing_files_and_unknown_names(tmp_path):
  assert _error(tmp_path / "nope.py") == (
    f"config file {str(tmp_path / 'nope.py')!r} does not exist; check the --config path."
  )
  assert _error("base9").startswith("Unknown config 'base9'. Did you mean base8")
  (tmp_path / "config.json").write_text("{not json")
  assert _error(tmp_path / "config.json") == (
    f"{tmp_path / 'config.json'} is not a switchjax config.json (Expecting property name "
    "enclosed in double quotes: line 1 column 2 (char 1)); give a config.json written by "
    "switchjax (pretrain.py or convert_hf.py), a preset name or a .py file."
  )
  (tmp_path / "config.json").write_text('{"model": {"width": 3}}')
  assert "(Unknown ModelConfig fields in saved config: ['width'].)" in _error(tmp_path)


# --------------------------------------------------------------------------------------------
# Sizes.


def _count(config) -> int:
  model = SwitchTransformer(config)
  tokens = jnp.ones((1, 8), jnp.int32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens, tokens))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["params"]))


def test_parameter_estimate_is_the_model_count():
  tiny = load_config("tiny").model
  variant = dataclasses.replace(
    tiny,
    tie_embeddings=False,
    mlp_activations=("gelu", "linear"),
    expert_d_ff=48,
    num_decoder_layers=4,
    num_sparse_decoder_layers=2,
    moe=dataclasses.replace(tiny.moe, router_bias=True),
  )
  explicit = dataclasses.replace(tiny, sparse_encoder_layers=(0, 1), expert_activations=("relu",))
  for config in (tiny, load_config("small").model, variant, explicit):
    assert estimate_parameters(config) == _count(config)
  # The released sizes (README), without building anything.
  assert estimate_parameters(load_config("base8").model) == 619_339_008
  assert f"{estimate_parameters(load_config('c2048').model):.3g}" == "1.57e+12"
  assert estimate_parameters(load_config("c2048").model) < MAX_PARAMETERS


@pytest.mark.parametrize(
  "override,message",
  [
    (
      "model.d_model=1000000000",
      "model.d_model=1000000000 is beyond the limit of 131,072 (32x switch-xxl-128's 4096): the "
      "model would have 8.1e+14 parameters (3.2 PB of weights); lower model.d_model.",
    ),
    (
      "model.num_layers=1000000",
      "model.num_layers=1000000 is beyond the limit of 1,024 (43x switch-large-128's 24; every "
      "layer is traced and compiled): the model would have 7.1e+12 parameters (28.3 TB of "
      "weights); lower model.num_layers.",
    ),
    (
      "model.vocab_size=10000000000",
      "model.vocab_size=10000000000 is beyond the limit of 16,777,216 (67x mT5's 250,112): the "
      "model would have 7.7e+12 parameters (30.7 TB of weights); lower model.vocab_size.",
    ),
    (
      "data.spm_vocab_size=10000000000",
      "data.spm_vocab_size=10000000000 is beyond the limit of 16,777,216 (67x mT5's 250,112): "
      "its embedding alone would have 7.7e+12 parameters; lower data.spm_vocab_size.",
    ),
    (
      "data.inputs_length=1000000",
      "data.inputs_length=1000000 is beyond the limit of 65,536 (128x T5's 512): the attention "
      "scores of one sequence and one head alone would take 4.0 TB; lower data.inputs_length.",
    ),
    (
      "train.batch_size=100000000",
      "train.batch_size=100000000 is beyond the limit of 1,048,576 (4096x Switch's 256): one "
      "step would read 6.3e+10 tokens; lower train.batch_size.",
    ),
  ],
)
def test_absurd_sizes_are_refused(override, message):
  assert _error("base8", [override]) == message


def test_too_many_parameters_in_all(tmp_path):
  # Each size is within its bound; together they are 130x switch-c-2048.
  assert _error("base8", ["model.moe.num_experts=65536", "model.expert_d_ff=1048576"]) == (
    "model: 1.3e+15 parameters (5.1 PB in float32) is beyond the limit of 1e+13, 6x "
    "switch-c-2048 (1.6e+12, the largest released Switch model); 1.3e+15 of them come from "
    "model.moe.num_experts=65536 (with model.d_model=768, 12 + 12 layers): lower "
    "model.moe.num_experts, model.d_model or the layer counts."
  )
  # A saved config.json is checked the same way.
  big = dataclasses.replace(
    load_config("base8"), model=dataclasses.replace(load_config("base8").model, d_model=10**9)
  )
  switchjax.config.save_config(big, tmp_path / "config.json")
  assert _error(tmp_path / "config.json").startswith("model.d_model=1000000000 is beyond")
  with pytest.raises(ValueError, match="model.d_model=1000000000 is beyond"):
    big.validate()
  assert isinstance(Config().validate(), Config)


# --------------------------------------------------------------------------------------------
# The scripts print the line and exit with status 1.


@pytest.mark.slow
def test_pretrain_prints_config_errors_as_one_line(tmp_path):
  (tmp_path / "bad.py").write_text("def get_config():\n  raise KeyError('d_model')\n")
  for args, expected in (
    (
      [f"--config={tmp_path / 'bad.py'}"],
      f"error: {tmp_path / 'bad.py'}: get_config() raised KeyError: 'd_model'; fix the file.\n",
    ),
    (
      ["--config=tiny", "--set", "model.d_model=1000000000"],
      "error: model.d_model=1000000000 is beyond the limit of 131,072",
    ),
  ):
    done = subprocess.run(
      [sys.executable, str(ROOT / "scripts" / "pretrain.py"), f"--workdir={tmp_path}", *args],
      capture_output=True,
      text=True,
      timeout=300,
    )
    assert done.returncode == 1 and done.stderr.startswith(expected), done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
