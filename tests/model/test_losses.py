"""The token cross-entropy (optax after a float32 upcast) against float64 numpy, torch, and the formula it
replaced (logsumexp minus the picked logit), in float32 and from bfloat16 logits.

The chunked loss equals the full-logits one in value and gradient, and never holds the full logits.

Tolerances: float32 throughout. Chunking splits only the token axis, so each logit is the same dot product; the
sums over tokens and the kernel-gradient accumulation over chunks are reordered: values to rtol 1e-6, gradients
to rtol 1e-5 / atol 1e-7. In bf16 compute (the logits rounded to bf16 as `lm_head` does) the same holds, since
both paths round the same products.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from qwenvl_jax.model import losses


B, T, D, V = 3, 37, 16, 50


def _logits(dtype=np.float32, shape=(2, 3, 37), seed=0):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=shape) * 4).astype(dtype), rng.integers(0, shape[-1], shape[:2]).astype(np.int32)


def test_cross_entropy_sum_matches_float64_numpy():
  logits, targets = _logits()
  mask = np.array([[1, 0, 1], [1, 1, 0]], np.float32)
  total, count = losses.cross_entropy_sum(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
  expected = 0.0
  for b in range(2):
    for t in range(3):
      if mask[b, t]:
        row = logits[b, t].astype(np.float64)
        expected += math.log(np.exp(row).sum()) - row[targets[b, t]]
  np.testing.assert_allclose(float(total), expected, rtol=1e-5)
  assert float(count) == 4 and total.dtype == jnp.float32


def test_token_cross_entropy_matches_torch():
  logits, targets = _logits(shape=(3, 5, 101), seed=1)
  got = np.asarray(losses.token_cross_entropy(jnp.asarray(logits), jnp.asarray(targets)))
  want = torch.nn.functional.cross_entropy(torch.from_numpy(logits).permute(0, 2, 1), torch.from_numpy(targets).long(),
                                           reduction="none").numpy()
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_optax_loss_equals_the_hand_written_formula(dtype):
  """The hand-written loss this replaced: logsumexp(float32 logits) - logits[target]. Same numbers, to rounding."""
  logits, targets = _logits(seed=2)
  logits = jnp.asarray(logits, dtype)
  f32 = logits.astype(jnp.float32)
  old = jax.nn.logsumexp(f32, axis=-1) - jnp.take_along_axis(f32, jnp.asarray(targets)[..., None], axis=-1)[..., 0]
  new = losses.token_cross_entropy(logits, jnp.asarray(targets))
  assert new.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(new), np.asarray(old), rtol=1e-6, atol=1e-6)
  # and the masked sum of the train step
  mask = jnp.ones(targets.shape, jnp.float32)
  np.testing.assert_allclose(float(losses.cross_entropy_sum(logits, jnp.asarray(targets), mask)[0]),
                             float(jnp.sum(old)), rtol=1e-6)


def _inputs(seed=0):
  """Random hidden states, kernel and targets; a loss mask of packed rows (two segments, the second's prompt
  unsupervised) with right padding, as the pipeline builds them."""
  rng = np.random.default_rng(seed)
  hidden = rng.normal(size=(B, T, D)).astype(np.float32)
  kernel = (0.3 * rng.normal(size=(D, V))).astype(np.float32)
  targets = rng.integers(0, V, (B, T)).astype(np.int32)
  mask = np.ones((B, T), np.float32)
  mask[:, 15:20] = 0   # second packed segment's prompt
  mask[:, -6:] = 0     # padding
  mask[1] *= rng.uniform(size=T) < 0.5
  return jnp.asarray(hidden), jnp.asarray(kernel), jnp.asarray(targets), jnp.asarray(mask)


def _full(hidden, kernel, targets, mask, dtype=jnp.float32):
  logits = jnp.einsum("btd,dv->btv", hidden.astype(dtype), kernel.astype(dtype))
  return losses.cross_entropy_sum(logits, targets, mask)


@pytest.mark.parametrize("chunk", [1, 8, 37, 64])
def test_value_and_gradient_equal_the_full_logits_loss(chunk):
  hidden, kernel, targets, mask = _inputs()

  def chunked(h, w):
    total, count = losses.chunked_cross_entropy_sum(h, w, targets, mask, chunk_size=chunk)
    return total / count

  def full(h, w):
    total, count = _full(h, w, targets, mask)
    return total / count

  v_c, (gh_c, gw_c) = jax.value_and_grad(chunked, argnums=(0, 1))(hidden, kernel)
  v_f, (gh_f, gw_f) = jax.value_and_grad(full, argnums=(0, 1))(hidden, kernel)
  np.testing.assert_allclose(float(v_c), float(v_f), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(gh_c), np.asarray(gh_f), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(np.asarray(gw_c), np.asarray(gw_f), rtol=1e-5, atol=1e-7)
  assert float(jnp.abs(gw_f).max()) > 1e-3  # the comparison is not between two zero gradients


def test_bf16_compute_matches_the_bf16_head():
  hidden, kernel, targets, mask = _inputs(1)
  got = losses.chunked_cross_entropy_sum(hidden.astype(jnp.bfloat16), kernel, targets, mask, chunk_size=8,
                                         dtype=jnp.bfloat16)
  want = _full(hidden.astype(jnp.bfloat16), kernel, targets, mask, dtype=jnp.bfloat16)
  np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=1e-6)
  assert float(got[1]) == float(want[1])


def test_per_token_losses_match():
  hidden, kernel, targets, _ = _inputs(2)
  got = losses.chunked_token_cross_entropy(hidden, kernel, targets, chunk_size=5)
  want = losses.token_cross_entropy(jnp.einsum("btd,dv->btv", hidden, kernel), targets)
  assert got.shape == (B, T) and got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)


def test_bad_chunk_size_is_refused():
  hidden, kernel, targets, _ = _inputs()
  with pytest.raises(ValueError, match="chunk_size"):
    losses.chunked_token_cross_entropy(hidden, kernel, targets, chunk_size=0)


def test_the_loss_never_holds_full_logits():
  """The compiled chunked loss + gradient has no [B, T, V] buffer; the full-logits one does."""
  hidden, kernel, targets, mask = _inputs()
  v = 4096  # large enough that a [B, T, V] float32 buffer dominates

  def grads(fn):
    k = jnp.zeros((D, v), jnp.float32)
    return jax.jit(jax.grad(lambda h, w: fn(h, w)[0], argnums=(0, 1))).lower(hidden, k).compile()

  chunked = grads(lambda h, w: losses.chunked_cross_entropy_sum(h, w, targets % v, mask, chunk_size=8))
  full = grads(lambda h, w: _full(h, w, targets % v, mask))
  shape = f"f32[{B},{T},{v}]"
  assert shape in full.as_text()
  assert shape not in chunked.as_text()
  assert chunked.memory_analysis().temp_size_in_bytes < full.memory_analysis().temp_size_in_bytes / 2
