"""Test-session setup shared by every test module.

Eight fake CPU devices are configured before JAX is imported anywhere, so sharded-vs-unsharded tests can build
real meshes on a CPU-only machine. Unsharded computations still run on device 0.
"""
import os
import pathlib

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_TIKTOKEN = REPO_ROOT.parent / "shared" / "data" / "qwen.tiktoken"


@pytest.fixture(scope="session")
def qwen_tiktoken_path() -> pathlib.Path:
  """Path of the real Qwen vocabulary; skips the test with the reason when it is not on this machine."""
  path = pathlib.Path(os.environ.get("QWEN_TIKTOKEN", SHARED_TIKTOKEN))
  if not path.is_file():
    pytest.skip(f"the real Qwen vocabulary is not at {path} (set QWEN_TIKTOKEN to a qwen.tiktoken file)")
  return path
