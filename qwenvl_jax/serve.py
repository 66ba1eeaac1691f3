"""Serve a model over an OpenAI-compatible HTTP API with continuous batching: `python -m qwenvl_jax.serve`.

  python -m qwenvl_jax.serve --checkpoint=runs/stage3 --port=8000           # a training run: all from its config
  python -m qwenvl_jax.serve --checkpoint=ckpt/params --tokenizer=../shared/data/qwen.tiktoken --image_root=data
  python -m qwenvl_jax.serve --model=tiny --tokenizer=sp.model --dtype=float32      # random weights (smoke test)

Endpoints: POST /v1/chat/completions (OpenAI schema, `stream: true` for server-sent events), GET /v1/models,
GET /health (slots, queue, compile counts), and a chat page at /. Binds 127.0.0.1 unless --host says otherwise.
Every program is compiled before the port opens (`serving.Engine` warm-up), so the first request is as fast as
any other. See qwenvl_jax/serving/ and README "Serving".
"""

from __future__ import annotations

import logging
import sys

from absl import app, flags

from qwenvl_jax import cli

FLAGS = flags.FLAGS
SWITCH_INTERVAL_S = 0.0005
flags.DEFINE_string("checkpoint", None, "A training run directory, <run>/checkpoints/<step>, or a params "
                    "checkpoint; omit to serve random weights (smoke tests).")
flags.DEFINE_string("model", None, "Architecture preset (default: the run's, else qwen_vl_7b).")
flags.DEFINE_string("tokenizer", None, "qwen.tiktoken or a SentencePiece .model (default: the run's).")
flags.DEFINE_integer("image_size", None, "Input resolution (default: the run's, else the preset's).")
flags.DEFINE_enum("chat_format", None, ["chatml", "raw"], "Prompt format (default: the run's, else chatml).")
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Compute dtype.")
flags.DEFINE_string("served_model_name", None, "The model id of /v1/models (default: the preset name).")
flags.DEFINE_string("host", "127.0.0.1", "Interface to bind (127.0.0.1: this machine only).")
flags.DEFINE_integer("port", 8000, "TCP port.")
flags.DEFINE_string("api_key", None, "Require 'Authorization: Bearer KEY' on /v1/* (default: open).")
flags.DEFINE_integer("num_slots", 8, "Requests decoded together (decode slots of the KV cache).")
flags.DEFINE_integer("context", 2048, "Most tokens of prompt + answer per request.")
flags.DEFINE_integer("max_tokens_limit", 1024, "Largest max_tokens a request may ask for.")
flags.DEFINE_integer("prefill_batch", 4, "Most requests admitted by one prefill.")
flags.DEFINE_list("buckets", None, "Padded prompt lengths (default 32,64,...; those below --context).")
flags.DEFINE_integer("max_images", 4, "Most images per request (the whole conversation).")
flags.DEFINE_integer("max_image_bytes", 10 * 2 ** 20, "Largest image upload in bytes.")
flags.DEFINE_integer("max_image_pixels", 4096 * 4096, "Largest image in pixels (width x height).")
flags.DEFINE_string("image_root", None, "Local image paths in requests are read under this folder only.")
flags.DEFINE_bool("allow_remote_images", False, "Fetch http(s) image URLs (off: only data: URLs and paths).")
flags.DEFINE_string("system", "You are a helpful assistant.", "Default system message (chatml).")
flags.DEFINE_string("rules", "fsdp", "Sharding rule table of qwenvl_jax/sharding_rules.py.")
flags.DEFINE_integer("seed", 0, "Seed of random weights.")
flags.DEFINE_enum("quantize", "none", ["none", "int8", "int4"],
                  "Weight-only quantization at load time (int8 per channel, int4 per group), as generate's. A "
                  "checkpoint written by `convert --mode=quantize` loads quantized as stored.")
flags.DEFINE_integer("group_size", 128, "int4 group size along each kernel's contracted axis.")
flags.DEFINE_enum("kv_cache_dtype", "auto", ["auto", "int8"],
                  "KV cache storage: the compute dtype, or int8 (about half the bytes of bf16: more slots x context).")
flags.DEFINE_integer("decode_steps", 4, "Decode steps per device call (more: less host work per token, later "
                     "admission of new requests).")


def build(argv_flags=FLAGS):
  """(engine, tokenizer, ServerConfig) from the flags; the engine is started (warmed up)."""
  from qwenvl_jax import sharding  # pylint: disable=import-outside-toplevel
  from qwenvl_jax.inference import decode, loading, model_source  # pylint: disable=import-outside-toplevel
  from qwenvl_jax.serving import api, engine as engine_lib, messages  # pylint: disable=import-outside-toplevel

  f = argv_flags
  source = model_source.resolve(f.checkpoint, model=f.model, tokenizer=f.tokenizer, image_size=f.image_size,
                                chat_format=f.chat_format)
  if not source.tokenizer:
    raise app.UsageError("--tokenizer is required unless --checkpoint is a training run")
  tok, _, mesh, rules, model = loading.load_source(source, dtype=f.dtype, rules=f.rules, seed=f.seed,
                                                   quantize=f.quantize, group_size=f.group_size)
  stops = [tok.eod_id] + ([tok.im_end_id, tok.im_start_id] if source.chat_format == "chatml" else [])
  buckets = tuple(int(b) for b in f.buckets) if f.buckets else decode.DEFAULT_BUCKETS
  engine = engine_lib.Engine(model, num_slots=f.num_slots, context=f.context, max_images=f.max_images,
                             prefill_batch=f.prefill_batch, buckets=buckets, stop_ids=stops,
                             vocab_limit=tok.vocab_size, thread_context=lambda: sharding.use_rules(mesh, rules),
                             decode_steps=f.decode_steps,
                             kv_cache_dtype=None if f.kv_cache_dtype == "auto" else f.kv_cache_dtype)
  engine.start()
  config = api.ServerConfig(
      model_name=f.served_model_name or source.preset, chat_format=source.chat_format, system=f.system,
      max_tokens_limit=f.max_tokens_limit, api_key=f.api_key,
      images=messages.ImagePolicy(max_bytes=f.max_image_bytes, max_pixels=f.max_image_pixels,
                                  image_root=f.image_root, allow_remote=f.allow_remote_images))
  return engine, tok, config


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  import uvicorn  # pylint: disable=import-outside-toplevel
  from qwenvl_jax.serving import api  # pylint: disable=import-outside-toplevel
  try:
    engine, tok, config = build()
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  logging.info("engine ready: %s", engine.stats())
  # The engine thread needs the GIL for a moment between device steps; with the default 5 ms switch interval a
  # busy event loop (many streams) makes it wait up to 5 ms each time, which caps the decode rate.
  sys.setswitchinterval(SWITCH_INTERVAL_S)
  uvicorn.run(api.create_app(engine, tok, config), host=FLAGS.host, port=FLAGS.port, log_level="warning")
  engine.shutdown()


if __name__ == "__main__":
  cli.run(main)
