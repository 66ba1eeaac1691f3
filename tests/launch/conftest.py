"""Helpers for the launcher tests: run launch/tpu.py, and fake gcloud / worker environments to run commands in."""
import os
import pathlib
import shlex
import stat
import subprocess
import sys

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
TPU_PY = REPO_ROOT / "launch" / "tpu.py"
sys.path.insert(0, str(REPO_ROOT / "launch"))

# Records its arguments, one NUL-terminated item each, then exits 0 (or prints $FAKE_STDOUT).
_RECORDER = """#!/bin/bash
for a in "$@"; do printf '%s\\0' "$a"; done >> "{log}"
printf '\\n\\0' >> "{log}"
if [ -n "${{FAKE_STDOUT:-}}" ]; then echo "$FAKE_STDOUT"; fi
"""


def write_recorder(path: pathlib.Path, log: pathlib.Path) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(_RECORDER.format(log=log))
  path.chmod(path.stat().st_mode | stat.S_IEXEC)


def read_recorded(log: pathlib.Path) -> list[list[str]]:
  """The argv lists a recorder saw, in call order."""
  if not log.exists():
    return []
  calls, current = [], []
  for item in log.read_text().split("\0")[:-1]:
    if item == "\n":
      calls.append(current)
      current = []
    else:
      current.append(item)
  return calls


@pytest.fixture
def fake_gcloud(tmp_path):
  """A PATH whose `gcloud` only records its calls (the real one must never run in tests)."""
  log = tmp_path / "gcloud_calls"
  write_recorder(tmp_path / "bin" / "gcloud", log)
  env = dict(os.environ, PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}")
  return env, log


def launch(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, str(TPU_PY), *args], capture_output=True, text=True, env=env,
                        cwd=REPO_ROOT, timeout=60, check=False)


def dry_commands(args: list[str], env: dict | None = None) -> list[list[str]]:
  """The commands `tpu.py <args> --dry-run` prints, each split back into its argv; fails on a non-zero exit."""
  cut = args.index("--") if "--" in args else len(args)
  proc = launch([*args[:cut], "--dry-run", *args[cut:]], env)
  assert proc.returncode == 0, proc.stderr
  return [shlex.split(line) for line in proc.stdout.splitlines() if line and not line.startswith("#")]


def ssh_command(argv: list[str]) -> str:
  """The remote shell command of a `gcloud ... ssh --command=...` argv."""
  (command,) = [a[len("--command="):] for a in argv if a.startswith("--command=")]
  return command
