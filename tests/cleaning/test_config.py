"""CleanConfig validation and the fixed rule order."""
import pytest

from qwenvl_jax.cleaning.config import RULES, CleanConfig


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
