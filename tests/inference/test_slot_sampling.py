"""Per-row seeds of the server's sampling (`inference.slot_sampling`): OpenAI's 64-bit seeds as two uint32 words; and
the log-probabilities of OpenAI's `logprobs`."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwenvl_jax.inference import slot_sampling


def test_seed_words_split_a_64_bit_seed_and_refuse_wider_ones():
  assert slot_sampling.seed_words(5) == (0, 5)
  assert slot_sampling.seed_words(2 ** 32 + 5) == (1, 5)
  assert slot_sampling.seed_words(-1) == (2 ** 32 - 1, 2 ** 32 - 1)  # int64 -1 is uint64 2^64 - 1
  assert slot_sampling.seed_words(2 ** 64 - 1) == (2 ** 32 - 1, 2 ** 32 - 1)
  for bad in (2 ** 64, -(2 ** 63) - 1):
    with pytest.raises(ValueError, match="64-bit"):
      slot_sampling.seed_words(bad)


def test_row_keys_are_jax_keys_of_the_seed_below_32_bits_and_differ_above():
  """Below 2^32 a row's key is `fold_in(key(seed), count)`, as before seeds had two words (and as `generate
  --seed` builds its key); seeds equal in their low 32 bits, which jax.random.key alone would merge without x64,
  get different keys."""
  seeds = [7, 2 ** 31 + 3, 7 + 2 ** 32, -1]
  counts = np.array([0, 5, 0, 2], np.int32)
  words = np.array([slot_sampling.seed_words(s) for s in seeds], np.uint32)
  keys = jax.random.key_data(slot_sampling.row_keys(words, counts))
  for i in (0, 1):
    np.testing.assert_array_equal(keys[i], jax.random.key_data(jax.random.fold_in(jax.random.key(seeds[i]),
                                                                                   counts[i])))
  assert not np.array_equal(keys[0], keys[2])


def test_token_logprobs_are_the_models_log_softmax_with_alternatives_within_the_limit_and_skipped_when_unwanted():
  """Against numpy's float64 log-softmax over the whole vocabulary (as the reference's evaluation normalizes): the
  chosen token's log-probability and the TOP_LOGPROBS most likely ids below the vocabulary limit, in order (ids past
  it are never produced, so never an alternative). No row wanting them: zeros, not computed."""
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 50)).astype(np.float32) * 4
  chosen = np.array([0, 7, 29], np.int32)
  lp, ids, top = slot_sampling.token_logprobs(logits, chosen, np.array([True, False, True]), vocab_limit=30)
  ref = logits.astype(np.float64)
  ref = ref - np.log(np.exp(ref).sum(-1, keepdims=True))
  n = slot_sampling.TOP_LOGPROBS
  np.testing.assert_allclose(lp, ref[np.arange(3), chosen], atol=1e-5)
  order = np.argsort(-ref[:, :30], axis=-1, kind="stable")[:, :n]
  np.testing.assert_array_equal(ids, order)
  np.testing.assert_allclose(top, np.take_along_axis(ref, order, -1), atol=1e-5)
  lp, ids, top = slot_sampling.token_logprobs(logits, chosen, np.zeros(3, bool), vocab_limit=30)
  assert not np.any(lp) and not np.any(ids) and not np.any(top) and ids.shape == (3, n)
  small = slot_sampling.token_logprobs(logits[:, :8], chosen % 8, np.ones(3, bool))[2]  # 8 ids < TOP_LOGPROBS
  assert np.all(np.isfinite(small[:, :8])) and np.all(np.isneginf(small[:, 8:]))


def test_penalize_reads_the_first_rows_of_the_history_and_leaves_logits_alone_without_penalties():
  """Rows with penalties get vLLM's definitions (checked by hand on three tokens), others keep their logits; the
  history may have more rows than the logits (a server decodes its first rows); no penalty anywhere: unchanged."""
  logits = np.array([[2.0, -1.0, 0.5, 3.0], [1.0, 1.0, 1.0, 1.0]], np.float32)
  seen = np.array([[True, True, False, False], [True, False, False, False], [True, True, True, True]])
  counts = np.array([[0, 0, 2, 0], [0, 0, 0, 0], [5, 5, 5, 5]], np.int32)
  out = np.asarray(slot_sampling.penalize(logits, seen, counts, repetition=np.array([2.0, 1.0], np.float32),
                                          frequency=np.array([0.25, 0.0], np.float32),
                                          presence=np.array([1.0, 0.0], np.float32)))
  # token 0: seen, positive -> 2 / 2; token 1: seen, negative -> -1 * 2; token 2: twice in the answer ->
  # 0.5 / 2 - 0.25 * 2 - 1; token 3: untouched.
  np.testing.assert_allclose(out, [[1.0, -2.0, 0.25 - 0.5 - 1.0, 3.0], [1.0, 1.0, 1.0, 1.0]])
  same = slot_sampling.penalize(logits, seen, counts, repetition=np.ones(2, np.float32),
                                frequency=np.zeros(2, np.float32), presence=np.zeros(2, np.float32))
  np.testing.assert_array_equal(same, logits)


def test_add_bias_adds_each_rows_pairs_drops_padding_and_skips_when_no_row_has_one():
  """Row i's (id, bias) pairs are added to its logits; ids past the vocabulary (the padding of unused entries) are
  dropped; the history may have more rows than the logits; no bias anywhere: the logits as they are."""
  logits = jnp.zeros((2, 6), jnp.float32)
  ids = np.array([[1, 6, 6], [4, 0, 6], [2, 2, 2]], np.int32)  # 6 = past the vocabulary: unused
  values = np.array([[3.0, 9.0, 9.0], [-100.0, 0.5, 9.0], [7.0, 7.0, 7.0]], np.float32)
  out = np.asarray(slot_sampling.add_bias(logits, ids, values))
  expected = np.zeros((2, 6), np.float32)
  expected[0, 1], expected[1, 4], expected[1, 0] = 3.0, -100.0, 0.5
  np.testing.assert_array_equal(out, expected)
  np.testing.assert_array_equal(np.asarray(slot_sampling.add_bias(logits + 1, ids, np.zeros_like(values))),
                                np.ones((2, 6), np.float32))


def test_hold_stops_bans_each_holding_rows_stop_ids_only():
  """Rows that hold (vLLM's `min_tokens` not yet reached) get -inf at their stop ids; the other rows are untouched;
  the history may have more rows than the logits."""
  logits = jnp.arange(12, dtype=jnp.float32).reshape(2, 6)
  stops = np.zeros((3, 6), bool)
  stops[0, [1, 3]] = stops[1, 4] = stops[2] = True
  out = np.asarray(slot_sampling.hold_stops(logits, stops, np.array([True, False])))
  expected = np.arange(12, dtype=np.float32).reshape(2, 6)
  expected[0, [1, 3]] = -np.inf
  np.testing.assert_array_equal(out, expected)
  np.testing.assert_array_equal(np.asarray(slot_sampling.hold_stops(logits, stops, np.array([False, False]))),
                                np.asarray(logits))
