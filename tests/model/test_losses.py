"""The token cross-entropy (optax after a float32 upcast) against float64 numpy, torch, and the formula it
replaced (logsumexp minus the picked logit), in float32 and from bfloat16 logits."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from qwenvl_jax.model import losses


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
