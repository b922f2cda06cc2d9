"""switchjax.huge_pages: when scripts restart with glibc's huge-page tunable, and that the
restarted process faults XLA's buffers in by huge pages."""

import os
import subprocess
import sys

import pytest

from switchjax import huge_pages

TUNABLE = "glibc.malloc.hugetlb=1"


@pytest.fixture
def linux_glibc(monkeypatch):
  """A Linux host with glibc 2.36, whatever runs the test."""
  monkeypatch.setattr(sys, "platform", "linux")
  monkeypatch.setattr(huge_pages.platform, "libc_ver", lambda: ("glibc", "2.36"))


def test_adds_the_tunable_under_the_madvise_mode(linux_glibc):
  assert huge_pages.environment({"A": "1"}, mode="madvise") == {"A": "1", "GLIBC_TUNABLES": TUNABLE}
  kept = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}
  assert huge_pages.environment(kept, mode="madvise")["GLIBC_TUNABLES"] == (
    f"glibc.malloc.arena_max=2:{TUNABLE}"
  )


@pytest.mark.parametrize(
  "tunables", ["glibc.malloc.hugetlb=0", "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=2"]
)
def test_an_explicit_setting_is_the_users_choice(linux_glibc, tunables):
  assert huge_pages.environment({"GLIBC_TUNABLES": tunables}, mode="madvise") is None


@pytest.mark.parametrize("mode", ["always", "never", None])
def test_nothing_to_add_unless_the_kernel_grants_on_advice(linux_glibc, mode, monkeypatch):
  monkeypatch.setattr(huge_pages, "thp_mode", lambda: None)  # mode=None: unknown
  assert huge_pages.environment({}, mode=mode) is None


@pytest.mark.parametrize("libc", [("glibc", "2.34"), ("", ""), ("glibc", "")])
def test_nothing_to_add_without_glibc_2_35(monkeypatch, libc):
  monkeypatch.setattr(sys, "platform", "linux")
  monkeypatch.setattr(huge_pages.platform, "libc_ver", lambda: libc)
  assert huge_pages.environment({}, mode="madvise") is None


def test_thp_mode_reads_the_bracketed_setting(tmp_path):
  setting = tmp_path / "enabled"
  setting.write_text("always [madvise] never\n")
  assert huge_pages.thp_mode(str(setting)) == "madvise"
  assert huge_pages.thp_mode(str(tmp_path / "missing")) is None


# What this host does: a process that calls reexec() restarts once, then touches 64 MiB
# buffers that XLA allocates (an output of each call) and reports its page faults.
PROBE = """
import os, resource, sys
from switchjax import huge_pages
huge_pages.reexec()
import jax, jax.numpy as jnp
x = jnp.ones((16, 1024, 1024))
jax.block_until_ready(x)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
  jax.block_until_ready(x + 1.0)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(os.environ.get("GLIBC_TUNABLES", ""), faults)
"""


def run_probe(environ):
  proc = subprocess.run(
    [sys.executable, "-c", PROBE], env=environ, capture_output=True, text=True, timeout=120
  )
  assert proc.returncode == 0, proc.stderr
  tunables, faults = proc.stdout.split("\n")[-2].rsplit(" ", 1)
  return tunables, int(faults)


@pytest.mark.slow
def test_a_script_restarts_once_and_faults_in_huge_pages():
  base = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  expected = huge_pages.environment(base)
  tunables, faults = run_probe(base)
  plain_tunables, plain_faults = run_probe({**base, "GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})
  assert plain_tunables == "glibc.malloc.hugetlb=0"  # left alone
  pages = 4 * 64 * 2**20 // 4096  # four 64 MiB outputs in 4 KiB pages
  assert plain_faults >= pages // 2  # each output is faulted in anew, page by page
  if expected is None:  # this host grants no huge pages on advice: no restart
    assert tunables == ""
  else:
    assert tunables == expected["GLIBC_TUNABLES"] == TUNABLE
    assert faults < plain_faults // 10, (faults, plain_faults)


def test_reexec_script_leaves_a_called_main_in_its_process(monkeypatch):
  calls = []
  monkeypatch.setattr(huge_pages, "reexec", lambda: calls.append(1))
  huge_pages.reexec_script(["--config=tiny"])  # main(argv) from a test or a notebook
  assert calls == []
  huge_pages.reexec_script(None)  # main() from the command line
  assert calls == [1]
