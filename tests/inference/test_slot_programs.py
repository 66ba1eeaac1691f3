"""The serving engine's prefill program (`inference.slot_programs.prefill`): what it holds as compiled, and its prompt
scores."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwenvl_jax.inference import slot_programs, slot_sampling
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
          np.full(k, cfg.llm.rope_base, np.float32), sampling, *slot_programs.no_bias(k, cfg.llm.vocab_size),
          slot_programs.no_stops(k, cfg.llm.vocab_size))
  text = slot_model._prefill.lower(*args).compile().as_text()  # pylint: disable=protected-access
  llm = cfg.llm
  whole = f"[{llm.layers},4,{llm.heads},64,{llm.head_dim}]"  # the slots' cache (donated, updated in place)
  assert whole in text
  assert f"[{llm.layers},{k},{llm.heads},{p},{llm.head_dim}]" not in text


def test_prompt_scores_in_chunks_equal_the_whole_prompts_log_softmax(tiny_model, monkeypatch):
  """`prompt_scores` builds the logits of a few positions at a time (here 3 for 2 rows of 7: one position per row
  and step, so the chunks and the padding past the prompt are exercised): position t of a row holds log p(token t)
  from position t - 1's logits, its rank and the most likely ids there, as one log-softmax over all positions says
  (float32; tolerance 1e-5); position 0 is zero, as are the rows when none is wanted."""
  monkeypatch.setattr(slot_programs, "PROMPT_SCORE_POSITIONS", 3)
  k, p, d, v = 2, 7, tiny_model.cfg.llm.width, tiny_model.cfg.llm.vocab_size
  h = jax.random.normal(jax.random.key(0), (k, p, d), jnp.float32)
  ids = jax.random.randint(jax.random.key(1), (k, p), 0, v - 10)
  got = slot_programs.prompt_scores(tiny_model, h, ids, np.array([True, False]), v - 10)
  logits = np.asarray(tiny_model.llm.lm_head(h), np.float64)
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(
      -1, keepdims=True)  # over the whole vocabulary; the alternatives only below the limit
  limited = np.where(np.arange(v) < v - 10, logp, -np.inf)
  ids = np.asarray(ids)
  expected = np.zeros((k, p))
  expected[:, 1:] = np.take_along_axis(logp[:, :-1], ids[:, 1:, None], -1)[..., 0]
  np.testing.assert_allclose(np.asarray(got.logprob), expected, atol=1e-5)
  top = np.argsort(-limited[:, :-1], axis=-1, kind="stable")[..., :slot_sampling.TOP_LOGPROBS]
  np.testing.assert_array_equal(np.asarray(got.top_ids)[:, 1:], top)
  np.testing.assert_allclose(np.asarray(got.top_logprobs)[:, 1:], np.take_along_axis(logp[:, :-1], top, -1),
                             atol=1e-5)
  rank = 1 + (logp[:, :-1] > np.take_along_axis(logp[:, :-1], ids[:, 1:, None], -1)).sum(-1)
  np.testing.assert_array_equal(np.asarray(got.rank)[:, 1:], rank)
  assert not np.asarray(got.top_ids)[:, 0].any() and not np.asarray(got.rank)[:, 0].any()
  none = slot_programs.prompt_scores(tiny_model, h, ids, np.array([False, False]), v - 10)
  assert not any(np.asarray(x).any() for x in none)


@pytest.mark.parametrize("cache_dtype", [None, "int8"])
def test_a_copied_prompt_decodes_as_the_prefilled_one(tiny_model, cache_dtype):
  """`copy_prompt` (how the engine prefills the prompt of n choices once): row 3, left dirty by a longer prompt,
  takes row 0's prompt (keys, values, int8 scales, segment ids, history with no answer counted); fed the prompt's
  last token at its position, it picks what the prefill picked, then what row 0 decodes next (greedy, float32)."""
  cfg = tiny_model.cfg
  v = cfg.llm.vocab_size
  slot_model = slots_lib.SlotModel(tiny_model, num_slots=4, context=64, feature_slots=1, cache_dtype=cache_dtype)
  rng = np.random.default_rng(0)
  rope = np.full(1, cfg.llm.rope_base, np.float32)

  def prefill(prompt, row):
    ids = np.zeros((1, 32), np.int32)
    ids[0, :len(prompt)] = prompt
    stops = slot_programs.no_stops(1, v)
    stops[0, 0] = 7  # held ids and a logit bias travel with the row
    bias = slot_programs.no_bias(1, v)
    bias[0][0, 0], bias[1][0, 0] = 11, 2.5
    return int(slot_model.prefill(ids, np.array([len(prompt)], np.int32), np.zeros(1, np.int32),
                                  slot_model.no_features, np.array([row], np.int32), rope,
                                  slots_lib.Sampling.greedy(1), bias, stops).tokens[0])

  prefill(rng.integers(20, v, 30), 3)  # the previous occupant of row 3
  prompt = rng.integers(20, v, 9)
  first = prefill(prompt, 0)
  slot_model.copy_prompt(0, 3, window=16)
  cache, history = slot_model.cache, slot_model.history
  for x in (cache.k, cache.v) + ((cache.k_scale, cache.v_scale) if cache_dtype else ()):
    np.testing.assert_array_equal(np.asarray(x[:, 3, :, :9]), np.asarray(x[:, 0, :, :9]))
  np.testing.assert_array_equal(np.asarray(cache.segment_ids[3]), np.asarray(cache.segment_ids[0]))
  assert np.asarray(cache.segment_ids[3]).sum() == 9
  for name in ("seen", "bias_ids", "bias_values", "stops"):
    np.testing.assert_array_equal(np.asarray(getattr(history, name)[3]), np.asarray(getattr(history, name)[0]))
  assert np.asarray(history.counts[0]).sum() == 1 and not np.asarray(history.counts[3]).any()
  active = np.array([True, False, False, True])
  out = slot_model.decode(np.array([first, 0, 0, prompt[-1]], np.int32), np.array([9, 0, 0, 8], np.int32), active,
                          np.full(4, cfg.llm.rope_base, np.float32), slots_lib.Sampling.greedy(4), steps=4)
  tokens = np.asarray(out.tokens)
  assert tokens[0, 3] == first
  np.testing.assert_array_equal(tokens[1:, 3], tokens[:3, 0])
