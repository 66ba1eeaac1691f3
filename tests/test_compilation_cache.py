"""Every command runs with JAX's persistent compilation cache (`qwenvl_jax/compilation_cache.py`, turned on by
`cli.run`): a second run loads what the first compiled. Checked through `cli.run` in fresh processes, with JAX's own
cache hit/miss events."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

from qwenvl_jax import compilation_cache

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


def _run(env_changes: dict) -> tuple[dict, str]:
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE"))}
  env.update(env_changes, PYTHONPATH=str(REPO))
  proc = subprocess.run([sys.executable, "-c", _COMMAND], env=env, capture_output=True, text=True, timeout=300,
                        check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def test_a_second_run_loads_what_the_first_compiled(tmp_path):
  folder = tmp_path / "cache"
  first, _ = _run({compilation_cache.ENV: str(folder)})
  assert first["folder"] == str(folder)
  assert first["misses"] >= 1 and first["hits"] == 0
  entries = sorted(p.name for p in folder.iterdir())
  assert entries  # written, even for a program that compiles in well under JAX's default 1 s threshold
  second, stderr = _run({compilation_cache.ENV: str(folder)})
  rejected = [line for line in stderr.splitlines() if "Error reading persistent compilation cache entry" in line]
  if second["hits"] == 0 and rejected:
    # A jaxlib bug on some Intel CPUs: the XLA:CPU loader refuses the host's own entries and JAX compiles anew.
    pytest.skip(f"jaxlib rejects its own CPU cache entries on this host (jax #38445): {rejected[0][:300]}")
  assert second["hits"] >= 1 and second["misses"] == 0
  assert second["out"] == first["out"]
  assert sorted(p.name for p in folder.iterdir()) == entries


def test_off_and_jax_own_setting_leave_it_to_jax(tmp_path):
  off, _ = _run({compilation_cache.ENV: "off", "HOME": str(tmp_path)})
  assert not off["folder"] and off["hits"] == off["misses"] == 0
  assert not (tmp_path / ".cache").exists()
  zero, _ = _run({compilation_cache.ENV: "0", "HOME": str(tmp_path)})
  assert not zero["folder"] and not (tmp_path / ".cache").exists()
  own = tmp_path / "jax_own"
  mine, _ = _run({"JAX_COMPILATION_CACHE_DIR": str(own), compilation_cache.ENV: str(tmp_path / "ours")})
  assert mine["folder"] == str(own) and not (tmp_path / "ours").exists()


def test_the_default_folder_is_per_jaxlib_and_host_and_an_unusable_one_only_warns(tmp_path):
  default, _ = _run({"HOME": str(tmp_path)})
  folder = pathlib.Path(default["folder"])
  assert folder.parent == tmp_path / ".cache" / "qwenvl_jax" / "xla"
  import jaxlib.version  # pylint: disable=import-outside-toplevel
  assert folder.name == f"{jaxlib.version.__version__}-{compilation_cache.host_fingerprint()}"
  assert any(folder.iterdir())
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  blocked, stderr = _run({compilation_cache.ENV: str(blocker / "cache")})
  assert not blocked["folder"] and blocked["out"] == default["out"]
  assert "compilation cache off: cannot use" in stderr


def test_a_relative_setting_is_refused_not_made_a_folder(tmp_path):
  """`QWENVL_COMPILATION_CACHE=of` (a typo of off) made a folder ./of."""
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE"))}
  env.update({compilation_cache.ENV: "of"}, PYTHONPATH=str(REPO))
  proc = subprocess.run([sys.executable, "-c", _COMMAND], env=env, cwd=tmp_path, capture_output=True, text=True,
                        timeout=300, check=False)
  assert proc.returncode == 2 and not (tmp_path / "of").exists(), proc.stderr[-3000:]
  assert proc.stderr.splitlines() == [f"error: {compilation_cache.ENV}='of' is neither 'off' nor an absolute folder "
                                      "path"]
