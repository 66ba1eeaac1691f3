"""Tests of the synthetic dataset: determinism, valid records, and answers that really are in the pixels."""
import re

import numpy as np
import pytest

from qwenvl_jax.data import records as rec
from qwenvl_jax.data import synthetic
from qwenvl_jax.data.images import preprocess_image

S = 96


def _pixels(record, i=0):
  return preprocess_image(record.images[i], S)


def _boxes(text):
  return [tuple(int(v) for v in m) for m in re.findall(r"<box>\((\d+),(\d+)\),\((\d+),(\d+)\)</box>", text)]


@pytest.mark.parametrize("task", rec.TASKS)
def test_deterministic_valid_and_varied(task):
  a = synthetic.synthetic_record(7, task=task, image_size=S, seed=3)
  b = synthetic.synthetic_record(7, task=task, image_size=S, seed=3)
  rec.validate(a)
  assert a.turns == b.turns and a.id == b.id
  for i in range(len(a.images)):
    np.testing.assert_array_equal(_pixels(a, i), _pixels(b, i))
  others = [synthetic.synthetic_record(i, task=task, image_size=S, seed=3).turns for i in range(8)]
  assert len({str(t) for t in others}) > 1
  other_seed = [synthetic.synthetic_record(i, task=task, image_size=S, seed=4).turns for i in range(8)]
  assert others != other_seed
  assert (task == "text") == (not a.images)


def test_caption_colours_and_boxes_match_the_pixels():
  for i in range(20):
    record = synthetic.synthetic_record(i, task="grounded_caption", image_size=S)
    pixels = _pixels(record)
    answer = record.turns[1][1]
    phrases = re.findall(r"<ref>an? (\w+) (\w+)</ref>", answer)
    boxes = _boxes(answer)
    assert len(phrases) == len(boxes) >= 1
    centres = []
    for (colour, shape), (x1, y1, x2, y2) in zip(phrases, boxes):
      assert shape in synthetic.SHAPES
      # The box centre (the lower middle for triangles) is painted in the named colour.
      cx, cy = (x1 + x2) / 2000 * S, (y1 + 3 * y2) / 4000 * S if shape == "triangle" else (y1 + y2) / 2000 * S
      assert tuple(pixels[int(cy), int(cx)]) == synthetic.COLOURS[colour], (i, colour, shape)
      centres.append(cx)
    assert centres == sorted(centres), "objects are listed left to right"


def test_vqa_answers_are_consistent_with_the_caption():
  for i in range(30):
    record = synthetic.synthetic_record(i, task="vqa", image_size=S)
    question, answer = record.turns[0][1], record.turns[1][1].strip()
    scene = synthetic._Scene(np.random.default_rng((0, rec.TASKS.index("vqa"), i)), S)
    kinds = {k: c for k, c, _ in scene.objects}
    if m := re.search(r"What colour is the (\w+)\?", question):
      assert kinds[m.group(1)] == answer
    elif "How many" in question:
      assert answer == synthetic.NUMBERS[len(kinds)]
    elif m := re.search(r"Is there a (\w+)\?", question):
      assert answer == ("yes" if m.group(1) in kinds else "no")
    else:
      colour = re.search(r"Which shape is (\w+)\?", question).group(1)
      assert kinds[answer] == colour


def test_ocr_box_encloses_the_rendered_word():
  for i in range(10):
    record = synthetic.synthetic_record(i, task="ocr", image_size=S)
    pixels = _pixels(record).astype(int)
    word = re.search(r"<ref>(\w+)</ref>", record.turns[1][1]).group(1)
    assert word in synthetic.WORDS
    x1, y1, x2, y2 = _boxes(record.turns[1][1])[0]
    background = pixels[0, 0]
    ink = np.argwhere(np.abs(pixels - background).sum(-1) > 60)
    assert len(ink)
    # Every painted pixel lies inside the box (one pixel of slack for rounding to thousandths).
    assert ink[:, 1].min() >= x1 * S / 1000 - 1 and ink[:, 1].max() <= x2 * S / 1000 + 1
    assert ink[:, 0].min() >= y1 * S / 1000 - 1 and ink[:, 0].max() <= y2 * S / 1000 + 1


def test_chat_has_multi_turn_and_multi_image_conversations():
  records = [synthetic.synthetic_record(i, task="chat", image_size=32) for i in range(40)]
  assert {len(r.images) for r in records} == {1, 2}
  assert all(len(r.turns) >= 4 for r in records)
  two = next(r for r in records if len(r.images) == 2)
  assert two.turns[0][1].startswith("Picture 1: <img></img>\nPicture 2: <img></img>\n")


def test_stage1_caption_is_bare():
  r = synthetic.synthetic_record(0, task="caption", image_size=32, stage=1)
  assert r.turns[0] == ("user", "<img></img>") and not r.turns[1][1].startswith(" ")


def test_bad_arguments():
  with pytest.raises(ValueError, match="unknown synthetic task"):
    synthetic.synthetic_record(0, task="dance", image_size=32)
  with pytest.raises(ValueError, match="non-negative"):
    synthetic.synthetic_record(-1, task="vqa", image_size=32)
  with pytest.raises(ValueError, match="max_shapes must be in"):
    synthetic.synthetic_record(0, task="vqa", image_size=32, max_shapes=4)


def test_max_shapes_bounds_the_scene_and_keeps_the_default_stream():
  one = [synthetic.synthetic_record(i, task="grounded_caption", image_size=S, max_shapes=1) for i in range(20)]
  assert all(len(_boxes(r.turns[1][1])) == 1 for r in one)
  # The default (3) draws exactly what the dataset always drew, so existing runs and checkpoints stay valid.
  counts = {len(_boxes(synthetic.synthetic_record(i, task="grounded_caption", image_size=S).turns[1][1]))
            for i in range(40)}
  assert counts == {1, 2, 3}
  default = synthetic.synthetic_record(7, task="caption", image_size=S)
  explicit = synthetic.synthetic_record(7, task="caption", image_size=S, max_shapes=synthetic.MAX_SHAPES)
  assert default.turns == explicit.turns


def test_synthetic_tokenizer_round_trips_the_corpus(tmp_path):
  tok = synthetic.train_synthetic_tokenizer(str(tmp_path / "syn"), vocab_size=400, num_records=400)
  record = synthetic.synthetic_record(1, task="grounded_caption", image_size=32)
  text = record.turns[1][1]
  ids = tok.encode(text)
  assert tok.decode(ids) == text
  assert tok.box_start_id in ids
  # A tokenizer trained on the corpus spends fewer tokens than bytes on it.
  assert len(ids) < len(text.encode()) / 2
  with pytest.raises(FileExistsError):
    synthetic.train_synthetic_tokenizer(str(tmp_path / "syn"), vocab_size=400, num_records=400)
