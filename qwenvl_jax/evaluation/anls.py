"""ANLS (average normalized Levenshtein similarity), as the official RRC script DocVQA is scored with.

Qwen-VL's DocVQA eval shells out to `infographicsvqa_eval.py` (RECIPES §2.3). Per question, for each ground-truth
answer: both strings are stripped, lower-cased and have their whitespace runs collapsed to one space; the edit
distance between those is divided by the larger *raw* length of the two (the official code measures
`len(answer.upper())` on the unnormalized strings, so leading/trailing or doubled spaces lower the distance
ratio; 0 when both are empty). The question scores 1 - the smallest ratio, set to 0 when below tau = 0.5. The
result is the mean over questions, in [0, 1].
"""
from typing import Sequence

ANLS_THRESHOLD = 0.5


def levenshtein(a: str, b: str) -> int:
  """Edit distance (insertions, deletions, substitutions all cost 1) between two strings."""
  if len(a) < len(b):
    a, b = b, a
  previous = list(range(len(b) + 1))
  for i, ca in enumerate(a, start=1):
    current = [i]
    for j, cb in enumerate(b, start=1):
      current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
    previous = current
  return previous[-1]


def _normalize(text: str) -> str:
  return " ".join(text.strip().lower().split())


def anls_question(prediction: str, gt_answers: Sequence[str], *, threshold: float = ANLS_THRESHOLD) -> float:
  """The ANLS score in [0, 1] of one prediction against the accepted answers of one question.

  Raises:
    ValueError: no answers, or a non-string answer or prediction.
  """
  if isinstance(gt_answers, str):
    gt_answers = [gt_answers]
  if not gt_answers:
    raise ValueError("anls_question needs at least one ground-truth answer")
  if not isinstance(prediction, str):
    raise ValueError(f"the prediction must be a string, got {prediction!r}")
  ratios = []
  for answer in gt_answers:
    if not isinstance(answer, str):
      raise ValueError(f"every ground-truth answer must be a string, got {answer!r}")
    distance = levenshtein(_normalize(answer), _normalize(prediction))
    # Raw lengths (of the upper-cased strings, which can differ from the originals for e.g. "ß"), as the
    # official script does.
    length = max(len(answer.upper()), len(prediction.upper()))
    ratios.append(0.0 if length == 0 else distance / length)
  score = 1.0 - min(ratios)
  return 0.0 if score < threshold else score


def anls(predictions: Sequence[str], gt_answers: Sequence[Sequence[str]], *,
         threshold: float = ANLS_THRESHOLD) -> dict:
  """Mean ANLS in [0, 1] over questions, and the per-question scores."""
  if len(predictions) != len(gt_answers):
    raise ValueError(f"{len(predictions)} predictions for {len(gt_answers)} questions")
  if not predictions:
    raise ValueError("anls needs at least one question")
  scores = [anls_question(p, g, threshold=threshold) for p, g in zip(predictions, gt_answers)]
  return {"anls": sum(scores) / len(scores), "per_example": scores}
