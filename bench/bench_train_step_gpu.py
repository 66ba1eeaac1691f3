"""A stage's train step on this host's accelerators, per `attention_impl`: the step time, tokens/s and MFU that
`python -m qwenvl_jax.train` measures, next to the planner's estimate for the same chips (issue 16).

  python bench/bench_train_step_gpu.py                       # mid preset, stage 2, bf16, xla vs cudnn, on a GPU
  python bench/bench_train_step_gpu.py --batch=16 --steps=20 --impls=cudnn
  JAX_PLATFORMS=cpu python bench/bench_train_step_gpu.py --preset=tiny --impls=xla --batch=2 --seq_len=128 \\
      --res=224 --steps=4 --log_every=2 --chip=h200 --dtype=float32       # a check of the script itself, on CPU

Per implementation it runs the real trainer (`python -m qwenvl_jax.train --config=configs/stageN.py:model=P`, the
synthetic data, `--steps` steps of `--batch` rows x `--seq_len` tokens, one micro-batch, the stage's remat, the
mesh over every local device) in a subprocess and reads its metrics.jsonl: the last logged interval (the first
one holds the compilation and has no rates) gives the seconds per step, tokens/s and MFU, against the chip's
peak from `hardware.chips`. Then, in this process, the planner compiles the same step for the same devices
(`planning.train_plan.plan_on_devices`, what `python -m qwenvl_jax.plan` runs for a TPU topology) and prints its
estimate: step time and MFU as a range (no overlap of compute and communication ... full overlap) and the
compiler's bytes per device. Each kernel's two lines print as soon as they are known (a run stopped at a time
limit keeps what it finished), then the table of all. The trainer writes a final checkpoint (the mid preset:
~12 GB of parameters and Adam moments, seconds on a local disk) into a temporary directory, removed afterwards.

`--chip` names the chip the estimate is for when the device kind does not (a CPU check of the script: the
estimate then is the chip's, for the program compiled for this CPU, and means nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# The planner runs in this process between the trainer subprocesses: without this, JAX would reserve most of the
# GPU's memory here (and the next trainer would run out of it), and the planner only compiles.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


def overrides(args, impl: str) -> dict:
  """The `--config.` overrides of one run (shared by the trainer subprocess and the planner)."""
  out = {"attention_impl": impl, "batch_size": args.batch, "accum_steps": 1, "seq_len": args.seq_len,
         "total_steps": args.steps, "log_every": args.log_every, "checkpoint.every": args.steps,
         "checkpoint.async_save": False, "progress_bar": False, "tensorboard": False}
  if args.res:
    out["res"] = args.res
  if args.dtype:
    out["model_dtype"] = args.dtype
  if args.remat:
    out["remat"] = args.remat
  return out


def run_trainer(args, impl: str, workdir: pathlib.Path) -> dict:
  """Trains `--steps` steps in a subprocess; returns the last logged record with rates (and the wall seconds)."""
  cmd = [sys.executable, "-m", "qwenvl_jax.train", f"--config={REPO / 'configs' / f'stage{args.stage}.py'}"
         f":model={args.preset}", f"--workdir={workdir}"]
  cmd += [f"--config.{k}={v}" for k, v in overrides(args, impl).items()]
  env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
  env.pop("XLA_PYTHON_CLIENT_PREALLOCATE", None)  # the trainer allocates as it does for users
  start = time.perf_counter()
  done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
  wall = time.perf_counter() - start
  if done.returncode != 0:
    return {"error": (done.stderr.strip().splitlines() or ["exit code " + str(done.returncode)])[-1], "wall": wall}
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  timed = [r for r in records if r.get("step_time_s")]
  if not timed:
    return {"error": f"no interval after the compilation was logged: raise --steps above --log_every "
                     f"({args.steps} <= {args.log_every})", "wall": wall}
  return dict(timed[-1], wall=wall)


def plan(args, impl: str):
  """The planner's estimate for this host's devices: (StepPlan, facts) or an error line."""
  import jax  # pylint: disable=import-outside-toplevel
  from qwenvl_jax.hardware import chips  # pylint: disable=import-outside-toplevel
  from qwenvl_jax.planning import train_plan  # pylint: disable=import-outside-toplevel
  from qwenvl_jax.training.stage_config import stage_config  # pylint: disable=import-outside-toplevel

  config = stage_config(args.stage, f"model={args.preset}")
  config.update_from_flattened_dict(overrides(args, impl))  # the same 'a.b' keys the trainer gets as flags
  devices = jax.devices()
  chip = chips.chip_spec(args.chip or devices[0].device_kind)
  return train_plan.plan_on_devices(config, devices, chip)


def _measured_cells(m: dict) -> str:
  """s/step, tokens/s and MFU of a trainer run, as table cells."""
  if "error" in m:
    return f"{'failed':>8} {'':>10} {'':>6}"
  mfu = f"{m['mfu']:.1%}" if m.get("mfu") is not None else "n/a"
  return f"{m['step_time_s']:>8.4g} {m['tokens_per_s']:>10.0f} {mfu:>6}"


def _planned_cells(p) -> str:
  """The estimate's step-time range, MFU range and compiler bytes per device, as table cells."""
  if p is None or isinstance(p, str):
    return f"{'-' if p is None else 'failed':>15} {'':>13} {'':>16}"
  step_plan = p[0]
  seconds, mfu = step_plan.step_seconds_range, step_plan.mfu_range
  s = f"{seconds[0]:.3g}-{seconds[1]:.3g}" if seconds else "n/a"
  u = f"{mfu[0]:.1%}-{mfu[1]:.1%}" if mfu else "n/a"
  return f"{s:>15} {u:>13} {step_plan.total_bytes / 2**30:>16.2f}"


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--preset", default="mid")
  parser.add_argument("--stage", type=int, default=2)
  parser.add_argument("--impls", default="xla,cudnn")
  parser.add_argument("--batch", type=int, default=8, help="rows per step (global; one micro-batch)")
  parser.add_argument("--seq_len", type=int, default=2048)
  parser.add_argument("--res", type=int, default=0, help="image size (0: the stage's)")
  parser.add_argument("--dtype", default="", help="compute dtype (default: the stage's, bfloat16 for mid)")
  parser.add_argument("--remat", default="", help="remat policy (default: the stage's)")
  parser.add_argument("--steps", type=int, default=12)
  parser.add_argument("--log_every", type=int, default=4)
  parser.add_argument("--chip", default="", help="chip of the estimate (default: from the device kind)")
  parser.add_argument("--no_plan", action="store_true", help="skip the planner's estimate")
  args = parser.parse_args()
  impls = [x for x in args.impls.split(",") if x]

  # Each row is printed as soon as it is known, so a run stopped at its time limit (bench/gpu_checks.sh) still
  # leaves the rows it finished.
  measured, planned = {}, {}
  for impl in impls:  # one kernel's pair (measured, planned) before the next kernel's
    print(f"training {args.preset} stage {args.stage}, attention {impl}: {args.steps} steps of {args.batch} x "
          f"{args.seq_len} ...", flush=True)
    with tempfile.TemporaryDirectory() as root:
      measured[impl] = run_trainer(args, impl, pathlib.Path(root) / impl)
    print(f"  measured ({measured[impl]['wall']:.0f} s): s/step, tokens/s, MFU = {_measured_cells(measured[impl])}",
          flush=True)
    if args.no_plan:
      continue
    print(f"planning attention {impl} for this host's devices ...", flush=True)
    try:
      planned[impl] = plan(args, impl)
    except Exception as e:  # pylint: disable=broad-except  (a bench: report the failure, keep the other rows)
      planned[impl] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    print(f"  planned: est. s/step, est. MFU, compiler GiB/dev = {_planned_cells(planned[impl])}", flush=True)

  print(f"\n{args.preset}, stage {args.stage}, {args.batch} x {args.seq_len} tokens per step")
  print(f"{'attention':>9} {'s/step':>8} {'tokens/s':>10} {'MFU':>6} | {'est. s/step':>15} {'est. MFU':>13} "
        f"{'compiler GiB/dev':>16}")
  for impl in impls:
    print(f"{impl:>9} {_measured_cells(measured[impl])} | {_planned_cells(planned.get(impl))}")
  for impl in impls:
    if "error" in measured[impl]:
      print(f"{impl}: the trainer failed: {measured[impl]['error']}")
    if isinstance(planned.get(impl), str):
      print(f"{impl}: the planner failed: {planned[impl]}")
  return 1 if any("error" in m for m in measured.values()) else 0


if __name__ == "__main__":
  sys.exit(main())
