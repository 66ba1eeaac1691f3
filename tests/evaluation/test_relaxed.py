"""Tests of ChartQA relaxed accuracy, including the argument swap of the reference."""
import pytest

from qwenvl_jax.evaluation import relaxed


@pytest.mark.parametrize("target, prediction, expected", [
    ("100", "105", True),       # |105 - 100| / 100 = 0.05 <= 0.05
    ("100", "105.1", False),    # 0.051
    ("50%", "0.5", True),       # x% -> x / 100
    ("0", "0.0", False),        # a zero target falls back to string matching
    ("Yes", "yes", True),       # case-insensitive string match
    ("nan", "nan", False),      # NaN relative error never passes
    ("red", "10", False),
])
def test_relaxed_correctness(target, prediction, expected):
  assert relaxed.relaxed_correctness(target, prediction) is expected


def test_relaxed_accuracy_divides_by_the_prediction():
  # Qwen-VL passes the prediction as `target`: |100 - 95| / 95 = 0.0526 > 0.05 fails, although the error
  # relative to the gold (5 / 100 = 0.05) would pass.
  assert relaxed.relaxed_accuracy(["95"], ["100"])["relaxed_accuracy"] == 0.0
  # And the other way round: |95 - 100| / 100 = 0.05 passes.
  assert relaxed.relaxed_accuracy(["100"], ["95"])["relaxed_accuracy"] == 1.0


def test_relaxed_accuracy_mean_max_and_strip():
  result = relaxed.relaxed_accuracy([" 12 ", "0", "Blue", "7"], ["12.5", "0", ["red", "blue"], ["3", "x"]])
  # 12 vs 12.5: 0.5 / 12 = 0.042 passes; "0" == "0"; "blue" matches the second annotation; 7 misses.
  assert result["per_example"] == [1.0, 1.0, 1.0, 0.0]
  assert result["relaxed_accuracy"] == 0.75


def test_bad_input_is_an_error():
  with pytest.raises(ValueError, match="1 predictions for 2"):
    relaxed.relaxed_accuracy(["1"], ["1", "2"])
  with pytest.raises(ValueError, match="example 0"):
    relaxed.relaxed_accuracy(["1"], [[]])
