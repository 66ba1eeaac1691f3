"""Referring-expression grounding: parse the generated box, scale it to pixels, Precision@1 at IoU >= 0.5.

Reproduces Qwen-VL's `evaluate_grounding.py` (RECIPES §2.5, SPEC §4.6):
- The generated text (special tags already stripped by decoding, though tags do no harm) is searched with the
  official regex `\\((.*?)\\),\\((.*?)\\)`; only the first match counts. Each group must contain a comma and
  split into exactly two Python floats, else the prediction is (0, 0, 0, 0), which always misses (its area is
  zero). Such predictions are counted as `unparsed`.
- Coordinates are divided by **999** (not the 1000 of the drawing helper), then x is multiplied by the image
  width and y by its height. Ground truth is xyxy in pixels.
- IoU as torchvision's `box_iou` in float32: intersection clamped at 0, union = area1 + area2 - inter, no
  guard against a zero union (0 / 0 is NaN, which is not >= 0.5). Degenerate or inverted boxes keep the signed
  areas torchvision gives them.
The official DataLoader's `drop_last=True` (which silently drops examples) is not reproduced: every example
is scored.
"""
import math
import re
from typing import Optional, Sequence, Tuple

import numpy as np

BOX_PATTERN = re.compile(r"\((.*?)\),\((.*?)\)")
# The reference divides by 999 although boxes are written on a [0, 1000) grid.
BOX_SCALE = 999.0
IOU_THRESHOLD = 0.5

Box = Tuple[float, float, float, float]


def parse_box(text: str) -> Optional[Box]:
  """The first `(x1,y1),(x2,y2)` box of `text` on the model's grid, or None where the official parser fails."""
  match = BOX_PATTERN.search(text)
  if match is None:
    return None
  first, second = match.group(1), match.group(2)
  if "," not in first or "," not in second:
    return None
  try:
    x1, y1 = (float(v) for v in first.split(","))
    x2, y2 = (float(v) for v in second.split(","))
  except ValueError:  # not a number, or not exactly two values (too many / too few to unpack)
    return None
  return (x1, y1, x2, y2)


def box_to_pixels(box: Box, width: float, height: float) -> np.ndarray:
  """float32[4] pixel xyxy of a grid box: /999, then x * width, y * height (float32, as the reference)."""
  out = np.asarray(box, np.float32) / np.float32(BOX_SCALE)
  out[0::2] *= np.float32(width)
  out[1::2] *= np.float32(height)
  return out


def box_iou(box1: np.ndarray, box2: np.ndarray) -> float:
  """IoU of two xyxy boxes, computed in float32 in torchvision's order of operations (NaN for 0 / 0)."""
  b1 = np.asarray(box1, np.float32)
  b2 = np.asarray(box2, np.float32)
  area1 = (b1[2] - b1[0]) * (b1[3] - b1[1])
  area2 = (b2[2] - b2[0]) * (b2[3] - b2[1])
  lt = np.maximum(b1[:2], b2[:2])
  rb = np.minimum(b1[2:], b2[2:])
  wh = np.maximum(rb - lt, np.float32(0))
  inter = wh[0] * wh[1]
  union = area1 + area2 - inter
  with np.errstate(divide="ignore", invalid="ignore"):
    return float(inter / union)


def grounding_accuracy(
    predictions: Sequence[str],
    gt_boxes: Sequence[Sequence[float]],
    sizes: Sequence[Tuple[int, int]],
    *,
    threshold: float = IOU_THRESHOLD,
) -> dict:
  """Precision@1 of generated boxes.

  Args:
    predictions: the generated texts.
    gt_boxes: per example the ground-truth box, xyxy in pixels.
    sizes: per example (width, height) of the original image in pixels.
    threshold: the IoU a hit needs (0.5).

  Returns:
    {"accuracy": fraction of hits in [0, 1], "unparsed": count of texts without a valid box, "per_example":
    [{"pred_box": pixel xyxy or None, "iou": float, "correct": bool}]}.
  """
  if not len(predictions) == len(gt_boxes) == len(sizes):
    raise ValueError(f"{len(predictions)} predictions, {len(gt_boxes)} boxes and {len(sizes)} sizes differ")
  if not predictions:
    raise ValueError("grounding_accuracy needs at least one example")
  per_example = []
  correct = unparsed = 0
  for i, (text, gt, size) in enumerate(zip(predictions, gt_boxes, sizes)):
    if len(gt) != 4 or len(size) != 2:
      raise ValueError(f"example {i}: the box must be 4 numbers and the size (width, height), got {gt!r}, {size!r}")
    box = parse_box(text)
    if box is None:
      unparsed += 1
    width, height = size
    pixels = box_to_pixels(box if box is not None else (0.0, 0.0, 0.0, 0.0), width, height)
    iou = box_iou(pixels, np.asarray(gt, np.float32))
    hit = bool(iou >= threshold)
    correct += hit
    per_example.append({"pred_box": None if box is None else [float(v) for v in pixels], "correct": hit,
                        "iou": None if math.isnan(iou) else iou})  # JSON has no NaN
  return {"accuracy": correct / len(predictions), "unparsed": unparsed, "per_example": per_example}


def best_constant_box_accuracy(gt_boxes: Sequence[Sequence[float]], sizes: Sequence[Tuple[int, int]], *,
                               threshold: float = IOU_THRESHOLD) -> Tuple[float, Box]:
  """The chance level of grounding: the best accuracy any single image-independent box reaches, in hindsight.

  A model that ignores the image can only answer a box that depends on the expression; where expressions do not
  say where things are (the synthetic shapes), its expected accuracy is at most that of the best fixed box. The
  candidates are every ground-truth box in relative coordinates (the optimum of a hit count lies at or near one of
  them); each is scored on every example with the metric's IoU.

  Returns:
    (accuracy in [0, 1], the winning box as relative xyxy in [0, 1]).
  """
  if not len(gt_boxes) == len(sizes) or not gt_boxes:
    raise ValueError(f"need as many boxes as sizes and at least one, got {len(gt_boxes)} and {len(sizes)}")
  scale = np.asarray([[w, h, w, h] for w, h in sizes], np.float64)
  relative = np.asarray(gt_boxes, np.float64) / scale
  best, best_box = -1.0, (0.0, 0.0, 0.0, 0.0)
  for candidate in relative:
    hits = sum(box_iou(candidate * s, gt) >= threshold for s, gt in zip(scale, gt_boxes))
    if hits / len(gt_boxes) > best:
      best, best_box = hits / len(gt_boxes), tuple(float(v) for v in candidate)
  return best, best_box
