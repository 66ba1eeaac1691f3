"""Caption cleaning steps, length units, emoji and language checks."""
import pytest

from qwenvl_jax.cleaning import text


@pytest.mark.parametrize("raw, cleaned", [
    # Unicode repair (mojibake of a UTF-8 apostrophe read as Windows-1252, twice) ...
    ("The Mona Lisa doesnÃ¢â‚¬â„¢t have eyebrows", "The Mona Lisa doesn’t have eyebrows"),
    # ... that leaves Chinese full-width punctuation and curly quotes as written.
    ("一只狗，在沙滩上！（很开心）“你好”", "一只狗，在沙滩上！（很开心）“你好”"),
    ("“quoted” text", "“quoted” text"),
    # HTML: tags become spaces, entities are unescaped, script/style bodies and comments vanish.
    ("<p>a <b>red</b> bus</p>", "a red bus"),
    ("a<br>b", "a b"),
    ("cats &amp; dogs &lt;3", "cats & dogs <3"),
    ("<script>var x = 1;</script>a cat<style>p {}</style><!-- note -->", "a cat"),
    ("price <10 and 5 > 3", "price <10 and 5 > 3"),
    # Control and invisible format characters.
    ("zero\u200bwidth\u00adsoft\ufeff", "zerowidthsoft"),
    ("tab\tnew\nline\x00null\x07bell", "tab new linenullbell"),  # other controls are dropped
    # Irregular patterns.
    ("see https://example.com/a?b=c and www.example.org now", "see and now"),
    ("mail me@example.com or @someone today", "mail or today"),
    ("IMG_20230101_1234.jpg a cat DSC01234 photo.PNG", "a cat"),
    ("PXL_20231231_235959 sunset", "sunset"),
    # Repeated punctuation.
    ("wow!!! really??? ok,,, fine", "wow! really? ok, fine"),
    ("wait..... what.. now...", "wait... what. now..."),
    ("他说……然后——走了。。。", "他说……然后——走了。"),
    ("-----", "-"),
    # Whitespace.
    ("  lots   of\u3000 space  ", "lots of space"),
    # Text without anything to clean comes back unchanged.
    ("一只红色的狗在沙滩上", "一只红色的狗在沙滩上"),
])
def test_clean_text(raw, cleaned):
  assert text.clean_text(raw) == cleaned


def test_clean_text_is_idempotent():
  raw = "<b>a red bus</b>!!! at https://x.example IMG_1.jpg"
  once = text.clean_text(raw)
  assert text.clean_text(once) == once


@pytest.mark.parametrize("caption, units", [
    ("a red bus", 3),
    ("一辆红色的公交车", 8),
    ("iPhone 手机壳", 4),
    ("a , . !", 1),
    ("东京の夜景 night", 6),
    ("", 0),
])
def test_text_units(caption, units):
  assert text.text_units(caption) == units


@pytest.mark.parametrize("caption, expected", [
    ("smile 😀", True),
    ("a heart ❤️", True),           # with the emoji variation selector
    ("family 👨‍👩‍👧", True),
    ("keycap 1️⃣", True),
    ("thumbs 👍🏽", True),
    ("© 2020 Getty Images", False),  # text-presentation symbols are not emoji
    ("Brand™ and ®", False),
    ("plain heart ❤ text", False),
    ("arrows → ★", False),
    ("一只狗", False),
])
def test_has_emoji(caption, expected):
  assert text.has_emoji(caption) is expected


@pytest.mark.parametrize("caption, language", [
    ("a dog running on the beach at sunset", "en"),
    ("一只狗在沙滩上奔跑", "zh"),
    ("一隻狗在沙灘上奔跑", "zh"),
    ("ein Hund läuft am Strand entlang", "de"),
    ("東京の夜景がとてもきれいです", "ja"),
    ("le chat noir dort sur la table", "fr"),
])
def test_detect_language(caption, language):
  assert text.detect_language(caption) == language
