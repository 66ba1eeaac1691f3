"""bench/bench_train_step_gpu.py runs as a GPU session will run it (where device time is short): the real trainer
per attention kernel in a subprocess, its measured rates read back, the planner's estimate for the same devices,
and a kernel the backend cannot run reported on its row, with a non-zero exit. On CPU with the tiny preset."""
import subprocess
import sys

import pytest

from tests.training import helpers


@pytest.mark.slow
def test_the_gpu_step_bench_measures_and_plans_on_this_host():
  proc = subprocess.run(
      [sys.executable, "bench/bench_train_step_gpu.py", "--preset=tiny", "--impls=xla,cudnn", "--batch=2",
       "--seq_len=64", "--res=56", "--steps=3", "--log_every=1", "--chip=h200", "--dtype=float32"],
      capture_output=True, text=True, cwd=helpers.REPO, env=helpers.subprocess_env(devices=1), timeout=600,
      check=False)
  assert proc.returncode == 1, proc.stdout + proc.stderr  # cudnn cannot run on a CPU
  rows = {line.split()[0]: line for line in proc.stdout.splitlines() if line.strip().startswith(("xla ", "cudnn "))}
  xla = rows["xla"].split()
  # measured: seconds per step and tokens/s (2 x 64 tokens per step) from the trainer's own metrics.jsonl
  seconds, tokens_per_s = float(xla[1]), float(xla[2])
  assert seconds > 0 and tokens_per_s == pytest.approx(2 * 64 / seconds, rel=0.02)
  # planned: an estimated step-time range and MFU range, and the compiler's bytes per device
  assert xla[3] == "n/a" and xla[4] == "|" and "-" in xla[5] and xla[6].endswith("%") and float(xla[7]) > 0
  assert "failed" in rows["cudnn"]
  assert "cudnn: the trainer failed: error: config.attention_impl='cudnn'" in proc.stdout
