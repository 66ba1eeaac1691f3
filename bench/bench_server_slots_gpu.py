"""How many serving slots of a full-size model fit on the GPUs of one host, measured (the GPU twin of
`python -m qwenvl_jax.planning.inference_plan --max_slots`, which answers for TPU slices without hardware).

  python bench/bench_server_slots_gpu.py                                   # qwen_vl_7b bf16, context 2048
  python bench/bench_server_slots_gpu.py --quantize=int8 --slots=64,128,256,384,512
  python bench/bench_server_slots_gpu.py --preset=mid --slots=8,16          # a quick check of the script

Prepared, not yet run (no GPU was lent when it was written). For each slot count B (each in a fresh child
process, so an out-of-memory leaves nothing behind) it builds the serving engine's device side
(`serving.slots.SlotModel`) on the inference layout (`inference_tp`: tensor parallel over the host's GPUs, the
default of `python -m qwenvl_jax.serve`) with random weights, prefills one `--prompt`-token request with one image
into a slot, runs `--steps` decode steps of all B slots, and prints: fits or out of memory, the compiler's
per-device bytes of the decode step (memory_analysis), the device's peak bytes in use, the decode step's time
and tokens/s (B tokens per step), and the one-request prefill's time and temporaries (memory_analysis). The last line is the largest B that ran. Compare it with the planner's answer
for a TPU chip of the same memory.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

GIB = 2 ** 30


def one(args) -> dict:
  """Builds B slots and runs them; returns the figures (raises on out of memory)."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from qwenvl_jax import sharding  # pylint: disable=import-outside-toplevel
  from qwenvl_jax.inference import layout, loading, slot_programs  # pylint: disable=import-outside-toplevel
  from qwenvl_jax.model import QwenVL, get_preset  # pylint: disable=import-outside-toplevel
  from qwenvl_jax.serving import slots as slots_lib  # pylint: disable=import-outside-toplevel

  cfg = get_preset(args.preset, dtype="bfloat16", param_dtype="bfloat16", remat_policy="none")
  mesh, rules = layout.make_inference_mesh(cfg, tensor_parallel=args.tensor_parallel)
  model = sharding.init_sharded(lambda: QwenVL(cfg, rngs=nnx.Rngs(0)), mesh, rules)
  qcfg = loading.quantization_config(args.quantize)
  if qcfg is not None:
    from qwenvl_jax.inference import quantized  # pylint: disable=import-outside-toplevel
    model = quantized.quantize_sharded(model, qcfg, mesh, rules)
  b, p = args.one, args.prompt
  rng = np.random.default_rng(0)
  greedy = slots_lib.Sampling.greedy
  rope = lambda k: np.full(k, cfg.llm.rope_base, np.float32)
  with sharding.use_rules(mesh, rules):
    slot_model = slots_lib.SlotModel(model, num_slots=b, context=args.context, feature_slots=1,
                                     cache_dtype="int8" if args.kv_cache_dtype == "int8" else None)
    s = cfg.vision.image_size
    feats = slot_model.encode(rng.integers(0, 256, (1, s, s, 3), dtype=np.uint8))
    ids = rng.integers(3, cfg.llm.vocab_size, (1, p)).astype(np.int32)
    ids[0, 5:5 + cfg.image_tokens] = cfg.image_pad_id
    prefill_args = (ids, np.array([p], np.int32), np.zeros(1, np.int32), feats, np.zeros(1, np.int32), rope(1),
                    greedy(1))
    slot_model.prefill(*prefill_args).tokens.block_until_ready()  # compile
    start = time.perf_counter()
    slot_model.prefill(*prefill_args).tokens.block_until_ready()
    prefill_ms = (time.perf_counter() - start) * 1e3
    prefill_analysis = slot_model._prefill.lower(  # pylint: disable=protected-access
        slot_model.state, slot_model.cache, slot_model.history, *prefill_args,
        *slot_programs.no_bias(1, cfg.llm.vocab_size),
        slot_programs.no_stops(1, cfg.llm.vocab_size)).compile().memory_analysis()
    tokens = np.ones(b, np.int32)
    positions = np.full(b, p, np.int32)
    lowered = slot_model.decode_program().lower(slot_model.state, slot_model.cache, slot_model.history, tokens,
                                                positions, np.ones(b, bool), rope(b), greedy(b))
    analysis = lowered.compile().memory_analysis()
    slot_model.decode(tokens, positions, np.ones(b, bool), rope(b), greedy(b)).tokens.block_until_ready()  # compile
    start = time.perf_counter()
    for i in range(args.steps):
      nxt = slot_model.decode(tokens, positions + 1 + i, np.ones(b, bool), rope(b), greedy(b)).tokens
    nxt.block_until_ready()
    step = (time.perf_counter() - start) / args.steps
  peak = max((d.memory_stats() or {}).get("peak_bytes_in_use", 0) for d in jax.local_devices())
  compiled = None
  if analysis is not None:
    compiled = (analysis.argument_size_in_bytes + analysis.output_size_in_bytes - analysis.alias_size_in_bytes
                + analysis.temp_size_in_bytes)
  prefill_temp = None if prefill_analysis is None else prefill_analysis.temp_size_in_bytes
  return {"slots": b, "layout": layout.describe(mesh), "compiled_bytes": compiled, "peak_bytes": peak,
          "step_ms": step * 1e3, "tokens_per_s": b / step, "prefill_ms": prefill_ms,
          "prefill_temp_bytes": prefill_temp}


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--preset", default="qwen_vl_7b")
  parser.add_argument("--quantize", default="none", choices=["none", "int8", "int4"])
  parser.add_argument("--kv_cache_dtype", default="bfloat16", choices=["bfloat16", "int8"])
  parser.add_argument("--context", type=int, default=2048)
  parser.add_argument("--prompt", type=int, default=1024)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--tensor_parallel", type=int, default=0)
  parser.add_argument("--slots", default="16,32,64,96,128,192,256")
  parser.add_argument("--one", type=int, default=0, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.one:
    print(json.dumps(one(args)))
    return
  largest = 0
  for b in (int(x) for x in args.slots.split(",")):
    cmd = [sys.executable, __file__, f"--one={b}"] + [a for a in sys.argv[1:] if not a.startswith("--slots")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ), check=False)
    if proc.returncode:
      oom = "RESOURCE_EXHAUSTED" in proc.stderr or "out of memory" in proc.stderr.lower()
      print(f"{b} slots: {'out of memory' if oom else 'failed: ' + proc.stderr.strip().splitlines()[-1]}",
            flush=True)
      if oom:
        break
      continue
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    largest = b
    compiled = "?" if r["compiled_bytes"] is None else f"{r['compiled_bytes'] / GIB:.2f}"
    prefill_temp = "?" if r["prefill_temp_bytes"] is None else f"{r['prefill_temp_bytes'] / GIB:.2f}"
    print(f"{b} slots ({r['layout']}): fits; decode step compiled {compiled} GiB per device, peak in use "
          f"{r['peak_bytes'] / GIB:.2f} GiB; {r['step_ms']:.1f} ms per step = {r['tokens_per_s']:.0f} tokens/s; "
          f"prefill of one {args.prompt}-token request {r['prefill_ms']:.1f} ms, temporaries {prefill_temp} GiB",
          flush=True)
  print(f"largest slot count that ran: {largest} (context {args.context}, weights {args.quantize}, KV cache "
        f"{args.kv_cache_dtype})")


if __name__ == "__main__":
  main()
