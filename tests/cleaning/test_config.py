"""CleanConfig validation and the fixed rule order."""
import pytest

from qwenvl_jax import errors
from qwenvl_jax.cleaning.config import RULES, CleanConfig
from qwenvl_jax.cleaning.text import detect_language, known_languages


def test_rule_order_is_the_documented_one():
  assert RULES == ("malformed", "text_too_short", "text_too_long", "emoji", "language", "image_unreadable",
                   "image_undecodable", "aspect_ratio", "image_too_small", "low_similarity")


@pytest.mark.parametrize("kwargs, message", [
    (dict(text_key=""), "text_key"),
    (dict(image_key="text"), "distinct"),
    (dict(score_key="image"), "distinct"),
    (dict(languages="en"), "languages"),
    (dict(languages=()), "languages"),
    (dict(min_text_units=5, max_text_units=4), "min_text_units=5 > max_text_units=4"),
    (dict(max_text_units=0), "max_text_units"),
    (dict(max_aspect_ratio=0.5), "max_aspect_ratio"),
    (dict(max_aspect_ratio=float("inf")), "max_aspect_ratio"),
    (dict(min_image_side=0), "min_image_side"),
    (dict(min_image_side=1.5), "min_image_side"),
    (dict(min_similarity=float("nan")), "min_similarity"),
    (dict(max_stored_side=0), "max_stored_side"),
    (dict(jpeg_quality=0), "jpeg_quality"),
    (dict(url_timeout_s=0), "url_timeout_s"),
    (dict(batch_size=True), "batch_size"),
    (dict(sample_size=-1), "sample_size"),
])
def test_invalid_settings_name_the_field(kwargs, message):
  with pytest.raises(ValueError, match=message):
    CleanConfig(**kwargs)


def test_to_json_round_trips():
  cfg = CleanConfig(languages=["en"], score_key="clip", max_stored_side=512)
  assert cfg.languages == ("en",)
  assert CleanConfig(**{**cfg.to_json(), "languages": tuple(cfg.to_json()["languages"])}) == cfg


@pytest.mark.parametrize("kwargs, message, hint", [
    (dict(languages=("en", "xx")), r"CleanConfig.languages: unknown language code 'xx'", "e.g. en, zh"),
    (dict(languages=("EN",)), r"unknown language code 'EN'", "did you mean 'en'?"),
    (dict(languages=("yue",)), r"'yue' is detected as 'zh'", None),
    (dict(min_similarity_by_language={"zz": 0.3}), r"min_similarity_by_language: unknown language code 'zz'", None),
])
def test_language_codes_the_detector_never_reports_are_refused(kwargs, message, hint):
  """`--languages=xx` rejected every pair (as "language") after the whole job ran."""
  with pytest.raises(errors.ConfigError, match=message) as info:
    CleanConfig(**kwargs)
  assert hint is None or hint in info.value.hint


def test_every_language_the_detector_reports_is_accepted():
  known = known_languages()
  assert {"en", "zh", "de", "fr", "ja"} <= known and not {"wuu", "yue"} & known  # Wu and Cantonese are "zh"
  assert {detect_language(t) for t in ("a red bus on the street", "一辆红色的公交车", "ein roter Bus")} <= known
  assert CleanConfig(languages=tuple(sorted(known))).languages == tuple(sorted(known))
