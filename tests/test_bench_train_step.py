"""bench/bench_train_step.py pins JAX and PyTorch to the same number of threads before either starts."""
import json
import os
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores to show the pinning")
def test_bench_pins_both_frameworks_to_the_requested_threads():
  code = """
import json, os, sys
sys.path.insert(0, "bench")
import bench_train_step as b          # imported as a module: nothing pinned yet
before = len(os.sched_getaffinity(0))
b.configure_threads(1)
b.pin_torch_threads(1)
print(json.dumps(dict(before=before, cores=len(os.sched_getaffinity(0)), torch=b.torch.get_num_threads(),
                      xla=os.environ.get("XLA_FLAGS", ""), omp=os.environ["OMP_NUM_THREADS"])))
"""
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "OMP_NUM_THREADS")}
  env["JAX_PLATFORMS"] = "cpu"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, env=env,
                       timeout=300, check=True).stdout
  got = json.loads(out.strip().splitlines()[-1])
  assert got["before"] >= 2
  assert got["cores"] == 1 and got["torch"] == 1 and got["omp"] == "1"
  assert "--xla_cpu_multi_thread_eigen=false" in got["xla"]


def test_bench_refuses_more_threads_than_cores():
  proc = subprocess.run([sys.executable, "bench/bench_train_step.py", "--threads=4096"], capture_output=True,
                        text=True, cwd=REPO_ROOT, timeout=120, check=False)
  assert proc.returncode != 0 and "--threads=4096" in proc.stderr and "Traceback" not in proc.stderr
