"""The Python port of pycocoevalcap's PTB normalisation against the Java tokenizer pycocoevalcap runs.

`data/ptb_java_outputs.json` holds the outputs of `PTBTokenizer -preserveLines -lowerCase` (CoreNLP 3.4.1, the
jar pycocoevalcap 1.2 ships) plus pycocoevalcap's punctuation filter, recorded by `ptb_cases.py` on ~2000
captions run as one batch (as pycocoevalcap runs them) and a few captions with other line separators run
alone. `test_matches_live_jar` reruns the jar itself when Java is installed.
"""
import json
import shutil
import tempfile

import pytest

from qwenvl_jax.evaluation import cider, ptb_tokenizer
from tests.evaluation import ptb_cases

RECORDED = json.loads(ptb_cases.DATA.read_text(encoding="utf-8"))


def test_recorded_cases_are_the_case_list():
  """The recording is of the current case list (rerun `python -m tests.evaluation.ptb_cases` after editing)."""
  assert [t for t, _ in RECORDED["batch"]] == ptb_cases.cases()
  assert [t for t, _ in RECORDED["line_breaks"]] == ptb_cases.LINE_BREAKS
  assert len(RECORDED["batch"]) > 1500


def test_agrees_with_java_on_the_recorded_batch():
  texts = [t for t, _ in RECORDED["batch"]]
  got = ptb_tokenizer.tokenize(texts)
  wrong = [(t, want, g) for (t, want), g in zip(RECORDED["batch"], got) if want != g]
  assert not wrong, f"{len(wrong)} of {len(texts)} differ, e.g. (caption, java, python): {wrong[:5]}"


@pytest.mark.parametrize("text, want", [tuple(x) for x in RECORDED["line_breaks"]])
def test_agrees_with_java_on_other_line_separators(text, want):
  assert ptb_tokenizer.tokenize([text]) == [want]


@pytest.mark.parametrize("text, want", [
    ("AT&T and B&W", "at&t and b&w"), ("at&t", "at & t"), ("-5 .5 +1", "-5 .5 +1"),
    ("\u20ac5 \u00a310 \u00bd", "$ 5 # 10 1/2"), ("A&amp;W", "a&w"), ("dog \U0001F436 a\u200bb", "dog a b"),
    ("cafe\u0301", "cafe\u0301"), ("#tag @user C++", "#tag @user c++"), ("5:30pm No.1", "5:30 pm no. 1"),
    ("'em 'til y'know", "'em 'til y' know"), ("a dog's \u201cball\u201d", "a dog 's ball")])
def test_issue_categories(text, want):
  """One case per category the Python tokenizer used to get wrong (their Java outputs are in the recording)."""
  assert ptb_tokenizer.tokenize([text]) == [want]
  assert dict(map(tuple, RECORDED["batch"])).get(text, want) == want


def test_the_next_caption_matters_as_in_the_jar():
  """The jar scans all captions as one text: `I.` before a capitalised `A` is the letter and a period."""
  assert ptb_tokenizer.tokenize(["letter I.", "A dog"]) == ["letter i", "a dog"]
  assert ptb_tokenizer.tokenize(["letter I.", "a dog"]) == ["letter i.", "a dog"]
  assert ptb_tokenizer.tokenize([]) == []
  assert ptb_tokenizer.tokenize(["a dog\nrunning."]) == ["a dog running"]


def test_cider_tokenizes_references_as_one_batch():
  """pycocoevalcap tokenizes all references in one call: the end of one image's last reference sees the next
  image's first (here `I.` then `A`), which an image-by-image call would not."""
  refs = {"x": ["the letter I."], "y": ["A dog"]}
  score, _ = cider.cider_from_raw({"x": "the letter i", "y": "a dog"}, refs)
  score_other, _ = cider.cider_from_raw({"x": "the letter i.", "y": "a dog"}, refs)
  assert score > score_other


@pytest.mark.skipif(shutil.which("java") is None, reason="java is not installed: the recorded outputs are used")
def test_matches_live_jar():
  pytest.importorskip("pycocoevalcap")
  texts = ptb_cases.cases()[:400] + ["letter I.", "A dog", "AT&T"]
  with tempfile.TemporaryDirectory() as workdir:
    java = ptb_cases.java_tokenize_lines(texts, workdir)
  assert ptb_tokenizer.tokenize(texts) == java


def test_cider_results_name_the_tokenizer():
  from qwenvl_jax.evaluation import tasks  # pylint: disable=import-outside-toplevel
  from qwenvl_jax.evaluation.readers import EvalExample  # pylint: disable=import-outside-toplevel
  examples = [EvalExample(example_id=i, image=f"{i}.jpg", references=("a dog", "a brown dog")) for i in range(2)]
  result = tasks.get_task("flickr").score(examples, ["a dog", "a cat"])
  assert result["details"]["tokenizer"] == ptb_tokenizer.NAME
