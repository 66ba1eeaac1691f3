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
  assert env["MIMALLOC_ARENA_EAGER_COMMIT"] == "0"  # arenas committed as used; a user's own setting is kept
  assert allocator.preload_environ({**cpu, "MIMALLOC_ARENA_EAGER_COMMIT": "1"})["MIMALLOC_ARENA_EAGER_COMMIT"] == "1"
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
  print(json.dumps(dict(pid=os.getpid(), argv=argv[1:], preload=os.environ.get("LD_PRELOAD", ""),
                        in_use=__import__("qwenvl_jax.hardware.allocator").hardware.allocator.in_use())))
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


@needs_mimalloc
def test_mimalloc_reads_the_settings_it_is_given():
  # mimalloc prints its options when MIMALLOC_VERBOSE=1: the ones mimalloc_environ sets are the ones in force.
  env = allocator.mimalloc_environ({k: v for k, v in os.environ.items() if not k.startswith("MIMALLOC_")})
  proc = subprocess.run([sys.executable, "-c", "pass"], env={**env, "MIMALLOC_VERBOSE": "1"}, capture_output=True,
                        text=True, timeout=60, check=True)
  assert "option 'arena_eager_commit': 0" in proc.stderr and "option 'purge_delay': -1" in proc.stderr, proc.stderr
