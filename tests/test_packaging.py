"""Installs: the presets of configs/ come with the package, from a wheel and an editable install.

Each check builds from a copy of the source tree (setup.py, README.md, switchjax/, configs/) and
imports switchjax in a fresh interpreter that sees the build and the installed dependencies but
not this repository (`python -S`, no PYTHONPATH, run from an empty directory).
"""

import json
import os
import pathlib
import shutil
import site
import subprocess
import sys
import zipfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
PRESETS = sorted(p.stem for p in (ROOT / "configs").glob("*.py") if not p.stem.startswith("_"))

# Prints where switchjax and a preset were imported from, the presets and base8's experts.
PROBE = """
import json, sys
import switchjax
from switchjax.config import available_configs
config = switchjax.load_config("base8")
print(json.dumps({
  "switchjax": switchjax.__file__,
  "preset": sys.modules["switchjax.configs.base8"].__file__,
  "available": available_configs(),
  "experts": config.model.moe.num_experts,
}))
"""


def _copy_source(target: pathlib.Path) -> pathlib.Path:
  target.mkdir()
  for name in ("setup.py", "README.md"):
    shutil.copy(ROOT / name, target / name)
  for name in ("switchjax", "configs"):
    shutil.copytree(ROOT / name, target / name, ignore=shutil.ignore_patterns("__pycache__"))
  return target


def _probe(tmp_path: pathlib.Path, setup_path: str) -> dict:
  """Runs PROBE with only the stdlib, `setup_path` (code that puts the build on sys.path) and
  then the installed dependencies (whose editable install of switchjax, if any, stays unused:
  `-S` skips its .pth file)."""
  dependencies = [p for p in site.getsitepackages() if os.path.isdir(p)]
  code = f"import sys, site\n{setup_path}\nsys.path += {dependencies!r}\n{PROBE}"
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  empty = tmp_path / "empty"
  empty.mkdir()
  done = subprocess.run(
    [sys.executable, "-S", "-c", code], cwd=empty, env=env, capture_output=True, text=True
  )
  assert done.returncode == 0, done.stderr[-2000:]
  return json.loads(done.stdout.splitlines()[-1])


def test_wheel_ships_the_presets(tmp_path):
  source = _copy_source(tmp_path / "source")
  subprocess.run(
    [
      sys.executable,
      *("-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"),
      *(str(source), "-w", str(tmp_path / "dist")),
    ],
    check=True,
    capture_output=True,
  )
  (wheel,) = (tmp_path / "dist").glob("switchjax-*.whl")
  installed = tmp_path / "installed"
  zipfile.ZipFile(wheel).extractall(installed)
  assert sorted(p.stem for p in (installed / "switchjax" / "configs").glob("[!_]*.py")) == PRESETS

  shutil.rmtree(source)  # Nothing may come from a source tree.
  found = _probe(tmp_path, f"sys.path.insert(0, {str(installed)!r})")
  assert found["switchjax"] == str(installed / "switchjax" / "__init__.py")
  assert found["preset"] == str(installed / "switchjax" / "configs" / "base8.py")
  assert found["available"] == PRESETS and found["experts"] == 8


def test_editable_install_finds_the_presets_in_configs(tmp_path):
  # What `pip install -e .` installs: the PEP 660 wheel of setuptools, whose .pth maps
  # switchjax to switchjax/ and switchjax.configs to configs/ of the source tree.
  source = _copy_source(tmp_path / "source")
  build = "import setuptools.build_meta as b, sys; b.build_editable(sys.argv[1])"
  subprocess.run(
    [sys.executable, "-c", build, str(tmp_path / "dist")],
    cwd=source,
    check=True,
    capture_output=True,
  )
  (wheel,) = (tmp_path / "dist").glob("switchjax-*.editable-*.whl")
  installed = tmp_path / "installed"
  zipfile.ZipFile(wheel).extractall(installed)
  found = _probe(tmp_path, f"site.addsitedir({str(installed)!r})")  # Runs the .pth.
  assert found["switchjax"] == str(source / "switchjax" / "__init__.py")
  assert found["preset"] == str(source / "configs" / "base8.py")
  assert found["available"] == PRESETS and found["experts"] == 8


def test_source_tree_on_sys_path_finds_the_presets_in_configs(tmp_path):
  # PYTHONPATH=repo without an install of its own (or an editable install made before configs/
  # was a package): the presets are imported from configs/ next to switchjax/.
  source = _copy_source(tmp_path / "source")
  found = _probe(tmp_path, f"sys.path.insert(0, {str(source)!r})")
  assert found["switchjax"] == str(source / "switchjax" / "__init__.py")
  assert found["preset"] == str(source / "configs" / "base8.py")
  assert found["available"] == PRESETS and found["experts"] == 8
