"""The scorer interface: factory specs, output checks, the deterministic test scorer."""
import pickle

import numpy as np
import PIL.Image
import pytest

from qwenvl_jax.cleaning import scoring


def _solid(color):
  return PIL.Image.new("RGB", (8, 8), color)


def test_dominant_color_scorer():
  scorer = scoring.DominantColorScorer()
  images = [_solid((200, 0, 0)), _solid((0, 200, 0)), _solid((0, 0, 200)), _solid((0, 0, 200)).convert("L")]
  texts = ["A Red bus", "green grass", "a red sky", "grey means red"]
  assert scorer(images, texts) == [1.0, 1.0, 0.0, 1.0]


def test_spec_factory_imports_on_call_and_pickles():
  factory = scoring.SpecFactory("qwenvl_jax.cleaning.scoring:DominantColorScorer")
  clone = pickle.loads(pickle.dumps(factory))
  assert isinstance(clone(), scoring.DominantColorScorer)


@pytest.mark.parametrize("spec, message", [
    ("no_colon", "not of the form"),
    ("qwenvl_jax.no_such_module:X", "cannot import"),
    ("qwenvl_jax.cleaning.scoring:Nope", "has no attribute"),
    ("qwenvl_jax.cleaning.scoring:DEFAULT_NOT_THERE", "has no attribute"),
    ("qwenvl_jax.cleaning.scoring:_COLOR_NAMES", "not a callable"),
])
def test_bad_specs_fail_at_launch(spec, message):
  with pytest.raises(ValueError, match=message):
    scoring.SpecFactory(spec)


def test_check_scores():
  assert scoring.check_scores(np.array([0.5, 1]), 2, "s") == [0.5, 1.0]
  with pytest.raises(ValueError, match="shape"):
    scoring.check_scores([0.5], 2, "s")
  with pytest.raises(ValueError, match="non-finite"):
    scoring.check_scores([0.5, np.inf], 2, "s")


@pytest.mark.parametrize("value, ok", [(0.3, True), (1, True), (np.float32(0.2), True), (True, False),
                                       ("0.3", False), (float("nan"), False), (None, False)])
def test_is_number(value, ok):
  assert scoring.is_number(value) is ok
