"""Token selection: top-k/top-p against transformers' warpers, sampling distributions, stop words."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation import logits_process as hf

from qwenvl_jax.inference import decode, sampling


def _kept(x):
  return np.isfinite(np.asarray(x))


@pytest.mark.parametrize("k", [1, 3, 10])
def test_top_k_matches_transformers(k):
  logits = np.random.default_rng(k).normal(size=(4, 50)).astype(np.float32)
  logits[0, :5] = 2.0  # ties at the boundary are kept by both
  ours = sampling.top_k_filter(jnp.asarray(logits), k)
  theirs = hf.TopKLogitsWarper(top_k=k)(None, torch.tensor(logits)).numpy()
  np.testing.assert_array_equal(_kept(ours), np.isfinite(theirs))


@pytest.mark.parametrize("p", [0.05, 0.3, 0.7, 0.95])
def test_top_p_matches_transformers(p):
  logits = np.random.default_rng(int(p * 100)).normal(scale=2.0, size=(6, 40)).astype(np.float32)
  ours = sampling.top_p_filter(jnp.asarray(logits), p)
  theirs = hf.TopPLogitsWarper(top_p=p)(None, torch.tensor(logits)).numpy()
  np.testing.assert_array_equal(_kept(ours), np.isfinite(theirs))


def test_sampling_follows_the_filtered_distribution():
  probs = np.array([0.5, 0.3, 0.15, 0.05])
  logits = jnp.asarray(np.log(probs), jnp.float32)[None].repeat(4000, axis=0)
  kw = dict(tokens=jnp.zeros((4000, 1), jnp.int32), end=jnp.int32(0), num_generated=jnp.int32(5),
            done=jnp.zeros(4000, bool), greedy=False, eos_id=3, pad_id=0)
  # top_p=0.7 keeps {0, 1} (0.5 before token 1 is < 0.7, 0.8 before token 2 is not): 0.625 / 0.375.
  draws = np.asarray(sampling.select_tokens(logits, jax.random.key(0), top_p=0.7, **kw))
  counts = np.bincount(draws, minlength=4) / draws.size
  assert counts[2] == counts[3] == 0
  np.testing.assert_allclose(counts[:2], [0.625, 0.375], atol=0.03)
  # No filter: all four, in proportion; temperature 0.5 squares and renormalizes the probabilities.
  draws = np.asarray(sampling.select_tokens(logits, jax.random.key(1), **kw))
  np.testing.assert_allclose(np.bincount(draws, minlength=4) / draws.size, probs, atol=0.03)
  draws = np.asarray(sampling.select_tokens(logits, jax.random.key(2), temperature=0.5, **kw))
  sharp = probs ** 2 / (probs ** 2).sum()
  np.testing.assert_allclose(np.bincount(draws, minlength=4) / draws.size, sharp, atol=0.03)


def test_top_k_one_sampling_equals_greedy(generator):
  rng = np.random.default_rng(5)
  prompts = [rng.integers(3, 390, n).tolist() for n in (4, 9, 7, 2)]
  cfg = generator.cfg
  batch = decode.make_prompt_batch(prompts, pad_id=0, image_pad_id=cfg.image_pad_id, image_tokens=16,
                                   buckets=(32,), num_rows=4, max_images=1, image_size=cfg.vision.image_size)
  greedy = generator.generate(batch, decode.GenerationConfig(max_new_tokens=6, eos_id=2, pad_id=0))
  sampled = generator.generate(batch, decode.GenerationConfig(max_new_tokens=6, eos_id=2, pad_id=0, do_sample=True,
                                                              top_k=1, temperature=0.7), key=jax.random.key(9))
  np.testing.assert_array_equal(sampled, greedy)


def test_stop_words_force_eos_only_on_a_full_match():
  tokens = jnp.asarray([[7, 8, 9], [1, 8, 9], [7, 8, 5]], jnp.int32)
  logits = jnp.zeros((3, 12))
  out = sampling.force_stop_words(logits, tokens, jnp.int32(2), [(8, 9), (4,)], eos_id=11)
  assert np.asarray(out[:, 11]).tolist() == [sampling.FORCED_LOGIT, sampling.FORCED_LOGIT, 0.0]
  # A sequence longer than the buffer so far never matches.
  out = sampling.force_stop_words(logits, tokens, jnp.int32(0), [(8, 9)], eos_id=11)
  assert np.asarray(out[:, 11]).tolist() == [0.0, 0.0, 0.0]
  # [eos] as a stop word is ignored, as in the reference.
  assert decode.GenerationConfig(eos_id=11, stop_words=((11,), (4, 5))).stop_words == ((4, 5),)


def test_finished_rows_emit_pad_and_min_new_tokens_blocks_eos():
  logits = jnp.asarray([[0.0, 5.0, 1.0], [0.0, 5.0, 1.0]])
  kw = dict(tokens=jnp.zeros((2, 1), jnp.int32), end=jnp.int32(0), greedy=True, eos_id=1, pad_id=0)
  out = sampling.select_tokens(logits, None, num_generated=jnp.int32(0), done=jnp.asarray([False, True]), **kw)
  assert np.asarray(out).tolist() == [1, 0]
  out = sampling.select_tokens(logits, None, num_generated=jnp.int32(0), done=jnp.zeros(2, bool),
                               min_new_tokens=1, **kw)
  assert np.asarray(out).tolist() == [2, 2]


def test_greedy_tokens_equal_argmax_with_ties_and_infinities():
  rng = np.random.default_rng(0)
  logits = rng.integers(-3, 4, size=(64, 1024)).astype(np.float32)  # many ties: the first maximum must win
  logits[1, :] = -np.inf
  logits[2, [5, 700]] = np.inf
  logits[3, -1] = 100.0
  got = np.asarray(jax.jit(sampling.greedy_tokens)(jnp.asarray(logits)))
  np.testing.assert_array_equal(got, np.argmax(logits, axis=-1))
  assert got.dtype == np.int32
