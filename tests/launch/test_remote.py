"""The worker-side scripts, run with bash in a fake $HOME (fake venv python, real tar)."""
import os
import subprocess
import tarfile

import pytest

import _remote
from tests.launch.conftest import read_recorded, write_recorder


def run_bash(script: str, home) -> subprocess.CompletedProcess:
  return subprocess.run(["bash", "-c", script], env=dict(os.environ, HOME=str(home)), capture_output=True,
                        text=True, timeout=60, check=False)


def test_install_unpacks_the_project_and_pins_jax_for_tpu(tmp_path):
  home = tmp_path / "home"
  src = tmp_path / "src"
  (src / "qwenvl_jax").mkdir(parents=True)
  (src / "requirements.txt").write_text("jax==0.10.2\n")
  (src / "qwenvl_jax" / "__init__.py").write_text("")
  home.mkdir()
  with tarfile.open(home / "qwenvl_jax.tar.gz", "w:gz") as tar:
    for path in ("requirements.txt", "qwenvl_jax"):
      tar.add(src / path, arcname=path)
  # An old install is replaced, not merged into.
  (home / "qwenvl_jax").mkdir()
  (home / "qwenvl_jax" / "stale.py").write_text("")
  calls = tmp_path / "pip_calls"
  write_recorder(home / "qwenvl_venv" / "bin" / "python", calls)
  proc = run_bash(_remote.install_script("qwenvl_jax.tar.gz", "jax[tpu]==0.10.2"), home)
  assert proc.returncode == 0, proc.stderr
  assert (home / "qwenvl_jax" / "qwenvl_jax" / "__init__.py").exists()
  assert not (home / "qwenvl_jax" / "stale.py").exists()
  assert not (home / "qwenvl_jax.tar.gz").exists()
  recorded = read_recorded(calls)
  assert ["-m", "pip", "install", "-q", "-r", "requirements.txt", "jax[tpu]==0.10.2"] in recorded
  assert ["-m", "pip", "install", "-q", "--no-deps", "-e", "."] in recorded


def test_install_stops_at_the_first_failure(tmp_path):
  home = tmp_path / "home"
  home.mkdir()
  calls = tmp_path / "calls"
  write_recorder(home / "qwenvl_venv" / "bin" / "python", calls)
  proc = run_bash(_remote.install_script("missing.tar.gz", "jax[tpu]==0.10.2"), home)
  assert proc.returncode != 0
  assert read_recorded(calls) == []  # pip never ran on a failed unpack


def test_logs_and_stop_report_a_missing_run(tmp_path):
  proc = run_bash(_remote.logs_script("nope", follow=False), tmp_path)
  assert proc.returncode == 1 and "no log for run nope" in proc.stderr
  proc = run_bash(_remote.stop_script("nope"), tmp_path)
  assert proc.returncode == 0 and "not running" in proc.stdout


def test_stop_sends_sigterm_to_the_recorded_pid(tmp_path):
  sleeper = subprocess.Popen(["sleep", "30"])
  try:
    (tmp_path / "qwenvl_jax_logs").mkdir()
    (tmp_path / "qwenvl_jax_logs" / "r.pid").write_text(f"{sleeper.pid}\n")
    proc = run_bash(_remote.stop_script("r"), tmp_path)
    assert "sent SIGTERM" in proc.stdout
    assert sleeper.wait(timeout=10) == -15
  finally:
    if sleeper.poll() is None:
      sleeper.kill()


def test_parse_env_keeps_equals_and_spaces():
  assert _remote.parse_env(["A=1", "XLA_FLAGS=--a=b --c"]) == {"A": "1", "XLA_FLAGS": "--a=b --c"}
  for bad in ["NOVALUE", "1X=2", "A-B=3"]:
    with pytest.raises(ValueError, match="--env"):
      _remote.parse_env([bad])
