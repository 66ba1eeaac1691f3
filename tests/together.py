"""Starts several processes at once and waits for them all, as one command of a background job (tests/background.py
runs a job's commands one after the other): `python -m tests.together SPEC.json`.

The spec, written by the job's factory with `write_spec`: {"processes": [{"argv", "env", "cwd"}, ...]} and, optionally,
"signal": {"to": i, "signal": number, "when": W}, where W is {"stderr_of": j, "contains": text} (process j has
written text to its stderr) or {"metrics": path, "step": n} (a trainer has logged step n to its metrics.jsonl).
`{free_port}` in an argument becomes a TCP port free on localhost when the processes start (a port chosen when the
job was queued could be taken by then). Process i writes its output to `i.stdout` and `i.stderr` beside the spec;
`result.json` there gets the exit codes, each process's seconds from the start (to within the 0.1-s poll), whether
the signal was sent, and the last step the metrics file held just after it was (`at_signal`).

This command exits 0 whatever the processes' codes (the test reads them). It has no deadline of its own: a queued
job runs at the lowest CPU priority for as long as the other tests keep the cores busy, and the test that waits
for it bounds it (stopping a job kills this command's process group, the processes it started included).
"""
from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import time

from tests.training.helpers import free_port


def logged_steps(path) -> list[int]:
  """Steps in a metrics.jsonl so far (a line still being written is left out)."""
  steps = []
  try:
    with open(path, encoding="utf-8") as f:
      for line in f:
        try:
          steps.append(json.loads(line)["step"])
        except (ValueError, KeyError):
          pass
  except OSError:  # not written yet
    pass
  return steps


def _due(when: dict, folder: pathlib.Path) -> tuple[bool, list[int]]:
  """(whether the signal is due, the steps logged so far where `when` watches a metrics file)."""
  if "stderr_of" in when:
    return when["contains"] in (folder / f"{when['stderr_of']}.stderr").read_text(errors="replace"), []
  steps = logged_steps(when["metrics"])
  return max(steps, default=0) >= when["step"], steps


def main(spec_path: str) -> int:
  spec_file = pathlib.Path(spec_path)
  folder, spec = spec_file.parent, json.loads(spec_file.read_text())
  signal_spec = spec.get("signal")
  port = str(free_port())
  procs = []
  for i, p in enumerate(spec["processes"]):
    argv = [a.replace("{free_port}", port) for a in p["argv"]]
    with open(folder / f"{i}.stdout", "w") as out, open(folder / f"{i}.stderr", "w") as err:
      procs.append(subprocess.Popen(argv, env=p["env"], cwd=p["cwd"], stdout=out, stderr=err))
  signalled, at_signal = False, None
  started, seconds = time.monotonic(), [None] * len(procs)
  try:
    while any(p.poll() is None for p in procs):
      for i, p in enumerate(procs):
        if seconds[i] is None and p.returncode is not None:
          seconds[i] = time.monotonic() - started
      due, steps = _due(signal_spec["when"], folder) if signal_spec and not signalled else (False, [])
      if due:
        procs[signal_spec["to"]].send_signal(signal_spec["signal"])
        signalled = True
        if "metrics" in signal_spec["when"]:
          at_signal = max(logged_steps(signal_spec["when"]["metrics"]) + steps)
      time.sleep(0.1)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
      p.wait()
  seconds = [time.monotonic() - started if s is None else s for s in seconds]
  result = {"codes": [p.returncode for p in procs], "signalled": signalled, "at_signal": at_signal,
            "seconds": seconds}
  (folder / "result.json").write_text(json.dumps(result))
  return 0


def write_spec(folder: pathlib.Path, processes: list[dict], *, signal: dict | None = None) -> list[str]:
  """Writes the spec into `folder` (made if missing) and returns the argv that runs it (a background Command's)."""
  folder.mkdir(parents=True, exist_ok=True)
  spec = {"processes": [{"argv": [str(a) for a in p["argv"]], "env": p["env"], "cwd": str(p["cwd"])}
                        for p in processes]}
  if signal is not None:
    spec["signal"] = signal
  (folder / "spec.json").write_text(json.dumps(spec))
  return [sys.executable, "-m", "tests.together", str(folder / "spec.json")]


def read_result(folder: pathlib.Path) -> tuple[dict, list[str]]:
  """(result.json, [stderr of each process]) of a finished spec in `folder`."""
  result = json.loads((folder / "result.json").read_text())
  return result, [(folder / f"{i}.stderr").read_text(errors="replace") for i in range(len(result["codes"]))]


if __name__ == "__main__":
  sys.exit(main(sys.argv[1]))
