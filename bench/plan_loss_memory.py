"""Per-chip memory of the full-size train step with the unchunked and the chunked loss, by AOT compilation, and
the fewest micro-batches that fit.

  flock /tmp/bigjob.lock python bench/plan_loss_memory.py --stages=1,2,3 --topologies=v5p-128,v4-128 \\
      --chunks=0,512
  flock /tmp/bigjob.lock python bench/plan_loss_memory.py --stages=2 --topologies=v5p-128 --chunks=512 \\
      --accum=8 --fewest --out=/tmp/loss_memory.jsonl

Needs libtpu (requirements-tpu-aot.txt). For each stage x topology x loss_chunk (0 = the full float32 logits)
x accumulation steps it compiles the real train step of `configs/stage<N>.py:model=qwen_vl_7b` (what
`python -m qwenvl_jax.plan --topology=...` does; xla attention, the stage's remat) and prints one row: memory per
chip (arguments + outputs + temporaries - aliased), the compiler's temporaries, whether it fits the chip's HBM,
and the float32 buffers of the compiled program that span the whole sequence and vocabulary (`[rows, T, 151936]`:
there should be none with the chunked loss).

`--fewest`: after the listed micro-batch counts, search the halvings of the fewest that fit (each the nearest
count whose micro-batch still splits over the chips) for the fewest that fits. Temporaries grow about in
proportion to the rows of a micro-batch, so from the fewest fitting compile the total at a counts is predicted
as total + temps x (a0 / a - 1): the search compiles the smallest halving predicted to fit; if it fits, it
compiles the next halving unless that is predicted over `--skip_over` x HBM (then printed as predicted, not
compiled); if it does not fit, it steps back up one halving. Rows marked "predicted" were not compiled.

Each compile runs in its own child process (libtpu 0.0.42.1 has crashed compiling a third program in one
process; a child also returns its several GB of RAM). Each takes minutes of CPU; `--out` appends every result as
a JSON line as soon as it is known, and a later run with the same `--out` skips what is already there.
"""
import argparse
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GIB = 1024**3


def stage_config(stage: int):
  path = REPO / "configs" / f"stage{stage}.py"
  spec = importlib.util.spec_from_file_location(f"stage{stage}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config("model=qwen_vl_7b")


def compile_one(stage: int, topo_name: str, chunk: int, accum: int) -> dict:
  """Compiles one train step in this process; returns its figures."""
  from qwenvl_jax.hardware import chips  # pylint: disable=import-outside-toplevel
  from qwenvl_jax.planning import train_plan  # pylint: disable=import-outside-toplevel
  topology = chips.parse_topology(topo_name, 1)
  config = stage_config(stage)
  config.loss_chunk = chunk
  config.accum_steps = accum
  config.attention_impl = "xla"
  start = time.perf_counter()
  plan, facts = train_plan.plan_stage(config, topology)
  return {"stage": stage, "topology": topo_name, "chunk": chunk, "accum": accum,
          "total_gib": plan.total_bytes / GIB, "args_gib": plan.argument_bytes / GIB,
          "temp_gib": plan.temp_bytes / GIB, "hbm_gib": topology.chip.hbm_bytes / GIB, "fits": plan.fits,
          "compile_error": plan.compile_error, "full_logits_buffers": facts["full_logits_buffers"],
          "rows_per_chip": config.batch_size // accum // (topology.chips_per_slice * topology.num_slices),
          "remat": config.remat, "seconds": time.perf_counter() - start}


def run_child(stage: int, topo_name: str, chunk: int, accum: int, timeout: float) -> dict:
  """`compile_one` in a fresh Python; a crash or timeout is a row with `error`."""
  start = time.perf_counter()
  cmd = [sys.executable, __file__, f"--one={stage},{topo_name},{chunk},{accum}"]
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
  except subprocess.TimeoutExpired:
    return {"stage": stage, "topology": topo_name, "chunk": chunk, "accum": accum, "error": f"timeout {timeout} s"}
  lines = proc.stdout.strip().splitlines()
  if proc.returncode or not lines:
    tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
    return {"stage": stage, "topology": topo_name, "chunk": chunk, "accum": accum,
            "error": f"child exit {proc.returncode}: {tail[:200]}", "seconds": time.perf_counter() - start}
  row = json.loads(lines[-1])
  row["wall_seconds"] = time.perf_counter() - start
  return row


def format_row(r: dict) -> str:
  if "error" in r:
    return f"{r['stage']:>5} {r['topology']:>9} {r['chunk']:>6} {r['accum']:>5}  error: {r['error']}"
  fits = "yes" if r["fits"] else ("no (compiler: out of HBM)" if r["compile_error"] else "no")
  return (f"{r['stage']:>5} {r['topology']:>9} {r['chunk']:>6} {r['accum']:>5} {r['rows_per_chip']:>5} "
          f"{r['total_gib']:>7.1f} GiB {r['temp_gib']:>7.1f} GiB {r['hbm_gib']:>4.0f} GiB {fits:>5}  "
          f"{' '.join(r['full_logits_buffers']) or 'none'}   ({r.get('wall_seconds', r['seconds']):.0f} s)")


def splits(batch: int, accum: int, chips_: int) -> bool:
  return accum >= 1 and batch % accum == 0 and (batch // accum) % chips_ == 0


def next_fewer(batch: int, accum: int, chips_: int) -> int | None:
  """The largest count <= accum / 2 whose micro-batch splits over the chips (None when there is none)."""
  for a in range(accum // 2, 0, -1):
    if splits(batch, a, chips_):
      return a
  return None


def fewest_fit(batch: int, chips_: int, fitting: list[int], get, skip_over: float) -> int:
  """The fewest micro-batches that fit among the halvings below min(fitting) (see the module docstring).

  `get(accum)` compiles (or recalls) one count and returns its row; returns the fewest count seen to fit.
  """
  known = {a: get(a) for a in fitting}  # recalled, already compiled
  best = min(fitting)
  chain = []
  a = next_fewer(batch, best, chips_)
  while a is not None:
    chain.append(a)
    a = next_fewer(batch, a, chips_)
  if not chain:
    return best

  def predict(a: int) -> float:
    r = known[best]
    return r["total_gib"] + r["temp_gib"] * (best / a - 1)

  hbm = known[best]["hbm_gib"]
  under = [a for a in chain if predict(a) <= hbm]
  i = chain.index(min(under)) if under else 0
  while 0 <= i < len(chain) and chain[i] not in known:
    a = chain[i]
    if predict(a) > skip_over * hbm:
      print(f"{'':>23}{a:>5}  predicted {predict(a):.0f} GiB from {best} micro-batches (> {skip_over} x "
            f"{hbm:.0f} GiB HBM): not compiled", flush=True)
      break
    known[a] = get(a)
    if known[a].get("fits"):
      best = min(best, a)
      i += 1   # fewer still
    else:
      i -= 1   # back up one halving
  return best


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--stages", default="1,2,3")
  parser.add_argument("--topologies", default="v5p-128,v4-128")
  parser.add_argument("--chunks", default="0,512", help="config.loss_chunk values (0 = full logits)")
  parser.add_argument("--accum", default="", help="config.accum_steps values ('' = the stage's own)")
  parser.add_argument("--fewest", action="store_true", help="then halve the micro-batches until one does not fit")
  parser.add_argument("--out", default="", help="JSON lines file: results are appended, and reused when present")
  parser.add_argument("--skip_over", type=float, default=1.25,
                      help="with --fewest: do not compile a count predicted over this x HBM")
  parser.add_argument("--timeout", type=float, default=3600, help="seconds per compile")
  parser.add_argument("--one", default="", help=argparse.SUPPRESS)  # child: stage,topology,chunk,accum
  args = parser.parse_args()
  if args.one:
    stage, topo_name, chunk, accum = args.one.split(",")
    print(json.dumps(compile_one(int(stage), topo_name, int(chunk), int(accum))), flush=True)
    return

  from qwenvl_jax.hardware import chips  # pylint: disable=import-outside-toplevel
  done, shown = {}, set()
  if args.out and os.path.exists(args.out):
    with open(args.out, encoding="utf-8") as f:
      for line in f:
        r = json.loads(line)
        if "error" not in r:
          done[(r["stage"], r["topology"], r["chunk"], r["accum"])] = r

  def get(stage: int, topo_name: str, chunk: int, accum: int) -> dict:
    key = (stage, topo_name, chunk, accum)
    if key in done:
      if key not in shown:
        shown.add(key)
        print(format_row(dict(done[key], wall_seconds=done[key].get("wall_seconds", 0.0))) + " (from --out)",
              flush=True)
      return done[key]
    r = run_child(stage, topo_name, chunk, accum, args.timeout)
    print(format_row(r), flush=True)
    if "error" not in r:
      done[key] = r
      shown.add(key)
    if args.out:
      with open(args.out, "a", encoding="utf-8") as f:
        f.write(json.dumps(r) + "\n")
    return r

  print(f"{'stage':>5} {'topology':>9} {'chunk':>6} {'accum':>5} {'rows':>5} {'per chip':>11} {'temps':>11} "
        f"{'HBM':>8} {'fits':>5}  full-logits f32 buffers   (wall)", flush=True)
  for stage in [int(s) for s in args.stages.split(",")]:
    base = stage_config(stage)
    for topo_name in args.topologies.split(","):
      n = chips.parse_topology(topo_name, 1).chips_per_slice
      for chunk in [int(c) for c in args.chunks.split(",")]:
        counts = [int(a) for a in args.accum.split(",")] if args.accum else [base.accum_steps]
        fitting = []
        for accum in counts:
          if not splits(base.batch_size, accum, n):
            print(f"{stage:>5} {topo_name:>9} {chunk:>6} {accum:>5}  skipped: {base.batch_size} rows in {accum} "
                  f"micro-batches do not split over {n} chips", flush=True)
            continue
          if get(stage, topo_name, chunk, accum).get("fits"):
            fitting.append(accum)
        if args.fewest and fitting:
          fewest_fit(base.batch_size, n, fitting, lambda a, s=stage, t=topo_name, c=chunk: get(s, t, c, a),
                     args.skip_over)


if __name__ == "__main__":
  main()
