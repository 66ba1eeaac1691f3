"""Multiple-choice scoring: mean option-token cross-entropy, batched and left-padded == computed by hand."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qwenvl_jax.inference import scoring

FULL = 64


@nnx.jit
def _logits(model, ids, segment_ids, images):
  return model(ids, segment_ids=segment_ids, images=images, image_mask=jnp.ones((1, 1), bool)).logits


def _by_hand(model, ids, n_option, image):
  """Mean CE of the last n_option tokens from one forward pass of the row alone (right-padded to a fixed length,
  pads after the real tokens change nothing before them)."""
  padded = np.zeros((1, FULL), np.int32)
  padded[0, :len(ids)] = ids
  segments = (np.arange(FULL) < len(ids)).astype(np.int32)[None]
  logits = _logits(model, jnp.asarray(padded), jnp.asarray(segments), jnp.asarray(image)[None, None])
  logp = np.asarray(jax.nn.log_softmax(logits[0, :len(ids) - 1].astype(jnp.float32), axis=-1))
  ce = -np.take_along_axis(logp, np.asarray(ids[1:])[:, None], axis=1)[:, 0]
  return float(ce[-n_option:].mean())


def test_option_losses_match_a_direct_computation(generator, tiny_model, image_prompt):
  ids, image = image_prompt
  options = [[5], [6, 7], [8, 9, 10]]  # different lengths: the rows are left-padded differently
  scorer = scoring.LikelihoodScorer(generator, dynamic_ntk=False, logn=False)
  got = scorer.option_losses(ids, options, [image], pad_id=0, num_rows=4)
  expected = [_by_hand(tiny_model, ids + o, len(o), image) for o in options]
  np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-5)


def test_option_losses_average_the_last_target_tokens():
  token_losses = np.asarray([[1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 5.0, 7.0]])
  # Option 0: mean of its last 1 loss = 4; option 1: mean of its last 2 = (5 + 7) / 2 = 6.
  np.testing.assert_allclose(scoring.option_losses(token_losses, [1, 2]), [4.0, 6.0])
  with pytest.raises(ValueError, match="target length 5"):
    scoring.option_losses(token_losses, [1, 5])
  with pytest.raises(ValueError, match="K=3"):
    scoring.option_losses(token_losses, [1, 1, 1])
