"""CPU runs re-execute themselves with mimalloc preloaded (`qwenvl_jax.hardware.allocator`): when, and that the
re-executed process is the same pid with the same arguments and mimalloc mapped in."""
import json
import os
import subprocess
import sys

import pytest

from qwenvl_jax.hardware import allocator

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LIBRARY = allocator.mimalloc_library()
needs_mimalloc = pytest.mark.skipif(LIBRARY is None or not sys.platform.startswith("linux"),
                                    reason="cmeel-mimalloc (requirements.txt) is not installed, or not Linux")


@needs_mimalloc
def test_the_wheel_provides_the_library():
  assert os.path.basename(LIBRARY) == "libmimalloc.so" and os.path.isfile(LIBRARY)


@pytest.mark.parametrize("platforms,expected", [("cpu", True), ("CPU", False), ("cpu,tpu", False), ("cuda", False)])
def test_cpu_only_follows_jax_platforms(platforms, expected):
  assert allocator.cpu_only({"JAX_PLATFORMS": platforms}) is expected


@needs_mimalloc
def test_when_a_run_is_re_executed():
  cpu = {"JAX_PLATFORMS": "cpu"}
  env = allocator.preload_environ(cpu)
  assert env["LD_PRELOAD"] == LIBRARY and env["JAX_PLATFORMS"] == "cpu"
  # The user's own preloads stay, after mimalloc.
  assert allocator.preload_environ({**cpu, "LD_PRELOAD": "/x/libfoo.so"})["LD_PRELOAD"] == f"{LIBRARY}:/x/libfoo.so"
  assert env["MIMALLOC_PURGE_DELAY"] == "-1"  # freed memory stays mapped; a user's own setting is kept
  assert allocator.preload_environ({**cpu, "MIMALLOC_PURGE_DELAY": "10"})["MIMALLOC_PURGE_DELAY"] == "10"
  assert env["MIMALLOC_ALLOW_THP"] == "0"  # 4 KiB pages; a user's own setting is kept
  assert allocator.preload_environ({**cpu, "MIMALLOC_ALLOW_THP": "1"})["MIMALLOC_ALLOW_THP"] == "1"
  assert allocator.preload_environ(env) is None  # already preloaded: no loop
  assert allocator.preload_environ({**cpu, allocator.ENV: "system"}) is None
  assert allocator.preload_environ({"JAX_PLATFORMS": "tpu"}) is None  # an accelerator run keeps its allocator
  assert allocator.preload_environ({"JAX_PLATFORMS": "tpu", allocator.ENV: "mimalloc"})["LD_PRELOAD"] == LIBRARY


def test_a_bad_setting_is_an_error():
  with pytest.raises(allocator.AllocatorError, match="QWENVL_CPU_ALLOCATOR='jemalloc': expected one of"):
    allocator.preload_environ({allocator.ENV: "jemalloc"})


_PROBE = """
import json, os, sys
from qwenvl_jax import cli
def main(argv):
  status = open("/proc/self/status").read()
  thp = status.split("THP_enabled:")[1].split()[0] if "THP_enabled:" in status else None
  print(json.dumps(dict(pid=os.getpid(), argv=argv[1:], preload=os.environ.get("LD_PRELOAD", ""),
                        in_use=__import__("qwenvl_jax.hardware.allocator").hardware.allocator.in_use(), thp=thp)))
cli.run(main, cpu_allocator=True)
"""


def _probe(env_extra: dict):
  env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", allocator.ENV)}
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=REPO_ROOT, **env_extra)
  proc = subprocess.Popen([sys.executable, "-c", _PROBE, "positional"], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=env, cwd=REPO_ROOT)
  out, err = proc.communicate(timeout=120)
  return proc, out, err


@needs_mimalloc
def test_a_cpu_run_re_executes_itself_with_mimalloc():
  proc, out, err = _probe({})
  assert proc.returncode == 0, err
  got = json.loads(out.strip().splitlines()[-1])
  # mimalloc read MIMALLOC_ALLOW_THP=0 and turned transparent huge pages off for the process (prctl), which
  # /proc reports as THP_enabled 0 (absent on kernels before 6.x: not checked there).
  assert got.pop("thp") in ("0", None)
  # The same process (exec keeps the pid that a scheduler or a test signals) with the same arguments, now with
  # mimalloc mapped in.
  assert got == dict(pid=proc.pid, argv=["positional"], preload=LIBRARY, in_use="mimalloc")


def test_system_keeps_glibc_and_an_unknown_setting_is_one_line():
  proc, out, err = _probe({allocator.ENV: "system"})
  assert proc.returncode == 0, err
  assert json.loads(out.strip().splitlines()[-1])["in_use"] == "system"
  proc, out, err = _probe({allocator.ENV: "tcmalloc"})
  assert proc.returncode == 2 and err.strip().startswith("error: QWENVL_CPU_ALLOCATOR='tcmalloc'"), err
  assert "Traceback" not in err
