"""The caption normalisation pycocoevalcap applies before CIDEr, in Python.

pycocoevalcap runs Stanford CoreNLP 3.4.1's Java `PTBTokenizer -preserveLines -lowerCase` on every reference
and candidate caption (newlines replaced by spaces), then drops the tokens in its `PUNCTUATIONS` list. This
module reproduces that for the text captioning models and annotators write, without Java:

- lower-case; `"`, `` ` ``, `'` quotes, `.`, `,`, `:`, `;`, `?`, `!`, `-`, `--`, `...` removed as tokens;
- brackets become `-lrb-`/`-rrb-`, `-lsb-`/`-rsb-`, `-lcb-`/`-rcb-` and **stay** (pycocoevalcap's list has
  the upper-case forms, but `-lowerCase` lower-cases them first);
- runs of `?`/`!` such as `?!`, and runs of one symbol such as `**`, are one token and stay; `---` is `--`;
- a decimal number glued to letters is split off (`2.5m` -> `2.5 m`), other numbers are not (`4km`);
- clitics split off: `don't` -> `do n't`, `can't` -> `ca n't`, `it's` -> `it 's`, `'m 're 've 'll 'd` likewise,
  `cannot` -> `can not`, `gonna` -> `gon na` (also gotta, wanna, lemme, gimme); a plural possessive's
  apostrophe is removed (`boys'` -> `boys`);
- `$`, `%`, `#`, `&`, `/` between spaces and other symbols become tokens of their own; numbers keep their
  inner `.`, `,` and `:` (`3.50`, `1,000`, `3:30`); words keep inner hyphens, periods, slashes, `@` and
  apostrophes (`black-and-white`, `www.example.com`, `1/2`, `o'clock`);
- a word's final period stays on letter-period abbreviations (`u.s.`, `p.m.`, `e.g.`), single letters
  (`c.`) and the common abbreviations in `ABBREVIATIONS` (`mr.`, `st.`, `no.` before a number, ...);
- typographic quotes, apostrophes, ellipsis and dashes are treated as their ASCII forms.

Known differences from the Java tokenizer (rare in captions; `tests/evaluation/test_ptb_tokenizer.py` checks a
corpus of captions against the real jar when Java and pycocoevalcap are present): SGML-like tags (`<b>` is one
token in Java, three here), `'tis`/`y'all` (Java: `'t is`, `y' all`), `rock 'n' roll` (Java keeps `'n'`), a
semicolon glued to a single letter (`c;d`), periods inside a run like `x...y`, code-like words with
underscores or file extensions (`eval_mm/mme`, `a_b.py`: Java splits some), `chat-1.1`, and the long tail of
CoreNLP's abbreviation list. On 166 lines of this project's markdown prose (not captions), 13 differ.
"""
import re
from typing import Iterable, List

# pycocoevalcap's PUNCTUATIONS verbatim: its upper-case bracket entries never match the lower-cased tokens.
PUNCTUATIONS = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":",
                          "-", "--", "...", ";"])
# Abbreviations that keep their period before another word. Letter-period runs and single letters are
# handled by pattern; "no." only keeps its period before a number, as in CoreNLP.
ABBREVIATIONS = frozenset([
    "mr", "mrs", "ms", "messrs", "dr", "prof", "st", "jr", "sr", "rev", "gen", "col", "lt", "sgt", "capt", "mt",
    "ft", "vs", "etc", "inc", "ltd", "co", "corp", "bros", "jan", "feb", "mar", "apr", "jun", "jul", "aug",
    "sep", "sept", "oct", "nov", "dec", "fig", "ave", "blvd",
])
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_SPLIT_WORDS = {"cannot": ("can", "not"), "gonna": ("gon", "na"), "gotta": ("got", "ta"),
                "wanna": ("wan", "na"), "lemme": ("lem", "me"), "gimme": ("gim", "me")}
_TYPOGRAPHIC = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2013": "--",
                              "\u2014": "--", "\u2026": "..."})
_TOKEN = re.compile(r"""
    (?P<initials>(?:[^\W\d_]\.){2,})                     # u.s. p.m. e.g.
  | (?P<decimal>\d+\.\d+(?=[^\W\d_]))                    # 2.5 of 2.5m (but 4km stays whole)
  | (?P<word>(?:'(?=\d))?\w+(?:(?:[-./@']|(?<=\d)[,:](?=\d))\w+)*)   # words, numbers, '90s
  | (?P<ellipsis>\.{2,})
  | (?P<marks>[?!]+)
  | (?P<dashes>-{2,})
  | (?P<run>(?P<symbol>[^\w\s])(?P=symbol)+)                # ** ## == are one token
  | (?P<clitic>'(?:s|m|d|re|ve|ll)\b|n't\b)
  | (?P<other>\S)
""", re.VERBOSE)
_CLITIC = re.compile(r"^(.+?)(n't|'s|'m|'d|'re|'ve|'ll)$")


def _split_clitics(word: str) -> List[str]:
  """`couldn't've` -> [could, n't, 've]; whole words in `_SPLIT_WORDS` split in two."""
  if word in _SPLIT_WORDS:
    return list(_SPLIT_WORDS[word])
  suffixes = []
  while True:
    match = _CLITIC.match(word)
    if match is None:
      break
    word = match.group(1)
    suffixes.append(match.group(2))
  return [word] + suffixes[::-1]


def tokenize_line(text: str) -> List[str]:
  """The lower-cased PTB tokens of one caption, before punctuation removal."""
  text = text.replace("\n", " ").translate(_TYPOGRAPHIC).lower()
  tokens: List[str] = []
  pos = 0
  while True:
    while pos < len(text) and text[pos].isspace():
      pos += 1
    if pos >= len(text):
      return tokens
    match = _TOKEN.match(text, pos)
    kind, token = match.lastgroup, match.group()
    pos = match.end()
    if kind == "word":
      tokens.extend(_split_clitics(token))
      if text.startswith(".", pos) and _keeps_period(token, text, pos):
        tokens[-1] += "."
        pos += 1
    elif kind == "ellipsis":
      tokens.append("...")
    elif kind == "dashes":
      tokens.append("--")
    elif kind == "other" and token in _BRACKETS:
      tokens.append(_BRACKETS[token])
    elif kind == "other" and token == '"':
      tokens.append("''")
    else:
      tokens.append(token)


def _keeps_period(word: str, text: str, pos: int) -> bool:
  """Whether the period at text[pos], right after `word`, belongs to it (an abbreviation)."""
  if pos + 1 < len(text) and not text[pos + 1].isspace():
    return False
  if len(word) == 1 and word.isalpha():
    return True
  if word == "no":
    return re.match(r"\.\s*\d", text[pos:]) is not None
  return word in ABBREVIATIONS


def tokenize(captions: Iterable[str]) -> List[str]:
  """pycocoevalcap's normalisation of each caption: PTB tokens without its punctuation, joined by spaces."""
  return [" ".join(t for t in tokenize_line(c) if t not in PUNCTUATIONS) for c in captions]
