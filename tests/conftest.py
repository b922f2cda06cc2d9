"""Test session set-up, before jax starts.

- 8 emulated CPU devices for the mesh tests;
- fast compilation: XLA's CPU backend at optimisation level 0 (the tiny test models compile in
  half the time and run fast enough) and one persistent compilation cache for the session and
  its subprocesses, so the many runs of the same tiny configuration compile once; one data
  cache likewise. Speed is measured by scripts/benchmark.py, never by tests.
"""

import atexit
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  " --xla_backend_optimization_level=0"
).strip()
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The tests run on the CPU (with libtpu installed, jax would also probe for TPUs and take their
# lock file); tests/test_tpu_compile.py compiles for described TPU slices all the same.
os.environ["JAX_PLATFORMS"] = "cpu"
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="switchjax-test-jax-cache-")
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
# Trained tokenizers and tokenized corpora go to one temporary cache for the session, its
# workers and subprocesses (the default corpus's tokenizers are trained once), never to
# ~/.cache. Its writes are atomic renames, so workers may fill it at the same time.
if "SWITCHJAX_TEST_DATA_CACHE" not in os.environ:  # the session's first process makes it
  _data_cache = tempfile.mkdtemp(prefix="switchjax-test-data-cache-")
  atexit.register(shutil.rmtree, _data_cache, ignore_errors=True)
  os.environ["SWITCHJAX_TEST_DATA_CACHE"] = _data_cache
os.environ["SWITCHJAX_CACHE"] = os.environ["SWITCHJAX_TEST_DATA_CACHE"]

import jax  # noqa: E402  (after XLA_FLAGS)

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_configure(config):
  config.addinivalue_line(
    "markers", "slow: end-to-end checks (multi-process, kills); CI runs them too"
  )
