"""What prefilling the prompt of an API request's n choices once saves: the engine alone (no HTTP), one request of
n sampled choices at a time, shared (`Engine.submit_all`: one prefill row, the other choices copy its cache row)
against unshared (each choice submitted on its own: each prefills the prompt), side by side in one run.

  python bench/bench_n_choices.py                                   # tiny random model on CPU (float32)
  JAX_PLATFORMS=cuda python bench/bench_n_choices.py --model=mid --dtype=bfloat16      # on a GPU (CPU unless told)

For each prompt length and n it prints, per request (the median of --repeats, the two ways alternating): the
wall time until every choice has ended, the engine's prefill time (image encoding, prefill and the row copies:
`Engine.stats`' prefill_seconds), prefill calls, and the ratio shared / unshared of both times. Every choice is
sampled (temperature 1, its own seed) and runs exactly --max_tokens tokens (`ignore_stop_tokens`).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import queue
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
  parser.add_argument("--slots", type=int, default=8)
  parser.add_argument("--prefill_batch", type=int, default=4)
  parser.add_argument("--prompts", default="100,450", help="prompt lengths in tokens")
  parser.add_argument("--n", default="1,2,4,8", help="choices per request")
  parser.add_argument("--max_tokens", type=int, default=16)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  lengths, ns = [int(x) for x in args.prompts.split(",")], [int(x) for x in args.n.split(",")]
  if max(ns) > args.slots:
    parser.error(f"--n up to {max(ns)} needs at least that many --slots, got {args.slots}")

  import jax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from qwenvl_jax.data import train_synthetic_tokenizer  # pylint: disable=import-outside-toplevel
  from qwenvl_jax.inference import loading  # pylint: disable=import-outside-toplevel
  from qwenvl_jax.model import QwenVL  # pylint: disable=import-outside-toplevel
  from qwenvl_jax.serving import Engine  # pylint: disable=import-outside-toplevel
  from qwenvl_jax.serving import engine as engine_lib  # pylint: disable=import-outside-toplevel

  tok = train_synthetic_tokenizer(os.path.join(tempfile.mkdtemp(), "sp"), vocab_size=400)
  cfg = loading.model_config(args.model, tok, dtype=args.dtype, random_weights=True)
  context = 64 * -(-(max(lengths) + args.max_tokens) // 64)
  engine = Engine(QwenVL(cfg, rngs=nnx.Rngs(0)), num_slots=args.slots, context=context, max_images=0,
                  prefill_batch=args.prefill_batch, buckets=(128, 256, 512), vocab_limit=tok.vocab_size)
  t0 = time.perf_counter()
  engine.start()
  print(f"{args.model} {args.dtype} on {jax.devices()[0].platform}: {args.slots} slots, prefill batch "
        f"{args.prefill_batch}, context {context}, {args.max_tokens} tokens per choice, warm-up "
        f"{time.perf_counter() - t0:.1f} s")
  rng = np.random.default_rng(0)

  def one(prompt, n, shared):
    """(wall s, prefill s, prefill calls) of one request of n choices."""
    ends = queue.Queue()
    requests = [engine_lib.Request(prompt, [], engine_lib.SamplingParams(args.max_tokens, temperature=1.0, seed=i,
                                                                        ignore_stop_tokens=True),
                                   lambda e: isinstance(e, (engine_lib.Finished, engine_lib.Failed)) and ends.put(e))
                for i in range(n)]
    before, t = engine.stats(), time.perf_counter()
    if shared:
      engine.submit_all(requests)
    else:  # on their own: queued one by one, admitted together, each prefilled
      for r in requests:
        engine.submit(r)
    for _ in range(n):
      end = ends.get(timeout=600)
      if isinstance(end, engine_lib.Failed):
        raise RuntimeError(end.message)
    after = engine.stats()
    return (time.perf_counter() - t, after["prefill_seconds"] - before.get("prefill_seconds", 0),
            after["prefills"] - before.get("prefills", 0))

  print(f"{'prompt':>6} {'n':>3} {'wall ms':>17} {'prefill ms':>17} {'prefills':>9} {'wall ratio':>10} "
        f"{'prefill ratio':>13}")
  print(f"{'':>6} {'':>3} {'shared / alone':>17} {'shared / alone':>17} {'sh / al':>9}")
  for length in lengths:
    prompt = rng.integers(10, tok.vocab_size, length).tolist()
    for n in ns:
      runs = {True: [], False: []}
      for _ in range(args.repeats):
        for shared in (True, False):
          runs[shared].append(one(prompt, n, shared))
      med = {s: np.median(np.asarray(r), axis=0) for s, r in runs.items()}
      print(f"{length:>6} {n:>3} {med[True][0] * 1e3:>8.1f} {med[False][0] * 1e3:>8.1f} "
            f"{med[True][1] * 1e3:>8.1f} {med[False][1] * 1e3:>8.1f} {med[True][2]:>4.0f} {med[False][2]:>4.0f} "
            f"{med[True][0] / med[False][0]:>10.2f} {med[True][1] / med[False][1]:>13.2f}")
  compiles = engine.stats()["compilations"]
  print(f"compilations after warm-up: {compiles['lowerings_after_warmup']} lowerings, "
        f"{compiles['backend_compiles_after_warmup']} backend compiles")
  engine.shutdown()


if __name__ == "__main__":
  main()
