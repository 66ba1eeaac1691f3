"""The serving engine's jitted decode call per busy-row count: ms per decode step (wall and process CPU).

  python bench/bench_serve_step.py                                   # tiny float32 on CPU, 64 slots x 256
  python bench/bench_serve_step.py --decode_steps=1 --window=256     # one step per call over the whole context
  python bench/bench_serve_step.py --kv_cache_dtype=int8
  python bench/bench_serve_step.py --options=none,logprobs,penalties   # what each request option costs a step

Calls `SlotModel.decode` (what `serving.Engine` runs between admissions) on the first R rows of a `--slots` x
`--context` cache for R = 1, 4, 16, 64, each row at a different position, all greedy, and prints ms per step
(a call runs `--decode_steps` steps) as the best of three rounds, plus the ratio of tokens per second to one row.
CPU seconds are those of the whole process (XLA's threads included): on a shared machine they move less than wall
time. The per-row growth is what bench_serve.py's concurrency ratio depends on. Beside them: the bytes one step
reads, the weights' (shared by the rows) and the KV cache's (each row its own `--window` slots of every layer):
where the KV bytes dominate, a step of R rows costs about R one-row steps and batching cannot raise tokens/s much.
`--options` repeats the table with every row asking for log-probabilities (`logprobs`: the log-softmax and top 20
of each step) or penalties (`penalties`: repetition 1.1, frequency and presence 0.5), as rows of requests that set
them do (`none`: plain greedy rows, which skip both).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", default="tiny")
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--slots", type=int, default=64)
  parser.add_argument("--context", type=int, default=256)
  parser.add_argument("--rows", default="1,4,16,64")
  parser.add_argument("--decode_steps", type=int, default=4)
  parser.add_argument("--window", type=int, default=128, help="cache slots attended (<= --context)")
  parser.add_argument("--kv_cache_dtype", default=None, choices=[None, "int8"])
  parser.add_argument("--calls", type=int, default=50)
  parser.add_argument("--options", default="none", help="comma-separated: none, logprobs, penalties")
  args = parser.parse_args()

  import jax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from qwenvl_jax.data import train_synthetic_tokenizer  # pylint: disable=import-outside-toplevel
  from qwenvl_jax.inference import loading  # pylint: disable=import-outside-toplevel
  from qwenvl_jax.model import QwenVL  # pylint: disable=import-outside-toplevel
  from qwenvl_jax.serving.slots import Sampling, SlotModel  # pylint: disable=import-outside-toplevel

  tok = train_synthetic_tokenizer(os.path.join(tempfile.mkdtemp(), "sp"), vocab_size=400)
  cfg = loading.model_config(args.model, tok, dtype=args.dtype, random_weights=True)
  slots = SlotModel(QwenVL(cfg, rngs=nnx.Rngs(0)), num_slots=args.slots, context=args.context, feature_slots=1,
                    vocab_limit=tok.vocab_size, cache_dtype=args.kv_cache_dtype)
  k, w = args.decode_steps, args.window
  print(f"{args.model} {args.dtype}, cache {args.slots} x {args.context} ({slots.cache.k.dtype}), {k} steps per "
        f"call, window {w}")
  # What a decode step reads: the LLM's weights but its token embedding (R rows of it are gathered).
  llm_state = {k: v for k, v in slots.state["llm"].items() if k != "wte"}
  weight_bytes = sum(x.nbytes for x in jax.tree.leaves(llm_state))
  llm = cfg.llm
  kv_row_bytes = 2 * llm.layers * llm.heads * w * llm.head_dim * slots.cache.k.dtype.itemsize  # k and v
  print(f"{'option':>9} {'rows':>5} {'ms/step wall':>13} {'ms/step CPU':>12} {'tok/s ratio (CPU)':>18} "
        f"{'weights MiB':>12} {'KV MiB read':>12}")
  base = None
  for option, r in [(o, int(x)) for o in args.options.split(",") for x in args.rows.split(",")]:
    sampling = Sampling.greedy(r)
    if option == "logprobs":
      sampling = sampling._replace(logprobs=np.ones(r, bool))
    elif option == "penalties":
      sampling = sampling._replace(repetition=np.full(r, 1.1, np.float32), frequency=np.full(r, 0.5, np.float32),
                                   presence=np.full(r, 0.5, np.float32))
    elif option != "none":
      raise SystemExit(f"--options: unknown option {option!r} (none, logprobs, penalties)")
    positions = (np.arange(r, dtype=np.int32) * 7) % (w - k)  # rows at different slots, all inside the window
    call = (np.zeros(r, np.int32), positions, np.ones(r, bool), np.full(r, cfg.llm.rope_base, np.float32), sampling)
    slots.decode(*call, steps=k, window=w).tokens.block_until_ready()  # compile
    wall = cpu = float("inf")
    for _ in range(3):
      t0, c0 = time.perf_counter(), time.process_time()
      for _ in range(args.calls):
        slots.decode(*call, steps=k, window=w).tokens.block_until_ready()
      wall = min(wall, (time.perf_counter() - t0) / args.calls / k * 1e3)
      cpu = min(cpu, (time.process_time() - c0) / args.calls / k * 1e3)
    base = base or cpu
    print(f"{option:>9} {r:>5} {wall:>13.3f} {cpu:>12.3f} {r * base / cpu:>18.2f} {weight_bytes / 2**20:>12.2f} "
          f"{r * kv_row_bytes / 2**20:>12.2f}")


if __name__ == "__main__":
  main()
