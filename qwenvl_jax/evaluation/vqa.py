"""VQA accuracy with the standard answer normalization, and the exact-match metrics of the VQA-style tasks.

This reproduces the LAVIS/Salesforce variant of the official VQA evaluator that Qwen-VL's `vqa_eval.py` uses
(RECIPES §2.3), including its quirks, because reported numbers are only comparable when computed the same way:

- The prediction is always normalized (newlines/tabs to spaces, strip, punctuation, then lower-case, number
  words to digits, articles dropped, contractions restored). (The later Python-3 release of the official
  evaluator differs: it normalizes prediction and answers fully, but only when the answers disagree.)
- Ground-truth answers get only the punctuation step, and only when they are not all identical.
- Punctuation: when the text has a comma between digits, or the mark touches a space, every occurrence of the
  mark is deleted; otherwise every occurrence becomes a space. The decision is taken on the original text for
  every mark, so "1,000" becomes "1000" and a text with one digit comma deletes all its marks.
- Periods: the official regex `(?!<=\\d)(\\.)(?!\\d)` was meant as a look-behind but is a look-ahead for the
  literal "<=", so it removes every period not followed by a digit ("3.5" and ".5" survive, "1." loses it).
  `re.UNICODE` is passed where `count` goes, so at most 32 periods are removed.
- Accuracy per question: for each of the n ground-truth answers, min(1, matches among the other n-1 / 3);
  the mean over the n leave-one-out subsets. The official code drops "the others" by dict inequality, which is
  leave-one-out by position for the official annotations (every answer has its own `answer_id`).
- Overall accuracy: 100 * mean, rounded to 2 decimals; also per question type and per answer type.

GQA and the exact-match datasets (OCR-VQA, AI2D) use `gqa_cleanup` and `exact_match_accuracy`, as
`evaluate_vqa.py` does.
"""
import re
from typing import Optional, Sequence

# The contraction table of the official VQA evaluator, entries (and their oddities) kept as they are: a
# normalized word is replaced only when it is a key here.
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've",
    "she'dve": "she'd've", "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's",
    "somethingd": "something'd", "somethingd've": "something'd've", "something'dve": "something'd've",
    "somethingll": "something'll", "thats": "that's", "thered": "there'd", "thered've": "there'd've",
    "there'dve": "there'd've", "therere": "there're", "theres": "there's", "theyd": "they'd",
    "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're",
    "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's", "whereve": "where've",
    "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll", "whos": "who's",
    "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've",
    "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've",
    "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES = ("a", "an", "the")
# Apostrophe, colon, period and most other marks are not in the official list.
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
               "?", "!")
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
# The official call `periodStrip.sub("", text, re.UNICODE)` passes the flag value as `count`.
_PERIOD_STRIP_COUNT = int(re.UNICODE)


def process_punctuation(text: str) -> str:
  """The official punctuation step (see the module docstring for its exact, quirky semantics)."""
  out = text
  has_digit_comma = _COMMA_BETWEEN_DIGITS.search(text) is not None
  for mark in PUNCTUATION:
    if mark + " " in text or " " + mark in text or has_digit_comma:
      out = out.replace(mark, "")
    else:
      out = out.replace(mark, " ")
  return _PERIOD_STRIP.sub("", out, _PERIOD_STRIP_COUNT)


def process_digit_article(text: str) -> str:
  """Lower-cases, maps number words to digits, drops articles and restores contractions, word by word."""
  words = []
  for word in text.lower().split():
    word = NUMBER_WORDS.get(word, word)
    if word not in ARTICLES:
      words.append(word)
  return " ".join(CONTRACTIONS.get(word, word) for word in words)


def normalize_prediction(answer: str) -> str:
  """The full normalization every prediction goes through before matching."""
  answer = answer.replace("\n", " ").replace("\t", " ").strip()
  return process_digit_article(process_punctuation(answer))


def vqa_question_accuracy(prediction: str, gt_answers: Sequence[str]) -> float:
  """Accuracy in [0, 1] of one prediction against the human answers of one question (usually 10).

  Raises:
    ValueError: `gt_answers` is empty or holds something that is not a string.
  """
  if isinstance(gt_answers, str) or not gt_answers:
    raise ValueError(f"gt_answers must be a non-empty list of strings, got {gt_answers!r}")
  for answer in gt_answers:
    if not isinstance(answer, str):
      raise ValueError(f"every ground-truth answer must be a string, got {answer!r} in {list(gt_answers)!r}")
  if not isinstance(prediction, str):
    raise ValueError(f"the prediction must be a string, got {prediction!r}")
  pred = normalize_prediction(prediction)
  gts = list(gt_answers)
  if len(set(gts)) > 1:
    gts = [process_punctuation(answer) for answer in gts]
  accs = []
  for i in range(len(gts)):
    matches = sum(1 for j, answer in enumerate(gts) if j != i and answer == pred)
    accs.append(min(1.0, matches / 3.0))
  return sum(accs) / len(accs)


def vqa_accuracy(
    predictions: Sequence[str],
    gt_answers: Sequence[Sequence[str]],
    *,
    question_types: Optional[Sequence[str]] = None,
    answer_types: Optional[Sequence[str]] = None,
    decimals: int = 2,
) -> dict:
  """VQA accuracy of a whole set, as `VQAEval(vqa, res, n=2).evaluate()` reports it.

  Args:
    predictions: one generated answer per question.
    gt_answers: per question, its human answers.
    question_types, answer_types: optional per-question labels for the breakdowns.
    decimals: rounding of the percentages (the official `n`).

  Returns:
    {"overall": percent, "per_question": [percent...], "per_question_type": {...}, "per_answer_type": {...}};
    the breakdowns only when their labels were given.
  """
  if len(predictions) != len(gt_answers):
    raise ValueError(f"{len(predictions)} predictions for {len(gt_answers)} questions")
  if not predictions:
    raise ValueError("vqa_accuracy needs at least one question")
  accs = [vqa_question_accuracy(p, g) for p, g in zip(predictions, gt_answers)]
  result = {
      "overall": round(100.0 * sum(accs) / len(accs), decimals),
      "per_question": [round(100.0 * a, decimals) for a in accs],
  }
  for key, labels in (("per_question_type", question_types), ("per_answer_type", answer_types)):
    if labels is None:
      continue
    if len(labels) != len(accs):
      raise ValueError(f"{key}: {len(labels)} labels for {len(accs)} questions")
    groups: dict = {}
    for label, acc in zip(labels, accs):
      groups.setdefault(label, []).append(acc)
    result[key] = {k: round(100.0 * sum(v) / len(v), decimals) for k, v in groups.items()}
  return result


def gqa_cleanup(response: str) -> str:
  """The answer cleanup `evaluate_vqa.py` applies to GQA before exact match.

  Each step keeps the text between the first and the second occurrence of the marker (`split(m)[1]`), so
  "this is a cat" gives "cat" because "is " first occurs inside "this".
  """
  response = response.strip().split(".")[0].split(",")[0].split("!")[0].lower()
  for marker in ("is ", "are ", "a ", "an ", "the "):
    if marker in response:
      response = response.split(marker)[1]
  if " of" in response:
    response = response.split(" of")[0]
  return response.strip()


def exact_match(prediction: str, annotations) -> float:
  """1.0 when the stripped, lower-cased prediction equals one of the stripped, lower-cased annotations."""
  if isinstance(annotations, str):
    annotations = [annotations]
  if not annotations:
    raise ValueError("exact_match needs at least one annotation")
  pred = prediction.strip().lower()
  return max(1.0 if pred == str(a).strip().lower() else 0.0 for a in annotations)


def exact_match_accuracy(predictions: Sequence[str], annotations: Sequence) -> dict:
  """Mean exact match in [0, 1] (as `evaluate_exact_match_accuracy` prints it) and the per-example scores."""
  if len(predictions) != len(annotations):
    raise ValueError(f"{len(predictions)} predictions for {len(annotations)} annotated examples")
  if not predictions:
    raise ValueError("exact_match_accuracy needs at least one example")
  scores = [exact_match(p, a) for p, a in zip(predictions, annotations)]
  return {"accuracy": sum(scores) / len(scores), "per_example": scores}


def gqa_accuracy(predictions: Sequence[str], annotations: Sequence) -> dict:
  """GQA test-dev accuracy: `gqa_cleanup` on each prediction, then exact match."""
  return exact_match_accuracy([gqa_cleanup(p) for p in predictions], annotations)

