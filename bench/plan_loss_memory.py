"""Per-chip memory of the full-size train step with the unchunked and the chunked loss, by AOT compilation.

  flock /tmp/bigjob.lock python bench/plan_loss_memory.py --stages=1,2,3 --topologies=v5p-128,v4-128 \\
      --chunks=0,512
  flock /tmp/bigjob.lock python bench/plan_loss_memory.py --stages=2 --topologies=v5p-128 --chunks=512 \\
      --accum=8,4,2

Needs libtpu (requirements-tpu-aot.txt). For each stage x topology x loss_chunk (0 = the full float32 logits)
x accumulation steps it compiles the real train step of `configs/stage<N>.py:model=qwen_vl_7b` (what
`python -m qwenvl_jax.plan --topology=...` does) and prints one row: memory per chip (arguments + outputs +
temporaries - aliased), the compiler's temporaries, whether it fits the chip's HBM, and the float32 buffers of the
compiled program that span the whole sequence and vocabulary (`[rows, T, 151936]`: there should be none with the
chunked loss). Each compile takes minutes of CPU and several GB of RAM.
"""
import argparse
import importlib.util
import os
import pathlib
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from qwenvl_jax.hardware import chips  # pylint: disable=wrong-import-position
from qwenvl_jax.planning import train_plan  # pylint: disable=wrong-import-position

GIB = 1024**3


def stage_config(stage: int):
  path = pathlib.Path(__file__).resolve().parents[1] / "configs" / f"stage{stage}.py"
  spec = importlib.util.spec_from_file_location(f"stage{stage}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config("model=qwen_vl_7b")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--stages", default="1,2,3")
  parser.add_argument("--topologies", default="v5p-128,v4-128")
  parser.add_argument("--chunks", default="0,512", help="config.loss_chunk values (0 = full logits)")
  parser.add_argument("--accum", default="", help="config.accum_steps values ('' = the stage's own)")
  args = parser.parse_args()
  print(f"{'stage':>5} {'topology':>9} {'chunk':>6} {'accum':>5} {'per chip':>10} {'temps':>10} {'HBM':>7} "
        f"{'fits':>5}  full-logits f32 buffers", flush=True)
  for stage in [int(s) for s in args.stages.split(",")]:
    for topo_name in args.topologies.split(","):
      topology = chips.parse_topology(topo_name, 1)
      for chunk in [int(c) for c in args.chunks.split(",")]:
        for accum in [int(a) for a in args.accum.split(",")] if args.accum else [None]:
          config = stage_config(stage)
          config.loss_chunk = chunk
          if accum:
            config.accum_steps = accum
          start = time.perf_counter()
          plan, facts = train_plan.plan_stage(config, topology)
          print(f"{stage:>5} {topo_name:>9} {chunk:>6} {config.accum_steps:>5} {plan.total_bytes / GIB:>6.1f} GiB "
                f"{plan.temp_bytes / GIB:>6.1f} GiB {topology.chip.hbm_bytes / GIB:>3.0f} GiB {str(plan.fits):>5}  "
                f"{' '.join(facts['full_logits_buffers']) or 'none'}   ({time.perf_counter() - start:.0f} s)",
                flush=True)


if __name__ == "__main__":
  main()
