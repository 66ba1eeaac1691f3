"""Keep/drop decisions of `clean_batch` on the generated input (every rule, corrupt images), without Beam."""
import collections
import io

import numpy as np
import PIL.Image
import pytest

from qwenvl_jax.cleaning import scoring
from qwenvl_jax.cleaning.config import RULES, CleanConfig
from qwenvl_jax.cleaning.filters import Kept, MalformedRow, RawPair, Rejected, clean_batch
from qwenvl_jax.cleaning.sources import read_shard

from tests.cleaning.cases import case_ids

COLUMN_CFG = CleanConfig(score_key="clip", min_similarity=0.3, max_text_units=30)
SCORER_CFG = CleanConfig(min_similarity=0.5, max_text_units=30)


def _read_all(folder):
  pairs = []
  for shard in sorted(folder.glob("*.*")):
    if shard.is_file():
      pairs += list(read_shard(str(shard)))
  return pairs


def _decisions(outcomes):
  return {o.id: ("kept" if isinstance(o, Kept) else o.rule) for o in outcomes}


@pytest.mark.parametrize("mode", ["column", "scorer"])
def test_every_rule_decides_exactly_as_expected(clean_inputs, mode):
  folder, cases = clean_inputs
  cfg, scorer = (COLUMN_CFG, None) if mode == "column" else (SCORER_CFG, scoring.DominantColorScorer())
  outcomes = clean_batch(_read_all(folder), cfg, scorer)
  expected = {cid: (c.with_column if mode == "column" else c.with_scorer) for cid, c in case_ids(cases).items()}
  assert _decisions(outcomes) == expected
  counts = collections.Counter(o.rule for o in outcomes if isinstance(o, Rejected))
  assert counts == collections.Counter(v for v in expected.values() if v != "kept")
  assert set(counts) <= set(RULES)


def test_kept_pairs_hold_cleaned_text_and_rgb_images(clean_inputs):
  folder, cases = clean_inputs
  by_id = case_ids(cases)
  kept = [o for o in clean_batch(_read_all(folder), COLUMN_CFG) if isinstance(o, Kept)]
  assert kept
  for pair in kept:
    assert pair.text == by_id[pair.id].cleaned
    example = pair.example()
    assert set(example) == {"id", "image", "text"}
    with PIL.Image.open(io.BytesIO(example["image"])) as image:
      assert image.mode == "RGB" and image.format in ("JPEG", "PNG")
      assert (image.width, image.height) == (pair.width, pair.height)
  # An RGB JPEG is stored byte for byte; a grey JPEG is converted to RGB.
  red = (folder / "img" / "red.jpg").read_bytes()
  assert next(p for p in kept if by_id[p.id].name == "kept_path").image == red
  grey = next(p for p in kept if by_id[p.id].name == "pq_kept_grey")
  assert grey.image != by_id[grey.id].row["image"]


def test_rejections_carry_the_row_for_the_report(clean_inputs):
  folder, cases = clean_inputs
  by_id = case_ids(cases)
  rejected = {o.id: o for o in clean_batch(_read_all(folder), COLUMN_CFG) if isinstance(o, Rejected)}
  german = next(r for r in rejected.values() if by_id[r.id].name == "german")
  assert german.text == by_id[german.id].row["text"] and german.image == "img/red.jpg"
  assert "'de'" in german.reason
  garbage = next(r for r in rejected.values() if by_id[r.id].name == "pq_garbage_bytes")
  assert garbage.image == f"<{len(b'GIF89a garbage')} bytes>"
  assert set(garbage.sample()) == {"id", "source", "reason", "text", "cleaned", "image"}
  short = next(r for r in rejected.values() if by_id[r.id].name == "too_short")
  assert (short.text, short.cleaned) == ("<b>red</b> http://a.example/b", "red")
  malformed = next(r for r in rejected.values() if by_id[r.id].name == "text_not_string")
  assert (malformed.text, malformed.cleaned) == ("42", "")


def _pair(row, index=0):
  return RawPair(key=f"/x/s.jsonl:{index}", source=f"s.jsonl:{index}", row=row, root="/nonexistent")


def _jpeg(size=(120, 100)):
  out = io.BytesIO()
  PIL.Image.new("RGB", size, (10, 200, 10)).save(out, "JPEG")
  return out.getvalue()


@pytest.mark.parametrize("row, reason", [
    (MalformedRow("line is not JSON"), "not JSON"),
    ([1, 2], "not an object"),
    ({"image": b"x"}, "missing column 'text'"),
    ({"text": None, "image": b"x"}, "missing column 'text'"),
    ({"text": "a red bus on the road", "image": b"x", "id": ""}, "'id'"),
    ({"text": "a red bus on the road", "image": b"x", "id": True}, "'id'"),
    ({"text": "a red bus on the road", "image": b"x", "id": "r1", "s": float("nan")}, "'s'"),
    ({"text": "a red bus on the road", "image": b"x", "id": "r1", "s": True}, "'s'"),
])
def test_malformed_rows_name_the_problem(row, reason):
  cfg = CleanConfig(id_key="id", score_key="s")
  [out] = clean_batch([_pair(row)], cfg)
  assert isinstance(out, Rejected) and out.rule == "malformed"
  assert reason in out.reason


def test_id_column_and_thresholds_are_inclusive():
  cfg = CleanConfig(id_key="id", score_key="s", min_similarity=0.5, min_text_units=3, max_text_units=6,
                    min_image_side=100, max_aspect_ratio=1.2)
  rows = [
      {"id": 7, "text": "the old house", "image": _jpeg((120, 100)), "s": 0.5},      # every bound met exactly
      {"id": "b", "text": "the old house", "image": _jpeg((121, 100)), "s": 0.5},    # 1.21 > 1.2
      {"id": "c", "text": "the old house", "image": _jpeg((120, 99)), "s": 0.5},     # aspect 1.21 first
      {"id": "d", "text": "the old house", "image": _jpeg((100, 99)), "s": 0.5},     # short side 99
      {"id": "e", "text": "the green grass of the field", "image": _jpeg(), "s": 0.5},  # 6 units
      {"id": "f", "text": "the green grass of the big field", "image": _jpeg(), "s": 0.5},
      {"id": "g", "text": "the old house", "image": _jpeg(), "s": 0.4999},
  ]
  outs = clean_batch([_pair(r, i) for i, r in enumerate(rows)], cfg)
  assert _decisions(outs) == {"7": "kept", "b": "aspect_ratio", "c": "aspect_ratio", "d": "image_too_small",
                              "e": "kept", "f": "text_too_long", "g": "low_similarity"}


def test_scorer_sees_rgb_images_and_cleaned_texts_in_one_batch():
  calls = []

  def scorer(images, texts):
    calls.append(([im.mode for im in images], list(texts)))
    return np.array([0.9, 0.1])

  rows = [{"text": "<i>a green</i> field today", "image": _jpeg()},
          {"text": "a green field at night", "image": _jpeg()},
          {"text": "hi", "image": _jpeg()}]
  outs = clean_batch([_pair(r, i) for i, r in enumerate(rows)], CleanConfig(min_similarity=0.5), scorer)
  assert calls == [(["RGB", "RGB"], ["a green field today", "a green field at night"])]
  assert [o.rule if isinstance(o, Rejected) else o.score for o in outs] == [0.9, "low_similarity", "text_too_short"]


@pytest.mark.parametrize("scores", [[0.5], [[0.5, 0.5]], [0.5, float("nan")]])
def test_broken_scorer_stops_the_job(scores):
  rows = [{"text": "a green field today", "image": _jpeg()}] * 2
  with pytest.raises(ValueError, match="scorer"):
    clean_batch([_pair(r, i) for i, r in enumerate(rows)], CleanConfig(), lambda images, texts: scores)


def test_downscaling_stores_jpeg_within_max_side():
  cfg = CleanConfig(max_stored_side=60)
  [out] = clean_batch([_pair({"text": "a green field today", "image": _jpeg((120, 100))})], cfg)
  with PIL.Image.open(io.BytesIO(out.image)) as image:
    assert image.format == "JPEG" and image.size == (60, 50)
  assert (out.width, out.height) == (120, 100)
