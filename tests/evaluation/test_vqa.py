"""Tests of the VQA accuracy, its answer normalization, the GQA cleanup and exact match."""
import pytest

from qwenvl_jax.evaluation import vqa


@pytest.mark.parametrize("raw, expected", [
    # Contractions are restored, number words become digits, articles go, text is lower-cased.
    ("dont", "don't"),
    ("Isnt it", "isn't it"),
    ("two", "2"),
    ("Two Dogs", "2 dogs"),
    ("none", "0"),
    ("ten.", "10"),
    ("a dog", "dog"),
    ("The Cat and an apple", "cat and apple"),
    # Periods go unless a digit follows (decimals stay).
    ("yes.", "yes"),
    ("3.5", "3.5"),
    (".5 inches.", ".5 inches"),
    # The comma between digits is deleted (digits joined), and then every mark is deleted, not spaced.
    ("1,000", "1000"),
    ("1,000 (approx)", "1000 approx"),
    # A mark touching a space is deleted; otherwise it becomes a space.
    ("hello, world", "hello world"),
    ("black/white", "black white"),
    ("t-shirt", "t shirt"),
    ("it's", "it's"),
    ("\tyes\n", "yes"),
    ("left : right", "left : right"),
    # Quirks of the official table: its "Im"/"Ive" keys are capitalized but looked up after lower-casing,
    # and "somebody'd" maps to "somebodyd".
    ("Im here", "im here"),
    ("somebody'd", "somebodyd"),
])
def test_official_normalization_cases(raw, expected):
  assert vqa.normalize_prediction(raw) == expected


def test_period_strip_removes_at_most_32_periods():
  # The official code passes re.UNICODE (32) as `count` to `sub`.
  assert vqa.process_punctuation("." * 40) == "." * 8


def test_question_accuracy_leave_one_out():
  # 3 humans said "2", 7 said "3"; prediction "two" -> "2".
  # Dropping one of the "2" answers leaves 2 matches -> 2/3 (3 subsets); dropping a "3" leaves 3 -> 1 (7).
  # Mean = (3 * 2/3 + 7 * 1) / 10 = 0.9.
  assert vqa.vqa_question_accuracy("two", ["2"] * 3 + ["3"] * 7) == pytest.approx(0.9)
  # One human agrees: the subset without him has 0 matches, the 9 others 1/3 -> 9 / 3 / 10 = 0.3.
  assert vqa.vqa_question_accuracy("2", ["2"] + ["x"] * 9) == pytest.approx(0.3)
  assert vqa.vqa_question_accuracy("cat", ["cat"] * 10) == 1.0
  assert vqa.vqa_question_accuracy("dog", ["cat"] * 10) == 0.0


def test_ground_truth_punctuation_only_when_answers_disagree():
  # Identical answers are left as they are, so "yes." never equals the normalized prediction "yes".
  assert vqa.vqa_question_accuracy("yes", ["yes."] * 10) == 0.0
  # Disagreeing answers are punctuation-processed: all ten become "yes".
  assert vqa.vqa_question_accuracy("yes", ["yes."] * 9 + ["yes"]) == 1.0
  # Ground truth gets no digit/article step: "two" in the answers never matches the prediction's "2".
  assert vqa.vqa_question_accuracy("two", ["two"] * 9 + ["2"]) == pytest.approx(0.3)


def test_vqa_accuracy_overall_and_breakdowns():
  preds = ["two", "2", "cat"]
  gts = [["2"] * 3 + ["3"] * 7, ["2"] + ["x"] * 9, ["dog"] * 10]
  result = vqa.vqa_accuracy(preds, gts, question_types=["how many", "how many", "what"],
                            answer_types=["number", "number", "other"])
  # (0.9 + 0.3 + 0) / 3 * 100 = 40.0; "how many" (0.9 + 0.3) / 2 = 60.0.
  assert result["overall"] == 40.0
  assert result["per_question"] == [90.0, 30.0, 0.0]
  assert result["per_question_type"] == {"how many": 60.0, "what": 0.0}
  assert result["per_answer_type"] == {"number": 60.0, "other": 0.0}


def test_vqa_accuracy_rounds_to_two_decimals():
  # Two of three questions fully right: 100 * 2 / 3 = 66.666... -> 66.67.
  result = vqa.vqa_accuracy(["a1", "b1", "c1"], [["a1"] * 10, ["b1"] * 10, ["z"] * 10])
  assert result["overall"] == 66.67


@pytest.mark.parametrize("bad", [[], "yes", [1, 2]])
def test_bad_ground_truth_is_an_error(bad):
  with pytest.raises(ValueError, match="answer"):
    vqa.vqa_question_accuracy("yes", bad)


def test_length_mismatch_is_an_error():
  with pytest.raises(ValueError, match="2 predictions for 1 questions"):
    vqa.vqa_accuracy(["a", "b"], [["a"] * 10])


@pytest.mark.parametrize("raw, expected", [
    # "is " occurs inside "this " and again in "is a": split("is ") = ["th", "", "a cat"], [1] is "".
    ("This is a cat.", ""),
    ("It is a cat.", "cat"),
    ("The color of the shirt is blue", "blue"),
    ("A black dog", "black dog"),
    ("an apple", "apple"),
    # "the " is handled before " of": split("the ")[1] = "table".
    ("left of the table", "table"),
    ("the left side of it", "left side"),
    ("Yes, it is.", "yes"),
    ("No!", "no"),
    ("  Wood  ", "wood"),
])
def test_gqa_cleanup(raw, expected):
  assert vqa.gqa_cleanup(raw) == expected


def test_exact_match_and_gqa_accuracy():
  assert vqa.exact_match(" Harry Potter ", ["harry potter"]) == 1.0
  assert vqa.exact_match("harry", "harry potter") == 0.0
  assert vqa.exact_match("b", ["a", "B"]) == 1.0
  result = vqa.exact_match_accuracy(["A", "b", "c"], ["a", ["x", "B"], "d"])
  assert result["accuracy"] == pytest.approx(2 / 3)
  assert result["per_example"] == [1.0, 1.0, 0.0]
  assert vqa.gqa_accuracy(["It is a table.", "the chair"], ["table", "bed"])["accuracy"] == 0.5
