"""qwenvl_jax.hardware.host_memory: freed blocks stay in the process on CPU-only hosts, and only there."""
import json
import os
import platform
import subprocess
import sys

import pytest

from qwenvl_jax.hardware import host_memory

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Allocates, touches and frees a 192 MB block twice on the main thread (the main malloc arena, where the trainer's
# steps allocate with synchronous dispatch) and prints the page faults of the second round.
_FAULTS = """
import ctypes, json, resource, sys
sys.path.insert(0, {root!r})
from qwenvl_jax.hardware import host_memory
applied = host_memory.keep_freed_memory() if sys.argv[1] == "keep" else False
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size = 192 << 20
def touch():
  p = libc.malloc(size)
  ctypes.memset(p, 1, size)
  libc.free(p)
touch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
touch()
print(json.dumps(dict(applied=applied, faults=resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)))
"""


def _second_round_faults(mode: str) -> dict:
  out = subprocess.run([sys.executable, "-c", _FAULTS.format(root=REPO_ROOT), mode], capture_output=True, text=True,
                       timeout=120, check=True).stdout
  return json.loads(out.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's (mallopt)")
def test_freed_block_is_reused_without_page_faults():
  default = _second_round_faults("default")
  kept = _second_round_faults("keep")
  # 192 MB is 49,152 pages: by default glibc unmaps the block at free and the next one faults every page in.
  assert not default["applied"] and default["faults"] > 40_000
  assert kept["applied"] and kept["faults"] < 1_000


def test_cpu_only_follows_jax_platforms(monkeypatch):
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  assert host_memory.cpu_only()
  monkeypatch.setenv("JAX_PLATFORMS", "tpu,cpu")
  assert not host_memory.cpu_only()


def test_an_installed_accelerator_plugin_means_not_cpu_only(monkeypatch, tmp_path):
  monkeypatch.delenv("JAX_PLATFORMS", raising=False)
  (tmp_path / "libtpu").mkdir()
  (tmp_path / "libtpu" / "__init__.py").write_text("")
  monkeypatch.syspath_prepend(str(tmp_path))
  assert not host_memory.cpu_only()


def test_the_switch_turns_it_off(monkeypatch):
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("QWENVL_KEEP_FREED_MEMORY", "0")
  assert not host_memory.keep_freed_memory_on_cpu_host()
  monkeypatch.setenv("JAX_PLATFORMS", "tpu")
  monkeypatch.delenv("QWENVL_KEEP_FREED_MEMORY")
  assert not host_memory.keep_freed_memory_on_cpu_host()
