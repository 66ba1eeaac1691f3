"""Caption cleaning and the text checks of stage-1 filtering (length, emoji, language).

`clean_text` rewrites a raw web caption, in this order:
  1. Unicode repair with `ftfy` (mojibake such as "doesnÃ¢â‚¬â„¢t", C0/C1 control characters, NFC); full-width
     punctuation and curly quotes are kept as written.
  2. HTML: tags are removed (each replaced by a space so "a<br>b" keeps two words), the content of <script> and
     <style> and comments are dropped, entities are unescaped ("&amp;" -> "&", "&#128512;" -> the emoji).
  3. Control and invisible format characters (Unicode categories Cc and Cf: zero-width spaces, bidi marks, BOM)
     are removed; tabs and newlines become spaces.
  4. Irregular patterns are removed:
       - URLs (scheme://... and www....), e-mail addresses, @mentions,
       - image file names ("IMG_1234.JPG", "photo-2.png") and camera file stems ("DSC01234", "PXL_2023...").
  5. Repeated punctuation is collapsed: a run of one punctuation or symbol character becomes one ("!!!" -> "!"),
     except that dots keep an ellipsis ("....." -> "...") and "……" / "——" (Chinese ellipsis and dash) stay
     doubled.
  6. Whitespace runs become one space; leading and trailing spaces are dropped.

Language detection uses `py3langid` (the langid.py model, bundled in the wheel: nothing is downloaded); emoji
detection uses the `emoji` package's Unicode data.
"""
import functools
import html.parser

import emoji
import ftfy
import py3langid
import regex

_SCRIPT_TAGS = frozenset({"script", "style"})
_CONTROL_OR_FORMAT = regex.compile(r"[\p{Cc}\p{Cf}]")
_IRREGULAR = regex.compile(
    r"(?:(?:https?|ftp)://|www\.)\S+"                         # URLs
    r"|[\w.+-]+@[\w-]+(?:\.[\w-]+)+"                            # e-mail addresses
    r"|(?<![\w@])@\w+"                                          # @mentions
    r"|\S+\.(?:jpe?g|png|gif|webp|bmp|tiff?|heic)(?!\w)"       # image file names
    r"|(?<!\w)(?:IMG|DSC|DSCN|DSCF|PXL|MVIMG|VID)[_-]?\d[\w-]*",  # camera file stems
    regex.IGNORECASE)
_REPEATED_PUNCT = regex.compile(r"([^\w\s])\1+")
_WHITESPACE = regex.compile(r"\s+")
# Characters that each count as one unit (languages written without spaces between words).
_CJK_CHAR = regex.compile(r"[\p{Han}\p{Hiragana}\p{Katakana}\p{Hangul}]")
_WORD = regex.compile(r"\w")
# Chinese varieties the language model tells apart; written Chinese of any of them counts as "zh".
LANGUAGE_ALIASES = {"wuu": "zh", "yue": "zh"}
# Emoji of these statuses are text-presentation symbols (e.g. "©", "™", "❤" without U+FE0F), not emoji.
_TEXT_PRESENTATION = emoji.STATUS["unqualified"]


class _TagStripper(html.parser.HTMLParser):
  """Collects the text content of an HTML fragment (entities unescaped, script/style bodies dropped)."""

  def __init__(self):
    super().__init__(convert_charrefs=True)
    self.parts: list[str] = []
    self._skip_depth = 0

  def handle_starttag(self, tag, attrs):
    if tag in _SCRIPT_TAGS:
      self._skip_depth += 1
    self.parts.append(" ")

  def handle_endtag(self, tag):
    if tag in _SCRIPT_TAGS and self._skip_depth:
      self._skip_depth -= 1
    self.parts.append(" ")

  def handle_startendtag(self, tag, attrs):
    self.parts.append(" ")

  def handle_data(self, data):
    if not self._skip_depth:
      self.parts.append(data)


def strip_html(text: str) -> str:
  """Removes HTML tags, comments and script/style bodies; unescapes entities. Plain text comes back as is."""
  if "<" not in text and "&" not in text:
    return text
  parser = _TagStripper()
  parser.feed(text)
  parser.close()
  return "".join(parser.parts)


def _collapse_punct(match: regex.Match) -> str:
  char = match.group(1)
  if char == ".":
    return "..." if len(match.group(0)) >= 3 else "."
  if char in "…—":
    return char * 2
  return char


def clean_text(text: str) -> str:
  """The cleaned caption (see the module docstring for the steps, in order)."""
  # Only repair: full-width punctuation ("，", "！") and curly quotes are how Chinese and much English text is
  # written, so ftfy's width and quote normalisations stay off.
  text = ftfy.fix_text(text, unescape_html=False, fix_character_width=False, uncurl_quotes=False)
  text = strip_html(text)
  text = _CONTROL_OR_FORMAT.sub(lambda m: " " if m.group(0).isspace() else "", text)
  text = _IRREGULAR.sub(" ", text)
  text = _REPEATED_PUNCT.sub(_collapse_punct, text)
  return _WHITESPACE.sub(" ", text).strip()


def text_units(text: str) -> int:
  """Length of a caption in a unit fair to English and Chinese alike.

  Each Han, kana or Hangul character is one unit; every other whitespace-separated token holding at least one
  letter or digit is one unit. So "a red bus" is 3 units, "一辆红色的公交车" is 8 and "iPhone 手机壳" is 4.
  """
  rest = _CJK_CHAR.sub(" ", text)
  return len(_CJK_CHAR.findall(text)) + sum(1 for tok in rest.split() if _WORD.search(tok))


def has_emoji(text: str) -> bool:
  """Whether the text holds an emoji, text-presentation symbols (©, ™, ❤ without U+FE0F) excepted."""
  for match in emoji.emoji_list(text):
    status = emoji.EMOJI_DATA.get(match["emoji"], {}).get("status")
    if status != _TEXT_PRESENTATION:
      return True
  return False


def detect_language(text: str) -> str:
  """Code of the text's most likely language (py3langid's 140-language model; Wu and Cantonese count as "zh").

  Like every character-n-gram detector it is unreliable on captions of two or three words (e.g. "cute cat" comes
  out Romanian), which is one reason the length rules run before it.
  """
  code = py3langid.classify(text)[0]
  return LANGUAGE_ALIASES.get(code, code)


@functools.cache
def known_languages() -> frozenset[str]:
  """The codes `detect_language` can return: py3langid's languages, Wu and Cantonese counted as "zh" (loads the
  language model on first use)."""
  return frozenset(LANGUAGE_ALIASES.get(code, code) for code, _ in py3langid.rank(""))
