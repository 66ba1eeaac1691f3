"""The OpenAI-compatible server over real HTTP (uvicorn on a local port; the `openai` client and `requests`),
on the tiny float32 model with greedy decoding, so every answer is exactly reproducible."""
import asyncio
import base64
import concurrent.futures
import dataclasses
import gc
import io
import json
import logging
import os
import queue
import socket
import subprocess
import sys
import time
import types

import jax.numpy as jnp
import numpy as np
import openai
import pytest
import requests
from flax import nnx
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from qwenvl_jax import inference
from qwenvl_jax import text as qtext
from qwenvl_jax.serving import api, messages
from qwenvl_jax.serving import engine as engine_lib
from tests.serving.conftest import MAX_TOKENS_LIMIT, MODEL_NAME, Server, wait_until

# The session's model, engine warm-up and server start cost more than 20 s on a 2-core CPU; one module pays it.
pytestmark = pytest.mark.slow


def png_bytes(w=60, h=40, seed=0) -> bytes:
  rng = np.random.default_rng(seed)
  buf = io.BytesIO()
  Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
  return buf.getvalue()


def data_url(data: bytes) -> str:
  return "data:image/png;base64," + base64.b64encode(data).decode()


def image_part(url: str) -> dict:
  return {"type": "image_url", "image_url": {"url": url}}


@pytest.fixture(scope="module")
def client(server):
  return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def ask(client, messages_, **kw):
  kw.setdefault("max_tokens", 12)
  return client.chat.completions.create(model=MODEL_NAME, messages=messages_, temperature=0, **kw)


def test_answer_is_the_reference_chat_of_the_same_conversation(client, serve_model, serve_tok, image_root):
  """Server (continuous batching, image by path) == `inference.chat` (the reference's `model.chat` on the
  batch Generator) for a two-turn conversation with a picture."""
  (image_root / "pic.png").write_bytes(png_bytes(seed=1))
  reply = ask(client, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                       {"role": "user", "content": [image_part("pic.png"), {"type": "text", "text": "What is it?"}]}])
  query = qtext.from_list_format([{"image": "pic.png"}, {"text": "What is it?"}])
  gen = inference.chat_generation_config(serve_tok, max_new_tokens=12)
  expected, _ = inference.chat.chat(inference.Generator(serve_model), serve_tok, query, [("Hi", "Hello.")],
                                    gen=gen, image_root=str(image_root))
  assert reply.choices[0].message.content.strip() == expected
  assert reply.usage.prompt_tokens > serve_model.cfg.image_tokens
  assert reply.choices[0].finish_reason in ("stop", "length")


def test_streaming_sends_the_same_answer_as_one_response(client):
  conversation = [{"role": "user", "content": [{"type": "text", "text": "Describe"},
                                               image_part(data_url(png_bytes(seed=2)))]}]
  whole = ask(client, conversation)
  chunks = list(ask(client, conversation, stream=True, stream_options={"include_usage": True}))
  text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
  assert text == whole.choices[0].message.content and text
  assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
  assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_models_endpoint_lists_the_served_model(client):
  assert [m.id for m in client.models.list().data] == [MODEL_NAME]


def _prompts():
  img = [data_url(png_bytes(seed=s)) for s in range(3)]
  return [
      [{"role": "user", "content": "Where is the red circle?"}],
      [{"role": "user", "content": [image_part(img[0]), {"type": "text", "text": "What shape?"}]}],
      [{"role": "user", "content": [image_part(img[1]), image_part(img[2]), {"type": "text", "text": "Compare."}]}],
      [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Count to three"}],
      [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
      [{"role": "user", "content": [{"type": "text", "text": "blue"}, image_part(img[0])]}],
  ]


def _sample(client, p, seed):
  return client.chat.completions.create(model=MODEL_NAME, messages=p, max_tokens=12, temperature=1.0, top_p=0.9,
                                        seed=seed, extra_body={"top_k": 50}).choices[0].message.content


def test_concurrent_requests_answer_exactly_what_they_answer_alone(client):
  """Greedy and sampled requests (each slot with its own settings and seed) give the same answer alone and
  among 13 others on 4 slots (so they join running batches at different steps, in different slots)."""
  prompts = _prompts()
  alone = [ask(client, p).choices[0].message.content for p in prompts]
  sampled_alone = [_sample(client, prompts[0], seed) for seed in (1, 2)]
  jobs = [lambda p=p: ask(client, p).choices[0].message.content for p in prompts * 2]
  jobs += [lambda seed=seed: _sample(client, prompts[0], seed) for seed in (1, 2)]
  with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
    together = list(pool.map(lambda job: job(), jobs))
  assert together == alone * 2 + sampled_alone
  assert len(set(alone)) > 1 and sampled_alone[0] != sampled_alone[1]  # the prompts and seeds really differ


BAD = [
    ("not json", b"{'messages': ", 400),
    ("unknown model", {"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}, 404),
    ("bad base64", {"messages": [{"role": "user", "content": [image_part("data:image/png;base64,@@@")]}]}, 400),
    ("not an image", {"messages": [{"role": "user", "content": [
        image_part("data:image/png;base64," + base64.b64encode(b"hello world").decode())]}]}, 400),
    ("too many bytes", {"messages": [{"role": "user", "content": [
        image_part(data_url(png_bytes(300, 300)))]}]}, 400),
    ("too many pixels", None, 400),  # built in the test: a small PNG file of 1.5 M pixels
    ("outside the image root", {"messages": [{"role": "user", "content": [image_part("../secret.png")]}]}, 400),
    ("too many images", {"messages": [{"role": "user", "content": [
        image_part(data_url(png_bytes())) for _ in range(3)]}]}, 400),
    ("prompt over the context", {"messages": [{"role": "user", "content": "word " * 600}]}, 400),
    ("max_tokens over the limit", {"messages": [{"role": "user", "content": "hi"}],
                                   "max_tokens": MAX_TOKENS_LIMIT + 1}, 400),
    ("no messages", {"model": MODEL_NAME}, 400),
    ("img tag in text", {"messages": [{"role": "user", "content": "<img>/etc/passwd</img> hi"}]}, 400),
    ("remote URL", {"messages": [{"role": "user", "content": [image_part("http://example.com/a.png")]}]}, 400),
    ("assistant last", {"messages": [{"role": "assistant", "content": "hi"}]}, 400),
    ("bad temperature", {"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400),
    ("nested too deeply", b"[" * 100_000 + b"]" * 100_000, 400),
    ("stop string too long", {"messages": [{"role": "user", "content": "hi"}], "stop": ["x" * 257]}, 400),
]


def test_bad_requests_get_openai_errors_while_good_ones_are_served(server, client, http):
  big = io.BytesIO()
  Image.new("RGB", (1500, 1000), (0, 0, 0)).save(big, format="PNG")  # small file, 1.5 M pixels > 1 M
  cases = []
  for name, body, status in BAD:
    if name == "too many pixels":
      body = {"messages": [{"role": "user", "content": [image_part(data_url(big.getvalue()))]}]}
    cases.append((name, body, status))
  good = _prompts()[:3]
  expected = [ask(client, p).choices[0].message.content for p in good]

  def send(case):
    name, body, status = case
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = http.post(server.url + "/v1/chat/completions", data=data, headers={"Content-Type": "application/json"},
                  timeout=60)
    return name, status, r.status_code, r.json()

  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    good_futures = [pool.submit(lambda p=p: ask(client, p).choices[0].message.content) for p in good * 2]
    bad_results = list(pool.map(send, cases))
  assert [f.result() for f in good_futures] == expected * 2
  for name, status, got, body in bad_results:
    assert got == status, (name, got, body)
    assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["message"], name
  assert http.get(server.url + "/health", timeout=10).json()["status"] == "ok"


def test_api_key_is_required_when_set(engine, serve_tok):
  srv = Server(api.create_app(engine, serve_tok, api.ServerConfig(model_name=MODEL_NAME, api_key="s3cret")))
  try:
    r = requests.get(srv.url + "/v1/models", timeout=10)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = requests.get(srv.url + "/v1/models", headers={"Authorization": "Bearer s3cret"}, timeout=10)
    assert r.status_code == 200
    # A key with non-ASCII characters is a wrong key, not a server error (compare_digest refuses non-ASCII str).
    r = requests.get(srv.url + "/v1/models", headers={"Authorization": "Bearer s3crét"}, timeout=10)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = requests.post(srv.url + "/v1/chat/completions", json={"messages": HI}, timeout=10)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    for path in ("/tokenize", "/detokenize"):  # /tokenize reads images as the completions do
      r = requests.post(srv.url + path, json={"prompt": "hi", "tokens": [1]}, timeout=10)
      assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert requests.get(srv.url + "/tokenizer_info", timeout=10).status_code == 401
    r = requests.get(srv.url + "/tokenizer_info", headers={"Authorization": "Bearer s3cret"}, timeout=10)
    assert r.status_code == 200 and r.json()["chat_template"] == qtext.chat_template()
    assert requests.get(srv.url + "/health", timeout=10).status_code == 200
  finally:
    srv.stop()


def _health(server, http):
  return http.get(server.url + "/health", timeout=10).json()


@pytest.fixture
def slow_decoding(engine, monkeypatch):
  """Each decode call of the engine waits 20 ms first (the same compiled program, called later): a 400-token answer
  (100 calls) runs for 2 s or more. The tiny model alone decodes one faster than a client reads a chunk and closes."""
  decode = engine.slots.decode

  def slow_decode(*args, **kwargs):
    time.sleep(0.02)
    return decode(*args, **kwargs)

  monkeypatch.setattr(engine.slots, "decode", slow_decode)


@pytest.mark.usefixtures("slow_decoding")
def test_a_client_leaving_mid_stream_frees_its_slot(server, http):
  # ignore_eos: the answer runs to max_tokens (400 decode steps), so it is still decoding when the client leaves.
  before = _health(server, http).get("finished_cancelled", 0)
  body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "go on"}], "max_tokens": MAX_TOKENS_LIMIT,
          "temperature": 0, "stream": True, "ignore_eos": True}
  with http.post(server.url + "/v1/chat/completions", json=body, stream=True, timeout=60) as r:
    # The role chunk comes before the engine takes the request in; a chunk with text means it holds a slot.
    for line in r.iter_lines():
      if line.startswith(b"data: ") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
        break
    assert _health(server, http)["active"] == 1
  # The connection is closed here, long before 400 tokens are decoded.
  deadline = time.monotonic() + 30
  while time.monotonic() < deadline:
    stats = _health(server, http)
    if stats.get("finished_cancelled", 0) > before and stats["active"] == 0:
      break
    time.sleep(0.05)
  assert stats.get("finished_cancelled", 0) == before + 1 and stats["active"] == 0


async def _asgi(app, method: str, path: str, body: bytes = b"", send=None) -> list[dict]:
  """The ASGI messages `app` sends for one request (as uvicorn's HTTP/1.1 protocol calls it); `send` sees each
  first and may hold it, as a socket whose buffers are full holds uvicorn's; the client leaves once it returns."""
  scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
           "method": method, "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
           "root_path": "", "headers": [(b"host", b"x"), (b"content-type", b"application/json"),
                                        (b"content-length", str(len(body)).encode())],
           "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 80)}
  sent, left = [], asyncio.Event()
  pending = [{"type": "http.request", "body": body, "more_body": False}]

  async def receive():
    if pending:
      return pending.pop()
    await left.wait()
    return {"type": "http.disconnect"}

  async def record(message):
    sent.append(message)
    if send is not None:
      await send(message)

  await app(scope, receive, record)
  left.set()
  return sent


@pytest.mark.usefixtures("slow_decoding")
def test_a_stream_its_client_stops_reading_is_cut_and_its_slot_freed(engine, serve_tok):
  """A streaming client that reads nothing more once its first text arrived (the socket's buffers full: uvicorn's
  send waits) used to keep its decode slot until its answer ended, however long. After --send_timeout the answer
  is cut, the request cancelled (its slot freed at once), and /health counts it."""
  app = api.create_app(engine, serve_tok, api.ServerConfig(model_name=MODEL_NAME, max_tokens_limit=MAX_TOKENS_LIMIT,
                                                           send_timeout=0.2))
  body = json.dumps({"messages": HI, "max_tokens": MAX_TOKENS_LIMIT, "temperature": 0, "stream": True,
                     "ignore_eos": True}).encode()
  before = engine.stats().get("finished_cancelled", 0)

  async def main():
    reads_again = asyncio.Event()

    async def full_after_the_first_text(message):
      if b'"content": "' in message.get("body", b"") and b'"content": ""' not in message["body"]:
        await reads_again.wait()  # the engine holds the request now: it has sent text

    stream = asyncio.create_task(_asgi(app, "POST", "/v1/chat/completions", body, full_after_the_first_text))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
      health = json.loads((await _asgi(app, "GET", "/health"))[-1]["body"])
      if health.get("cancelled_send_timeout") and health["active"] == 0:
        break
      await asyncio.sleep(0.05)
    reads_again.set()
    await stream
    return health

  gc.disable()  # the slot must be freed by the server's code, not by a collection of the suspended generator
  try:
    health = asyncio.run(main())
  finally:
    gc.enable()
  assert health.get("cancelled_send_timeout") == 1 and health["active"] == 0, health
  assert health["finished_cancelled"] == before + 1  # cut mid-answer (its 400 tokens take 2 s or more)


def test_a_client_leaving_while_it_sends_its_body_is_not_logged_as_a_server_error(server, http):
  """A client that goes away halfway through its request body (a cancelled upload, a killed script) is a normal
  event: no "Exception in ASGI application" traceback in the server's log, no slot taken."""
  errors = []
  handler = logging.Handler(logging.ERROR)
  handler.emit = errors.append
  logging.getLogger("uvicorn.error").addHandler(handler)
  try:
    body = json.dumps({"messages": HI, "max_tokens": 2}).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as s:
      s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n" % len(body) + body[:10])
      time.sleep(0.2)  # the server is reading the body when the client leaves
    deadline = time.monotonic() + 1  # the traceback came within milliseconds of the close
    while not errors and time.monotonic() < deadline:
      time.sleep(0.05)
  finally:
    logging.getLogger("uvicorn.error").removeHandler(handler)
  assert not errors, [r.getMessage() for r in errors]
  assert _health(server, http)["active"] == 0


def test_no_compilation_after_warm_up(server, client, http):
  """Traffic of every shape class (0/1/2 images, 1 or 2 joining requests, streamed or not, sampled or greedy)
  compiles nothing: JAX's own compile events on the engine thread stay at their warm-up counts."""
  prompts = _prompts()
  with concurrent.futures.ThreadPoolExecutor(6) as pool:
    list(pool.map(lambda p: ask(client, p), prompts))
    list(pool.map(lambda p: client.chat.completions.create(model=MODEL_NAME, messages=p, max_tokens=5,
                                                           temperature=0.8, top_p=0.9, seed=3,
                                                           extra_body={"top_k": 5}), prompts))
  stats = _health(server, http)
  compiles = stats["compilations"]
  assert compiles["lowerings"] > 0 and compiles["backend_compiles"] >= 0  # the warm-up was counted
  assert compiles["lowerings_after_warmup"] == 0 and compiles["backend_compiles_after_warmup"] == 0, compiles


def test_submit_all_queues_every_request_or_none(engine, serve_tok):
  """`submit_all` (an API request's n choices) checks every request before it queues any: with one refused, the
  others never run; accepted, they all answer."""
  prompt, events = serve_tok.encode("hi"), queue.Queue()
  good = engine_lib.Request(prompt, [], engine_lib.SamplingParams(2, ignore_stop_tokens=True), events.put)
  bad = engine_lib.Request(prompt, [], engine_lib.SamplingParams(2, min_tokens=3), events.put)
  admitted = engine.stats().get("admitted", 0)
  with pytest.raises(ValueError, match="min_tokens must be in"):
    engine.submit_all([good, bad])
  engine.submit_all([engine_lib.Request(prompt, [], engine_lib.SamplingParams(2, ignore_stop_tokens=True), events.put)
                     for _ in range(2)])
  ends = 0
  while ends < 2:  # the inbox is read in order: had `good` been queued, it would have been admitted before these
    ends += isinstance(events.get(timeout=60), engine_lib.Finished)
  assert engine.stats()["admitted"] == admitted + 2


def test_requests_queued_together_on_one_prompt_prefill_it_once(engine, serve_tok):
  """Three requests of one `submit_all` with the same prompt and sampling but for the seed (an API request's n
  choices): one is prefilled, two copy its cache row and token history; each answers what it answers alone, its
  logit bias, held stop ids (min_tokens), penalties, log-probabilities (to 1e-5) and prompt scores included. A
  request of other settings in the same call gets its own prefill."""
  prompt = serve_tok.encode("the red circle is left of the blue square")

  def params(seed, **kw):
    return engine_lib.SamplingParams(8, temperature=0.9, seed=seed, logprobs=2, prompt_logprobs=1,
                                     repetition_penalty=1.3, frequency_penalty=0.4, min_tokens=3,
                                     logit_bias=((serve_tok.im_end_id, 4.0), (prompt[2], 3.0)), **kw)

  def run(batch):
    sinks = [queue.Queue() for _ in batch]
    engine.submit_all([engine_lib.Request(prompt, [], p, q.put) for p, q in zip(batch, sinks)])
    out = []
    for q in sinks:
      events = [q.get(timeout=60)]
      while not isinstance(events[-1], (engine_lib.Finished, engine_lib.Failed)):
        events.append(q.get(timeout=60))
      out.append(events)
    return out

  batch = [params(1), params(2), params(3), params(1, top_k=5)]
  alone = [run([p])[0] for p in batch]
  before = engine.stats()
  together = run(batch)
  after = engine.stats()
  assert after["prompts_shared"] - before.get("prompts_shared", 0) == 2
  # One prefill call of 2 rows (4 without the sharing: 2 calls at prefill_batch 2).
  assert after["admitted"] - before["admitted"] == 4 and after["prefills"] - before["prefills"] == 1
  for got, want in zip(together, alone):
    assert [type(e) for e in got] == [type(e) for e in want]
    assert isinstance(got[0], engine_lib.PromptTokens) and got[0].ranks == want[0].ranks
    end = lambda events: dataclasses.replace(events[-1], stop_token=getattr(events[-1].stop_token, "token_id", None))
    tokens = lambda events: [e.token_id for e in events[1:-1]] + [end(events)]
    assert tokens(got) == tokens(want)
    scores = lambda events: [x for e in events[1:-1] + list(events[0].tokens) + [events[-1].stop_token] if e
                             for x in (e.logprob, *(lp for _, lp in e.top_logprobs))]
    np.testing.assert_allclose(scores(got), scores(want), atol=1e-5)
  assert len({tuple(e.token_id for e in events[1:-1]) for events in alone[:3]}) == 3  # the seeds really differ


def test_choices_that_only_score_their_prompt_share_one_prefill(engine, serve_tok):
  """n choices with max_tokens 0 (echo with logprobs: a harness scoring a prompt) take the first's prompt scores:
  one prefill row, no row copied, each ends at once with the same scores."""
  prompt, sinks = serve_tok.encode("a blue square above a red circle"), [queue.Queue() for _ in range(3)]
  before = engine.stats()
  engine.submit_all([engine_lib.Request(prompt, [], engine_lib.SamplingParams(0, seed=i, prompt_logprobs=2), q.put)
                     for i, q in enumerate(sinks)])
  events = [[q.get(timeout=60), q.get(timeout=60)] for q in sinks]
  after = engine.stats()
  assert after["prompts_shared"] - before.get("prompts_shared", 0) == 2 and after["prefills"] - before["prefills"] == 1
  for scores, end in events:
    assert isinstance(scores, engine_lib.PromptTokens) and len(scores.tokens) == len(prompt) - 1
    assert scores == events[0][0] and end == engine_lib.Finished("length", len(prompt), 0)


@pytest.mark.usefixtures("slow_decoding")
def test_a_request_cancelled_before_it_gets_a_slot_is_counted_and_never_runs(engine, serve_tok):
  """Every slot holds a long answer (decode calls slowed); a fifth request waits, is cancelled, and is
  counted as cancelled_waiting: it gets no slot and no event, and the four answers run to the end."""
  prompt = serve_tok.encode("go on")
  before = engine.stats()
  runs = [queue.Queue() for _ in range(engine.num_slots)]
  for q in runs:
    engine.submit(engine_lib.Request(prompt, [], engine_lib.SamplingParams(200, ignore_stop_tokens=True), q.put))
  while engine.stats()["active"] < engine.num_slots:
    time.sleep(0.01)
  late = queue.Queue()
  request = engine_lib.Request(prompt, [], engine_lib.SamplingParams(5), late.put)
  engine.submit(request)
  engine.cancel(request)
  for q in runs:
    while not isinstance(event := q.get(timeout=60), engine_lib.Finished):
      pass
    assert event.reason == "length"
  after = engine.stats()
  assert after.get("cancelled_waiting", 0) == before.get("cancelled_waiting", 0) + 1
  assert after["admitted"] == before["admitted"] + engine.num_slots and late.empty()


def _post(server, http, body):
  r = http.post(server.url + "/v1/chat/completions", json=body, timeout=60)
  return r.status_code, r.json()


HI = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("field, value", [
    ("top_logprobs", 3), ("presence_penalty", 3), ("frequency_penalty", -2.5), ("repetition_penalty", 0),
    ("min_p", 1.5), ("stop_token_ids", [-1]), ("min_tokens", 3), ("min_tokens", -1),
    ("min_tokens", True), ("best_of", 3), ("use_beam_search", True),
    ("length_penalty", 0.5), ("logit_bias", {"5": -101}), ("logit_bias", {"abc": 1}), ("logit_bias", {"-1": 1}),
    ("logit_bias", {"400": 1}), ("logit_bias", {"5": True}), ("logit_bias", [5]),
    ("logit_bias", {str(i): 1 for i in range(301)}), ("response_format", {"type": "json_object"}),
    ("tools", [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]),
    ("tool_choice", "required"), ("seed", 2 ** 64), ("stream_options", {"include_usage": True}),
    ("modalities", ["text", "audio"]), ("audio", {"voice": "alloy", "format": "wav"}), ("web_search_options", {}),
])
def test_fields_the_server_does_not_implement_are_refused_not_ignored(server, http, field, value):
  """A request asking for what this server does not do (JSON mode, tools, audio output, web search, vLLM's
  best_of, beam search) gets a 400 naming the field, not an answer that silently lacks it; so do a seed over 64 bits,
  stream_options on a request that does not stream, top_logprobs without logprobs, and penalties, min_p, stop ids,
  min_tokens (past max_tokens, negative, not an integer) or logit biases out of their range (keys not ids of the
  vocabulary, biases past ±100 or not numbers, more than 300)."""
  status, body = _post(server, http, {"messages": HI, "max_tokens": 2, field: value})
  assert status == 400 and body["error"]["param"] == field, body


def test_logit_bias_steers_and_bans_tokens_as_openais(server, http, serve_model, serve_tok):
  """OpenAI's `logit_bias` is added to the logits before the choice: +100 on a token makes every greedy step pick it
  (on both endpoints); -100 on the greedy first token makes the answer start with the runner-up, whose reported
  log-probability stays the model's (the plain forward pass's; tolerance 1e-4). The bias belongs to its request:
  the next request in the same slot answers as before."""
  plain = _post(server, http, {"messages": HI, "max_tokens": 4, "temperature": 0, "ignore_eos": True})[1]
  token = serve_tok.encode(" square")[-1]
  status, out = _post(server, http, {"messages": HI, "max_tokens": 4, "temperature": 0, "ignore_eos": True,
                                     "logit_bias": {str(token): 100}})
  assert status == 200 and out["choices"][0]["message"]["content"] == serve_tok.decode([token] * 4), out
  _, text = _complete_text(server, http, "hello there", max_tokens=3, logit_bias={str(token): 100})
  assert text["choices"][0]["text"] == serve_tok.decode([token] * 3)
  (first, _, top), = _greedy_reference(serve_model, serve_tok, HI, 1, top=2)
  status, out = _post(server, http, {"messages": HI, "max_tokens": 1, "temperature": 0, "ignore_eos": True,
                                     "logprobs": True, "logit_bias": {str(first): -100}})
  runner_up, logprob = top[1]
  assert out["choices"][0]["message"]["content"] == serve_tok.decode([runner_up])
  assert out["choices"][0]["logprobs"]["content"][0]["logprob"] == pytest.approx(logprob, abs=1e-4)
  again = _post(server, http, {"messages": HI, "max_tokens": 4, "temperature": 0, "ignore_eos": True})[1]
  assert again["choices"][0]["message"]["content"] == plain["choices"][0]["message"]["content"]


def test_min_tokens_holds_back_stop_tokens_and_stop_strings_as_vllms(server, http, serve_model, serve_tok):
  """vLLM's `min_tokens`: a logit bias of +100 on a stop token (the chat's <|im_end|>, or a request's stop_token_ids)
  ends the answer at its first token; with min_tokens 3 the first 3 tokens are the greedy tokens of the model with
  the stop ids banned (the plain forward pass's), and the 4th is the stop, on both endpoints. A stop string met
  within the first min_tokens tokens is text; met after, it ends the answer. The slot's next request holds nothing
  back."""
  im_end, other = serve_tok.im_end_id, serve_tok.encode(" square")[-1]
  forced = {"messages": HI, "max_tokens": 8, "temperature": 0, "logit_bias": {str(im_end): 100}}
  status, out = _post(server, http, forced)
  assert status == 200 and out["usage"]["completion_tokens"] == 1 and out["choices"][0]["finish_reason"] == "stop"
  stops = {serve_tok.eod_id, im_end, serve_tok.im_start_id}

  def banned(logits, prompt, answer):
    logits = logits.copy()
    logits[list(stops)] = -np.inf
    return logits
  expected = [t for t, _, _ in _greedy_reference(serve_model, serve_tok, HI, 3, adjust=banned)]
  status, out = _post(server, http, {**forced, "min_tokens": 3, "logprobs": True})
  assert status == 200 and out["choices"][0]["finish_reason"] == "stop", out
  assert out["usage"]["completion_tokens"] == 4
  assert out["choices"][0]["message"]["content"] == serve_tok.decode(expected)
  assert [e["token"] for e in out["choices"][0]["logprobs"]["content"]] == [serve_tok.decode([t]) for t in expected]
  # A request's own stop id, on the text endpoint (its entries end with the stop token's).
  status, text = _complete_text(server, http, "hello there", max_tokens=8, logit_bias={str(other): 100},
                                stop_token_ids=[other], min_tokens=2, logprobs=0)
  assert status == 200 and text["choices"][0]["finish_reason"] == "stop", text
  assert text["usage"]["completion_tokens"] == 3 and text["choices"][0]["logprobs"]["tokens"][-1] == \
      serve_tok.decode([other])
  # Stop strings: the text of the 1st greedy token (met within min_tokens 2: text) and of the 4th (after: the end).
  ids = [t for t, _, _ in _greedy_reference(serve_model, serve_tok, HI, 4)]
  assert not stops & set(ids), ids  # the premise: no stop token among them
  texts = [serve_tok.decode(ids[:k]) for k in range(5)]
  first, fourth = texts[1], texts[4][len(texts[3]):]
  assert first and texts[4].find(first, 1) < 0 and texts[4].find(fourth) == len(texts[3]), texts  # met once each
  answer = _post(server, http, {"messages": HI, "max_tokens": 6, "temperature": 0, "ignore_eos": True,
                                "min_tokens": 2, "stop": [first, fourth]})[1]
  assert answer["choices"][0]["message"]["content"] == texts[3], (answer, texts)
  assert answer["choices"][0]["finish_reason"] == "stop"
  assert _post(server, http, forced)[1]["usage"]["completion_tokens"] == 1
  status, out = _post(server, http, {**forced, "min_tokens": 1, "stop_token_ids": list(range(100, 170))})
  assert status == 400 and out["error"]["param"] == "stop_token_ids", out


def test_no_op_values_and_nulls_are_accepted_as_absent(server, http):
  """OpenAI clients send unset fields as null and no-op values of the unsupported ones (pydantic payloads,
  harness wrappers): these are served, and max_tokens holds when max_completion_tokens is null."""
  body = {"messages": HI, "max_tokens": 3, "temperature": 0, "ignore_eos": True, "max_completion_tokens": None,
          "n": None, "stream": None, "stop": None, "logprobs": False, "top_logprobs": None, "presence_penalty": 0,
          "frequency_penalty": 0, "logit_bias": {}, "response_format": {"type": "text"}, "tools": [],
          "tool_choice": "none", "user": "someone", "seed": None, "modalities": ["text"], "audio": None}
  status, out = _post(server, http, body)
  assert status == 200 and out["usage"]["completion_tokens"] == 3 and out["choices"][0]["finish_reason"] == "length"
  status, out = _post(server, http, {**body, "max_tokens": None, "max_completion_tokens": 500})
  assert status == 400 and out["error"]["param"] == "max_completion_tokens"  # the name the client used


def _greedy_reference(model, tok, conversation, steps, top=1, adjust=None):
  """Greedy decoding by the model's plain forward pass over the whole sequence (no cache, no server): per step the
  chosen id and its log-probability, and the `top` most likely (id, log-probability). adjust(logits, prompt ids,
  answer ids so far): the logits the choice is made from (the log-probabilities stay the model's)."""
  cfg = model.cfg
  ids = list(messages.build_prompt(conversation, tok, image_tokens=cfg.image_tokens, image_size=cfg.vision.image_size,
                                   policy=messages.ImagePolicy(), max_images=0).tokens)
  prompt = list(ids)
  n = len(ids) + steps  # one shape: attention is causal, so the zeros past the end change no earlier logit
  forward = nnx.jit(lambda m, x: m.llm(m.llm.embed(x), positions=jnp.arange(n)[None], segment_ids=jnp.ones_like(x))[0])
  out = []
  for _ in range(steps):
    logits = np.asarray(forward(model, np.asarray(ids + [0] * (n - len(ids)), np.int32)[None])[0, len(ids) - 1])
    logp = logits.astype(np.float64)  # normalized over the model's whole vocabulary, as the reference's
    logp = (logp - np.log(np.sum(np.exp(logp - logp.max()))) - logp.max())[:tok.vocab_size]
    order = np.argsort(-logp, kind="stable")[:top]
    chosen = int(order[0]) if adjust is None else int(np.argmax(adjust(logits[:tok.vocab_size].astype(np.float64),
                                                                         prompt, ids[len(prompt):])))
    out.append((chosen, logp[chosen], [(int(i), logp[i]) for i in order]))
    ids.append(chosen)
  return out


def test_logprobs_are_the_models_log_softmax_of_each_answer_token(client, serve_model, serve_tok):
  """`logprobs` / `top_logprobs` (OpenAI's shape: token, logprob, bytes, top_logprobs) equal the log-softmax of the
  model's plain forward pass over the sequence, computed here without the server (float64 log-softmax of float32
  logits; tolerance 1e-4), token for token, top five in order; streamed, the chunks carry the same entries; the
  bytes of the entries join to the answer's text."""
  conversation = [{"role": "user", "content": "Count to three"}]
  steps, top = 8, 5
  reply = ask(client, conversation, max_tokens=steps, logprobs=True, top_logprobs=top,
              extra_body={"ignore_eos": True})
  entries = reply.choices[0].logprobs.content
  assert reply.usage.completion_tokens == len(entries) == steps
  assert bytes(b for e in entries for b in e.bytes).decode() == reply.choices[0].message.content
  for entry, (chosen, logprob, best) in zip(entries, _greedy_reference(serve_model, serve_tok, conversation, steps,
                                                                       top)):
    assert bytes(entry.bytes) == serve_tok.decode([chosen]).encode()
    assert abs(entry.logprob - logprob) < 1e-4, (entry.logprob, logprob)
    assert [t.token for t in entry.top_logprobs] == [serve_tok.decode([i]) for i, _ in best]
    np.testing.assert_allclose([t.logprob for t in entry.top_logprobs], [lp for _, lp in best], atol=1e-4)
  chunks = list(ask(client, conversation, max_tokens=steps, logprobs=True, top_logprobs=top, stream=True,
                    extra_body={"ignore_eos": True}))
  streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
  assert [e.model_dump() for e in streamed] == [e.model_dump() for e in entries]
  plain = ask(client, conversation, max_tokens=steps, logprobs=True, extra_body={"ignore_eos": True})
  assert [(e.token, e.logprob, e.top_logprobs) for e in plain.choices[0].logprobs.content] == [
      (e.token, e.logprob, []) for e in entries]
  assert ask(client, conversation, max_tokens=2).choices[0].logprobs is None


def test_logprobs_of_a_sampled_answer_are_the_models_not_the_warped_distribution(client):
  """At temperature 0.5, top_k 3, the log-probabilities are still the model's (as vLLM's default): the chosen token
  is among the top three, and its log-probability is the one listed there, not a renormalized one."""
  reply = client.chat.completions.create(model=MODEL_NAME, messages=HI, max_tokens=6, temperature=0.5, seed=3,
                                         logprobs=True, top_logprobs=3,
                                         extra_body={"top_k": 3, "ignore_eos": True})
  for entry in reply.choices[0].logprobs.content:
    listed = {t.token: t.logprob for t in entry.top_logprobs}
    assert entry.token in listed and abs(listed[entry.token] - entry.logprob) < 1e-6
    assert sum(np.exp(list(listed.values()))) < 1 - 1e-6  # a renormalized top-3 would sum to 1


def test_logprobs_among_other_requests_and_with_a_stop_string(client):
  """Rows that want log-probabilities share decode calls with rows that do not: each gets what it gets alone. An
  answer cut by a stop string has an entry for every token counted in its usage, the one completing the string
  included."""
  conversation = [{"role": "user", "content": "Count to three"}]

  def entries(**kw):
    reply = ask(client, conversation, max_tokens=10, extra_body={"ignore_eos": True}, **kw)
    lp = reply.choices[0].logprobs
    return reply, None if lp is None else [(e.token, e.logprob, [t.logprob for t in e.top_logprobs])
                                           for e in lp.content]

  alone = entries(logprobs=True, top_logprobs=2)[1]
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    jobs = [pool.submit(entries, logprobs=True, top_logprobs=2) if i % 2 else pool.submit(entries) for i in range(6)]
    together = [j.result() for j in jobs]
  for i, (reply, got) in enumerate(together):
    if i % 2:  # batch shapes may change float32 low bits on CPU
      assert [t for t, _, _ in got] == [t for t, _, _ in alone]
      np.testing.assert_allclose([[lp, *top] for _, lp, top in got], [[lp, *top] for _, lp, top in alone], atol=1e-5)
    else:
      assert got is None and reply.usage.completion_tokens == 10
  text = together[0][0].choices[0].message.content
  stop = text[len(text) // 2:len(text) // 2 + 2]
  cut, got = entries(logprobs=True, stop=[stop])
  assert cut.choices[0].finish_reason == "stop" and stop not in cut.choices[0].message.content
  assert len(got) == cut.usage.completion_tokens < 10


def test_n_choices_are_what_requests_of_consecutive_seeds_answer(client, engine):
  """n sampled choices: choice i is what one request with seed + i answers (so they differ), the prompt and its
  image prefilled once (the other choices copy its cache row); usage counts the prompt once and every choice's
  tokens; streamed, each index's chunks join to that choice; greedy choices agree."""
  conversation = _prompts()[1]  # with an image

  def sample(seed, **kw):
    return client.chat.completions.create(model=MODEL_NAME, messages=conversation, max_tokens=12, temperature=1.0,
                                          top_p=1, seed=seed, extra_body={"ignore_eos": True}, **kw)

  alone = [sample(seed).choices[0].message.content for seed in (5, 6, 7)]
  assert len(set(alone)) == 3
  before = engine.stats()
  reply = sample(5, n=3, logprobs=True)
  # Submitted together to 4 free slots: choice 0 is prefilled (one image encoded), choices 1 and 2 copy its row.
  after = engine.stats()
  assert after["images_encoded"] - before["images_encoded"] == 1
  assert after["prompts_shared"] - before.get("prompts_shared", 0) == 2
  assert after["prefills"] - before["prefills"] == 1
  assert [c.index for c in reply.choices] == [0, 1, 2]
  assert [c.message.content for c in reply.choices] == alone
  assert all(len(c.logprobs.content) == 12 for c in reply.choices)
  assert reply.usage.completion_tokens == 36 and reply.usage.prompt_tokens == sample(5).usage.prompt_tokens
  chunks = list(sample(5, n=3, stream=True, stream_options={"include_usage": True}))
  streamed = ["".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i)
              for i in range(3)]
  assert streamed == alone
  assert sorted(c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason) == [0, 1, 2]
  assert chunks[-1].usage.completion_tokens == 36
  greedy = ask(client, conversation, n=2)
  assert greedy.choices[0].message.content == greedy.choices[1].message.content


@pytest.mark.usefixtures("slow_decoding")
def test_a_client_leaving_an_n_choice_stream_frees_every_slot(server, http):
  """The three choices' slots are freed when the client leaves (cancelled, not run to their 400 tokens)."""
  before = _health(server, http)
  body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "go on"}], "max_tokens": MAX_TOKENS_LIMIT,
          "temperature": 0, "stream": True, "ignore_eos": True, "n": 3}
  with http.post(server.url + "/v1/chat/completions", json=body, stream=True, timeout=60) as r:
    for line in r.iter_lines():
      if line.startswith(b"data: ") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
        break
  wait_until(lambda: _health(server, http).get("finished_cancelled", 0) == before.get("finished_cancelled", 0) + 3)
  stats = _health(server, http)
  assert stats.get("finished_cancelled", 0) == before.get("finished_cancelled", 0) + 3 and stats["active"] == 0
  assert stats.get("finished_length", 0) == before.get("finished_length", 0)


def _penalized(repetition=1.0, frequency=0.0, presence=0.0):
  """vLLM's penalties written out on one row of float64 logits (an independent reference for the server's)."""
  def adjust(logits, prompt, answer):
    out = logits.copy()
    counts = np.bincount(np.asarray(answer, np.int64), minlength=len(out))[:len(out)]
    held = (counts > 0) | np.isin(np.arange(len(out)), prompt)
    out[held] = np.where(out[held] > 0, out[held] / repetition, out[held] * repetition)
    return out - frequency * counts - presence * (counts > 0)
  return adjust


@pytest.mark.parametrize("penalties", [
    {"repetition_penalty": 1.8}, {"frequency_penalty": 1.5}, {"presence_penalty": 2.0},
    {"repetition_penalty": 0.7, "frequency_penalty": -0.5, "presence_penalty": 0.5},
])
def test_penalties_give_the_greedy_answer_of_vllms_definitions(client, serve_model, serve_tok, penalties):
  """Greedy answers under repetition / frequency / presence penalties equal a plain-forward greedy decoding whose
  logits are penalized by vLLM's definitions written out in numpy (over the prompt and 16 answer tokens, across
  several decode calls of the engine), and differ from the unpenalized answer."""
  conversation = [{"role": "user", "content": "Count to three"}]
  steps = 16
  kw = {"max_tokens": steps, "extra_body": {"ignore_eos": True, **{k: v for k, v in penalties.items()
                                                                   if k == "repetition_penalty"}}}
  openai_kw = {k: v for k, v in penalties.items() if k != "repetition_penalty"}
  answer = ask(client, conversation, **kw, **openai_kw).choices[0].message.content
  ref = _greedy_reference(serve_model, serve_tok, conversation, steps, adjust=_penalized(
      penalties.get("repetition_penalty", 1.0), penalties.get("frequency_penalty", 0.0),
      penalties.get("presence_penalty", 0.0)))
  assert answer == serve_tok.decode([i for i, _, _ in ref])
  plain = ask(client, conversation, max_tokens=steps, extra_body={"ignore_eos": True})
  assert answer != plain.choices[0].message.content


def test_min_p_of_one_samples_only_the_most_likely_token(client):
  """min_p = 1 keeps only the tokens as likely as the most likely one: sampling at temperature 1 is then greedy."""
  conversation = [{"role": "user", "content": "Count to three"}]
  greedy = ask(client, conversation, max_tokens=12, extra_body={"ignore_eos": True}).choices[0].message.content
  sampled = [client.chat.completions.create(model=MODEL_NAME, messages=conversation, max_tokens=12, temperature=1.0,
                                            top_p=1, seed=seed, extra_body={"ignore_eos": True, "min_p": p})
             .choices[0].message.content for seed in (1, 2) for p in (1.0, 0.0)]
  assert sampled[0] == sampled[2] == greedy and sampled[1] != sampled[3]


def test_stop_token_ids_end_the_answer_as_a_stop_token(client, serve_model, serve_tok):
  conversation = [{"role": "user", "content": "Count to three"}]
  ids = [i for i, _, _ in _greedy_reference(serve_model, serve_tok, conversation, 8)]
  at = next(j for j in range(2, 8) if ids[j] not in ids[:j])  # the first token that is new from the third on
  reply = ask(client, conversation, max_tokens=8, extra_body={"ignore_eos": False, "stop_token_ids": [ids[at]]})
  assert reply.choices[0].finish_reason == "stop" and reply.usage.completion_tokens == at + 1
  assert reply.choices[0].message.content == serve_tok.decode(ids[:at])


@pytest.mark.parametrize("fields, param", [
    ({"n": 0}, "n"), ({"n": 5}, "n"), ({"n": 1.5}, "n"),  # the test server has 4 slots
    ({"logprobs": "yes"}, "logprobs"), ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": -1}, "top_logprobs"), ({"logprobs": True, "top_logprobs": 2.5}, "top_logprobs"),
    ({"logprobs": False, "top_logprobs": 2}, "top_logprobs"),
])
def test_bad_n_and_logprobs_fields_get_a_400_naming_them(server, http, fields, param):
  status, body = _post(server, http, {"messages": HI, "max_tokens": 2, **fields})
  assert status == 400 and body["error"]["param"] == param, body


def test_seeds_that_differ_above_32_bits_draw_differently(client):
  def sample(seed):
    return client.chat.completions.create(model=MODEL_NAME, messages=HI, max_tokens=16, temperature=1.0, top_p=1,
                                          seed=seed, extra_body={"ignore_eos": True}).choices[0].message.content
  low, high, negative = sample(7), sample(7 + 2 ** 32), sample(-(2 ** 63))
  assert sample(7) == low and len({low, high, negative}) == 3


def test_a_stream_shares_one_id_and_created_and_carries_null_usage_until_the_last_chunk(server, http):
  body = {"model": MODEL_NAME, "messages": HI, "max_tokens": 40, "temperature": 0, "ignore_eos": True,
          "stream": True, "stream_options": {"include_usage": True}}
  with http.post(server.url + "/v1/chat/completions", json=body, stream=True, timeout=60) as r:
    events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith(b"data: {")]
  assert len({(e["id"], e["created"]) for e in events}) == 1 and len(events) > 3
  assert all(e["usage"] is None for e in events[:-1]) and events[-1]["usage"]["completion_tokens"] == 40


def test_a_stop_string_ends_the_answer_as_stop_on_health(server, client, http):
  answer = ask(client, HI, max_tokens=20).choices[0].message.content
  before = _health(server, http)
  got = ask(client, HI, max_tokens=20, stop=[answer[3:6]])
  assert got.choices[0].finish_reason == "stop" and got.choices[0].message.content == answer[:3]
  # The API answers as soon as it sees the stop string; the engine frees the slot (and counts it) at its next loop
  # turn, which on a loaded machine can come after the answer arrived.
  deadline = time.monotonic() + 30
  while (after := _health(server, http))["active"] and time.monotonic() < deadline:
    time.sleep(0.02)
  assert after.get("finished_stop", 0) == before.get("finished_stop", 0) + 1
  assert after.get("finished_cancelled", 0) == before.get("finished_cancelled", 0)


def _complete_text(server, http, prompt, **fields):
  r = http.post(server.url + "/v1/completions", json={"model": MODEL_NAME, "prompt": prompt, "temperature": 0,
                                                      **fields}, timeout=60)
  return r.status_code, r.json()


def test_a_text_completion_is_the_reference_chat_of_the_raw_format(server, http, serve_model, serve_tok, image_root):
  """/v1/completions takes its prompt as it is (no template), as the reference's raw (base model) format does: a
  prompt with a picture as an <img> span (a path under the image root) gets `inference.chat`'s raw-format answer
  on the batch Generator, token for token; streamed, the same text, and no role chunk."""
  (image_root / "cmp.png").write_bytes(png_bytes(seed=4))
  text = "<img>cmp.png</img>Generate the caption in English:"
  gen = inference.chat_generation_config(serve_tok, "raw", max_new_tokens=12)
  expected, _ = inference.chat.chat(inference.Generator(serve_model), serve_tok, text, [], chat_format="raw",
                                    gen=gen, image_root=str(image_root))
  status, out = _complete_text(server, http, text, max_tokens=12)
  assert status == 200 and out["object"] == "text_completion" and out["id"].startswith("cmpl-"), out
  assert out["choices"][0]["text"].strip() == expected and expected
  assert out["usage"]["prompt_tokens"] == len(qtext.make_context(serve_tok, text, [], chat_format="raw",
                                                                 n_image_tokens=serve_model.cfg.image_tokens).tokens)
  with http.post(server.url + "/v1/completions", json={"prompt": text, "max_tokens": 12, "temperature": 0,
                                                      "stream": True}, stream=True, timeout=60) as r:
    chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith(b"data: {")]
  assert all(c["object"] == "text_completion" and "delta" not in c["choices"][0] for c in chunks)
  assert "".join(c["choices"][0]["text"] for c in chunks) == out["choices"][0]["text"]


def test_a_base_model_prompt_with_an_image_and_legacy_logprobs(server, http, serve_model, serve_tok):
  """The base model's prompt shape (`<img>…</img>` + instruction, here a data: URL) is served, the image as its
  span's tokens; the legacy `logprobs` (tokens, token_logprobs, top_logprobs as {token: logprob}, text_offset) are
  one entry per token, at most 2 alternatives, offsets counted over the tokens' text, which joins to the answer
  (their values come from the path the chat endpoint's logprobs test checks); without max_tokens a completion
  stops at 16 tokens (OpenAI's default)."""
  prompt = f"<img>{data_url(png_bytes(seed=5))}</img>Generate the caption in English:"
  status, out = _complete_text(server, http, prompt, logprobs=2, ignore_eos=True)
  assert status == 200, out
  choice = out["choices"][0]
  lp = choice["logprobs"]
  assert out["usage"]["completion_tokens"] == 16 == len(lp["tokens"]) and choice["finish_reason"] == "length"
  span = qtext.make_context(serve_tok, "<img>x</img>Generate the caption in English:", [], chat_format="raw",
                            n_image_tokens=serve_model.cfg.image_tokens).tokens  # the image's span is its tokens
  assert out["usage"]["prompt_tokens"] == len(span)
  assert lp["text_offset"] == list(np.cumsum([0] + [len(t) for t in lp["tokens"]])[:-1])
  assert all(len(top) <= 2 and max(top.values()) >= chosen - 1e-6 for top, chosen in
             zip(lp["top_logprobs"], lp["token_logprobs"]))
  if "\ufffd" not in choice["text"]:
    assert "".join(lp["tokens"]) == choice["text"]


def test_a_list_of_prompts_answers_each_with_n_choices_in_openais_order(server, http):
  """prompt: [p0, p1] with n=2: choices 0-1 answer p0 and 2-3 answer p1 (OpenAI's order), each what its prompt
  alone answers; usage counts each prompt once; streamed, the same texts under the same indices."""
  prompts = ["hello there", "<ref>the red square</ref>"]
  alone = [_complete_text(server, http, p, max_tokens=6, ignore_eos=True)[1] for p in prompts]
  status, out = _complete_text(server, http, prompts, max_tokens=6, n=2, ignore_eos=True)
  assert status == 200, out
  assert [c["index"] for c in out["choices"]] == [0, 1, 2, 3]
  assert [c["text"] for c in out["choices"]] == [a["choices"][0]["text"] for a in alone for _ in range(2)]
  assert out["usage"]["prompt_tokens"] == sum(a["usage"]["prompt_tokens"] for a in alone)
  assert out["usage"]["completion_tokens"] == 4 * 6
  body = {"prompt": prompts, "max_tokens": 6, "n": 2, "temperature": 0, "ignore_eos": True, "stream": True}
  with http.post(server.url + "/v1/completions", json=body, stream=True, timeout=60) as r:
    chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith(b"data: {")]
  streamed = ["".join(c["choices"][0]["text"] for c in chunks if c["choices"][0]["index"] == i) for i in range(4)]
  assert streamed == [c["text"] for c in out["choices"]]


@pytest.mark.parametrize("fields, param", [
    ({"prompt": [1, 2, -3]}, "prompt"), ({"prompt": [1, 2, 400]}, "prompt"), ({"prompt": [[1, 2], []]}, "prompt"),
    ({"prompt": [[1, "a"]]}, "prompt"), ({"prompt": [1, True]}, "prompt"), ({"prompt": [1] * 512}, "prompt"),
    ({"prompt": ["a", ""]}, "prompt"), ({"prompt": ["a"] * 40, "n": 4}, "prompt"),
    ({"prompt": ""}, "prompt"), ({"prompt": "<img>a.png"}, "prompt"),
    ({"prompt": "<img>../x.png</img>hi"}, None), ({"prompt": "hi", "echo": "yes"}, "echo"),
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens"), ({"prompt": "hi", "echo": True, "max_tokens": -1}, "max_tokens"),
    ({"prompt": "hi", "suffix": "x"}, "suffix"), ({"prompt": "hi", "logprobs": 21}, "logprobs"),
    ({"prompt": "<img>a</img><img>b</img><img>c</img>"}, "prompt"),
])
def test_bad_text_completions_get_openai_errors(server, http, fields, param):
  status, body = _complete_text(server, http, **{"max_tokens": 2, **fields})
  assert 400 <= status < 500 and body["error"]["param"] == param or param is None, body
  assert 400 <= status < 500 and "error" in body


def test_a_token_prompt_cannot_hold_an_image(server, http, serve_tok):
  """Token ids of an image span (<img>, <imgpad>, </img>) have no picture behind them: 400, naming the text form."""
  for name in (qtext.IMG_START, qtext.IMG_PAD, qtext.IMG_END):
    status, body = _complete_text(server, http, [5, serve_tok.special_tokens[name], 6], max_tokens=2)
    assert status == 400 and body["error"]["param"] == "prompt" and "<img>SOURCE</img>" in body["error"]["message"]


def test_echo_is_refused_on_chat_completions(server, http):
  r = http.post(server.url + "/v1/chat/completions", json={"messages": HI, "echo": True}, timeout=60)
  assert r.status_code == 400 and r.json()["error"]["param"] == "echo"


def _log_softmax(model, tok, ids, whole=False):
  """float64[T, V'] log-softmax of the model's plain forward pass over `ids` (no cache, no server), normalized over
  the model's whole vocabulary and kept for the tokenizer's V' ids (whole: all of them): row t scores the token
  after position t."""
  forward = nnx.jit(lambda m, x: m.llm(m.llm.embed(x), positions=jnp.arange(x.shape[1])[None],
                                       segment_ids=jnp.ones_like(x))[0])
  logits = np.asarray(forward(model, np.asarray(ids, np.int32)[None])[0]).astype(np.float64)
  top = logits.max(-1, keepdims=True)
  logp = logits - np.log(np.sum(np.exp(logits - top), -1, keepdims=True)) - top
  return logp if whole else logp[:, :tok.vocab_size]


def test_echo_scores_each_prompt_token_as_the_models_plain_forward(server, http, serve_model, serve_tok):
  """`echo` with `logprobs` and max_tokens 0 (how a harness scores a text): the text is the prompt (token ids,
  decoded), one entry per prompt token, the first with none (nothing before it), every other the log-softmax of the
  model's plain forward pass at the position before it, computed here without the server (float64 of float32
  logits; tolerance 1e-4), its 3 alternatives the 3 most likely tokens there; nothing generated."""
  ids = serve_tok.encode("the red square is left of the blue circle")
  status, out = _complete_text(server, http, ids, echo=True, max_tokens=0, logprobs=3)
  assert status == 200, out
  choice, ref = out["choices"][0], _log_softmax(serve_model, serve_tok, ids)
  lp = choice["logprobs"]
  assert choice["text"] == serve_tok.decode(ids) and choice["finish_reason"] == "length"
  assert out["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}
  assert len(lp["tokens"]) == len(ids) and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
  np.testing.assert_allclose(lp["token_logprobs"][1:], [ref[t, ids[t + 1]] for t in range(len(ids) - 1)],
                             atol=1e-4)
  for t in range(1, len(ids)):
    expected, top = np.sort(ref[t - 1])[::-1][:3], list(lp["top_logprobs"][t].values())
    assert 1 <= len(top) <= 3  # tokens whose texts coincide share one key (OpenAI's shape keys them by text)
    assert max(top) == pytest.approx(expected[0], abs=1e-4)
    assert all(np.min(np.abs(expected - v)) < 1e-4 for v in top)
  assert lp["text_offset"] == list(np.cumsum([0] + [len(t) for t in lp["tokens"]])[:-1])


def test_echo_then_answer_is_the_prompt_then_what_the_prompt_alone_answers(server, http, serve_tok):
  """echo with max_tokens 4: the prompt's text and entries, then the answer and entries of the same request
  without echo; a text prompt echoes as it was sent; streamed, the same text (the prompt in the first chunk)."""
  ids = serve_tok.encode("a cat sat on the mat")
  _, plain = _complete_text(server, http, ids, max_tokens=4, logprobs=1, ignore_eos=True)
  _, echoed = _complete_text(server, http, ids, echo=True, max_tokens=4, logprobs=1, ignore_eos=True)
  prompt_text, answer = serve_tok.decode(ids), plain["choices"][0]
  assert echoed["choices"][0]["text"] == prompt_text + answer["text"]
  lp = echoed["choices"][0]["logprobs"]
  assert len(lp["tokens"]) == len(ids) + 4 and lp["tokens"][len(ids):] == answer["logprobs"]["tokens"]
  np.testing.assert_allclose(lp["token_logprobs"][len(ids):], answer["logprobs"]["token_logprobs"], atol=1e-5)
  assert echoed["usage"]["completion_tokens"] == 4 and echoed["usage"]["prompt_tokens"] == len(ids)
  _, text_echo = _complete_text(server, http, "hello there", echo=True, max_tokens=0)
  assert text_echo["choices"][0]["text"] == "hello there" and text_echo["choices"][0]["logprobs"] is None
  # An image's prompt: the text as sent (its data: URL), an entry per prompt token (the image's included), each of
  # n choices the prompt and then its own answer.
  image_prompt = f"<img>{data_url(png_bytes(seed=6))}</img>Describe:"
  _, pictured = _complete_text(server, http, image_prompt, echo=True, max_tokens=3, logprobs=0, n=2, temperature=1,
                               seed=5, ignore_eos=True)
  start, end = image_prompt.index("<img>"), image_prompt.index("</img>")
  for choice in pictured["choices"]:
    assert choice["text"].startswith(image_prompt) and len(choice["text"]) > len(image_prompt)
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == pictured["usage"]["prompt_tokens"] + 3
    # text_offset places each entry in the text as sent: <img> at the span's start, its image's tokens at the
    # source (the data: URL) they stand for, </img> at its tag, then each prompt token's text where it stands, and
    # the answer right after the prompt. (It counted the image's tokens' own text, and so ended 3,000 characters off.)
    first, last = lp["tokens"].index("<img>"), lp["tokens"].index("</img>")
    assert lp["text_offset"][first] == start and lp["text_offset"][last] == end
    assert set(lp["text_offset"][first + 1:last]) == {start + len("<img>")}
    for offset, token in list(zip(lp["text_offset"], lp["tokens"]))[last:-3]:  # the prompt's (whole characters)
      assert choice["text"][offset:offset + len(token)] == token, (offset, token)
    assert lp["text_offset"][-3] == len(image_prompt)
  body = {"prompt": ids, "echo": True, "max_tokens": 4, "temperature": 0, "ignore_eos": True, "stream": True}
  with http.post(server.url + "/v1/completions", json=body, stream=True, timeout=60) as r:
    chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith(b"data: {")]
  assert chunks[0]["choices"][0]["text"].startswith(prompt_text)
  assert "".join(c["choices"][0]["text"] for c in chunks) == echoed["choices"][0]["text"]


def _check_vllm_prompt_logprobs(entries, ids, whole, tok, top):
  """vLLM's prompt_logprobs of prompt `ids` against the plain forward's log-softmax `whole` [T, V]: None first, then
  the token itself (its log-probability and rank over the whole vocabulary), then the `top` most likely ids."""
  assert len(entries) == len(ids) and entries[0] is None
  for t in range(1, len(ids)):
    entry, row = entries[t], whole[t - 1]
    first = next(iter(entry))
    assert first == str(ids[t]) and entry[first]["logprob"] == pytest.approx(row[ids[t]], abs=1e-4)
    assert entry[first]["rank"] == 1 + int(np.sum(row > row[ids[t]] + 1e-6))
    assert entry[first]["decoded_token"] == tok.decode([ids[t]]) or "\ufffd" in entry[first]["decoded_token"]
    order = np.argsort(-row[:tok.vocab_size], kind="stable")[:top]
    alternatives = {int(k): v for k, v in entry.items() if v["rank"] <= top}
    assert sorted(alternatives) == sorted(int(i) for i in order)
    for rank, i in enumerate(order, 1):
      assert alternatives[int(i)]["logprob"] == pytest.approx(row[i], abs=1e-4) and (
          alternatives[int(i)]["rank"] == rank or int(i) == ids[t])


def test_vllm_prompt_logprobs_on_both_endpoints(server, http, serve_model, serve_tok):
  """vLLM's `prompt_logprobs` (alternatives per prompt token): on each choice of a text completion and beside the
  choices of a chat completion, each prompt token's log-probability and rank and its position's most likely tokens,
  as the model's plain forward pass says (tolerance 1e-4); echo's entries keep their own count beside it;
  refused with streaming, as vLLM's, and out of range."""
  ids = serve_tok.encode("the red square is left of the blue circle")
  status, out = _complete_text(server, http, ids, max_tokens=1, prompt_logprobs=3, echo=True, logprobs=1)
  assert status == 200, out
  _check_vllm_prompt_logprobs(out["choices"][0]["prompt_logprobs"], ids,
                              _log_softmax(serve_model, serve_tok, ids, whole=True), serve_tok, 3)
  assert all(len(t) == 1 for t in out["choices"][0]["logprobs"]["top_logprobs"][1:])  # echo's own count
  r = http.post(server.url + "/v1/chat/completions", json={"messages": HI, "max_tokens": 1, "prompt_logprobs": 2,
                                                           "temperature": 0}, timeout=60)
  chat_ids = http.post(server.url + "/tokenize", json={"messages": HI}, timeout=60).json()["tokens"]
  assert r.status_code == 200 and "prompt_logprobs" not in r.json()["choices"][0]
  _check_vllm_prompt_logprobs(r.json()["prompt_logprobs"], chat_ids,
                              _log_softmax(serve_model, serve_tok, chat_ids, whole=True), serve_tok, 2)
  for fields in ({"prompt_logprobs": 2, "stream": True}, {"prompt_logprobs": 21}, {"prompt_logprobs": -1}):
    status, body = _complete_text(server, http, ids, max_tokens=1, **fields)
    assert status == 400 and body["error"]["param"] == "prompt_logprobs", body


def test_a_text_completions_logprobs_end_with_the_stop_token(server, http, serve_model, serve_tok):
  """A text completion that ends on a stop token has an entry for it (never shown as text), as vLLM's: a harness
  that scores with echo and max_tokens 1 drops the last entry as the generated one. Here the greedy first token is
  made a stop token: no text, one entry, the model's log-probability of that token (plain forward pass)."""
  ids = serve_tok.encode("the blue circle")
  ref = _log_softmax(serve_model, serve_tok, ids)[-1]
  first = int(np.argmax(ref))
  _, out = _complete_text(server, http, ids, max_tokens=3, logprobs=0, stop_token_ids=[first])
  choice = out["choices"][0]
  assert choice["finish_reason"] == "stop" and choice["text"] == "" and out["usage"]["completion_tokens"] == 1
  assert len(choice["logprobs"]["token_logprobs"]) == 1
  assert choice["logprobs"]["token_logprobs"][0] == pytest.approx(ref[first], abs=1e-4)
  _, echoed = _complete_text(server, http, ids, echo=True, max_tokens=1, logprobs=1, stop_token_ids=[first])
  assert len(echoed["choices"][0]["logprobs"]["tokens"]) == len(ids) + 1  # what the harness counts on


def test_tokenize_and_detokenize_as_vllm(server, http, serve_tok, serve_model, engine):
  """vLLM's /tokenize (a text as /v1/completions takes it, or messages as the chat endpoint builds them),
  /detokenize and /tokenizer_info (what lm-evaluation-harness's remote tokenizer reads)."""
  r = http.post(server.url + "/tokenize", json={"prompt": "hello there", "return_token_strs": True}, timeout=60)
  out = r.json()
  assert r.status_code == 200 and out["tokens"] == serve_tok.encode("hello there")
  assert out["count"] == len(out["tokens"])
  assert out["max_model_len"] == 512 and "".join(out["token_strs"]) == "hello there"
  assert http.post(server.url + "/detokenize", json={"tokens": out["tokens"]}, timeout=60).json() == {
      "prompt": "hello there"}
  chat = http.post(server.url + "/tokenize", json={"messages": HI}, timeout=60).json()
  completion = http.post(server.url + "/v1/chat/completions", json={"messages": HI, "max_tokens": 1}, timeout=60)
  assert chat["tokens"] and chat["count"] == completion.json()["usage"]["prompt_tokens"]
  image = http.post(server.url + "/tokenize", json={"prompt": f"<img>{data_url(png_bytes())}</img>hi"}, timeout=60)
  assert image.json()["tokens"].count(serve_tok.img_pad_id) == serve_model.cfg.image_tokens
  long = http.post(server.url + "/tokenize", json={"prompt": "hello there " * 300}, timeout=60).json()
  assert long["count"] > long["max_model_len"] == 512  # a whole document, past the context, as vLLM's
  info = http.get(server.url + "/tokenizer_info", timeout=60).json()
  assert info["eos_token"] == "<|endoftext|>" and info["model_max_length"] == 512
  assert info["chat_template"] == qtext.chat_template()  # the harness renders it (test_the_harness_renders_...)
  raw = Server(api.create_app(engine, serve_tok, api.ServerConfig(model_name=MODEL_NAME, chat_format="raw")))
  try:  # a base model's format has no chat template, as vLLM's base models
    assert requests.get(raw.url + "/tokenizer_info", timeout=10).json()["chat_template"] is None
  finally:
    raw.stop()
  for path, body, param in (("/tokenize", {"prompt": "a", "messages": HI}, "prompt"), ("/tokenize", {}, "prompt"),
                            ("/tokenize", {"messages": HI, "add_generation_prompt": False}, "add_generation_prompt"),
                            ("/tokenize", {"prompt": "<img>../x.png</img>"}, None),
                            ("/detokenize", {"tokens": [1, 400]}, "tokens"), ("/detokenize", {"tokens": "1"}, "tokens"),
                            ("/tokenize", {"prompt": "a", "model": "gpt-9"}, "model")):
    r = http.post(server.url + path, json=body, timeout=60)
    assert 400 <= r.status_code < 500 and "error" in r.json() and (param is None or r.json()["error"]["param"] == param)
  r = http.post(server.url + "/tokenize", data=b"{not json", timeout=60)
  assert r.status_code == 400 and "error" in r.json()


def test_the_harness_renders_the_servers_chat_template_to_the_chat_endpoints_prompt(server, http):
  """lm-evaluation-harness's remote tokenizer (`RemoteTokenizer.apply_chat_template`) renders the template of
  /tokenizer_info, and that text tokenizes (through /tokenize, as the harness does) to the chat endpoint's prompt.
  (The 0.4.13 CLI's `--apply_chat_template` with `local-completions` does not get there: the harness fails on its
  own message list first, whatever the server.)"""
  lm_utils = pytest.importorskip("lm_eval.utils")
  remote = lm_utils.RemoteTokenizer(server.url + "/v1/completions", max_retries=1)
  for conversation in ([{"role": "user", "content": "the red square"}],
                       [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "the red square"},
                        {"role": "assistant", "content": "is left"}, {"role": "user", "content": "a cat"}]):
    text = remote.apply_chat_template(conversation)
    chat = http.post(server.url + "/tokenize", json={"messages": conversation}, timeout=60).json()["tokens"]
    assert remote.encode(text) == chat, text


def test_lm_evaluation_harness_scores_and_generates_through_the_server(server, http, serve_model, serve_tok):
  """lm-evaluation-harness's own `local-completions` client, with the server's tokenizer (its "remote" backend:
  /tokenize, /tokenizer_info): each loglikelihood request is the sum of the continuation's log-probabilities
  under the model's plain forward pass and as `evaluate`'s multiple-choice scorer says, and is_greedy whether each
  is the most likely token; loglikelihood_rolling (perplexity) sums its windows' scores as the plain forward pass
  does; generate_until answers what /v1/completions answers the same prompt."""
  completions = pytest.importorskip("lm_eval.models.openai_completions")
  from lm_eval.api.instance import Instance  # pylint: disable=import-outside-toplevel
  lm = completions.LocalCompletionsAPI(base_url=server.url + "/v1/completions", model=MODEL_NAME,
                                       tokenizer_backend="remote", tokenized_requests=True, max_retries=1)
  pairs = [("the red square is", " left of the blue circle"), ("a cat", " sat"), ("the", " the")]
  scorer = inference.scoring.LikelihoodScorer(inference.Generator(serve_model))
  got = lm.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)],
                         disable_tqdm=True)
  for (context, continuation), (score, greedy) in zip(pairs, got):
    # The harness's split: the whole text tokenized, the context's tokens first, the rest the continuation's.
    whole, head = serve_tok.encode(context + continuation), serve_tok.encode(context)
    ref = _log_softmax(serve_model, serve_tok, whole)
    positions = range(len(head) - 1, len(whole) - 1)
    assert score == pytest.approx(sum(ref[t, whole[t + 1]] for t in positions), abs=1e-3)
    assert greedy == all(int(np.argmax(ref[t])) == whole[t + 1] for t in positions)
    # What `python -m qwenvl_jax.evaluate` scores a multiple-choice option with: the same likelihood.
    mean = scorer.option_losses(head, [whole[len(head):]], pad_id=serve_tok.eod_id)[0]
    assert score == pytest.approx(-mean * (len(whole) - len(head)), abs=1e-3)
  # Perplexity (loglikelihood_rolling): the document cut into the harness's windows of max_length tokens, each
  # scored through the server; the sum is what the plain forward pass gives each window's predicted tokens.
  from lm_eval import utils as lm_utils  # pylint: disable=import-outside-toplevel
  lm.max_length = 16
  document = "the red square is left of the blue circle and the cat sat on the mat"
  tokens = serve_tok.encode(document)
  assert len(tokens) > 2 * 16  # several windows
  rolling = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (document,), 0)], disable_tqdm=True)[0]
  assert serve_tok.encode("<|endoftext|>") == [serve_tok.eod_id]  # the harness's prefix token, via /tokenize
  expected = 0.0
  for context_ids, predicted in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
      token_list=tokens, prefix_token=serve_tok.eod_id, max_seq_len=15, context_len=1)):
    window = list(context_ids) + list(predicted)
    ref = _log_softmax(serve_model, serve_tok, window)
    expected += sum(ref[t, window[t + 1]] for t in range(len(context_ids) - 1, len(window) - 1))
  assert rolling == pytest.approx(expected, abs=1e-3)
  context = "the red square"
  out = lm.generate_until([Instance("generate_until", {}, (context, {"until": ["\n\n"], "max_gen_toks": 6}), 0)],
                          disable_tqdm=True)
  _, direct = _complete_text(server, http, serve_tok.encode(context), max_tokens=6, stop=["\n\n"])
  assert out == [direct["choices"][0]["text"]]


_TASK = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
"""


def test_the_readmes_lm_eval_command_runs_a_multiple_choice_task_through_the_server(server, serve_model, serve_tok,
                                                                                     tmp_path):
  """The README's `lm_eval --model local-completions ... tokenizer_backend=remote` command, run as a user runs it
  (the harness's own CLI in a subprocess, offline, on a local task file): every choice's loglikelihood in its
  samples is the plain forward pass's score of the pair it sent (tolerance 1e-3), and its accuracy is what those
  scores give."""
  pytest.importorskip("lm_eval")
  docs = [{"question": "the red square is", "choices": ["left of the blue circle", "a cat", "on the mat"], "label": 0},
          {"question": "a cat", "choices": ["sat", "square", "blue"], "label": 0},
          {"question": "the blue circle", "choices": ["is right", "the", "red"], "label": 1}]
  data = tmp_path / "docs.jsonl"
  data.write_text("".join(json.dumps(d) + "\n" for d in docs))
  (tmp_path / "tiny_mc.yaml").write_text(_TASK.format(data=data))
  env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
  args = f"model={MODEL_NAME},base_url={server.url}/v1/completions,tokenizer_backend=remote,max_length=511"
  run = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args", args,
                        "--tasks", "tiny_mc", "--include_path", str(tmp_path), "--output_path", str(tmp_path / "out"),
                        "--log_samples"], env=env, capture_output=True, text=True, timeout=600, check=False)
  assert run.returncode == 0, run.stderr[-3000:]
  samples = [json.loads(line) for f in (tmp_path / "out").rglob("samples_tiny_mc_*.jsonl")
             for line in f.read_text().splitlines()]
  results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())["results"]["tiny_mc"]
  assert len(samples) == len(docs)
  correct = 0
  for sample in samples:
    scores = []
    for (context, continuation), ((score, _),) in zip(
        [(a["arg_0"], a["arg_1"]) for a in sample["arguments"].values()], sample["resps"]):
      whole, head = serve_tok.encode(context + continuation), serve_tok.encode(context)
      ref = _log_softmax(serve_model, serve_tok, whole)
      expected = sum(ref[t, whole[t + 1]] for t in range(len(head) - 1, len(whole) - 1))
      assert float(score) == pytest.approx(expected, abs=1e-3)
      scores.append(expected)
    correct += int(np.argmax(scores)) == sample["doc"]["label"]
  assert results["acc,none"] == pytest.approx(correct / len(docs))


def _metrics(server, http) -> dict:
  """{(sample name, labels as sorted tuple): value} of /metrics, parsed by prometheus_client's own parser."""
  r = http.get(server.url + "/metrics", timeout=10)
  assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
  return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
          for family in text_string_to_metric_families(r.text) for sample in family.samples}


def test_metrics_count_requests_tokens_and_first_token_times_in_prometheus_format(server, client, http):
  """/metrics (what a Prometheus scraper reads) moves with the requests: finished by reason, tokens, the time to
  first token and latency histograms, busy seconds; no compile event after warm-up; nothing left running."""
  before = _metrics(server, http)
  ask(client, HI, max_tokens=5, extra_body={"ignore_eos": True})
  reply = ask(client, HI, max_tokens=7, n=2, extra_body={"ignore_eos": True})
  after = _metrics(server, http)

  def grew(name, **labels):
    key = (name, tuple(sorted(labels.items())))
    return after[key] - before.get(key, 0)

  assert grew("qwenvl_requests_finished_total", reason="length") == 3
  assert grew("qwenvl_generation_tokens_total") == 5 + 14
  assert grew("qwenvl_prompt_tokens_total") == 3 * reply.usage.prompt_tokens
  assert grew("qwenvl_prefills_total") == 2 and grew("qwenvl_prompts_shared_total") == 1  # n = 2: one prefill
  assert grew("qwenvl_time_to_first_token_seconds_count") == 3
  assert grew("qwenvl_e2e_request_latency_seconds_count") == 3
  assert grew("qwenvl_e2e_request_latency_seconds_sum") > 0 and grew("qwenvl_device_seconds_total",
                                                                      program="decode") > 0
  assert after[("qwenvl_compilations_after_warmup_total", (("kind", "backend_compiles"),))] == 0
  assert after[("qwenvl_num_requests_running", ())] == 0 and after[("qwenvl_decode_slots", ())] == 4
  assert after[("qwenvl_healthy", ())] == 1


def test_a_model_is_retrieved_by_id(client):
  assert client.models.retrieve(MODEL_NAME).id == MODEL_NAME
  with pytest.raises(openai.NotFoundError):
    client.models.retrieve("gpt-9")


def test_browser_origins_are_allowed_only_when_configured(engine, serve_tok, server):
  preflight = {"Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST",
               "Access-Control-Request-Headers": "authorization,content-type"}
  r = requests.options(server.url + "/v1/chat/completions", headers=preflight, timeout=10)
  assert "access-control-allow-origin" not in r.headers
  config = api.ServerConfig(model_name=MODEL_NAME, cors_origins=("http://localhost:3000",))
  srv = Server(api.create_app(engine, serve_tok, config))
  try:
    r = requests.options(srv.url + "/v1/chat/completions", headers=preflight, timeout=10)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://localhost:3000"
    r = requests.options(srv.url + "/v1/chat/completions", headers={**preflight, "Origin": "http://evil.test"},
                         timeout=10)
    assert r.headers.get("access-control-allow-origin") != "http://evil.test"
    r = requests.get(srv.url + "/v1/models", headers={"Origin": "http://localhost:3000"}, timeout=10)
    assert r.headers["access-control-allow-origin"] == "http://localhost:3000"
  finally:
    srv.stop()


def test_the_body_is_parsed_off_the_event_loop(server, http, monkeypatch):
  """Parsing a body of tens of MB (the images' base64) takes a while: it runs on a worker thread, as the rest of
  a request's checks do, not on the event loop, where it held up every stream meanwhile."""
  on_loop = []

  def loads(*args, **kwargs):
    try:
      asyncio.get_running_loop()
      on_loop.append(True)
    except RuntimeError:
      on_loop.append(False)
    return json.loads(*args, **kwargs)

  # The body is parsed by `messages.json_body` (the tokenizer's endpoints share it).
  monkeypatch.setattr(messages, "json", types.SimpleNamespace(loads=loads, dumps=json.dumps,
                                                              JSONDecodeError=json.JSONDecodeError))
  status, _ = _post(server, http, {"messages": HI, "max_tokens": 1})
  assert status == 200 and on_loop == [False]
