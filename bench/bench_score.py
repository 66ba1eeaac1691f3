"""Likelihood scoring through the server (lm-evaluation-harness's requests) against the in-process scorer.

  python bench/bench_score.py                                  # tiny random model on CPU (float32)
  JAX_PLATFORMS=cuda python bench/bench_score.py --model=mid --dtype=bfloat16     # on a GPU (CPU unless told)

Builds `--items` multiple-choice items (a context of `--context_tokens` tokens and 4 options of 1-4 tokens, random
ids of the tokenizer's text) and scores every (context, option) pair three ways:
  scorer  `inference.scoring.LikelihoodScorer`, what `python -m qwenvl_jax.evaluate` runs for multiple choice: one
          jitted forward pass per item, its 4 options as rows, in this process;
  echo    through the server as lm-evaluation-harness's `local-completions` sends them: one request per pair, a
          token-id prompt with `echo`, `logprobs: 1` and `max_tokens: 1`, from C concurrent clients (in other
          processes, as `bench_serve.py`'s);
  plain   the same requests without `echo` and `logprobs`: the same prefills without the prompt scores, so
          echo / plain is what scoring the prompt costs the server.
For each client count it prints pairs/s of echo and plain, echo's ratio to plain and to the scorer, and the largest
difference between the server's and the scorer's sum of the options' log-probabilities (float32 on CPU: rounding
only, the prefill's right-padded rows against the scorer's left-padded ones). Last, the device side alone: one
prefill call of 1 and 8 rows of 128 tokens (the engine's program, on its own `SlotModel`) with and without the
prompt scores (`slot_programs.prompt_scores`), ms per call.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import os
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402
import requests  # noqa: E402


def _post_all(url: str, bodies: list[dict]) -> list[dict]:
  """Posts `bodies` one after another (one client), returning the JSON answers."""
  with requests.Session() as s:
    out = []
    for body in bodies:
      r = s.post(url, json=body, timeout=600)
      r.raise_for_status()
      out.append(r.json())
    return out


def _spread(run, bodies: list, ways: int, mapper) -> list:
  """`run(bodies share)` over `ways` interleaved shares through `mapper`, the answers put back in order."""
  shares = [bodies[i::ways] for i in range(ways)]
  out = [None] * len(bodies)
  for i, answers in enumerate(mapper(run, shares)):
    out[i::ways] = answers
  return out


def _worker(url: str, bodies: list[dict], threads: int) -> list[dict]:
  """One client process: `threads` clients, each posting its share of `bodies` one after another."""
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    return _spread(lambda share: _post_all(url, share), bodies, threads, pool.map)


def _drive(pool, clients: int, procs: int, url: str, bodies: list[dict]) -> tuple[list[dict], float]:
  """`bodies` sent by `clients` concurrent clients spread over `procs` processes (interleaved, so each gets every
  kind); (answers in the order of `bodies`, wall seconds)."""
  threads = [clients // procs + (i < clients % procs) for i in range(procs)]
  t0 = time.perf_counter()
  shares = [bodies[i::procs] for i in range(procs)]
  done = list(pool.map(_worker, [url] * procs, shares, threads))
  wall = time.perf_counter() - t0
  out = [None] * len(bodies)
  for i, answers in enumerate(done):
    out[i::procs] = answers
  return out, wall


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", default="tiny")
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--slots", type=int, default=16)
  parser.add_argument("--items", type=int, default=32)
  parser.add_argument("--context_tokens", type=int, default=100)
  parser.add_argument("--clients", default="1,4,16")
  parser.add_argument("--client_processes", type=int, default=4)
  args = parser.parse_args()

  import jax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from qwenvl_jax import inference  # pylint: disable=import-outside-toplevel
  from qwenvl_jax.data import train_synthetic_tokenizer  # pylint: disable=import-outside-toplevel
  from qwenvl_jax.inference import loading, scoring  # pylint: disable=import-outside-toplevel
  from qwenvl_jax.model import QwenVL  # pylint: disable=import-outside-toplevel
  from qwenvl_jax.serving import Engine, api  # pylint: disable=import-outside-toplevel
  from qwenvl_jax.serving.slots import Sampling, SlotModel  # pylint: disable=import-outside-toplevel

  tok = train_synthetic_tokenizer(os.path.join(tempfile.mkdtemp(), "sp"), vocab_size=400)
  cfg = loading.model_config(args.model, tok, dtype=args.dtype, random_weights=True)
  model = QwenVL(cfg, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  special = set(tok.special_tokens.values())
  text_ids = np.array([i for i in range(3, tok.vocab_size) if i not in special])  # no special or image ids
  items = [(rng.choice(text_ids, args.context_tokens).tolist(),
            [rng.choice(text_ids, rng.integers(1, 5)).tolist() for _ in range(4)]) for _ in range(args.items)]
  pairs = [(ctx, opt) for ctx, opts in items for opt in opts]

  scorer = scoring.LikelihoodScorer(inference.Generator(model))
  scorer.option_losses(*items[0], pad_id=tok.eod_id)  # compile
  t0 = time.perf_counter()
  ref = [-loss * len(o) for ctx, opts in items
         for loss, o in zip(scorer.option_losses(ctx, opts, pad_id=tok.eod_id), opts)]
  scorer_rate = len(pairs) / (time.perf_counter() - t0)

  t0 = time.perf_counter()
  engine = Engine(model, num_slots=args.slots, context=256, max_images=1, prefill_batch=8, buckets=(64, 128),
                  stop_ids=[tok.eod_id, tok.im_end_id, tok.im_start_id], vocab_limit=tok.vocab_size)
  engine.start()
  sys.setswitchinterval(0.0005)  # as `python -m qwenvl_jax.serve` does
  print(f"{args.model} {args.dtype} on {jax.devices()[0].platform}: {args.slots} slots, warm-up "
        f"{time.perf_counter() - t0:.1f} s; {len(pairs)} pairs ({args.items} items x 4 options, contexts of "
        f"{args.context_tokens} tokens); scorer {scorer_rate:.1f} pairs/s")
  server = api.ThreadedServer(api.create_app(engine, tok, api.ServerConfig(model_name=args.model)))
  url = server.url + "/v1/completions"
  base = {"model": args.model, "temperature": 0, "max_tokens": 1, "seed": 1234}
  echo = [{**base, "prompt": ctx + opt, "echo": True, "logprobs": 1} for ctx, opt in pairs]
  plain = [{**base, "prompt": ctx + opt} for ctx, opt in pairs]

  print(f"{'clients':>7} {'echo/s':>8} {'plain/s':>8} {'echo/plain':>10} {'echo/scorer':>11} {'max |diff|':>10}")
  for c in [int(x) for x in args.clients.split(",")]:
    procs = min(c, args.client_processes)
    with concurrent.futures.ProcessPoolExecutor(procs, mp_context=multiprocessing.get_context("spawn")) as pool:
      _drive(pool, c, procs, url, echo[:c] + plain[:c])  # start the processes, warm the HTTP path
      answers, echo_wall = _drive(pool, c, procs, url, echo)
      _, plain_wall = _drive(pool, c, procs, url, plain)
    got = [sum(a["choices"][0]["logprobs"]["token_logprobs"][len(ctx):-1]) for a, (ctx, _) in zip(answers, pairs)]
    diff = float(np.max(np.abs(np.asarray(got) - np.asarray(ref))))
    rate, plain_rate = len(pairs) / echo_wall, len(pairs) / plain_wall
    print(f"{c:>7} {rate:>8.1f} {plain_rate:>8.1f} {rate / plain_rate:>10.2f} {rate / scorer_rate:>11.2f} "
          f"{diff:>10.2e}")
  print(f"compilations: {engine.stats()['compilations']}")
  server.stop()
  engine.shutdown()

  slot_model = SlotModel(model, num_slots=16, context=256, feature_slots=1, vocab_limit=tok.vocab_size)
  for k in (1, 8):
    ids = rng.choice(text_ids, (k, 128)).astype(np.int32)
    times = {}
    for want in (False, True) * 2:  # interleaved, each timed twice
      sampling = Sampling.greedy(k)._replace(prompt_logprobs=np.full(k, want))
      call = (ids, np.full(k, 128, np.int32), np.zeros(k, np.int32), slot_model.no_features,
              np.arange(k, dtype=np.int32), np.full(k, cfg.llm.rope_base, np.float32), sampling)
      jax.block_until_ready(slot_model.prefill(*call))  # compile (the first time), warm
      t0 = time.perf_counter()
      for _ in range(20):
        jax.block_until_ready(slot_model.prefill(*call))
      times.setdefault(want, []).append((time.perf_counter() - t0) / 20 * 1e3)
    print(f"one prefill of {k} x 128 tokens: {min(times[False]):.2f} ms, with the prompt scores "
          f"{min(times[True]):.2f} ms (best of 2 x 20 calls)")


if __name__ == "__main__":
  main()
