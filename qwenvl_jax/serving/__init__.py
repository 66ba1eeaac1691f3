"""Serving: an OpenAI-compatible HTTP server over a continuously batched engine (`python -m qwenvl_jax.serve`).

  engine = Engine(model, num_slots=8, context=2048, stop_ids=[...])   # one thread owns the device
  engine.start()                                                       # compiles every program once
  engine.submit(Request(prompt_ids, images, SamplingParams(max_tokens=64), sink))

Layers: `slots` (the jitted encode / prefill / decode of `inference.slot_programs` over the slot cache),
`engine` (the scheduling thread), `compile_monitor` (JAX compile events), and the HTTP side in `api` (its request
limits in `limits`, its connection deadlines in `connection`, remote images fetched by `qwenvl_jax.remote_fetch`).
"""
from qwenvl_jax.serving.engine import Engine
from qwenvl_jax.serving.engine import Failed
from qwenvl_jax.serving.engine import Finished
from qwenvl_jax.serving.engine import Request
from qwenvl_jax.serving.engine import SamplingParams
from qwenvl_jax.serving.engine import Token
