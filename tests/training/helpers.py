"""Helpers of the training tests: small stage configs and subprocess environments."""
import importlib.util
import json
import os
import pathlib
import socket
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[2]


def load_stage_config(stage: int, arg: str | None = None):
  """`configs/stage<N>.py:get_config(arg)` loaded the way config_flags loads it (by path)."""
  spec = importlib.util.spec_from_file_location(f"stage{stage}_config", REPO / "configs" / f"stage{stage}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


# A tiny-model run small enough for tests: 56 px (4x4 patches), 8 rows of 64 tokens, float32, every step logged.
SMALL = {
    "res": 56, "batch_size": 8, "seq_len": 64, "max_images": 2, "total_steps": 24, "log_every": 1,
    "checkpoint.every": 4, "optimizer.warmup_steps": 2, "optimizer.lr": 3e-3, "progress_bar": False,
    "tensorboard": False, "data.num_workers": 0, "data.read_threads": 1, "synthetic_vocab_size": 400,
}


def small_config(stage: int, workdir, **overrides):
  """`configs/stage<N>.py` with SMALL and `overrides` ('a.b' keys) applied, writing to `workdir`."""
  c = load_stage_config(stage)
  c.workdir = str(workdir)
  # ml_collections' own dotted update: a key the config does not have is an error, as the same `--config.` flag is.
  c.update_from_flattened_dict({**SMALL, **overrides})
  return c


def small_flags(stage: int, workdir, **overrides) -> list[str]:
  """The same run as `small_config` as `python -m qwenvl_jax.train` arguments."""
  args = [f"--config={REPO / 'configs' / f'stage{stage}.py'}", f"--workdir={workdir}"]
  return args + [f"--config.{k}={v}" for k, v in {**SMALL, **overrides}.items()]


def read_losses(workdir) -> dict[int, float]:
  """step -> loss from `<workdir>/metrics.jsonl` (later lines win, as after a resume)."""
  out = {}
  with open(pathlib.Path(workdir) / "metrics.jsonl", encoding="utf-8") as f:
    for line in f:
      record = json.loads(line)
      if "loss" in record:  # evaluation rows hold scores only
        out[record["step"]] = record["loss"]
  return out


def process_alive(pid: int) -> bool:
  """Whether process `pid` runs (a zombie, dead and not yet reaped, does not)."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except OSError:
    return False


def live_children(pid: int) -> dict[int, str]:
  """pid -> command line of the live (not zombie) child processes of `pid`."""
  out = {}
  for entry in os.listdir("/proc"):
    if not entry.isdigit():
      continue
    try:
      with open(f"/proc/{entry}/stat") as f:
        stat = f.read()
      with open(f"/proc/{entry}/cmdline", "rb") as f:
        cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
      continue
    fields = stat.rsplit(")", 1)[1].split()
    if int(fields[1]) == pid and fields[0] != "Z":
      out[int(entry)] = cmdline
  return out


def free_port() -> int:
  """A TCP port free on localhost now (for a coordinator or a server)."""
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def process_of_two(workdir, index: int, port, **overrides) -> list[str]:
  """The command of process `index` of a two-process stage-2 trainer run (`small_flags`) joined at localhost:`port`
  (an int, or tests/together.py's "{free_port}"); it runs with `subprocess_env(devices=2)`."""
  return [sys.executable, "-m", "qwenvl_jax.train"] + small_flags(
      2, workdir, **{"distributed.coordinator": f"localhost:{port}", "distributed.num_processes": 2,
                     "distributed.process_id": index, **overrides})


def processes_of_two(workdir, **overrides) -> list[dict]:
  """Both processes of that run as tests/together.py's spec entries (their port chosen when they start)."""
  return [{"argv": process_of_two(workdir, i, "{free_port}", **overrides), "env": subprocess_env(devices=2),
           "cwd": REPO} for i in range(2)]


def start_process_of_two(workdir, index: int, port: int, *, cwd=REPO, **overrides) -> subprocess.Popen:
  """Process `index` of that run started now, its stdout and stderr piped."""
  return subprocess.Popen(process_of_two(workdir, index, port, **overrides), env=subprocess_env(devices=2), cwd=cwd,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def stderr_of_all(procs: list, timeout: float) -> list[str]:
  """Waits for every process (killing those still running when one times out) and returns their stderr."""
  errs = []
  try:
    for p in procs:
      errs.append(p.communicate(timeout=timeout)[1])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  return errs


def subprocess_env(devices: int = 8, *, default_llvm_level: bool = False) -> dict:
  """Environment for a trainer subprocess: CPU, `devices` fake devices, the repo importable (the session's
  compilation cache and XLA flags come with `os.environ`, exported by tests/conftest.py). `default_llvm_level`: XLA's
  default LLVM level and fusion emitters instead of the session's -O0 and older emitters, for a run of hundreds of
  steps (at -O0 a step of the tiny model on one device takes 38.5 ms instead of 17.5 ms, while compiling saves
  seconds once; test_runner_trained's 1000-step run took 42.0 s with XLA's defaults, 46.4 s with the older emitters
  at the default level)."""
  env = dict(os.environ)
  env["JAX_PLATFORMS"] = "cpu"
  dropped = ("xla_force_host_platform_device_count",) + (
      ("xla_backend_optimization_level", "xla_cpu_use_fusion_emitters") if default_llvm_level else ())
  flags = " ".join(f for f in env.get("XLA_FLAGS", "").split() if not any(d in f for d in dropped))
  env["XLA_FLAGS"] = (flags + f" --xla_force_host_platform_device_count={devices}").strip()
  env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
  return env


def wait_for_step(workdir, step: int, proc, timeout: float) -> None:
  """Waits until the trainer subprocess `proc` has logged `step` to metrics.jsonl; fails if it exits first."""
  import time  # pylint: disable=import-outside-toplevel
  deadline = time.time() + timeout
  path = os.path.join(workdir, "metrics.jsonl")
  while time.time() < deadline:
    if proc.poll() is not None:
      stderr = proc.stderr.read()[-3000:] if proc.stderr else ""
      raise AssertionError(f"trainer exited early with {proc.returncode}: {stderr}")
    if os.path.exists(path):
      with open(path) as f:
        steps = [json.loads(line)["step"] for line in f if line.strip()]
      if steps and max(steps) >= step:
        return
    time.sleep(0.2)
  raise AssertionError(f"no step {step} within {timeout} s")


def sigterm_and_rerun(folder: pathlib.Path, flags: list[str], step: int, *, default_llvm_level: bool = False) -> list:
  """The commands of a background job (tests/background.py): `python -m qwenvl_jax.train FLAGS` (8 fake devices) gets
  SIGTERM once it has logged `step` (tests/together.py, its files in `folder/processes`), then runs again (both with
  `subprocess_env(default_llvm_level=...)`)."""
  import signal  # pylint: disable=import-outside-toplevel
  from tests import background, together  # pylint: disable=import-outside-toplevel
  workdir = next(f.split("=", 1)[1] for f in flags if f.startswith("--workdir="))
  cmd, env = [sys.executable, "-m", "qwenvl_jax.train"] + flags, subprocess_env(default_llvm_level=default_llvm_level)
  sigterm = {"to": 0, "signal": int(signal.SIGTERM),
             "when": {"metrics": os.path.join(workdir, "metrics.jsonl"), "step": step}}
  spec = together.write_spec(folder / "processes", [{"argv": cmd, "env": env, "cwd": REPO}], signal=sigterm)
  return [background.Command(spec, env), background.Command(cmd, env)]


def stopped_and_rerun(finished) -> tuple[str, int, int, subprocess.CompletedProcess]:
  """(stderr of the stopped run, the step it saved on the signal, the last step logged when the signal was sent,
  the rerun) of a `sigterm_and_rerun` job's (folder, finished commands) (`background.finished_work`'s fixture);
  fails unless the run got the signal, exited 143 and saved."""
  import re  # pylint: disable=import-outside-toplevel
  from tests import together  # pylint: disable=import-outside-toplevel
  folder, (stopped, *rest) = finished
  assert stopped.returncode == 0, stopped.stderr[-3000:]
  result, (err,) = together.read_result(folder / "processes")
  assert result["signalled"] and result["codes"] == [143], (result, err[-3000:])
  saved = re.search(r"stop requested: saved step (\d+)", err)
  assert saved and rest, err[-3000:]
  return err, int(saved.group(1)), result["at_signal"], rest[0]
