"""ChartQA relaxed accuracy, with the argument swap of Qwen-VL's `evaluate_vqa.py` (RECIPES §2.3).

Pix2Struct's `relaxed_correctness(target, prediction)`: when both strings parse as floats (a trailing `%`
divides by 100) and the *target* is non-zero, the answer passes when |prediction - target| / |target| <= 5%;
otherwise it needs a case-insensitive exact string match. Qwen-VL calls it as
`relaxed_correctness(prediction.strip(), annotation)`, so the relative error is divided by the *prediction*,
a zero prediction falls back to string matching, and only the prediction is stripped. `relaxed_accuracy`
reproduces that call (the reported numbers depend on it); `relaxed_correctness` is the function itself. The
score of an example is the max over its annotations; the result is the mean, in [0, 1].
"""
from typing import Optional, Sequence

MAX_RELATIVE_CHANGE = 0.05


def _to_float(text: str) -> Optional[float]:
  """Python `float()` semantics (so " 12", "1e3", "nan", "inf" parse), with "x%" -> x / 100; None otherwise."""
  try:
    if text.endswith("%"):
      return float(text.rstrip("%")) / 100.0
    return float(text)
  except ValueError:
    return None


def relaxed_correctness(target: str, prediction: str, *, max_relative_change: float = MAX_RELATIVE_CHANGE) -> bool:
  """Pix2Struct's relaxed match of `prediction` to `target` (relative error taken w.r.t. `target`)."""
  prediction_float = _to_float(prediction)
  target_float = _to_float(target)
  # `target_float` is tested for truth, as in the original: 0.0 (and None) fall through to string matching.
  if prediction_float is not None and target_float:
    relative_change = abs(prediction_float - target_float) / abs(target_float)
    return relative_change <= max_relative_change  # False for NaN ("nan", "inf" - "inf"), as in the original
  return prediction.lower() == target.lower()


def relaxed_accuracy(predictions: Sequence[str], annotations: Sequence) -> dict:
  """ChartQA relaxed accuracy in [0, 1] exactly as Qwen-VL computes it, and the per-example scores.

  Args:
    predictions: the generated answers.
    annotations: per example a string or a list of strings.
  """
  if len(predictions) != len(annotations):
    raise ValueError(f"{len(predictions)} predictions for {len(annotations)} annotated examples")
  if not predictions:
    raise ValueError("relaxed_accuracy needs at least one example")
  scores = []
  for i, (prediction, anns) in enumerate(zip(predictions, annotations)):
    if isinstance(anns, str):
      anns = [anns]
    if not anns or not all(isinstance(a, str) for a in anns) or not isinstance(prediction, str):
      raise ValueError(f"example {i}: need a string prediction and string annotations, got "
                       f"{prediction!r} and {anns!r}")
    # The swapped call of the reference: the stripped prediction goes in as `target`.
    scores.append(float(max(relaxed_correctness(prediction.strip(), a) for a in anns)))
  return {"relaxed_accuracy": sum(scores) / len(scores), "per_example": scores}
