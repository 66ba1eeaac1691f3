"""Tests of the model-free parts of likelihood-ranked multiple choice."""
import jax.numpy as jnp
import numpy as np
import pytest

from qwenvl_jax.evaluation import multiple_choice as mc


def test_format_options_and_suffixes():
  assert mc.format_options(["cat", "dog"]) == "A. cat\nB. dog"
  assert mc.option_suffixes(3) == (" A", " B", " C")
  with pytest.raises(ValueError, match="1 to 5"):
    mc.format_options(list("abcdef"))
  with pytest.raises(ValueError, match="1 to 5"):
    mc.option_suffixes(0)


def test_build_option_batch_left_pads():
  tokens, mask, lengths = mc.build_option_batch([5, 6], [[7], [8, 9]], pad_id=0)
  np.testing.assert_array_equal(tokens, [[0, 5, 6, 7], [5, 6, 8, 9]])
  np.testing.assert_array_equal(mask, [[False, True, True, True], [True, True, True, True]])
  np.testing.assert_array_equal(lengths, [1, 2])
  with pytest.raises(ValueError, match="at least one token"):
    mc.build_option_batch([5], [[7], []], pad_id=0)


def test_token_cross_entropy_matches_log_softmax():
  logits = jnp.asarray([[[0.0, 1.0, 2.0], [3.0, 0.0, 0.0]]])
  targets = jnp.asarray([[2, 1]])
  ce = np.asarray(mc.token_cross_entropy(logits, targets))
  # -log(e^2 / (1 + e + e^2)) and -log(1 / (e^3 + 2))
  expected = [[np.log(1 + np.e + np.e ** 2) - 2, np.log(np.e ** 3 + 2)]]
  np.testing.assert_allclose(ce, expected, rtol=1e-6)


def test_option_losses_average_the_last_target_tokens():
  token_losses = np.asarray([[1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 5.0, 7.0]])
  # Option 0: mean of its last 1 loss = 4; option 1: mean of its last 2 = (5 + 7) / 2 = 6.
  np.testing.assert_allclose(mc.option_losses(token_losses, [1, 2]), [4.0, 6.0])
  with pytest.raises(ValueError, match="target length 5"):
    mc.option_losses(token_losses, [1, 5])
  with pytest.raises(ValueError, match="K=3"):
    mc.option_losses(token_losses, [1, 1, 1])


def test_choose_option():
  assert mc.choose_option([2.5, 0.7, 1.1]) == 1
  assert mc.choose_option([0.3, 0.3, 0.9]) == 0       # first on ties, as torch.argmin
  with pytest.raises(ValueError, match="NaN"):
    mc.choose_option([0.1, float("nan")])
  with pytest.raises(ValueError, match="non-empty"):
    mc.choose_option([])


def test_choice_accuracy():
  result = mc.choice_accuracy([1, 0, 2, 2], [1, 1, 2, 0])
  assert result["accuracy"] == 0.5
  assert result["per_example"] == [1.0, 0.0, 1.0, 0.0]
