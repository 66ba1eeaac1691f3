"""Tests of box parsing, /999 scaling, float32 IoU and Precision@1."""
import math

import numpy as np
import pytest

from qwenvl_jax.evaluation import grounding


@pytest.mark.parametrize("text, box", [
    ("(10,20),(30,40)", (10.0, 20.0, 30.0, 40.0)),
    ("<ref>the dog</ref><box>(1,2),(3,4)</box>", (1.0, 2.0, 3.0, 4.0)),
    ("(1,2),(3,4) and then (5,6),(7,8)", (1.0, 2.0, 3.0, 4.0)),      # first match only
    ("( 1, 2),(3 ,4 )", (1.0, 2.0, 3.0, 4.0)),                        # float() strips spaces
    ("(1.5,2),(3,4e2)", (1.5, 2.0, 3.0, 400.0)),
    ("(1, 2), (3, 4)", None),                                         # the regex needs "),(" exactly
    ("(1,2),(3,4,5)", None),                                          # three values do not unpack
    ("(12),(3,4)", None),                                             # no comma in a group
    ("(a,b),(c,d)", None),
    ("the dog on the left", None),
    ("", None),
    # The lazy first group runs up to the first "),(": "1,2) at (3,4" has three parts -> unparsable.
    ("(1,2) at (3,4),(5,6)", None),
])
def test_parse_box(text, box):
  assert grounding.parse_box(text) == box


def test_scaling_divides_by_999():
  np.testing.assert_array_equal(grounding.box_to_pixels((999, 999, 999, 999), 640, 480), [640, 480, 640, 480])
  # x scales with the width, y with the height.
  np.testing.assert_allclose(grounding.box_to_pixels((0, 999, 333, 0), 300, 100), [0, 100, 100, 0], rtol=1e-6)
  assert grounding.box_to_pixels((1, 2, 3, 4), 10, 10).dtype == np.float32


def test_box_iou():
  assert grounding.box_iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
  assert grounding.box_iou([0, 0, 10, 10], [20, 20, 30, 30]) == 0.0      # intersection clamped at 0
  assert grounding.box_iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(50 / 150)
  assert math.isnan(grounding.box_iou([0, 0, 0, 0], [1, 1, 1, 1]))     # 0 / 0, as torchvision


def test_grounding_accuracy_threshold_and_unparsed():
  # Grid (0,0,999,999) on 100 x 200 -> (0,0,100,200): with GT (0,0,100,100) inter 10000, union 20000 -> 0.5,
  # a hit (>=); with GT (0,0,100,201) on a 100 x 100 image: inter 10000, union 20100 -> 0.4975, a miss.
  texts = ["(0,0),(999,999)", "(0,0),(999,999)", "I cannot find it", "(0,0),(999,999)"]
  boxes = [[0, 0, 100, 100], [0, 0, 100, 201], [0, 0, 50, 50], [5, 5, 5, 5]]
  sizes = [(100, 200), (100, 100), (100, 100), (10, 10)]
  result = grounding.grounding_accuracy(texts, boxes, sizes)
  assert [e["correct"] for e in result["per_example"]] == [True, False, False, False]
  assert result["accuracy"] == 0.25
  assert result["unparsed"] == 1
  assert result["per_example"][0]["iou"] == 0.5
  assert result["per_example"][1]["iou"] == pytest.approx(10000 / 20100)
  assert result["per_example"][2]["pred_box"] is None and result["per_example"][2]["iou"] == 0.0
  assert result["per_example"][0]["pred_box"] == [0.0, 0.0, 100.0, 200.0]
  # A zero-area GT inside a full-image prediction: inter 0, union 100 -> 0.0 (not NaN).
  assert result["per_example"][3]["iou"] == 0.0


def test_unparsed_against_zero_area_gt_is_a_counted_miss():
  result = grounding.grounding_accuracy(["nothing"], [[3, 3, 3, 3]], [(10, 10)])
  assert result["per_example"][0] == {"pred_box": None, "correct": False, "iou": None}  # NaN -> None
  assert result["unparsed"] == 1 and result["accuracy"] == 0.0


def test_bad_input_is_an_error():
  with pytest.raises(ValueError, match="differ"):
    grounding.grounding_accuracy(["x"], [], [])
  with pytest.raises(ValueError, match="example 0"):
    grounding.grounding_accuracy(["x"], [[1, 2, 3]], [(1, 1)])


@pytest.mark.parity
def test_matches_a_torch_reimplementation_of_the_official_loop():
  torch = pytest.importorskip("torch")

  def official(text, gt, width, height):
    # evaluate_grounding.py's loop with torchvision's box_iou, written out in torch.
    found = grounding.BOX_PATTERN.findall(text)
    try:
      if "," not in found[0][0] or "," not in found[0][1]:
        box = (0.0, 0.0, 0.0, 0.0)
      else:
        x1, y1 = [float(t) for t in found[0][0].split(",")]
        x2, y2 = [float(t) for t in found[0][1].split(",")]
        box = (x1, y1, x2, y2)
    except Exception:  # the reference's bare except
      box = (0.0, 0.0, 0.0, 0.0)
    target = torch.tensor(gt, dtype=torch.float32).view(-1, 4)
    pred = torch.tensor(box, dtype=torch.float32).view(-1, 4) / 999
    pred[:, 0::2] *= width
    pred[:, 1::2] *= height
    area1 = (pred[:, 2] - pred[:, 0]) * (pred[:, 3] - pred[:, 1])
    area2 = (target[:, 2] - target[:, 0]) * (target[:, 3] - target[:, 1])
    lt = torch.max(pred[:, None, :2], target[:, :2])
    rb = torch.min(pred[:, None, 2:], target[:, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[:, :, 0] * wh[:, :, 1]
    return (inter / (area1[:, None] + area2 - inter)).item()

  rng = np.random.default_rng(0)
  texts, gts, sizes, expected = [], [], [], []
  for _ in range(300):
    width, height = (int(v) for v in rng.integers(50, 1000, size=2))
    x1, y1 = rng.integers(0, 999, size=2)
    x2, y2 = x1 + rng.integers(0, 999 - x1 + 1), y1 + rng.integers(0, 999 - y1 + 1)
    text = rng.choice([f"({x1},{y1}),({x2},{y2})", f"<box>({x1},{y1}),({x2},{y2})</box> ok", f"({x1}, {y1})",
                       f"({x1},{y1}),({x2},{y2},{y1})"])
    gx1, gy1 = rng.uniform(0, width), rng.uniform(0, height)
    gt = [gx1, gy1, rng.uniform(gx1, width), rng.uniform(gy1, height)]
    texts.append(text), gts.append(gt), sizes.append((width, height))
    expected.append(official(text, gt, width, height))
  result = grounding.grounding_accuracy(texts, gts, sizes)
  ious = [e["iou"] for e in result["per_example"]]
  np.testing.assert_array_equal(np.asarray(ious, np.float64), np.asarray(expected, np.float64))
  assert result["accuracy"] == np.mean([e >= 0.5 for e in expected])
  assert 0 < result["accuracy"] < 1


def test_best_constant_box_accuracy_is_the_hindsight_optimum():
  from qwenvl_jax.evaluation.grounding import best_constant_box_accuracy  # pylint: disable=import-outside-toplevel
  # Three examples share the top-left quadrant (one on a twice-as-large image), one is bottom-right.
  boxes = [(0, 0, 50, 50), (0, 0, 100, 100), (2, 2, 52, 52), (60, 60, 100, 100)]
  sizes = [(100, 100), (200, 200), (100, 100), (100, 100)]
  accuracy, box = best_constant_box_accuracy(boxes, sizes)
  assert accuracy == 0.75 and box == (0.0, 0.0, 0.5, 0.5)
  assert best_constant_box_accuracy([(60, 60, 100, 100)], [(100, 100)]) == (1.0, (0.6, 0.6, 1.0, 1.0))
  with pytest.raises(ValueError, match="as many boxes as sizes"):
    best_constant_box_accuracy(boxes, sizes[:2])
