"""Serve a model over an OpenAI-compatible HTTP API with continuous batching: `python -m qwenvl_jax.serve`.

  python -m qwenvl_jax.serve --checkpoint=runs/stage3 --port=8000           # a training run: all from its config
  python -m qwenvl_jax.serve --checkpoint=ckpt/params --image_root=data    # converted: the tokenizer it keeps
  python -m qwenvl_jax.serve --model=tiny --tokenizer=sp.model --dtype=float32      # random weights (smoke test)

Endpoints: POST /v1/chat/completions (OpenAI schema, `stream: true` for server-sent events), GET /v1/models,
GET /health (slots, queue, open requests, compile counts), and a chat page at /. Binds 127.0.0.1 unless --host
says otherwise. Every program is compiled before the port opens (`serving.Engine` warm-up), so the first request
is as fast as any other. Limits on request bodies (size, stalls) and on the requests held at once answer 413, 408
and 429; an answer its client stops reading is cut (`serving.limits`); a request head must arrive within
--header_timeout, and a closed connection whose last bytes stay unread for --send_timeout is reset
(`serving.connection`). Ctrl-C (SIGINT) or SIGTERM stops it gracefully (open streams end first); a second Ctrl-C
stops at once. See qwenvl_jax/serving/ and README "Serving".
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import sys

from absl import app, flags

from qwenvl_jax import cli, serving_defaults

FLAGS = flags.FLAGS
SWITCH_INTERVAL_S = 0.0005
cli.define_model_flags()  # checkpoint, model, tokenizer, image_size, chat_format, dtype, quantize, rules, ...
flags.DEFINE_string("served_model_name", None, "The model id of /v1/models (default: the preset name).")
flags.DEFINE_string("host", "127.0.0.1", "Interface to bind (127.0.0.1: this machine only).")
flags.DEFINE_integer("port", 8000, "TCP port.")
flags.DEFINE_string("api_key", None, "Require 'Authorization: Bearer KEY' on /v1/* (default: open).")
flags.DEFINE_list("cors_origins", [], "Web origins whose pages may call the API from a browser, e.g. "
                  "http://localhost:3000 ('*': any; default none: only the server's own chat page).")
flags.DEFINE_integer("num_slots", serving_defaults.NUM_SLOTS,
                     "Requests decoded together (decode slots of the KV cache).")
flags.DEFINE_integer("context", serving_defaults.CONTEXT, "Most tokens of prompt + answer per request.")
flags.DEFINE_integer("max_tokens_limit", 1024, "Largest max_tokens a request may ask for.")
flags.DEFINE_integer("prefill_batch", serving_defaults.PREFILL_BATCH, "Most requests admitted by one prefill.")
flags.DEFINE_list("buckets", None, "Padded prompt lengths (default 32,64,...; those below --context).")
flags.DEFINE_integer("max_images", serving_defaults.MAX_IMAGES,
                     "Most images per request (the whole conversation).")
flags.DEFINE_integer("max_image_bytes", 10 * 2 ** 20, "Largest image upload in bytes.")
flags.DEFINE_integer("max_image_pixels", 4096 * 4096, "Largest image in pixels (width x height).")
flags.DEFINE_string("image_root", None, "Local image paths in requests are read under this folder only.")
flags.DEFINE_bool("allow_remote_images", False, "Fetch http(s) image URLs (off: only data: URLs and paths).")
flags.DEFINE_integer("max_request_bytes", None, "Largest request body in bytes, answered 413 past it (default: "
                     "--max_images images of --max_image_bytes as base64 data: URLs, plus 1 MiB of text).")
flags.DEFINE_float("body_timeout", 60.0, "Seconds a request body may send nothing before it is answered 408.")
flags.DEFINE_float("send_timeout", 60.0, "Seconds an answer may wait for a client that reads nothing (its socket "
                   "buffers full) before the answer is cut and its decode slot freed; also how long a closed "
                   "connection may leave its last bytes unread before it is reset.")
flags.DEFINE_float("header_timeout", 60.0, "Seconds a connection may take to send a whole request head (from its "
                   "opening or its previous answer's end): a partial head is then answered 408, a silent connection "
                   "closed.")
flags.DEFINE_integer("max_waiting", 128, "Most requests held beyond the --num_slots being decoded (being received, "
                     "checked or waiting for a slot); more are answered 429 with Retry-After.")
flags.DEFINE_string("system", "You are a helpful assistant.", "Default system message (chatml).")
flags.DEFINE_integer("seed", 0, "Seed of random weights.")
flags.DEFINE_enum("kv_cache_dtype", "auto", ["auto", "int8"],
                  "KV cache storage: the compute dtype, or int8 (about half the bytes of bf16: more slots x context).")
flags.DEFINE_integer("decode_steps", serving_defaults.DECODE_STEPS, "Decode steps per device call (more: less host "
                     "work per token, later admission of new requests).")
flags.DEFINE_integer("compile_threads", 0, "Programs the warm-up compiles at once (0: this host's CPU count, at most "
                     "8); each holds its compiler's memory meanwhile.")


def _check_can_listen(host: str, port: int) -> int:
  """The port to serve on (port 0: a free one, chosen now so the log can name it); ConfigError when host:port
  cannot be listened on (a busy port, an address not on this machine)."""
  import socket  # pylint: disable=import-outside-toplevel
  from qwenvl_jax import errors  # pylint: disable=import-outside-toplevel
  try:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as s:
      s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a port in TIME_WAIT is free
      s.bind(address)
      return s.getsockname()[1]
  except OSError as e:
    busy = getattr(e, "errno", None) == errno.EADDRINUSE
    hint = ("another server holds the port: choose another --port" if busy else
            "--host must be an address of this machine (127.0.0.1, 0.0.0.0 for every interface, or one of its own)")
    raise errors.ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e}", hint=hint) from None


def build(argv_flags=FLAGS):
  """(engine, tokenizer, ServerConfig) from the flags; the engine is started (warmed up)."""
  from qwenvl_jax import errors, sharding  # pylint: disable=import-outside-toplevel
  from qwenvl_jax.inference import decode, layout  # pylint: disable=import-outside-toplevel
  from qwenvl_jax.serving import api, engine as engine_lib, messages  # pylint: disable=import-outside-toplevel

  f = argv_flags
  try:
    buckets = tuple(int(b) for b in f.buckets) if f.buckets else decode.DEFAULT_BUCKETS
  except ValueError as e:
    raise errors.ConfigError(f"--buckets={','.join(f.buckets)}: not a list of integers") from e
  if f.num_slots < 1 or f.prefill_batch < 1 or f.max_images < 0 or f.context < 1:
    raise errors.ConfigError(f"need --num_slots >= 1, --prefill_batch >= 1, --max_images >= 0 and --context >= 1; "
                             f"got {f.num_slots}, {f.prefill_batch}, {f.max_images}, {f.context}")
  if f.decode_steps < 1:
    raise errors.ConfigError(f"need --decode_steps >= 1, got {f.decode_steps}")
  if f.compile_threads < 0:
    raise errors.ConfigError(f"--compile_threads={f.compile_threads} must be >= 0 (0: the CPU count, at most 8)")
  # 0 would refuse every request (max_request_bytes: None is the default derived from the image limits)
  for name in ("max_tokens_limit", "max_image_bytes", "max_image_pixels", "max_request_bytes"):
    if f[name].value is not None and f[name].value < 1:
      raise errors.ConfigError(f"--{name}={f[name].value} must be >= 1")
  for name in ("body_timeout", "send_timeout", "header_timeout"):
    if not f[name].value > 0:
      raise errors.ConfigError(f"--{name}={f[name].value:g} must be > 0 (seconds)")
  if f.max_waiting < 0:
    raise errors.ConfigError(f"--max_waiting={f.max_waiting} must be >= 0")
  if not 0 <= f.port <= 65535:
    raise errors.ConfigError(f"--port={f.port} must be in 0..65535")
  if f.image_root and not os.path.isdir(f.image_root):
    raise errors.UserFileNotFoundError(f"--image_root={f.image_root} is not a folder")
  f.port = _check_can_listen(f.host, f.port)  # now, not after minutes of loading and compiling
  for origin in f.cors_origins:
    scheme, sep, rest = origin.partition("://")
    if origin != "*" and not (scheme in ("http", "https") and sep and rest and "/" not in rest):
      raise errors.ConfigError(f"--cors_origins: {origin!r} is not an origin",
                               hint="give scheme://host[:port] as the browser sends it, e.g. http://localhost:3000")
  source, tok, _, mesh, rules, model = cli.load_model_from_flags()
  layout.check_slots(f.num_slots, mesh, rules)
  logging.info("layout: %s (%s)", layout.describe(mesh), f.rules)
  stops = [tok.eod_id] + ([tok.im_end_id, tok.im_start_id] if source.chat_format == "chatml" else [])
  # Built inside the layout so the slots' KV cache is created in it (rows over `data`, heads over `tensor`).
  with sharding.use_rules(mesh, rules):
    engine = engine_lib.Engine(model, num_slots=f.num_slots, context=f.context, max_images=f.max_images,
                               prefill_batch=f.prefill_batch, buckets=buckets, stop_ids=stops,
                               vocab_limit=tok.vocab_size, thread_context=lambda: sharding.use_rules(mesh, rules),
                               decode_steps=f.decode_steps, compile_threads=f.compile_threads or None,
                               kv_cache_dtype=None if f.kv_cache_dtype == "auto" else f.kv_cache_dtype)
  print("compiling the server's programs (a minute or more on a CPU, less with a filled compilation cache) ...",
        file=sys.stderr, flush=True)
  engine.start()
  config = api.ServerConfig(
      model_name=f.served_model_name or source.preset, chat_format=source.chat_format, system=f.system,
      max_tokens_limit=f.max_tokens_limit, api_key=f.api_key, cors_origins=tuple(f.cors_origins),
      max_request_bytes=f.max_request_bytes, body_timeout=f.body_timeout, send_timeout=f.send_timeout,
      header_timeout=f.header_timeout,
      max_waiting=f.max_waiting,
      images=messages.ImagePolicy(max_bytes=f.max_image_bytes, max_pixels=f.max_image_pixels,
                                  image_root=f.image_root, allow_remote=f.allow_remote_images))
  return engine, tok, config


def _exit_at_once(signum, frame):  # pylint: disable=unused-argument
  os._exit(128 + signum)  # pylint: disable=protected-access


def _uvicorn_server(app_, host: str, port: int):
  """uvicorn's `Server` for `app_`, stopped by SIGINT / SIGTERM as uvicorn stops it, without uvicorn's re-raise of
  the stopping signals once it has shut down: under `asyncio.run` the re-raised second Ctrl-C reached JAX's atexit
  clean-up as a KeyboardInterrupt and printed its traceback at exit (`tests/serving/conftest.py` stops every
  server it starts with two Ctrl-C and checks the exit is clean). A second Ctrl-C while the first waits for open
  requests exits at once with 130: uvicorn's own forced stop left `asyncio.run` to cancel them, which logged a
  traceback for each open stream or upload and exited 0 as if every answer had ended."""
  import contextlib  # pylint: disable=import-outside-toplevel
  import threading  # pylint: disable=import-outside-toplevel
  import uvicorn  # pylint: disable=import-outside-toplevel

  class Server(uvicorn.Server):

    def handle_exit(self, sig, frame):
      if self.should_exit and sig == signal.SIGINT:  # the second Ctrl-C: nothing is left to save
        _exit_at_once(sig, frame)
      super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self):
      if threading.current_thread() is not threading.main_thread():
        yield
        return
      original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
      try:
        yield
      finally:
        for sig, handler in original.items():
          signal.signal(sig, handler)

  from qwenvl_jax.serving import api  # pylint: disable=import-outside-toplevel
  return Server(api.uvicorn_config(app_, host, port))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from qwenvl_jax.serving import api  # pylint: disable=import-outside-toplevel
  cli.quiet_libraries()
  engine, tok, config = build()
  logging.info("engine ready: %s", engine.stats())
  print(f"serving {config.model_name} on http://{FLAGS.host}:{FLAGS.port}/ (the chat page; the API under /v1, "
        f"/health); Ctrl-C stops", file=sys.stderr, flush=True)
  # The engine thread needs the GIL for a moment between device steps; with the default 5 ms switch interval a
  # busy event loop (many streams) makes it wait up to 5 ms each time, which caps the decode rate.
  sys.setswitchinterval(SWITCH_INTERVAL_S)
  server = _uvicorn_server(api.create_app(engine, tok, config), FLAGS.host, FLAGS.port)
  server.run()
  # Nothing is left to save: a Ctrl-C from here on (a second one after a quick shutdown) exits at once and
  # quietly, instead of a KeyboardInterrupt traceback from wherever the interpreter is, often its atexit hooks.
  signal.signal(signal.SIGINT, _exit_at_once)
  engine.shutdown()
  print("stopped", file=sys.stderr, flush=True)


if __name__ == "__main__":
  cli.run(main)
