"""The caption normalisation pycocoevalcap applies before CIDEr: its Java PTBTokenizer, ported to Python.

pycocoevalcap 1.2 writes all captions of one call, newlines replaced by spaces, to a file of lines and runs
Stanford CoreNLP 3.4.1's `edu.stanford.nlp.process.PTBTokenizer -preserveLines -lowerCase` on it, then drops
the tokens in its `PUNCTUATIONS` list. That Java tokenizer is the reference here. It is a JFlex scanner
(`PTBLexer`), and no maintained Python library reproduces it (NLTK's Treebank tokenizer, spaCy and stanza
all split differently), so this module hand-ports the scanner's behaviour with the options pycocoevalcap
gets (CoreNLP 3.4.1 defaults plus `tokenizeNLs`):

- the scanner's rules are the regular expressions in `_RULES`, in the scanner's priority order; at each
  position the rule with the longest match wins (the text a trailing-context rule only looks at counts
  toward its length, as in JFlex), ties go to the earlier rule;
- literal words match in any case (`%caseless`), character classes as written (`[A-Z]` is upper case only:
  `AT&T` is one token, `at&t` three);
- the text is scanned as UTF-16 code units like Java's, so emoji and other characters outside the BMP are
  two "untokenizable" units the scanner deletes (with zero-width spaces and joiners, BOM and DEL);
- the captions of one `tokenize` call are scanned as one text joined by newlines, as the jar sees them: the
  end of a caption can depend on the start of the next (`letter I.` then `A dog` gives `i`, then `a dog`
  gives `i.`), and the last caption ends at the end of the text;
- tokens are lower-cased (Java `toLowerCase(Locale.ENGLISH)`), joined by spaces, and filtered with
  pycocoevalcap's `PUNCTUATIONS` exactly as it does (`-LRB-` etc. are listed upper-case, so the lower-cased
  `-lrb-` stay).

One deliberate difference: a caption containing another line separator (`\\r`, U+2028, U+2029, VT, FF, NEL)
makes the jar emit an extra line, which shifts every later caption onto the wrong image in pycocoevalcap;
here the separator ends the caption's line there and the pieces are joined by a space, as if that caption
had been tokenized alone. `tests/evaluation/test_ptb_tokenizer.py` checks ~2000 recorded jar outputs
(`tests/evaluation/ptb_cases.py` re-records them).

Shapes: none (strings in, strings out).
"""
import functools
from typing import Iterable, List, Sequence, Tuple

import regex

NAME = "ptb-python-port-of-corenlp-3.4.1"
"""What `evaluate` records as the CIDEr tokenizer: this port of pycocoevalcap's Java PTBTokenizer."""

# pycocoevalcap's PUNCTUATIONS verbatim: its upper-case bracket entries never match the lower-cased tokens.
PUNCTUATIONS = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":",
                          "-", "--", "...", ";"])

# --- Character classes ---------------------------------------------------------------------------------------
# The scanner's tables are from 2014 (Unicode 6): letters and digits Unicode added since are "untokenizable"
# (deleted) in the jar. These are they, in the BMP, found by running the jar on every letter and digit; U+1885-6
# were letters then (marks now).
_NEWER = (r"\u037F\u0528-\u052F\u0560\u0588\u05EF\u0860-\u086A\u0870-\u0887\u0889-\u088F\u08A1\u08AD-\u08C9"
          r"\u0978\u0980\u09FC\u0AF9\u0C34\u0C5A\u0C5C-\u0C5D\u0C80\u0CDC-\u0CDD\u0D04\u0D54-\u0D56\u0D5F"
          r"\u0DE6-\u0DEF\u0E86\u0E89\u0E8C\u0E8E-\u0E93\u0E98\u0EA0\u0EA8-\u0EA9\u0EAC\u13F5\u13F8-\u13FD"
          r"\u16F1-\u16F8\u170D\u171F\u1878\u191D-\u191E\u19B0-\u19C0\u19C8-\u19C9\u1B4C\u1C80-\u1C8A"
          r"\u1C90-\u1CBA\u1CBD-\u1CBF\u1CF2-\u1CF3\u1CFA\u2C2F\u2C5F\u312E-\u312F\u31BB-\u31BF\u4DB6-\u4DBF"
          r"\u9FCD-\u9FFF\uA698-\uA69D\uA78F\uA794-\uA79F\uA7AB-\uA7DC\uA7F1-\uA7F7\uA8FD-\uA8FE\uA9E0-\uA9E4"
          r"\uA9E6-\uA9FE\uAA7E-\uAA7F\uAB30-\uAB5A\uAB5C-\uAB69\uAB70-\uABBF")
JLETTER = rf"[[\p{{L}}\u1885\u1886]--[{_NEWER}]]"  # Java isLetter as the scanner's tables have it
JDIGIT = rf"[\p{{Nd}}--[{_NEWER}]]"
JUPPER = rf"[\p{{Lu}}--[{_NEWER}]]"
# The scanner's LETTER adds combining marks and other ranges; soft hyphen is a letter.
_LETTER_EXTRA = (r"\u00AD\u0237-\u024F\u02C2-\u02C5\u02D2-\u02DF\u02E5-\u02FF\u0300-\u036F\u0370-\u037D\u0384"
                 r"\u0385\u03CF\u03F6\u03FC-\u03FF\u0483-\u0487\u04CF\u04F6-\u04FF\u0510-\u0525\u055A-\u055F"
                 r"\u0591-\u05BD\u05BF\u05C1\u05C2\u05C4\u05C5\u05C7\u0615-\u061A\u063B-\u063F\u064B-\u065E\u0670"
                 r"\u06D6-\u06EF\u06FA-\u06FF\u070F\u0711\u0730-\u074F\u0750-\u077F\u07A6-\u07B1\u07CA-\u07F5"
                 r"\u07FA\u0900-\u0903\u093C\u093E-\u094E\u0951-\u0955\u0962-\u0963\u0981-\u0983\u09BC-\u09C4"
                 r"\u09C7\u09C8\u09CB-\u09CD\u09D7\u09E2\u09E3\u0A01-\u0A03\u0A3C\u0A3E-\u0A4F\u0A81-\u0A83"
                 r"\u0ABC-\u0ACF\u0B82\u0BBE-\u0BC2\u0BC6-\u0BC8\u0BCA-\u0BCD\u0C01-\u0C03\u0C3E-\u0C56"
                 r"\u0D3E-\u0D44\u0D46-\u0D48\u0E30-\u0E3A\u0E47-\u0E4E\u0EB1-\u0EBC\u0EC8-\u0ECD")
_L = JLETTER + _LETTER_EXTRA
_D = JDIGIT + r"\u07C0-\u07C9"
_SPACE = r" \t\u00A0\u2000-\u200A\u3000"
_NL_CHARS = r"\r\n\u2028\u2029\u000B\u000C\u0085"

# --- Macros (regular expressions, each a group) --------------------------------------------------------------
SPLET = r"(?:&[aeiouAEIOU](?i:acute|grave|uml);)"
LETTER = rf"(?:[{_L}]|{SPLET})"
LETDIG = rf"(?:[{_L}{_D}]|{SPLET})"
DIGIT = rf"[{_D}]"
NEWLINE = r"(?:\r\n|[\r\n\u2028\u2029\u000B\u000C\u0085])"
SPACENL = rf"[{_SPACE}{_NL_CHARS}]"
SGML = (r"(?:<(?:[!?][A-Za-z\-][^>\r\n]*|[A-Za-z][A-Za-z0-9_:.\-]*(?:[ ]+(?:[A-Za-z][A-Za-z0-9_:.\-]*|"
        r"[A-Za-z][A-Za-z0-9_:.\-]*[ ]*=[ ]*(?:'[^']*'|\"[^\"]*\")))*[ ]*/?|/[A-Za-z][A-Za-z0-9_:.\-]*)[ ]*>)")
SENTEND = rf"(?:{SPACENL}(?:{SPACENL}|{JUPPER}|{SGML}))"
NUM = rf"(?:{DIGIT}+|{DIGIT}*(?:[.:,\u00AD\u066B\u066C]{DIGIT}+)+)"
APOS = r"(?:['\u0092\u2019]|(?i:&apos;))"
APOSETC = rf"(?:{APOS}|[`\u0091\u2018\u201B])"
WORD = rf"(?:{LETTER}{LETDIG}*(?:[.!?]{LETTER}{LETDIG}*)*)"
REDAUX = rf"(?:{APOS}(?:[msdMSD]|(?i:re|ve|ll)))"
SWORD = r"(?:[A-Za-z\u00AD]*[A-MO-Za-mo-z]\u00AD*)"
SREDAUX = rf"(?:(?i:n){APOSETC}(?i:t))"
HYPHEN = r"[\-_\u058A\u2010\u2011]"
_LD = rf"[{JLETTER}{JDIGIT}]"  # plain Java letter-or-digit, without LETTER's additions
THING = rf"(?:(?:[dDoOlL]{APOSETC}{_LD})?{_LD}+(?:{HYPHEN}(?:[dDoOlL]{APOSETC}{_LD})?{_LD}+)*)"
THINGA = r"(?:[A-Z]+(?:(?:[+&]|(?i:&amp;))[A-Z]+)+)"
THING3 = r"(?:[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}(?:\\?/[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}){1,2})"
_ACRO_SPECIAL = r"(?i:canada|sino|korean|eu|japan|non)-(?i:u\.s)|(?i:u\.s\.-)(?:(?i:u\.k)|(?i:u\.s\.s\.r))"
ACRO = rf"(?:[A-Za-z](?:\.[A-Za-z])*|{_ACRO_SPECIAL})"
ACRO2 = rf"(?:[A-Za-z](?:\.[A-Za-z])+|{_ACRO_SPECIAL})"
HTHING = rf"(?:[A-Za-z0-9][A-Za-z0-9.,\u00AD]*(?:-(?:[A-Za-z0-9\u00AD]+|{ACRO2}\.))+)"
APOWORD = (rf"(?:{APOS}(?i:n){APOS}?|[lLdDjJ]{APOS}|(?i:dunkin){APOS}|(?i:somethin){APOS}|(?i:ol){APOS}"
           rf"|{APOS}(?i:em)|[A-HJ-XZn]{APOSETC}{JLETTER}{{2,}}|{APOS}[2-9]0(?i:s)|{APOS}(?i:till?)"
           rf"|{JLETTER}+[aeiouyAEIOUY]{APOSETC}[aeiouA-Z]{JLETTER}*|{APOS}(?i:cause)|(?i:cont'd)\.?"
           r"|(?i:'twas|nor'easter|c'mon|e'er|s'mores|ev'ry|li'l|nat'l)|(?i:o)" + APOSETC + r"(?i:o))")
FULLURL = r"(?:(?i:https?)://[^ \t\n\f\r\"<>|(){}]+[^ \t\n\f\r\"<>|.!?(){},\-])"
# `,-_` in the scanner's class is a range (0x2C-0x5F: digits, upper case, `./:;<=>?@[\]^`), kept as such.
LIKELYURL = (r"(?:(?:(?i:www)\.(?:[^ \t\n\f\r\"<>|.!?(){},]+\.)+[a-zA-Z]{2,4}"
             r"|(?:[^ \t\n\f\r\"`'<>|.!?(){}\x2C-\x5F$]+\.)+(?i:com|net|org|edu))"
             r"(?:/[^ \t\n\f\r\"<>|()]+[^ \t\n\f\r\"<>|.!?(){},\-])?)")
EMAIL = (r"(?:(?:(?i:&lt;)|<)?[a-zA-Z0-9][^ \t\n\f\r\"<>|()\u00A0{}]*@(?:[^ \t\n\f\r\"<>|(){}.\u00A0]+\.)*"
         r"[^ \t\n\f\r\"<>|(){}.\u00A0]+(?:(?i:&gt;)|>)?)")
TWITTER = rf"(?:@[a-zA-Z_][a-zA-Z_0-9]*|#{LETTER}+)"
DATE = rf"(?:{DIGIT}{{1,2}}[\-/]{DIGIT}{{1,2}}[\-/]{DIGIT}{{2,4}})"
FRAC = rf"(?:(?:{DIGIT}{{1,4}}[\- \u00A0])?{DIGIT}{{1,4}}(?:\\?/|\u2044){DIGIT}{{1,4}})"
FILENAME_EXT = (r"(?i:bat|bmp|c|class|cgi|cpp|dll|doc|docx|exe|gif|gz|h|htm|html|jar|java|jpeg|jpg|mov|mp3|pdf"
                r"|php|pl|png|ppt|ps|py|sql|tar|txt|wav|x|xml|zip)")
FILENAME = rf"(?:{LETDIG}+(?:\.{LETDIG}+)*\.{FILENAME_EXT})"
# Abbreviations; an upper-case letter in brackets is the scanner's case-sensitive first letter.
_ABBREV1_WORDS = (
    r"(?i:jan|feb|mar|apr|jun|jul|aug|sep|sept|oct|nov|dec|mon|tue|tues|wed|thu|thurs|fri"
    r"|ala|ariz|calif|colo|conn|ct|dak|fla|ga|ind|kans?|ky|md|mich|minn|mo|mont|neb|nev|okla|penn|tenn|va|vt"
    r"|wisc?|wyo|inc|cos?|corp|ltd|plc|rt|bancorp|bhd|assn|univ|intl|sys|tel|est|ext|sq|jr|sr|bros"
    r"|(?:ed|ph)\.d|blvd|rd|esq|etc|al|seq|bldg)"
    r"|A(?i:z)|A(?i:rk)|D(?i:el)|I(?i:ll)|L(?i:a)|M(?i:ass)|M(?i:iss)|O(?i:re)|P(?i:a)|T(?i:ex)|W(?i:ash)"
    r"|(?i:pp?t)[ye](?i:s?)")
ABBREV1 = rf"(?:(?:{_ABBREV1_WORDS})\.)"
_ABTITLE = (r"(?i:mr|mrs|ms|drs?|profs?|sens?|reps?|attys?|lt|col|gen|messrs|govs?|adm|rev|maj|sgt|cpl|pvt|capt"
            r"|ste?|ave|pres|lieut|hon|brig|co?mdr|pfc|spc|supts?|det|mt|ft|adj|adv|asst|assoc|ens|insp|mlle"
            r"|mme|msgr|sfc)|M(?i:iss)")
_ABCOMP2 = r"(?i:invt|elec|natl|dept)|(?i:m)[ft](?i:g)"
ABBREV4 = rf"(?:{_ABTITLE}|(?i:vs|alex|wm|jos|cie|a\.k\.a|cf|treas|ph)|{ACRO}|{_ABCOMP2})"
ABBREV3 = r"(?:(?i:ca|figs?|prop|nos?|art|bldg|pp|op)\.)"
_ACRONYM_NEXT = ("About|According|Additionally|After|An|A|As|At|But|Earlier|He|Her|Here|However|If|In|It|Last"
                 "|Many|More|Mr\\.|Ms\\.|Now|Once|One|Other|Our|She|Since|So|Some|Such|That|The|Their|Then"
                 "|There|These|They|This|We|When|While|What|Yet|You")
# Only the first letter of these words is case-sensitive in the scanner.
ACRONYM_NEXT = "(?:" + "|".join(f"{w[0]}(?i:{w[1:]})" if len(w) > 1 else w for w in _ACRONYM_NEXT.split("|")) + ")"
PHONE = (r"(?:(?:\([0-9]{2,3}\)[ \u00A0]?|(?:\+\+?)?(?:[0-9]{2,4}[\- \u00A0])?[0-9]{2,4}[\- \u00A0])[0-9]{3,4}"
         r"[\- \u00A0]?[0-9]{3,5}|(?:(?:\+\+?)?[0-9]{2,4}\.)?[0-9]{2,4}\.[0-9]{3,4}\.[0-9]{3,5})")
INSENTP = r"[,;:\u3001]"
QUOTES = (rf"(?:{APOS}|''|[`\u2018\u2019\u201A\u201B\u201C\u201D\u0091\u0092\u0093\u0094\u201E\u201F\u2039\u203A"
          r"\u00AB\u00BB]{1,2})")
DBLQUOT = r"(?:\"|(?i:&quot;))"
TBSPEC = (r"(?:-(?i:rrb|lrb|rcb|lcb|rsb|lsb)-|(?i:c\.d\.s|pro-|anti-)|(?i:s)(?:&|(?i:&amp;))(?i:p-500)"
          rf"|(?i:s)(?:&|(?i:&amp;))(?i:ls)|(?i:cap){APOS}(?i:n)|(?i:c){APOS}(?i:est))")
SMILEY = r"(?:[<>]?[:;=][\-o*']?[()DPdpO\\{@|\[\]])"
ASIANSMILEY = (r"(?:[\^x=~<>]\.\[\^(?i:x)=~<>\]|[\-\^x=~<>']_[\-\^x=~<>']|\([\-\^x=~<>'][_.]?[\-\^x=~<>']\)"
               r"|\([\^x=~<>']-[\^x=~<>'`]\))")
MISCSYMBOL = (r"[+%&~\^|\\\u00A6\u00A7\u00A8\u00A9\u00AC\u00AE\u00AF\u00B0-\u00BA\u00D7\u00F7\u0387\u05BE\u05C0"
              r"\u05C3\u05C6\u05F3\u05F4\u0600-\u0603\u0606-\u060A\u060C\u0614\u061B\u061E\u066A\u066D"
              r"\u0703-\u070D\u07F6-\u07F8\u0964\u0965\u0E4F\u1FBD\u2016\u2017\u2020-\u2023\u2030-\u2038\u203B"
              r"\u203E-\u2042\u2044\u207A-\u207F\u208A-\u208E\u2100-\u214F\u2190-\u21FF\u2200-\u2BFF\u3012\u30FB"
              r"\uFF01-\uFF0F\uFF1A-\uFF20\uFF3B-\uFF40\uFF5B-\uFF65]")


def _h(pattern: str) -> str:
  """The part of a trailing-context rule that becomes the token."""
  return f"(?P<h>{pattern})"


# (regular expression, action). A rule with a group `h` has trailing context: the whole match counts for the
# longest-match choice, the token is `h`. Actions are in `_act`.
_RULES: List[Tuple[str, str]] = [
    (r"(?i:c)\+\+", "keep"),
    (r"(?i:c|f)#", "keep"),
    (r"(?i:cannot)", "push3"),
    (r"(?i:'twas)", "push3"),
    (r"(?i:'tis)", "push2"),
    (r"(?i:gonna|gotta|lemme|gimme|wanna)", "push2"),
    (SGML, "sgml"),
    (r"(?:&(?i:md|mdash|ndash);|[\u0096\u0097\u2013\u2014\u2015])", "dash"),
    (r"(?i:&amp;)", "amp"),
    (r"&(?i:ht|tl|ur|lr|qc|ql|qr|odq|cdq|#[0-9]+);", "keep"),
    (_h(WORD) + REDAUX, "soft"),
    (_h(SWORD) + SREDAUX, "soft"),
    (WORD, "soft"),
    (APOWORD, "keep"),
    (_h(rf"(?i:y){APOS}") + JLETTER, "keep"),
    (FULLURL, "keep"),
    (LIKELYURL, "keep"),
    (EMAIL, "keep"),
    (TWITTER, "keep"),
    (_h(REDAUX) + "[^A-Za-z]", "quote_right"),
    (_h(SREDAUX) + "[^A-Za-z]", "quote_right"),
    (DATE, "keep"),
    (rf"[\-+]?{NUM}", "soft"),
    (r"[\u207A\u207B\u208A\u208B]?(?:[\u2070\u00B9\u00B2\u00B3\u2074-\u2079]+|[\u2080-\u2089]+)", "keep"),
    (FRAC, "nbsp"),
    (r"[\u00BC\u00BD\u00BE\u2153-\u215E]", "fraction"),
    (TBSPEC, "amp"),
    (THING3, "keep"),
    (r"(?:[A-Z]*\$|#)", "keep"),
    (r"[\u00A2\u00A3\u00A4\u00A5\u0080\u20A0\u20AC\u060B\u0E3F\u20A4\uFFE0\uFFE1\uFFE5\uFFE6]", "currency"),
    (_h(rf"{ACRO}\.") + rf"{SPACENL}+(?:{ACRONYM_NEXT}|{SGML}){SPACENL}", "acronym"),
    (_h(ABBREV3) + rf"{SPACENL}?{JDIGIT}", "keep"),
    (_h(r"(?:(?i:pt)[eyEY]|(?i:co))\.") + rf"[{_SPACE}](?i:ltd|lim)", "keep"),
    (_h(ABBREV1) + SENTEND, "period_again"),
    (_h(ABBREV1) + r"[\s\S][\s\S]", "keep"),
    (ABBREV1, "period_again"),
    (rf"{ABBREV4}\.", "keep"),
    (_h(ABBREV4) + f"[{_SPACE}]", "keep"),
    (_h(ACRO) + SPACENL, "keep"),
    (_h(r"{APOS}[0-9][0-9]".replace("{APOS}", APOS)) + SPACENL, "keep"),
    (_h(FILENAME) + rf"(?:{SPACENL}|[.?!,])", "keep"),
    (_h(rf"{WORD}\.") + INSENTP, "soft"),
    (PHONE, "phone"),
    (_h(DBLQUOT) + r"[A-Za-z0-9$]", "quote_left"),
    (DBLQUOT, "quote_right"),
    (r"\x7f", "skip"),
    (r"<|(?i:&lt;)", "lt"),
    (r">|(?i:&gt;)", "gt"),
    (_h(SMILEY) + r"[^A-Za-z0-9]", "parens"),
    (ASIANSMILEY, "parens"),
    (r"[{}\[\]()]", "bracket"),
    (r"-+", "hyphens"),
    (r"(?:\.{3,5}|(?:\.[ \u00A0]){2,4}\.|[\u0085\u2026])", "ellipsis"),
    (r"(?:@+|#+|_+)", "keep"),
    (r"(?:\*+|(?:\\\*){1,3})", "keep"),
    (INSENTP, "keep"),
    (r"[?!]+", "keep"),
    (r"[.\u00A1\u00BF\u037E\u0589\u061F\u06D4\u0700-\u0702\u07FA\u3002]", "keep"),
    (r"=", "keep"),
    (r"/", "keep"),
    (_h(rf"{HTHING}\.") + INSENTP, "soft"),
    (HTHING, "soft"),
    (_h(rf"{THING}\.") + INSENTP, "keep"),
    (THING, "keep"),
    (_h(rf"{THINGA}\.") + INSENTP, "amp"),
    (THINGA, "amp"),
    (_h("'") + r"[A-Za-z][^ \t\n\r\u00A0]", "quote_left"),
    (REDAUX, "quote_right"),
    (SREDAUX, "quote_right"),
    (QUOTES, "quote_right"),
    (r"<<|>>", "keep"),
    (MISCSYMBOL, "keep"),
    (rf"\x00|[{_SPACE}]+|[\u200B\u200E\u200F\uFEFF]", "skip"),
    (NEWLINE, "newline"),
    (r"(?i:&nbsp;)", "skip"),
    (r".", "skip"),  # "untokenizable": the jar deletes it (and logs the first one)
]

_BRACKETS = {"(": "-LRB-", ")": "-RRB-", "[": "-LSB-", "]": "-RSB-", "{": "-LCB-", "}": "-RCB-"}
_FRACTIONS = {"\u00BC": "1/4", "\u00BD": "1/2", "\u00BE": "3/4", "\u2153": "1/3", "\u2154": "2/3"}
_AMP = regex.compile(r"&[aA][mM][pP];")
_NEWLINE_TOKEN = "\n"


def _caseless(pattern: str) -> str:
  r"""`pattern` with each `(?i:...)` group's letters spelled as classes (`(?i:ab)` -> `(?:[aA][bB])`).

  The `regex` module mis-matches some alternations that mix scoped case-insensitive groups with negated classes
  (`(?:(?i:www)x|[^.]+\.org)` misses `example.org`), so the scoped flag is never handed to it.
  """
  out, i = [], 0
  while i < len(pattern):
    if not pattern.startswith("(?i:", i):
      out.append(pattern[i])
      i += 1
      continue
    out.append("(?:")
    i += 4
    depth = 1
    while depth:
      c = pattern[i]
      if c == "\\":
        out.append(pattern[i:i + 2])
        i += 2
        continue
      if c == "[":
        end = pattern.index("]", i + 1)
        out.append(pattern[i:end + 1])
        i = end + 1
        continue
      depth += {"(": 1, ")": -1}.get(c, 0)
      out.append(f"[{c.lower()}{c.upper()}]" if c.isascii() and c.isalpha() else c)
      i += 1
  return "".join(out)


@functools.lru_cache(maxsize=1)
def _compiled():
  # POSIX (leftmost-longest) matching: JFlex takes each rule's longest match, Python's default is leftmost-first.
  return [(regex.compile(_caseless(p), regex.POSIX | regex.V1), a) for p, a in _RULES]


def _quotes(token: str, probably_left: bool) -> str:
  """The scanner's LaTeX quote normalisation."""
  if probably_left:
    token = token.replace("&apos;", "`").replace("'", "`").replace('"', "``").replace("&quot;", "``")
  else:
    token = token.replace("&apos;", "'").replace("'", "'").replace('"', "''").replace("&quot;", "''")
  for chars, out in (("\u0091\u2018\u201B\u2039", "`"), ("\u0092\u2019\u203A", "'"),
                     ("\u0093\u201C\u00AB", "``"), ("\u0094\u201D\u00BB", "''")):
    for c in chars:
      token = token.replace(c, out)
  return token


def _soft(token: str) -> str:
  """Soft hyphens are dropped from words (a token of only soft hyphens becomes `-`)."""
  return token.replace("\u00AD", "") or "-"


def _act(action: str, token: str) -> Tuple[str, int]:
  """(output token or "" for none, number of characters consumed) for a rule's matched token."""
  if action == "keep":
    return token, len(token)
  if action == "soft":
    return _soft(token), len(token)
  if action in ("push2", "push3"):
    kept = token[:len(token) - int(action[-1])]
    return kept, len(kept)
  if action == "sgml" or action == "nbsp":
    return token.replace(" ", "\u00A0"), len(token)
  if action == "dash":
    return "--", len(token)
  if action == "amp":
    return _AMP.sub("&", token), len(token)
  if action == "quote_left":
    return _quotes(token, True), len(token)
  if action == "quote_right":
    return _quotes(token, False), len(token)
  if action == "fraction":
    return "".join(_FRACTIONS.get(c, c) for c in token), len(token)
  if action == "currency":
    return token.replace("\u00A2", "cents").replace("\u00A3", "#").translate(
        {0x80: "$", 0xA4: "$", 0x20A0: "$", 0x20AC: "$"}), len(token)
  if action == "acronym":
    if len(token) == 2:  # "I." before "The": the letter, then the period as its own token
      return token[0], 1
    return token, len(token) - 1  # the acronym with its period, then the period again
  if action == "period_again":
    return token, len(token) - 1
  if action == "phone":
    return token.replace(" ", "\u00A0").replace("(", "-LRB-").replace(")", "-RRB-"), len(token)
  if action == "lt":
    return "<", len(token)
  if action == "gt":
    return ">", len(token)
  if action == "parens":
    return token.replace("(", "-LRB-").replace(")", "-RRB-"), len(token)
  if action == "bracket":
    return _BRACKETS[token], len(token)
  if action == "hyphens":
    return ("--" if 3 <= len(token) <= 4 else token), len(token)
  if action == "ellipsis":
    return "...", len(token)
  if action == "newline":
    return _NEWLINE_TOKEN, len(token)
  if action == "skip":
    return "", len(token)
  raise AssertionError(action)


def _utf16_units(text: str) -> str:
  """`text` with each character outside the BMP as its two surrogate code units, as Java sees it."""
  if all(ord(c) < 0x10000 for c in text):
    return text
  out = []
  for c in text:
    code = ord(c)
    if code < 0x10000:
      out.append(c)
    else:
      code -= 0x10000
      out.append(chr(0xD800 + (code >> 10)) + chr(0xDC00 + (code & 0x3FF)))
  return "".join(out)


def _from_utf16_units(token: str) -> str:
  return token.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


@functools.lru_cache(maxsize=None)
def _rules_starting_with(char: str):
  """The rules whose match can begin with `char` (a speed-up only: the others cannot match there)."""
  return [(p, a) for p, a in _compiled() if p.match(char, partial=True) is not None]


def scan(text: str) -> List[Tuple[str, int, int]]:
  """The scanner's tokens of `text` as (token, start, end) in UTF-16 units, before lower-casing; a newline
  token is "\\n"."""
  tokens = []
  pos = 0
  while pos < len(text):
    best_len, best = 0, None
    for pattern, action in _rules_starting_with(text[pos]):
      match = pattern.match(text, pos)
      if match is not None and match.end() - pos > best_len:
        best_len, best = match.end() - pos, (match, action)
    match, action = best
    head = match.group("h") if "h" in match.re.groupindex else match.group()
    token, consumed = _act(action, head)
    if token:
      tokens.append((token, pos, pos + consumed))
    pos += consumed
  return tokens


def _finish_line(tokens: Sequence[str]) -> str:
  """pycocoevalcap's handling of one output line of the jar: lower-case, join, strip, drop punctuation."""
  line = " ".join(_from_utf16_units(t).lower() for t in tokens)
  return " ".join(w for w in line.rstrip().split(" ") if w not in PUNCTUATIONS)


def tokenize(captions: Iterable[str]) -> List[str]:
  """pycocoevalcap's `PTBTokenizer().tokenize` of these captions, in this order, one string per caption.

  Args:
    captions: raw captions (str), in the order pycocoevalcap would write them (all references of a set in
      one call, all candidates in another).
  Returns:
    For each caption its lower-cased PTB tokens without punctuation, joined by single spaces.
  """
  captions = [_utf16_units(c.replace("\n", " ")) for c in captions]
  if not captions:
    return []
  text = "\n".join(captions)
  # Where each caption's joining newline is: only those start a new caption.
  boundaries, offset = set(), 0
  for caption in captions[:-1]:
    offset += len(caption)
    boundaries.add(offset)
    offset += 1
  results: List[str] = []
  pieces: List[str] = []
  line: List[str] = []
  for token, start, end in scan(text):
    if token == _NEWLINE_TOKEN:
      pieces.append(_finish_line(line))
      line = []
      if any(b in boundaries for b in range(start, end)):  # a newline token spans 1 or 2 units
        results.append(" ".join(pieces))
        pieces = []
    else:
      line.append(token)
  pieces.append(_finish_line(line))
  results.append(" ".join(pieces))
  return results
