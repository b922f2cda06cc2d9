"""Run first in every local data worker process (workers.ordered_map passes it to
runpy.run_path as the pool's initializer), before the worker imports any of switchjax.

A spawned worker unpickles its task, `switchjax.data.<module>.<function>`, by importing that
module, and importing a submodule runs its packages' `__init__` first: `switchjax/__init__.py`
imports the routers and with them JAX and Flax, which the readers and the tokenizer never use
(1 to 3 s per worker here, against about 0.3 s for what they do use). So `switchjax` is
registered as a bare package (its directory, no `__init__` run), unless the parent's main
module, which a spawned worker imports first, has imported it already. Also: Ctrl-C goes to
the whole process group, and is the parent's to handle (it terminates the workers), so the
workers ignore it; and nested maps inside a worker run in-process.

It imports nothing of switchjax by name, so running it as a module does nothing but that.
"""

import importlib
import importlib.machinery
import pathlib
import signal
import sys
import types


def _bare_package(name: str, directory: pathlib.Path) -> types.ModuleType:
  """A package module for `directory` whose `__init__.py` has not run."""
  spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
  spec.submodule_search_locations = [str(directory)]
  package = types.ModuleType(name)
  package.__spec__, package.__path__ = spec, [str(directory)]
  return package


if __name__ == "switchjax-data-worker":
  if "switchjax" not in sys.modules:
    sys.modules["switchjax"] = _bare_package("switchjax", pathlib.Path(__file__).parents[1])
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  importlib.import_module("switchjax.data.workers")._IN_WORKER = True
