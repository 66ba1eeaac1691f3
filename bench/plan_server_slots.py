"""How many serving slots of the full-size model fit on a TPU slice, from small AOT compiles: the server's two
programs (`planning.inference_plan --server`: decode step over all slots, engine prefill of one request with one
image into the slots' cache, not serve's default 4 requests of up to 4 images) compiled with 2 and 4 decoder layers
at full width and two slot counts, then extrapolated to 32 layers.

A first guess only: at full depth it over-predicts (v5e-8 bf16 ~107 slots vs 72 by the full 9.6B `--max_slots`
search; v6e-8 ~228 vs 152), because near HBM the compiler's decode-step temporaries jump (the cache is no longer
updated in place); README's table has the full-depth figures.

  PYTHONPATH=/tmp/libtpu python bench/plan_server_slots.py --topologies=v5e-8,v6e-8 --quantize=none,int8

Why this works: the decoder is one scanned layer, so the compiled program is the same for any depth and only the
stacked weights and cache grow with it; per chip, bytes(L, B) = a + b L + c B + d L B for each program (weights and
cache exactly; the scan's temporaries are one layer's). Four compiles fit the four coefficients, a fifth (8 layers)
checks the fit (its error is printed), and the most slots B with both programs within HBM at the preset's depth is
solved from them. The full-size check of that answer is one `inference_plan --server --batch=B` run (printed;
a 9.6B compile, run it under the machine's shared lock). Each compile runs in its own child process (libtpu).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import textwrap

ROOT = pathlib.Path(__file__).resolve().parents[1]
GIB = 2 ** 30

_CHILD = """
import dataclasses, json
from qwenvl_jax.hardware import chips
from qwenvl_jax.model import get_preset
from qwenvl_jax.planning import inference_plan
cfg = get_preset({preset!r}, dtype="bfloat16", param_dtype="bfloat16", remat_policy="none").with_image_size({res})
cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, layers={layers}))
plan = inference_plan.plan_inference(cfg, chips.parse_topology({topology!r}, 1), quantize={quantize!r},
                                     batch={slots}, context={context}, prompt={prompt}, images=1,
                                     prefill_batch=1, kv_cache_dtype={kv!r}, rules_name="inference_tp",
                                     server=True)
print(json.dumps({{"decode": plan.decode.total_bytes, "prefill": plan.prefill.total_bytes,
                  "fits": plan.decode.fits and plan.prefill.fits, "hbm": plan.decode.chip.hbm_bytes,
                  "layout": plan.facts["layout"],
                  "seconds": plan.decode.compile_seconds + plan.prefill.compile_seconds}}))
"""


def compile_point(args, topology: str, quantize: str | None, kv: str | None, layers: int, slots: int) -> dict:
  code = _CHILD.format(preset=args.preset, res=args.res, layers=layers, topology=topology, quantize=quantize,
                       slots=slots, context=args.context, prompt=args.prompt, kv=kv)
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(
      p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p))
  proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                        cwd=ROOT, check=False)
  if proc.returncode:
    raise RuntimeError(proc.stderr[-2000:])
  return json.loads(proc.stdout.strip().splitlines()[-1])


def fit(points: dict[tuple[int, int], float]) -> tuple[float, float, float, float]:
  """(a, b, c, d) of y = a + b L + c B + d L B through the four points {(L, B): y} of a 2 x 2 grid."""
  (l1, l2), (b1, b2) = sorted({k[0] for k in points}), sorted({k[1] for k in points})
  y11, y12, y21, y22 = points[(l1, b1)], points[(l1, b2)], points[(l2, b1)], points[(l2, b2)]
  d = (y22 - y21 - y12 + y11) / ((l2 - l1) * (b2 - b1))
  c = (y12 - y11) / (b2 - b1) - d * l1
  b = (y21 - y11) / (l2 - l1) - d * b1
  a = y11 - b * l1 - c * b1 - d * l1 * b1
  return a, b, c, d


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--preset", default="qwen_vl_7b")
  parser.add_argument("--res", type=int, default=448)
  parser.add_argument("--layers", type=int, default=32, help="the depth to extrapolate to (the preset's)")
  parser.add_argument("--topologies", default="v5e-8,v6e-8")
  parser.add_argument("--quantize", default="none,int8", help="weights: none (bf16), int8, int4")
  parser.add_argument("--kv_cache_dtype", default="bfloat16", help="bfloat16 and/or int8, comma separated")
  parser.add_argument("--context", type=int, default=2048)
  parser.add_argument("--prompt", type=int, default=None,
                      help="prompt tokens of the prefill plan (default: the whole --context, the longest prefill "
                      "serve compiles, as the planner's server default)")
  parser.add_argument("--slots", default="32,64", help="the two slot counts compiled")
  args = parser.parse_args()
  args.prompt = args.context if args.prompt is None else args.prompt
  b1, b2 = (int(x) for x in args.slots.split(","))
  for topology in args.topologies.split(","):
    for q in args.quantize.split(","):
      for kv in args.kv_cache_dtype.split(","):
        quantize, kv_dtype = (None if q == "none" else q), ("int8" if kv == "int8" else None)
        got = {}
        for layers, slots in ((2, b1), (2, b2), (4, b1), (4, b2), (8, (b1 + b2) // 2)):
          got[(layers, slots)] = compile_point(args, topology, quantize, kv_dtype, layers, slots)
        hbm = got[(2, b1)]["hbm"]
        answer, checks = None, []
        limits = []
        for prog in ("decode", "prefill"):
          a, b, c, d = fit({k: v[prog] for k, v in got.items() if k[0] in (2, 4)})
          check_l, check_b = 8, (b1 + b2) // 2
          predicted = a + b * check_l + c * check_b + d * check_l * check_b
          checks.append(f"{prog} at 8 layers x {check_b} slots: compiled {got[(8, check_b)][prog] / GIB:.3f} GiB, "
                        f"predicted {predicted / GIB:.3f} GiB")
          fixed, per_slot = a + b * args.layers, c + d * args.layers
          limits.append(int((hbm - fixed) // per_slot))
          if prog == "decode":
            answer = (fixed, per_slot)
        slots_fit = max(min(limits), 0)
        fixed, per_slot = answer
        print(f"{topology} ({got[(2, b1)]['layout']}), weights {q}, KV cache {kv}, context {args.context}: "
              f"~{slots_fit} slots fit at {args.layers} layers (decode: {fixed / GIB:.2f} GiB + "
              f"{per_slot / 2 ** 20:.1f} MiB per slot per chip of {hbm / GIB:.0f} GiB; decode allows {limits[0]}, "
              f"prefill {limits[1]})", flush=True)
        for line in checks:
          print("   ", line, flush=True)
        print(f"    verify at full size: python -m qwenvl_jax.planning.inference_plan --preset={args.preset} "
              f"--topology={topology} --quantize={q} --kv_cache_dtype={kv} --context={args.context} "
              f"--prompt={args.prompt} --prefill_batch=1 --images=1 --server --batch={slots_fit}", flush=True)


if __name__ == "__main__":
  main()
