"""The shell scripts the launcher runs on every TPU VM worker (through `gcloud ... ssh --command`).

Every value that comes from the user is passed through `shlex.quote`, so configs, flags and paths with spaces or
quotes reach the trainer unchanged. Paths on the workers:

  $HOME/qwenvl_jax          the project (replaced by each `install`)
  $HOME/qwenvl_venv         the Python environment (created once, updated by each `install`)
  $HOME/qwenvl_jax_logs/    <run>.log (stdout+stderr of the trainer) and <run>.pid
"""
import re
import shlex
from collections.abc import Mapping, Sequence

PROJECT_DIR = "$HOME/qwenvl_jax"
VENV = "$HOME/qwenvl_venv"
LOG_DIR = "$HOME/qwenvl_jax_logs"
_RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def check_run_name(run: str) -> str:
  if not _RUN_NAME.fullmatch(run):
    raise ValueError(f"--run {run!r}: use letters, digits, '.', '_' and '-' (it names the log file)")
  return run


def parse_env(items: Sequence[str]) -> dict[str, str]:
  """['K=V', ...] -> {'K': 'V'}; the value may contain '=' and spaces.

  Raises:
    ValueError: an item without '=' or with a name that is not a shell variable name.
  """
  env = {}
  for item in items:
    name, sep, value = item.partition("=")
    if not sep or not _ENV_NAME.fullmatch(name):
      raise ValueError(f"--env {item!r}: expected NAME=VALUE with NAME a shell variable name")
    env[name] = value
  return env


def install_script(tarball: str, jax_tpu_requirement: str) -> str:
  """Unpacks the uploaded project tarball and installs it with its pinned requirements and JAX for TPU.

  Args:
    tarball: path of the uploaded tarball on the worker, relative to $HOME.
    jax_tpu_requirement: e.g. 'jax[tpu]==0.10.2' (the version pinned in requirements.txt).
  """
  tar = f"$HOME/{shlex.quote(tarball)}"
  steps = [
      "set -euo pipefail",
      # The base images ship python3 without venv on some generations.
      f"if [ ! -x {VENV}/bin/python ]; then python3 -m venv {VENV} || "
      f"{{ sudo apt-get update -qq && sudo apt-get install -y -qq python3-venv && python3 -m venv {VENV}; }}; fi",
      f"rm -rf {PROJECT_DIR}.new && mkdir -p {PROJECT_DIR}.new && tar -xzf {tar} -C {PROJECT_DIR}.new",
      f"rm -rf {PROJECT_DIR} && mv {PROJECT_DIR}.new {PROJECT_DIR} && rm -f {tar}",
      f"cd {PROJECT_DIR}",
      f"{VENV}/bin/python -m pip install -q --upgrade pip",
      f"{VENV}/bin/python -m pip install -q -r requirements.txt {shlex.quote(jax_tpu_requirement)}",
      # gs:// workdirs and data: etils.epath goes through gcsfs (which also brings google-cloud-storage).
      f"{VENV}/bin/python -m pip install -q gcsfs==2026.10.1",
      f"{VENV}/bin/python -m pip install -q --no-deps -e .",
      f"echo \"installed on $(hostname): $({VENV}/bin/python -c 'import jax; print(jax.__version__)')\"",
  ]
  return "; ".join(steps)


def train_script(run: str, trainer_args: Sequence[str], env: Mapping[str, str]) -> str:
  """Starts `python -m qwenvl_jax.train <trainer_args>` detached (it survives the ssh session) with `env`.

  Refuses to start when the run's log already exists on the worker: a run name is used once, so a second start
  never truncates the log of the first.
  """
  check_run_name(run)
  log = f"{LOG_DIR}/{run}.log"
  pid = f"{LOG_DIR}/{run}.pid"
  assignments = [f"{name}={shlex.quote(value)}" for name, value in env.items()]
  command = " ".join(["nohup", "env", *assignments, f"{VENV}/bin/python", "-m", "qwenvl_jax.train",
                      *(shlex.quote(a) for a in trainer_args)])
  return "; ".join([
      "set -euo pipefail",
      f"mkdir -p {LOG_DIR}",
      f"if [ -e {log} ]; then echo \"run {run} was already started on $(hostname): {log} exists; pick a new --run\" "
      f">&2; exit 1; fi",
      f"cd {PROJECT_DIR}",
      # All three streams redirected: the ssh session can close while the trainer keeps running.
      f"{command} > {log} 2>&1 < /dev/null & echo $! > {pid}",
      f"echo \"started {run} on $(hostname), pid $(cat {pid}), log {log}\"",
  ])


def logs_script(run: str, *, follow: bool = True) -> str:
  """Prints the run's log from its start and, with `follow`, keeps streaming it."""
  check_run_name(run)
  log = f"{LOG_DIR}/{run}.log"
  tail = f"tail -n +1 -F {log}" if follow else f"cat {log}"
  return f"if [ ! -e {log} ]; then echo \"no log for run {run} on $(hostname)\" >&2; exit 1; fi; {tail}"


def stop_script(run: str) -> str:
  """Sends SIGTERM to the run's trainer: it writes a checkpoint and exits (status 143)."""
  check_run_name(run)
  pid = f"{LOG_DIR}/{run}.pid"
  return (f"if [ -e {pid} ] && kill -0 $(cat {pid}) 2>/dev/null; then kill -TERM $(cat {pid}) && "
          f"echo \"sent SIGTERM to {run} on $(hostname)\"; else echo \"{run} is not running on $(hostname)\"; fi")
