"""bench/bench_train_step.py pins JAX and PyTorch to the same number of threads before either starts, and its
no-fault diagnostic (`keep_freed_memory`) keeps a freed block for reuse. Its processes run as a background job from
the session's start (tests/background.py)."""
import json
import os
import platform
import sys

import pytest

from tests import background

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


_PINS = """
import json, os, sys
sys.path.insert(0, "bench")
import bench_train_step as b          # imported as a module: nothing pinned yet
before = len(os.sched_getaffinity(0))
b.configure_threads(1)
b.pin_torch_threads(1)
print(json.dumps(dict(before=before, cores=len(os.sched_getaffinity(0)), torch=b.torch.get_num_threads(),
                      xla=os.environ.get("XLA_FLAGS", ""), omp=os.environ["OMP_NUM_THREADS"])))
"""

# Allocates, touches and frees a 192 MB block twice on the main thread and prints the second round's page faults.
_FAULTS = """
import ctypes, json, resource, sys
sys.path.insert(0, "bench")
import bench_train_step as b
applied = b.keep_freed_memory() if sys.argv[1] == "keep" else False
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




def _commands(folder):
  """The bench's processes the tests below read, as the commands of a job registered in tests/background.py (from
  the session's start, on the core the other tests leave idle), in `_COMMANDS`'s order."""
  del folder
  pins_env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "OMP_NUM_THREADS")}
  pins_env["JAX_PLATFORMS"] = "cpu"
  env = dict(os.environ)
  return [background.Command([sys.executable, "-c", _PINS], pins_env, REPO_ROOT, check=False),
          background.Command([sys.executable, "bench/bench_train_step.py", "--threads=4096"], env, REPO_ROOT,
                             check=False),
          background.Command([sys.executable, "-c", _FAULTS, "default"], env, REPO_ROOT, check=False),
          background.Command([sys.executable, "-c", _FAULTS, "keep"], env, REPO_ROOT, check=False)]


_COMMANDS = ("pins", "too_many_threads", "faults_default", "faults_keep")
commands = background.finished_work(__name__, "commands", _commands)


def _ran(commands, name: str):
  _, procs = commands
  assert len(procs) == len(_COMMANDS), procs
  return procs[_COMMANDS.index(name)]


def _printed(commands, name: str) -> dict:
  proc = _ran(commands, name)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores to show the pinning")
def test_bench_pins_both_frameworks_to_the_requested_threads(commands):
  got = _printed(commands, "pins")
  assert got["before"] >= 2
  assert got["cores"] == 1 and got["torch"] == 1 and got["omp"] == "1"
  assert "--xla_cpu_multi_thread_eigen=false" in got["xla"]


def test_bench_refuses_more_threads_than_cores(commands):
  proc = _ran(commands, "too_many_threads")
  assert proc.returncode != 0 and "--threads=4096" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the diagnostic is glibc's mallopt")
def test_keep_freed_memory_reuses_a_freed_block_without_page_faults(commands):
  default, kept = _printed(commands, "faults_default"), _printed(commands, "faults_keep")
  # By default glibc unmaps the block at free and the next one faults every page in again: 49,152 4-KB pages
  # (fewer where transparent huge pages are always on); kept, the second block reuses the first's pages.
  assert not default["applied"] and kept["applied"]
  assert default["faults"] > 20 * max(kept["faults"], 1), (default, kept)


def _bench_module():
  sys.path.insert(0, os.path.join(REPO_ROOT, "bench"))
  try:
    import bench_train_step  # pylint: disable=import-outside-toplevel
  finally:
    sys.path.pop(0)
  return bench_train_step


def test_blocked_schedule_runs_each_framework_back_to_back_after_one_untimed_step():
  calls = []
  steps = {name: (lambda name=name: calls.append(name) or (len(calls), 0.0, 0)) for name in ("jax", "torch")}
  wall, _, _ = _bench_module().timed(steps, 3, "blocked")
  assert calls == ["jax"] * 4 + ["torch"] * 4
  assert wall == {"jax": 3, "torch": 7}  # medians of calls 2-4 and 6-8
  calls.clear()
  _bench_module().timed(steps, 2, "interleaved")
  assert calls == ["jax", "torch"] * 2


def test_each_worker_gets_its_allocator(monkeypatch):
  from qwenvl_jax.hardware import allocator  # pylint: disable=import-outside-toplevel
  bench = _bench_module()
  library = allocator.mimalloc_library()
  monkeypatch.setenv("LD_PRELOAD", f"{library or '/x/libmimalloc.so'}:/x/libother.so")
  assert bench.worker_environ("system")["LD_PRELOAD"] == "/x/libother.so"  # mimalloc dropped, the rest kept
  if library is None:
    pytest.skip("cmeel-mimalloc (requirements.txt) is not installed")
  env = bench.worker_environ("mimalloc")
  assert env["LD_PRELOAD"] == f"{library}:/x/libother.so" and env["MIMALLOC_PURGE_DELAY"] == "-1"
