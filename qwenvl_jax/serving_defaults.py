"""The serving engine's default sizes, in one place: `serve`'s flags, `serving.Engine`'s arguments and the server
plans of the planner (`planning.inference_plan --server`, `plan --inference=server=true`) read them, so a plan that
says "fits" planned what `serve` compiles when it is given no size flags.

It imports nothing: `serve` defines its flags from it without loading JAX, and `planning` reads it without importing
`serving` (a layer beside it).
"""

NUM_SLOTS = 8       # --num_slots: requests decoded together (decode slots of the KV cache)
CONTEXT = 2048      # --context: cache slots per request (prompt + answer)
PREFILL_BATCH = 4   # --prefill_batch: the most requests one prefill admits
MAX_IMAGES = 4      # --max_images: the most images per request (one prefill encodes up to PREFILL_BATCH x this)
DECODE_STEPS = 4    # --decode_steps: decode steps per device call
