"""Every command runs with JAX's persistent compilation cache (`qwenvl_jax/compilation_cache.py`, turned on by
`cli.run`): a second run loads what the first compiled. Checked through `cli.run` in fresh processes, with JAX's own
cache hit/miss events. The processes run as a background job from the session's start (tests/background.py)."""
import json
import os
import pathlib
import sys

import pytest

from qwenvl_jax import compilation_cache
from tests import background

REPO = pathlib.Path(__file__).resolve().parents[1]

# A command as the entry points are: absl flags, `cli.run(main)`; main compiles one program and reports.
_COMMAND = """
import json, jax, jax.numpy as jnp
from qwenvl_jax import cli
events = {"hits": 0, "misses": 0}
def count(name, **kwargs):
  for key in events:
    if name == f"/jax/compilation_cache/cache_{key}":
      events[key] += 1
jax.monitoring.register_event_listener(count)
def main(argv):
  out = jax.jit(lambda x: jnp.tanh(x @ x.T).sum())(jnp.arange(64.0).reshape(8, 8))
  print(json.dumps(dict(events, folder=jax.config.jax_compilation_cache_dir, out=float(out))))
cli.run(main)
"""


def _env(env_changes: dict) -> dict:
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE"))}
  env.update(env_changes, PYTHONPATH=str(REPO))
  return env


def _runs(folder):
  """The command runs the tests below read, in order, as the commands of a job registered in tests/background.py
  (from the session's start, on the core the other tests leave idle); `_RUNS` names them."""
  home, blocker = folder / "home", folder / "a_file"
  home.mkdir()
  blocker.write_text("")
  (folder / "cwd").mkdir()
  listing = [sys.executable, "-c", "import json, os, sys; print(json.dumps(sorted(os.listdir(sys.argv[1]))))",
             str(folder / "cache")]
  runs = {
      "first": {compilation_cache.ENV: str(folder / "cache")},
      "listing": None,
      "second": {compilation_cache.ENV: str(folder / "cache")},
      "off": {compilation_cache.ENV: "off", "HOME": str(folder / "off_home")},
      "zero": {compilation_cache.ENV: "0", "HOME": str(folder / "zero_home")},
      "own": {"JAX_COMPILATION_CACHE_DIR": str(folder / "jax_own"), compilation_cache.ENV: str(folder / "ours")},
      "default": {"HOME": str(home)},
      "blocked": {compilation_cache.ENV: str(blocker / "cache")},
      "relative": {compilation_cache.ENV: "of"},
  }
  assert tuple(runs) == _RUNS, tuple(runs)
  return [background.Command(listing, _env({}), check=False) if changes is None else
          background.Command([sys.executable, "-c", _COMMAND], _env(changes),
                             folder / "cwd" if name == "relative" else REPO, check=False)
          for name, changes in runs.items()]


_RUNS = ("first", "listing", "second", "off", "zero", "own", "default", "blocked", "relative")  # `_runs`'s, in order
runs = background.finished_work(__name__, "runs", _runs)


def _ran(runs, name: str) -> tuple[dict, str]:
  """(the JSON the command printed last, its stderr) of the finished command `name`."""
  _, procs = runs
  assert len(procs) == len(_RUNS), procs
  proc = procs[_RUNS.index(name)]
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def test_a_second_run_loads_what_the_first_compiled(runs):
  folder = runs[0] / "cache"
  first, _ = _ran(runs, "first")
  assert first["folder"] == str(folder)
  assert first["misses"] >= 1 and first["hits"] == 0
  entries, _ = _ran(runs, "listing")
  assert entries  # written, even for a program that compiles in well under JAX's default 1 s threshold
  second, stderr = _ran(runs, "second")
  rejected = [line for line in stderr.splitlines() if "Error reading persistent compilation cache entry" in line]
  if second["hits"] == 0 and rejected:
    # A jaxlib bug on some Intel CPUs: the XLA:CPU loader refuses the host's own entries and JAX compiles anew.
    pytest.skip(f"jaxlib rejects its own CPU cache entries on this host (jax #38445): {rejected[0][:300]}")
  assert second["hits"] >= 1 and second["misses"] == 0
  assert second["out"] == first["out"]
  assert sorted(p.name for p in folder.iterdir()) == entries


def test_off_and_jax_own_setting_leave_it_to_jax(runs):
  folder = runs[0]
  off, _ = _ran(runs, "off")
  assert not off["folder"] and off["hits"] == off["misses"] == 0
  assert not (folder / "off_home" / ".cache").exists()
  zero, _ = _ran(runs, "zero")
  assert not zero["folder"] and not (folder / "zero_home" / ".cache").exists()
  mine, _ = _ran(runs, "own")
  assert mine["folder"] == str(folder / "jax_own") and not (folder / "ours").exists()


def test_the_default_folder_is_per_jaxlib_and_host_and_an_unusable_one_only_warns(runs):
  default, _ = _ran(runs, "default")
  folder = pathlib.Path(default["folder"])
  assert folder.parent == runs[0] / "home" / ".cache" / "qwenvl_jax" / "xla"
  import jaxlib.version  # pylint: disable=import-outside-toplevel
  assert folder.name == f"{jaxlib.version.__version__}-{compilation_cache.host_fingerprint()}"
  assert any(folder.iterdir())
  blocked, stderr = _ran(runs, "blocked")
  assert not blocked["folder"] and blocked["out"] == default["out"]
  assert "compilation cache off: cannot use" in stderr


def test_a_relative_setting_is_refused_not_made_a_folder(runs):
  """`QWENVL_COMPILATION_CACHE=of` (a typo of off) made a folder ./of."""
  folder, procs = runs
  proc = procs[_RUNS.index("relative")]
  assert proc.returncode == 2 and not (folder / "cwd" / "of").exists(), proc.stderr[-3000:]
  assert proc.stderr.splitlines() == [f"error: {compilation_cache.ENV}='of' is neither 'off' nor an absolute folder "
                                      "path"]
