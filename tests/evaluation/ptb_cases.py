"""The caption cases on which the Python PTB tokenizer is checked against pycocoevalcap's Java tokenizer.

`python -m tests.evaluation.ptb_cases` (needs Java and pycocoevalcap) reruns the jar on them and rewrites
`data/ptb_java_outputs.json`, which `test_ptb_tokenizer.py` reads. The cases are what captioning models and
annotators write, by category: ordinary captions and punctuation, `&` names and HTML entities, signed and
leading-dot numbers, currency and fraction symbols, emoji and invisible characters, combining accents, tags,
handles, URLs, times and numbering, clitics, abbreviations, quotes, dashes, brackets and markup, smileys.
Each fragment is also placed inside and at the end of a sentence, because the Java lexer looks at what follows
a token (`U.S. The` vs `u.s. the`), and the cases run as one batch as pycocoevalcap runs them, so the end of
one caption sees the start of the next.
"""
import json
import os
import pathlib
import subprocess
import sys
import tempfile
from typing import Dict, List

DATA = pathlib.Path(__file__).parent / "data" / "ptb_java_outputs.json"

ORDINARY = [
    "A man riding a wave on top of a surfboard.",
    "a tennis player swinging a racket at a ball .",
    "A LARGE GROUP OF PEOPLE STANDING AROUND .",
    "Two people are sitting on a bench, watching the sunset.",
    "A kitchen with stainless steel appliances and granite counter tops",
    "There's a sign that reads \"STOP\" on the corner.",
    "A young girl, wearing a pink dress, is jumping on the bed.",
    "Three men (two in suits) stand near a 4-door car.",
    "A plate of food: rice, beans and chicken.",
    "The woman's umbrella is open; it's raining.",
    "An old man with a cane walks his dog in the park at 7 a.m.",
    "A dog catches a frisbee in mid-air!",
    "Is this a cat? No, it's a dog.",
    "Someone's hand holding a smartphone showing the time 12:45.",
    "A crowd watches fireworks over the city... beautiful!",
    "The sign says 'No Parking' in red letters.",
    "two giraffes standing next to each other in a zoo enclosure .",
    "A bowl of soup, a sandwich, and a glass of water on a wooden table.",
    "Baseball player #23 swings at the pitch",
    "A surfer rides a 10-foot wave at Mavericks, California.",
    "Children's toys are scattered across the floor",
    "The bus is heading to downtown via 5th Ave.",
    "A black-and-white photo of Mr. Smith's car in the U.S.",
    "He doesn't know, can't go, won't stop. I'm here, you're there; they've gone, we'll see, she'd say.",
    "The price is $3.50 or 1,000 yen -- 50% off & more.",
    "A cat/dog on a [red] {blue} couch: nice?",
    "Cannot believe it's 3:30 p.m. already",
    "A t-shirt that says 'hi' and ``quoted'' text",
    "Gonna wanna gotta lemme gimme",
    "A man's hat and the boys' hats",
    "What?! Wow!! Really?? ok!?",
    "It costs 5$ and 10%.",
    "St. Louis and Dr. Who vs. Mr Bean etc.",
    "No. 5 and Fig. 3 and fig 4",
    "the answer is no.",
    "hello- -hello a -- b - c",
    "(1,2),(3,4)",
    "it\u2019s a dog\u2019s \u201cfavorite\u201d toy\u2026",
    "a man \u2013 with a hat \u2014 walks",
    "A person.With no space",
    "**MME (Qwen-VL-Chat)**",
    "---",
    "",
    "   ",
    "a  man\twith   spaces  ",
    "...",
    "!?",
    "A bathroom with a toilet, sink, and mirror.",
    "a red double decker bus driving down a street",
    "Zebras grazing; one looks up.",
    "A pizza cut into 8 slices sits on a pan.",
    "Is it raining?Yes.",
    "a cat,a dog,and a bird",
    "the end.The start",
    "Two dogs.Three cats.",
    "I think so.",
    "The letter I. A dog runs.",
    "Plan B. The team won.",
    "The U.S. The flag waves.",
    "He lives in the U.S. and Canada.",
    "Made in the U.K.",
    "It was 5 p.m. The sun set.",
    "Sign: OPEN 24/7",
    "A sign reading 'WELCOME TO L.A.'",
    "A man in a suit (and tie).",
    "The score is 3-2.",
    "Route 66; mile 12.5",
    "A 2x4 board",
    "The 1990s and the '80s and 90's",
    "an apple, a banana, etc., on a table",
    "e.g. a cat, i.e. a pet",
    "Mt. Fuji at dawn",
    "Sept. 11 memorial",
    "Jan. 1st, 2020",
    "Calif. beaches",
    "Smith Inc. and Jones Co. Ltd. and Acme Corp.",
    "Pty. Ltd. company",
    "Prof. X and Sen. Y",
    "a.k.a. the boss",
    "cf. figure",
    "approx. 5 kg",
    "vs. the world",
    "op. cit.",
    "The dog's name is Rex.",
    "It's 10 o'clock.",
    "An O'Neil sign",
    "Ma'am, yes ma'am.",
]

# Fragments placed in three contexts each: alone, inside a sentence, and before a full stop.
FRAGMENTS = [
    # capitalised & names and entities
    "AT&T", "at&t", "B&W", "b&w", "R&D", "Q&A", "S&P", "S&P-500", "AT&T's", "A&W", "Tom & Jerry",
    "rock&roll", "AT&amp;T", "&amp;", "&AMP;", "&lt;", "&gt;", "&quot;hi&quot;", "&apos;", "&nbsp;", "&#39;",
    "&#8217;", "&mdash;", "&ndash;", "&eacute;", "caf&eacute;", "&copy;", "&hellip;", "&", "&&", "AT & T",
    "M&Ms", "H&M", "P&G", "C&A", "PB&J", "A+B", "A+", "B+", "C+", "c+",
    # numbers
    "-5", ".5", "+1", "-0.5", "+3.14", "0.5", "1,000,000", "3.14", "-40", "+/-", "1/2", "1 1/2", "3/4",
    "10-20", "5-year-old", "2nd", "3rd", "1st", "21st", "1990s", "'90s", "90's", "12:30", "5:30pm",
    "5:30 pm", "5pm", "5 p.m.", "No.1", "No. 1", "no.1", "#1", "# 1", "100%", "50/50", "3x", "x3",
    "555-1234", "(555) 555-1234", "555.555.1234", "+1 650 555 1234", "12/25/2020", "2020-01-01", "v1.2.3",
    "1.2.3", "4.5.6.7", "1:2", "3:1", "1-0", "100m", "2.5m", "4km", "10kg", "1.5L", "$5.99", "5.", "5..",
    "0", "007", "1e5", "6'2\"", "5'", "10\"", "1,5", "1.000", "99.9%", "-", "+", "--5", "- 5", "(5)", "[5]",
    ".45 caliber", "3.", ".", "x.5", "A4", "B-52", "F-16", "COVID-19", "M4A1", "R2-D2", "C-3PO",
    # currency and fractions
    "€5", "£10", "¥100", "5¢", "¢", "US$5", "$5", "5$", "€", "£", "¥", "₹500", "₩1000", "₽", "$",
    "½", "1½", "¼", "¾", "⅓", "⅔", "⅛", "2¼ cups", "C$10", "A$", "HK$5",
    # emoji and invisible characters
    "\U0001F600", "\U0001F436 dog", "dog \U0001F436", "I \u2764\ufe0f NY", "\u2764", "\u263a", "\u2713",
    "\u2714 done", "a\u200bb", "zero\u200bwidth", "a\u200db", "soft\u00adhyphen", "\ufeffbom", "non\u00a0breaking",
    "narrow\u202fspace", "\u2060joiner", "thumbs \U0001F44D\U0001F3FD", "\U0001F1FA\U0001F1F8 flag",
    "a\u00adb", "\u00ad", "tab\there", "\u3000ideographic", "x\u2009y", "dog\U0001F415", "\u2605 star",
    "\u2192 arrow", "\u2022 bullet", "\u00b7 dot", "\u00a9 2020", "\u00ae", "\u2122", "\u00b0C", "25\u00b0",
    "x\u00b2", "5\u00d73", "6\u00f72", "\u00a7 3", "\u00b6", "\u2020", "\u00bf", "\u00a1", "\u221e",
    "\u2190", "\u25b2", "\u2665", "\u266a music", "\u20ac\u20ac", "\x7f", "a\x01b", "\u0085",
    # combining accents and other scripts
    "cafe\u0301", "caf\u00e9", "Cafe\u0301 au lait", "nai\u0308ve", "re\u0301sume\u0301", "\u00c5ngstr\u00f6m",
    "Zo\u00eb", "\u00bfQu\u00e9?", "\u00a1Hola!", "Stra\u00dfe", "\u0391\u03b8\u03ae\u03bd\u03b1", "\u041c\u043e\u0441\u043a\u0432\u0430",
    "\u732b", "\u732b\u548c\u72d7", "\u3002", "\u0627\u0644\u0642\u0637", "\u0939\u093f\u0928\u094d\u0926\u0940", "e\u0301", "\u0301",
    "n\u0303", "\u00f1and\u00fa", "S\u00e3o Paulo", "M\u00fcller", "\u0130stanbul", "\u00c9COLE", "\u0152uvre",
    "\u1e9e", "\u0237", "\u01c5", "\u02bcokina", "\u0130", "\u03a3\u039f\u03a3",
    # tags, handles, code, URLs
    "#tag", "#Tag", "#1tag", "#hash_tag", "##", "@user", "@User_1", "@1user", "@", "user@example.com",
    "foo@bar.com", "John.Smith@Example.COM", "C++", "c++", "C#", "c#", "F#", "J#", ".NET", "Node.js",
    "http://example.com", "https://example.com/a?b=c&d=e", "http://x.co/a.", "HTTP://EXAMPLE.COM",
    "www.google.com", "WWW.GOOGLE.COM", "google.com", "Google.com", "example.org/path", "site.net.",
    "image.jpg", "IMAGE.JPG", "photo.png", "a_b.py", "file.txt", "readme.md", "index.html", "3.x",
    "snake_case", "__init__", "_", "a_b", "a/b", "a\\b", "a|b", "a=b", "a==b", "a->b", "a=>b", "a~b", "~",
    "^", "*", "**", "***", "a*b", "<b>bold</b>", "<br/>", "<br />", "<p class='x'>", "<!-- c -->", "<3",
    "a<b", "a > b", "<<", ">>", "<", ">", "->", "<-", "x86_64", "a.b.c", "U.S.A.", "u.s.a", "A.I.",
    # times and numbering
    "5:30pm", "5.30pm", "10am", "10 AM", "10:00 a.m.", "No.1", "No.", "no.", "Nos. 3", "nos. 4", "Fig. 2",
    "fig.2", "p. 5", "pp. 5", "Vol.2", "Ch. 3", "Ex. 1", "ca. 1900", "Art. 5", "Op. 9", "tel. 555", "ext. 4",
    "sq. ft.", "est. 1990",
    # clitics and apostrophes
    "'em", "'Em", "'til", "'till", "til", "y'know", "Y'know", "y'all", "Y'all", "ya'll", "'tis", "'Tis",
    "'twas", "'Twas", "rock 'n' roll", "rock 'n roll", "rock n' roll", "ma'am", "o'clock", "O'Neil",
    "O'Reilly", "don't", "DON'T", "Don't", "can't", "CAN'T", "won't", "ain't", "shan't", "couldn't've",
    "I'd've", "'cause", "'Cause", "cause", "gonna", "Gonna", "GONNA", "gotta", "cannot", "Cannot", "CANNOT",
    "cont'd", "li'l", "ol'", "nor'easter", "c'mon", "C'mon", "d'Artagnan", "l'amour", "L'Oreal", "ne'er",
    "e'er", "dunkin'", "Dunkin'", "somethin'", "nothin'", "goin'", "'bout", "'round", "'n'", "it's", "It'S",
    "IT'S", "I'M", "we're", "WE'RE", "they've", "you'll", "he'd", "she's", "let's", "Let's", "James'",
    "boss's", "boys'", "'s", "'", "''", "'''", "s'mores", "ev'ry", "nat'l", "O'o", "Ol'", "i'll", "I'll",
    "who'd", "y'", "'90", "'a", "don\u2019t", "it\u2019s", "y\u2019know", "\u2019em", "\u2018til",
    "rock \u2019n\u2019 roll", "d'oh", "Hawai'i", "don`t", "it`s", "can't've", "wouldn't", "needn't", "N'T",
    "doesn\u2019t", "isn't", "o'er", "'tween", "'em'", "c'est", "Cap'n", "cap'n",
    # abbreviations
    "Mr.", "MR.", "mr.", "Mrs.", "Ms.", "Dr.", "DR.", "St.", "Jr.", "Sr.", "Inc.", "Co.", "Ltd.", "etc.",
    "Etc.", "U.S.", "u.s.", "U.K.", "e.g.", "E.G.", "i.e.", "vs.", "VS.", "a.m.", "A.M.", "p.m.", "P.M.",
    "Jan.", "Feb.", "Mon.", "Ave.", "Blvd.", "Rd.", "Ph.D.", "Ph.D", "Esq.", "Gov.", "Gen.", "Lt.", "Capt.",
    "Sgt.", "Rev.", "Hon.", "Fig.", "Dept.", "Univ.", "Calif.", "Mass.", "MASS.", "Pa.", "PA.", "Wash.",
    "Tex.", "Ill.", "Ala.", "al.", "et al.", "seq.", "Bldg.", "Pty.", "Mt.", "Ft.", "Cie.", "Mlle.", "Mme.",
    "Wm.", "Jos.", "Alex.", "a.k.a.", "cf.", "TREAS.", "Ph.", "I.", "A.", "Z.", "x.", "C.D.s", "pro-",
    "anti-", "non-U.S.", "U.S.-U.K.", "Mrs", "Dr", "approx.", "max.", "min.", "misc.",
    # quotes
    "\"quoted\"", "'single'", "``latex''", "\u201ccurly\u201d", "\u2018curly\u2019", "\u00abguillemets\u00bb",
    "\u201elow\u201c", "\u201alow\u2019", "\u2039angle\u203a", "\"", "\"\"", "\" spaced \"", "'x", "x'",
    "\"5\"", "\"$5\"", "\"a", "a\"", "\u201c", "\u201d", "`", "``", "\u201f", "\u201b",
    # dashes and ellipses
    "-", "--", "---", "----", "-----", "\u2014", "\u2013", "\u2015", "\u2010", "\u2011", "\u2012", "a-b",
    "a--b", "a---b", "a\u2014b", "a\u2013b", "a\u2010b", "ice-cream", "x-ray", "X-Ray", "T-shirt",
    "e-mail", "self-driving", "state-of-the-art", "-ish", "pre-", "re-", "...", "....", ".....", "......",
    ". . .", ". . . .", "\u2026", "wait...", "wait\u2026what", "a...b", "..a", "?!?", "!!!", "???",
    # brackets and smileys
    "(a)", "[a]", "{a}", "(a", "a)", "((a))", ":)", ":-)", ":(", ":-(", ";)", ";-)", ":D", ":P", ":p",
    "=)", ":o)", ":]", "<3", "</3", "^_^", "-_-", "T_T", "o_O", "O_o", "xD", "XD", ":'(", ":/", ":-/",
    "(^_^)", "(-_-)", ":*", ";D", ":|", "\u00ac_\u00ac", ">:(", "<:)",
    # symbols
    "+", "%", "&", "~", "^", "|", "\\", "=", "/", "//", "\\\\", "@@", "##", "__", "***", "+++", "%%",
    "a+b=c", "1+1=2", "2*3", "2^3", "x/y", "and/or", "w/", "w/o", "A/B", "24/7", "1/2/3", "a/b/c/d",
]

# Line separators other than "\n" (which pycocoevalcap replaces by a space): the jar starts a new output line at
# each, shifting every later caption; these run one caption at a time and their lines are joined by a space.
LINE_BREAKS = ["a dog\rrunning", "a cat\r\nsleeping", "line\u2028separator", "para\u2029graph",
               "vertical\x0btab", "form\x0cfeed", "next\x85line", "U.S.\rThe end", "I.\u2028A dog"]

TEMPLATES = ["{}", "A sign that says {} on the wall.", "a photo of {}."]


def cases() -> List[str]:
  """Every caption of the batch, in order, without duplicates."""
  seen, out = set(), []
  for text in ORDINARY + [t.format(f) for f in FRAGMENTS for t in TEMPLATES]:
    if text not in seen:
      seen.add(text)
      out.append(text)
  return out


def java_tokenize_lines(texts: List[str], workdir: str) -> List[str]:
  """pycocoevalcap's `PTBTokenizer.tokenize` on `texts`: the same jar, flags, file of lines and punctuation
  filter, with the file in `workdir` (site-packages may be read-only). One output line per line of the file."""
  from pycocoevalcap.tokenizer import ptbtokenizer as ptb
  jar = pathlib.Path(ptb.__file__).parent / ptb.STANFORD_CORENLP_3_4_1_JAR
  source = pathlib.Path(workdir) / "captions.txt"
  source.write_bytes("\n".join(t.replace("\n", " ") for t in texts).encode())
  proc = subprocess.run(["java", "-cp", os.fspath(jar), "edu.stanford.nlp.process.PTBTokenizer",
                         "-preserveLines", "-lowerCase", os.fspath(source)],
                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, check=True, timeout=300)
  return [" ".join(w for w in line.rstrip().split(" ") if w not in ptb.PUNCTUATIONS)
          for line in proc.stdout.decode().split("\n")]


def record() -> Dict[str, object]:
  """The Java outputs of the batch and of each line-break case."""
  with tempfile.TemporaryDirectory() as workdir:
    texts = cases()
    lines = java_tokenize_lines(texts, workdir)
    if len(lines) != len(texts):
      raise RuntimeError(f"the jar returned {len(lines)} lines for {len(texts)} captions")
    breaks = [" ".join(java_tokenize_lines([t], workdir)) for t in LINE_BREAKS]
  return {"tokenizer": "edu.stanford.nlp.process.PTBTokenizer -preserveLines -lowerCase (stanford-corenlp-3.4.1.jar,"
                       " pycocoevalcap 1.2), then pycocoevalcap's PUNCTUATIONS filter",
          "batch": [[t, o] for t, o in zip(texts, lines)],
          "line_breaks": [[t, o] for t, o in zip(LINE_BREAKS, breaks)]}


if __name__ == "__main__":
  result = record()
  DATA.write_text(json.dumps(result, ensure_ascii=True, indent=0) + "\n", encoding="utf-8")
  print(f"wrote {len(result['batch'])} + {len(result['line_breaks'])} cases to {DATA}", file=sys.stderr)
