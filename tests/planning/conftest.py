"""Helpers for planner tests: libtpu runs in a child process, so this test process keeps its 8 fake CPU devices
and no TPU plugin state leaks into other tests."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from qwenvl_jax.planning import mesh

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

requires_libtpu = pytest.mark.skipif(
    not mesh.libtpu_available(), reason="libtpu is not installed (pip install -r requirements-tpu-aot.txt)")


def run_json(code: str, timeout: float = 1800) -> dict:
  """Runs `code` in a fresh Python (JAX on CPU, libtpu allowed for topologies); returns the JSON it prints last.

  The default timeout is generous: each TPU compile takes seconds of CPU, but a shared 2-core host under load
  stretches that many times over.
  """
  # The repo first; a PYTHONPATH of the caller's (e.g. a libtpu installed with pip --target) is kept after it.
  path = os.pathsep.join(p for p in (REPO_ROOT, os.environ.get("PYTHONPATH", "")) if p)
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=path)
  proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                        env=env, cwd=REPO_ROOT, timeout=timeout, check=False)
  if proc.returncode:
    raise AssertionError(f"child failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])
