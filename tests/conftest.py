"""Test-session setup shared by every test module.

Eight fake CPU devices are configured before JAX is imported anywhere, so sharded-vs-unsharded tests can build
real meshes on a CPU-only machine. Unsharded computations still run on device 0.

One persistent compilation cache serves the whole session, in-process and in every subprocess a test starts (it is
exported in the environment): on a 2-core CPU compiling the tiny model's train step takes tens of seconds, and many
tests compile the very same programs. It is a pure cache keyed by the compiled program, so results are unaffected.

One reference training run serves the whole session too (`uninterrupted`): the training tests compare against it
and the quick start chats with it and evaluates it. Subprocess work that test modules register in tests/background.py
(trainings, a bench) starts with the session, at the lowest CPU priority, on the core the other tests leave idle.
"""
import importlib.metadata
import os
import pathlib
import re
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  _flags += " --xla_force_host_platform_device_count=8"
# LLVM at -O0 for what the tests compile (exported, so their subprocesses too): compiling is a third of the suite's
# time on 2 cores and -O0 halves it (the reference run: 15.8 s -> 7.4 s). A tiny step runs up to 2.2x longer, so the
# few runs of hundreds of steps keep XLA's default level (`subprocess_env(default_llvm_level=True)`).
# Results change only at float32 round-off (XLA's CPU code has no fast-math; LLVM contracts or orders a few float
# operations differently): tests/training/test_train.py's SIGTERM run trains the reference run at XLA's default
# level in a subprocess and compares its losses with the reference's at the suite's tolerance.
if "xla_backend_optimization_level" not in _flags:
  _flags += " --xla_backend_optimization_level=0"
# XLA's older CPU emitters for fused elementwise code instead of its MLIR fusion emitters: they compile the same
# fused HLO in well under half the time (tests/training/test_step.py with tests/model/test_attention.py: 40.3 s ->
# 17.2 s of backend compiling, 66.7 s -> 46.0 s in all). Backend compiling was 446 s of a 1199-s suite. The HLO, so
# what the tests check of a compiled program (its fusions, collectives, buffers), is the same; the elementwise code
# differs at float32 round-off, and the SIGTERM run above compiles with neither flag. jaxlib 0.11 has no such flag
# (XLA aborts on a flag it does not know), so only older jaxlibs get it.
_JAXLIB = tuple(int(p) for p in re.findall(r"\d+", importlib.metadata.version("jaxlib"))[:2])
if "xla_cpu_use_fusion_emitters" not in _flags and _JAXLIB < (0, 11):
  _flags += " --xla_cpu_use_fusion_emitters=false"
os.environ["XLA_FLAGS"] = _flags.strip()

import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_TIKTOKEN = REPO_ROOT.parent / "shared" / "data" / "qwen.tiktoken"


@pytest.fixture(scope="session", autouse=True)
def compile_cache_dir(tmp_path_factory) -> str:
  """The session's persistent compilation cache (a fresh folder, so nothing stale is ever read)."""
  import jax  # pylint: disable=import-outside-toplevel  (after the XLA flags above)
  path = str(tmp_path_factory.mktemp("jax_compile_cache"))
  settings = {"jax_compilation_cache_dir": path, "jax_persistent_cache_min_compile_time_secs": 0,
              "jax_persistent_cache_min_entry_size_bytes": 0}
  previous = {k: getattr(jax.config, k) for k in settings}
  env_before = {k.upper(): os.environ.get(k.upper()) for k in settings}
  for key, value in settings.items():
    jax.config.update(key, value)
    os.environ[key.upper()] = str(value)
  yield path
  for key, value in previous.items():
    jax.config.update(key, value)
  for key, value in env_before.items():
    if value is None:
      os.environ.pop(key, None)
    else:
      os.environ[key] = value


@pytest.fixture(scope="session")
def qwen_tiktoken_path() -> pathlib.Path:
  """Path of the real Qwen vocabulary; skips the test with the reason when it is not on this machine."""
  path = pathlib.Path(os.environ.get("QWEN_TIKTOKEN", SHARED_TIKTOKEN))
  if not path.is_file():
    pytest.skip(f"the real Qwen vocabulary is not at {path} (set QWEN_TIKTOKEN to a qwen.tiktoken file)")
  return path


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory, compile_cache_dir):
  """(workdir, TrainResult, {step: loss}) of one uninterrupted stage-2 `tests.training.helpers.SMALL` run (24
  steps, compiled through the session's compilation cache, so resumed runs and subprocesses reuse its step). Its
  users only read the workdir."""
  del compile_cache_dir  # set up first
  from qwenvl_jax.training import train  # pylint: disable=import-outside-toplevel  (after the XLA flags above)
  from tests.training.helpers import read_losses, small_config  # pylint: disable=import-outside-toplevel
  workdir = tmp_path_factory.mktemp("uninterrupted")
  result = train(small_config(2, workdir))
  return workdir, result, read_losses(workdir)


@pytest.fixture(scope="session", autouse=True)
def background_work(request, tmp_path_factory, compile_cache_dir):
  """Starts the subprocess work registered in tests/background.py by the modules of the selected tests (after the
  compilation cache is exported, which their subprocesses use); stops what still runs when the session ends."""
  del compile_cache_dir
  from tests import background  # pylint: disable=import-outside-toplevel
  start = time.time()
  background.start_selected(request.session.items, tmp_path_factory.mktemp)
  yield
  background.REPORT[:] = background.summary(start)
  background.stop_all()


def pytest_collection_modifyitems(items):
  """The tests of the modules that register background work run last (tests/background.py
  `modules_with_work_last`), so that they find their jobs done instead of waiting for them."""
  from tests import background  # pylint: disable=import-outside-toplevel
  items[:] = background.modules_with_work_last(items)


def pytest_terminal_summary(terminalreporter):
  """Where the background work's time went (tests/background.py `summary`)."""
  from tests import background  # pylint: disable=import-outside-toplevel
  if background.REPORT:
    terminalreporter.write_sep("-", "background work (seconds from the session's start)")
    for line in background.REPORT:
      terminalreporter.write_line(line)
