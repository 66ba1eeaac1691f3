"""Tests of ANLS against hand-computed values."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qwenvl_jax.evaluation import anls


@pytest.mark.parametrize("a, b, distance", [
    ("", "", 0), ("abc", "", 3), ("kitten", "sitting", 3), ("flaw", "lawn", 2), ("same", "same", 0),
])
def test_levenshtein(a, b, distance):
  assert anls.levenshtein(a, b) == distance
  assert anls.levenshtein(b, a) == distance


@pytest.mark.parametrize("prediction, answers, expected", [
    ("Hello   World", ["hello world"], 1.0),         # case and whitespace runs are normalized
    ("helo", ["hello"], 1 - 1 / 5),                  # one deletion over max(5, 4) characters
    ("ab", ["abcd"], 0.5),                           # 1 - 2/4 = 0.5 is not below tau: kept
    ("a", ["abc"], 0.0),                             # 1 - 2/3 < 0.5: zeroed
    ("xyz", ["abc"], 0.0),
    ("helo", ["nope", "hello"], 1 - 1 / 5),          # the best answer counts
    # The normaliser is the raw length: "  hello  " has 9 characters, normalized distance to "helo" is 1.
    ("  hello  ", ["helo"], 1 - 1 / 9),
    ("", [""], 1.0),                                 # both empty: distance 0 by definition
])
def test_anls_question(prediction, answers, expected):
  assert anls.anls_question(prediction, answers) == pytest.approx(expected)


def test_anls_mean():
  result = anls.anls(["helo", "a", "x"], [["hello"], ["abc"], ["x"]])
  # (0.8 + 0 + 1) / 3 = 0.6
  assert result["anls"] == pytest.approx(0.6)
  assert result["per_example"] == pytest.approx([0.8, 0.0, 1.0])


def test_bad_input_is_an_error():
  with pytest.raises(ValueError, match="at least one"):
    anls.anls_question("x", [])
  with pytest.raises(ValueError, match="string"):
    anls.anls_question("x", [3])
  with pytest.raises(ValueError, match="2 predictions for 1 questions"):
    anls.anls(["a", "b"], [["a"]])


def _naive_levenshtein(a, b):
  if not a or not b:
    return len(a) + len(b)
  return min(_naive_levenshtein(a[1:], b) + 1, _naive_levenshtein(a, b[1:]) + 1,
             _naive_levenshtein(a[1:], b[1:]) + (a[0] != b[0]))


@settings(max_examples=200, deadline=None)
@given(st.text("abc ", max_size=6), st.text("abc ", max_size=6))
def test_levenshtein_matches_the_recursive_definition(a, b):
  assert anls.levenshtein(a, b) == _naive_levenshtein(a, b)
