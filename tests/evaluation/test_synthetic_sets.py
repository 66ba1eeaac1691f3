"""Held-out synthetic evaluation sets: readable by the official readers, boxes on the shapes, never overwritten."""
import numpy as np
import pytest

from qwenvl_jax.data.images import preprocess_image
from qwenvl_jax.evaluation import synthetic_sets
from qwenvl_jax.evaluation.tasks import get_task

S = 56


def test_grounding_set_boxes_cover_the_named_shape(tmp_path):
  path = synthetic_sets.write_grounding_set(tmp_path, n=12, image_size=S)
  examples = get_task("refcoco_val").read(path)
  assert len(examples) == 12 and all(e.size == (S, S) for e in examples)
  for e in examples:
    x1, y1, x2, y2 = e.bbox
    assert 0 <= x1 < x2 <= S and 0 <= y1 < y2 <= S
    pixels = preprocess_image(str(tmp_path / e.image), S).astype(int)
    background = pixels[0, 0] if not (x1 < 1 and y1 < 1) else pixels[-1, -1]
    inside = pixels[int(np.ceil(y1)) + 1:int(y2) - 1, int(np.ceil(x1)) + 1:int(x2) - 1]
    # The shape's colour fills a good part of its box (triangles half of it), unlike the plain background.
    assert np.mean(np.any(inside != background, axis=-1)) > 0.3, e
    assert e.fields["expr"].startswith("the ")


def test_caption_set_and_max_shapes(tmp_path):
  path = synthetic_sets.write_caption_set(tmp_path, n=10, image_size=S, max_shapes=1)
  examples = get_task("flickr").read(path)
  assert [len(e.references) for e in examples] == [1] * 10
  assert not any(" and " in e.references[0] for e in examples)  # one shape per scene


def test_sets_are_held_out_and_never_overwritten(tmp_path):
  a = get_task("refcoco_val").read(synthetic_sets.write_grounding_set(tmp_path / "a", n=8, image_size=S))
  b = get_task("refcoco_val").read(synthetic_sets.write_grounding_set(tmp_path / "b", n=8, image_size=S, seed=0))
  assert [e.bbox for e in a] != [e.bbox for e in b]  # the default seed is not the trainer's seed 0
  with pytest.raises(FileExistsError, match="never overwritten"):
    synthetic_sets.write_grounding_set(tmp_path / "a", n=8, image_size=S)
