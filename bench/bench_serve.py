"""Throughput and latency of the OpenAI-compatible server under 1, 4, 16 and 64 concurrent clients.

  python bench/bench_serve.py                       # tiny random model on CPU (float32)
  JAX_PLATFORMS=cuda python bench/bench_serve.py --model=mid --dtype=bfloat16 --slots=64      # on a GPU (CPU unless told)

Starts the real server (engine + uvicorn on a free local port, in this process) with `--slots` decode slots and
drives it over HTTP with C concurrent streaming clients, each sending `--requests` / C requests back to back (the
same chat prompt, greedy, `ignore_eos` so every answer has exactly `--max_tokens` tokens): every level does the
same work, so the one-client level is not a fraction of a second of noise. Per level it prints
aggregate generated tokens/s, time to first token and request latency (p50 / p99), the ratio of tokens/s to
one client, the mean busy rows per decode step, the CPU the server process and the client processes used (in
cores: on a small machine the clients' own HTTP work competes with the server), and two engine figures from its
own timers (`Engine.stats`): `device` = the share of the wall time the engine thread spent in device calls
(decode, prefill, image encoding), and `bound` = the tokens/s the device calls alone deliver at that level, as a
ratio to the one-client level's: the concurrency ratio the device itself allows (on a CPU the decode step of R
rows costs far more than one row's, so this bound, not the server, caps the ratio).

With `--without_http`, the same levels driven on the engine in this process (no HTTP, no client processes): what
the engine and the device alone allow, with the share of decode and prefill calls in the wall time.

Then `--agreement` different greedy prompts, answered one at a time and then all at once (one decode batch): how
many answers are identical (on CPU in float32 all must be; on an accelerator in bf16 the batch shape may change
low bits, so this is the agreement rate the issue asks for there; random weights make near-ties, so it is a
pessimistic one). Then one client's tokens/s against the two single-request paths on the same prompt and length: what
`python -m qwenvl_jax.generate` runs (`inference.chat_stream`: one device call per token, each token detokenized
and shown), and the whole answer in one jitted loop (`inference.Generator.generate`, what batch jobs use); and the
engine's compile counts (must not grow after warm-up).

--xla_threads=1 runs XLA's CPU computations on the calling thread only (`--xla_cpu_multi_thread_eigen=false`):
on a 2-core machine shared by the server's threads and the clients, splitting each small op over a thread pool
costs more than it gains.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
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


def _client(url: str, body: dict, n: int) -> list[tuple[float, float, int]]:
  """n streamed requests in a row: (time to first token, latency, completion tokens) each."""
  out = []
  with requests.Session() as s:
    for _ in range(n):
      t0 = time.perf_counter()
      first = None
      tokens = 0
      with s.post(url, json=body, stream=True, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
          if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
          chunk = json.loads(line[6:])
          if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
          elif first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
            first = time.perf_counter() - t0
      out.append((first if first is not None else float("nan"), time.perf_counter() - t0, tokens))
  return out


def request_body(model: str, query: str, max_tokens: int) -> dict:
  """The streamed greedy request every client sends (`ignore_eos`: every answer is `max_tokens` long)."""
  return {"model": model, "messages": [{"role": "user", "content": query}], "max_tokens": max_tokens,
          "temperature": 0, "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}


def _worker(url: str, body: dict, n: int, threads: int) -> tuple[list[tuple[float, float, int]], float]:
  """`threads` concurrent clients of `n` requests each, in one client process; also its CPU seconds."""
  c0 = time.process_time()
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    out = [r for rs in pool.map(lambda _: _client(url, body, n), range(threads)) for r in rs]
  return out, time.process_time() - c0


def _answer(url: str, body: dict) -> str:
  body = {k: v for k, v in body.items() if k != "stream_options"}  # the API refuses it unless streaming
  r = requests.post(url, json=dict(body, stream=False), timeout=600)
  r.raise_for_status()
  return r.json()["choices"][0]["message"]["content"]


def agreement(url: str, body: dict, n: int) -> tuple[int, float]:
  """n different greedy prompts answered one at a time, then all at once (one decode batch): how many answers are
  identical, and the mean share of each answer (characters) before the first difference."""
  bodies = [dict(body, messages=[{"role": "user", "content": f"Picture {i}: describe it in detail, please."}])
            for i in range(n)]
  alone = [_answer(url, b) for b in bodies]
  with concurrent.futures.ThreadPoolExecutor(n) as pool:
    together = list(pool.map(lambda b: _answer(url, b), bodies))
  prefix = lambda a, b: next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
  shares = [prefix(a, b) / max(len(a), len(b), 1) for a, b in zip(alone, together)]
  return sum(a == b for a, b in zip(alone, together)), float(np.mean(shares))


def engine_levels(engine, prompt: list[int], clients: list[int], requests: int, max_tokens: int) -> None:
  """The same levels driven on the engine in this process, without HTTP: C callers each submit their next request
  when the last one finishes (greedy, `ignore_stop_tokens`). What the engine and the device alone allow."""
  import threading  # pylint: disable=import-outside-toplevel
  from qwenvl_jax.serving import engine as engine_lib  # pylint: disable=import-outside-toplevel
  print(f"{'clients':>7} {'tok/s':>9} {'ratio':>6} {'decode':>7} {'prefill':>8} {'ms/decode call':>15} "
        f"{'rows/step':>9} {'ms/prefill':>10} {'per prefill':>11}")
  single = None
  for c in clients:
    done, lock, left = threading.Semaphore(0), threading.Lock(), [requests]

    def submit():
      with lock:
        if left[0] <= 0:
          return
        left[0] -= 1
      def sink(event):
        if isinstance(event, engine_lib.Finished):
          done.release()
          submit()
      engine.submit(engine_lib.Request(prompt, [], engine_lib.SamplingParams(max_tokens, ignore_stop_tokens=True),
                                       sink))

    before, t0 = engine.stats(), time.perf_counter()
    for _ in range(c):
      submit()
    for _ in range(requests):
      done.acquire()
    wall, after = time.perf_counter() - t0, engine.stats()
    d = {k: after.get(k, 0) - before.get(k, 0) for k in ("decode_seconds", "prefill_seconds", "decode_calls",
                                                           "decoded_tokens", "prefills", "admitted")}
    rate = requests * max_tokens / wall
    single = single or rate
    print(f"{c:>7} {rate:>9.1f} {rate / single:>6.2f} {d['decode_seconds'] / wall:>7.0%} "
          f"{d['prefill_seconds'] / wall:>8.0%} {d['decode_seconds'] / max(d['decode_calls'], 1) * 1e3:>15.3f} "
          f"{d['decoded_tokens'] / max(d['decode_calls'] * engine.decode_steps, 1):>9.1f} "
          f"{d['prefill_seconds'] / max(d['prefills'], 1) * 1e3:>10.2f} {d['admitted'] / max(d['prefills'], 1):>11.1f}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", default="tiny")
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--slots", type=int, default=64)
  parser.add_argument("--context", type=int, default=256)
  parser.add_argument("--max_tokens", type=int, default=64)
  parser.add_argument("--requests", type=int, default=256, help="requests per level, spread over its clients")
  parser.add_argument("--decode_steps", type=int, default=4, help="decode steps per engine call")
  parser.add_argument("--clients", default="1,4,16,64")
  parser.add_argument("--agreement", type=int, default=16,
                      help="different prompts answered alone and then all at once, compared (0: skip)")
  parser.add_argument("--client_processes", type=int, default=4, help="processes the clients are spread over")
  parser.add_argument("--without_http", action="store_true",
                      help="also drive the same levels on the engine in-process, without HTTP (what it alone allows)")
  parser.add_argument("--xla_threads", default="all", choices=["all", "1"],
                      help="1: XLA:CPU runs each op on the calling thread (see the module docstring)")
  args = parser.parse_args()
  if args.xla_threads == "1":  # before jax starts its backend
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()

  import jax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from qwenvl_jax import inference, text as qtext  # pylint: disable=import-outside-toplevel
  from qwenvl_jax.data import train_synthetic_tokenizer  # pylint: disable=import-outside-toplevel
  from qwenvl_jax.inference import loading  # pylint: disable=import-outside-toplevel
  from qwenvl_jax.model import QwenVL  # pylint: disable=import-outside-toplevel
  from qwenvl_jax.serving import Engine, api  # pylint: disable=import-outside-toplevel

  tok = train_synthetic_tokenizer(os.path.join(tempfile.mkdtemp(), "sp"), vocab_size=400)
  cfg = loading.model_config(args.model, tok, dtype=args.dtype, random_weights=True)
  model = QwenVL(cfg, rngs=nnx.Rngs(0))
  stops = [tok.eod_id, tok.im_end_id, tok.im_start_id]
  t0 = time.perf_counter()
  engine = Engine(model, num_slots=args.slots, context=args.context, max_images=1, prefill_batch=8,
                  buckets=(64, 128), stop_ids=stops, vocab_limit=tok.vocab_size, decode_steps=args.decode_steps)
  engine.start()
  sys.setswitchinterval(0.0005)  # as `python -m qwenvl_jax.serve` does (see SWITCH_INTERVAL_S there)
  print(f"{args.model} {args.dtype} on {jax.devices()[0].platform}: {args.slots} slots, warm-up "
        f"{time.perf_counter() - t0:.1f} s, {engine.stats()['compilations']['lowerings']} programs")
  server = api.ThreadedServer(api.create_app(engine, tok, api.ServerConfig(model_name=args.model,
                                                               max_tokens_limit=args.max_tokens)))
  url = server.url + "/v1/chat/completions"
  query = "Describe the picture in detail, please."
  body = request_body(args.model, query, args.max_tokens)
  _client(url, body, 2)  # warm the HTTP path

  print(f"{'clients':>7} {'tok/s':>9} {'ratio':>6} {'TTFT p50':>9} {'TTFT p99':>9} {'lat p50':>8} {'lat p99':>8} "
        f"{'rows/step':>9} {'server CPU':>10} {'client CPU':>10} {'device':>7} {'bound':>6}")
  single = single_bound = None
  for c in [int(x) for x in args.clients.split(",")]:
    # Clients live in other processes: in the server's process their JSON parsing would take the GIL from it.
    procs = min(c, args.client_processes)
    shares = [c // procs + (i < c % procs) for i in range(procs)]
    with concurrent.futures.ProcessPoolExecutor(procs, mp_context=multiprocessing.get_context("spawn")) as pool:
      list(pool.map(_worker, [url] * procs, [body] * procs, [1] * procs, [1] * procs))  # start the processes
      before = engine.stats()
      t0, c0 = time.perf_counter(), time.process_time()
      per_client = max(1, args.requests // c)
      done = list(pool.map(_worker, [url] * procs, [body] * procs, [per_client] * procs, shares))
      wall, server_cpu = time.perf_counter() - t0, time.process_time() - c0
      after = engine.stats()
    results = [r for rs, _ in done for r in rs]
    client_cpu = sum(cpu for _, cpu in done)
    calls = after.get("decode_calls", 0) - before.get("decode_calls", 0)
    rows = (after.get("decoded_tokens", 0) - before.get("decoded_tokens", 0)) / max(calls * args.decode_steps, 1)
    ttft, lat, toks = (np.array(x, float) for x in zip(*results))
    rate = toks.sum() / wall
    single = single or rate
    device = sum(after.get(f"{n}_seconds", 0) - before.get(f"{n}_seconds", 0) for n in ("decode", "prefill"))
    bound = toks.sum() / max(device, 1e-9)
    single_bound = single_bound or bound
    print(f"{c:>7} {rate:>9.1f} {rate / single:>6.2f} {np.percentile(ttft, 50) * 1e3:>7.0f}ms "
          f"{np.percentile(ttft, 99) * 1e3:>7.0f}ms {np.percentile(lat, 50):>7.2f}s {np.percentile(lat, 99):>7.2f}s "
          f"{rows:>9.1f} {server_cpu / wall:>9.0%} {client_cpu / wall:>9.0%} {device / wall:>6.0%} "
          f"{bound / single_bound:>6.2f}")

  if args.without_http:
    prompt = qtext.make_context(tok, query, chat_format="chatml", n_image_tokens=cfg.image_tokens).tokens
    print("the same levels on the engine alone (in this process, no HTTP):")
    engine_levels(engine, list(prompt), [int(x) for x in args.clients.split(",")], args.requests, args.max_tokens)

  # eos = an id past the tokenizer, never produced: every answer is max_tokens long, as with ignore_eos.
  if args.agreement:
    same, share = agreement(url, body, args.agreement)
    print(f"{args.agreement} different prompts, greedy, answered alone and then all at once: {same} identical, the "
          f"mean answer {share:.1%} the same before its first difference")

  gen = inference.GenerationConfig(max_new_tokens=args.max_tokens, eos_id=tok.vocab_size, pad_id=tok.eod_id,
                                   vocab_limit=tok.vocab_size)
  generator = inference.Generator(model)

  def rate_of(run) -> float:  # tokens/s of `run` (returns its token count), at least 4 runs and 3 s
    run()  # compile
    t0, reps, tokens = time.perf_counter(), 0, 0
    while reps < 4 or time.perf_counter() - t0 < 3.0:  # the machine may be shared
      tokens += run()
      reps += 1
    return tokens / (time.perf_counter() - t0)

  def streamed() -> int:  # python -m qwenvl_jax.generate: chat_stream, every token detokenized as it comes
    reply = inference.chat_stream(generator, tok, query, gen=gen)
    for _ in reply:
      pass
    return len(reply.new_tokens)

  context = qtext.make_context(tok, query, chat_format="chatml", n_image_tokens=cfg.image_tokens)
  batch = inference.make_prompt_batch([context.tokens], pad_id=tok.eod_id, image_pad_id=cfg.image_pad_id,
                                      image_tokens=cfg.image_tokens)
  def whole_loop() -> int:  # the whole answer in one jitted loop (returns host arrays: waited for)
    generator.generate(batch, gen)
    return args.max_tokens

  cli_rate = rate_of(streamed)
  loop_rate = rate_of(whole_loop)
  print(f"one client {single:.1f} tok/s vs `generate` (chat_stream, a device call per token) {cli_rate:.1f} tok/s: "
        f"ratio {single / cli_rate:.2f}; vs Generator.generate (B=1, whole loop in one jit) {loop_rate:.1f} "
        f"tok/s: ratio {single / loop_rate:.2f}")
  print("compilations:", engine.stats()["compilations"])
  server.stop()
  engine.shutdown()


if __name__ == "__main__":
  main()
