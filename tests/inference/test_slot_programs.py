"""The serving engine's prefill program (`inference.slot_programs.prefill`) as compiled: what it holds."""
import numpy as np

from qwenvl_jax.serving import slots as slots_lib


def test_the_server_prefill_writes_into_the_slots_cache_without_a_cache_of_its_own(tiny_model):
  """The prefill ran the prompts into a prompt-sized cache of its own, then copied it into the slot rows: for the
  7B model's int8 cache a 2.1 GiB temporary at 4 requests of 2048 tokens (v5e AOT). Each layer now writes into
  the slots' cache directly: the compiled program holds no [L, k, N, P, H] buffer (2 requests of 32 tokens)."""
  cfg = tiny_model.cfg
  slot_model = slots_lib.SlotModel(tiny_model, num_slots=4, context=64, feature_slots=1)
  k, p = 2, 32
  sampling = slots_lib.Sampling.greedy(k)
  args = (slot_model.state, slot_model.cache, slot_model.history, np.ones((k, p), np.int32), np.full(k, p, np.int32),
          np.zeros(k, np.int32), slot_model.no_features, np.array([0, 1], np.int32),
          np.full(k, cfg.llm.rope_base, np.float32), sampling)
  text = slot_model._prefill.lower(*args).compile().as_text()  # pylint: disable=protected-access
  llm = cfg.llm
  whole = f"[{llm.layers},4,{llm.heads},64,{llm.head_dim}]"  # the slots' cache (donated, updated in place)
  assert whole in text
  assert f"[{llm.layers},{k},{llm.heads},{p},{llm.head_dim}]" not in text
