"""`qwenvl_jax.serving_defaults`: serve's flags and the engine hold one set of sizes."""
import inspect

from qwenvl_jax import serve, serving_defaults
from qwenvl_jax.serving.engine import Engine

SIZES = {"num_slots": serving_defaults.NUM_SLOTS, "context": serving_defaults.CONTEXT,
         "prefill_batch": serving_defaults.PREFILL_BATCH, "max_images": serving_defaults.MAX_IMAGES,
         "decode_steps": serving_defaults.DECODE_STEPS}


def test_serve_and_the_engine_default_to_the_shared_sizes():
  assert {name: serve.FLAGS[name].default for name in SIZES} == SIZES
  engine = inspect.signature(Engine).parameters
  assert {name: engine[name].default for name in SIZES} == SIZES

