"""`qwenvl_jax.serving_defaults`: serve's flags, the engine and the planner's server plans hold one set of sizes."""
import inspect
import json
import subprocess
import sys

from qwenvl_jax import serving_defaults
from qwenvl_jax.inference import layout
from qwenvl_jax.planning import inference_plan
from qwenvl_jax.serving.engine import Engine

SIZES = {"num_slots": serving_defaults.NUM_SLOTS, "context": serving_defaults.CONTEXT,
         "prefill_batch": serving_defaults.PREFILL_BATCH, "max_images": serving_defaults.MAX_IMAGES,
         "decode_steps": serving_defaults.DECODE_STEPS}


def test_serve_and_the_engine_default_to_the_shared_sizes():
  # serve's flags are read in a child process: importing qwenvl_jax.serve here defines --system a second time for
  # every later in-process import of qwenvl_jax.generate (DuplicateFlagError).
  code = ("import json; from qwenvl_jax import serve; "
          f"print(json.dumps({{n: serve.FLAGS[n].default for n in {sorted(SIZES) + ['rules']!r}}}))")
  done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
  assert json.loads(done.stdout) == dict(SIZES, rules=layout.DEFAULT_RULES)  # the layout generate and plan assume
  engine = inspect.signature(Engine).parameters
  assert {name: engine[name].default for name in SIZES} == SIZES


def test_a_server_plan_defaults_to_what_serve_compiles():
  """`plan --inference=server=true` and `inference_plan --server` planned a prefill of 1 request with 1 image,
  where serve with its defaults compiles prefills of up to 4 requests of up to 4 images each (16 encoded at
  once): their "fits" held for less than serve needs."""
  kwargs = inference_plan.parse_inference_arg("server=true")
  assert (kwargs["batch"], kwargs["context"], kwargs["prefill_batch"], kwargs["images"], kwargs["prompt"]) == (
      SIZES["num_slots"], SIZES["context"], SIZES["prefill_batch"], SIZES["max_images"], SIZES["context"])
  assert inference_plan.SERVER_SIZES == {"batch": SIZES["num_slots"], "images": SIZES["max_images"],
                                         "prefill_batch": SIZES["prefill_batch"]}
  assert inspect.signature(inference_plan.plan_inference).parameters["decode_steps"].default == SIZES["decode_steps"]
  # What the user gives stays; a plan that is not a server's keeps Generator's sizes.
  given = inference_plan.parse_inference_arg("server=true,batch=2,prefill_batch=1,images=0")
  assert (given["batch"], given["prefill_batch"], given["images"]) == (2, 1, 0)
  plain = inference_plan.parse_inference_arg("")
  assert (plain["batch"], plain["prefill_batch"], plain["images"], plain["prompt"]) == (4, None, 1, 1024)
  # A server's prompt defaulted to 1024 where serve compiles prefills of the whole context; a given one stays.
  assert inference_plan.parse_inference_arg("server=true,context=512")["prompt"] == 512
  assert inference_plan.parse_inference_arg("server=true,prompt=100")["prompt"] == 100
  assert inference_plan.parse_inference_arg("context=512")["prompt"] == 512  # a generator's: 1024, at most C
