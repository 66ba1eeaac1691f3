"""Tests of the model-free parts of likelihood-ranked multiple choice."""
import pytest

from qwenvl_jax.evaluation import multiple_choice as mc


def test_format_options_and_suffixes():
  assert mc.format_options(["cat", "dog"]) == "A. cat\nB. dog"
  assert mc.option_suffixes(3) == (" A", " B", " C")
  with pytest.raises(ValueError, match="1 to 5"):
    mc.format_options(list("abcdef"))
  with pytest.raises(ValueError, match="1 to 5"):
    mc.option_suffixes(0)


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
