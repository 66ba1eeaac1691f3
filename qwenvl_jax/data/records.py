"""The source-independent record every source yields, its validation, and bad-record accounting.

A `Record` is one training example before tokenization: a conversation of alternating user / assistant turns
whose text holds one `<img></img>` span per entry of `images` (in order), plus `<ref>`/`<box>`/`<quad>` markup.
Stages 1 and 2 read a record as raw text (prompt = the user turns, answer = the assistant turns); stage 3 as ChatML.

Bad records (malformed source entry, missing or corrupt image, box out of [0, 1000), span/image count mismatch,
too many images, over-long text) raise `BadRecordError` naming the record. The pipeline either skips them and
counts them with a warning (`SkipCounter`), or lets the error end the run when the config says strict.
"""
import collections
import dataclasses
import logging
import re
import threading
from typing import Any, Sequence

from qwenvl_jax import errors
from qwenvl_jax.text.formatting import IMAGE_SPAN

_BOX_SPAN = re.compile(r"<box>(.*?)</box>", re.DOTALL)
_QUAD_SPAN = re.compile(r"<quad>(.*?)</quad>", re.DOTALL)
_POINT = r"\(\s*(-?\d+)\s*,\s*(-?\d+)\s*\)"
_BOX_BODY = re.compile(rf"^{_POINT}\s*,\s*{_POINT}$")
_QUAD_BODY = re.compile(rf"^{_POINT}\s*,\s*{_POINT}\s*,\s*{_POINT}\s*,\s*{_POINT}$")
# Box coordinates are integers in [0, 1000) (SPEC §4.2, Gotcha 20).
BOX_RANGE = 1000

# UTF-16 surrogates: valid Unicode text never holds one alone (a JSON "\\ud800" escape without its pair gives one);
# no tokenizer can encode it faithfully (SentencePiece fails, tiktoken silently writes U+FFFD).
_SURROGATE = re.compile("[\ud800-\udfff]")

# Stage-2 task names (SPEC §6.1, RECIPES §3.3) plus the stage-3 chat kind.
TASKS = ("caption", "vqa", "grounding", "ref", "grounded_caption", "ocr", "text", "chat")
ROLES = ("user", "assistant")
# Stage-2 caption prompt of the paper (RECIPES §3.3); the caption eval prompt mirrors it.
CAPTION_PROMPT = "Generate the caption in English:"


class BadRecordError(errors.InputFormatError):
  """A record that cannot become a correct training example; the message starts with the record id.

  A `UserError` (the data is the user's), so a strict run that stops on one prints one line; picklable with both
  arguments, so it crosses the grain worker boundary intact.
  """

  def __init__(self, record_id: str, reason: str):
    super().__init__(f"bad record {record_id!r}: {reason}",
                     "fix or remove the record, or leave config.data.strict false to skip and count bad records")
    self.record_id = record_id
    self.reason = reason

  def __str__(self) -> str:
    return self.message

  def __reduce__(self):
    return type(self), (self.record_id, self.reason)


class TooManyBadRecordsError(errors.InputFormatError, RuntimeError):
  """More than `data.max_consecutive_skips` records in a row were bad: the source is not what the stage reads.

  Names the source and the first bad record of the run with its reason (a wrong schema makes every record bad for
  the same reason, which the first one shows). Picklable with its arguments, so it crosses the grain worker boundary.
  """

  def __init__(self, source: str, count: int, first: str):
    super().__init__(f"{source}: {count} bad records in a row, the first {first}",
                     "check the source's record format, config.seq_len and config.max_images "
                     "(config.data.max_consecutive_skips=0 skips bad records without limit)")
    self.source = source
    self.count = count
    self.first = first

  def __str__(self) -> str:
    return self.message

  def __reduce__(self):
    return type(self), (self.source, self.count, self.first)


@dataclasses.dataclass
class Record:
  """One example before tokenization.

  Attributes:
    id: stable id used in every warning and error about this record.
    task: one of `TASKS` (stage-2 mixture key; "chat" for conversations).
    turns: (role, text) pairs, roles alternating "user", "assistant", starting with "user".
    images: one entry per `<img></img>` span of the text, in order: encoded bytes, a file path, a PIL image or
      uint8[H, W, 3]. Span contents in the text are ignored (the reference's path is here instead).
  """
  id: str
  task: str
  turns: list[tuple[str, str]]
  images: list[Any] = dataclasses.field(default_factory=list)


def validate(record: Record) -> Record:
  """Checks a record's structure and markup; returns it unchanged.

  Raises:
    BadRecordError: unknown task, empty or non-alternating turns, unclosed or nested `<img>`, span count !=
      number of images, malformed box or coordinates outside [0, 1000).
  """
  rid = record.id
  if record.task not in TASKS:
    raise BadRecordError(rid, f"unknown task {record.task!r} (expected one of {TASKS})")
  if not record.turns:
    raise BadRecordError(rid, "no turns")
  for i, (role, text) in enumerate(record.turns):
    if role != ROLES[i % 2]:
      raise BadRecordError(rid, f"turn {i} is from {role!r}, expected {ROLES[i % 2]!r} (turns must alternate)")
    if not isinstance(text, str):
      raise BadRecordError(rid, f"turn {i} text is {type(text).__name__}, not str")
    check_unicode(rid, f"turn {i}", text)
  text = "".join(t for _, t in record.turns)
  spans = IMAGE_SPAN.findall(text)
  if text.count("<img>") != len(spans) or text.count("</img>") != len(spans):
    raise BadRecordError(rid, "unbalanced <img>/</img> markup")
  if any("<img>" in s for s in spans):
    raise BadRecordError(rid, "nested <img> spans")
  if len(spans) != len(record.images):
    raise BadRecordError(rid, f"{len(spans)} <img></img> spans but {len(record.images)} images")
  _check_coordinates(rid, text)
  return record


def check_unicode(rid: str, what: str, text: str) -> None:
  """Raises BadRecordError when `text` holds a lone UTF-16 surrogate (invalid Unicode), naming where."""
  m = _SURROGATE.search(text)
  if m is not None:
    raise BadRecordError(rid, f"{what} holds a lone surrogate U+{ord(m.group()):04X} at character {m.start()} "
                              "(not valid Unicode: an unpaired \\uD800-\\uDFFF escape?)")


def _check_coordinates(rid: str, text: str) -> None:
  for pattern, body, name in ((_BOX_SPAN, _BOX_BODY, "box"), (_QUAD_SPAN, _QUAD_BODY, "quad")):
    if text.count(f"<{name}>") != text.count(f"</{name}>"):
      raise BadRecordError(rid, f"unbalanced <{name}>/</{name}> markup")
    for content in pattern.findall(text):
      m = body.match(content.strip())
      if m is None:
        raise BadRecordError(rid, f"malformed <{name}>{content}</{name}>")
      coords = [int(c) for c in m.groups()]
      if any(not 0 <= c < BOX_RANGE for c in coords):
        raise BadRecordError(rid, f"<{name}>{content}</{name}> has a coordinate outside [0, {BOX_RANGE})")
      if name == "box" and (coords[0] > coords[2] or coords[1] > coords[3]):
        raise BadRecordError(rid, f"<box>{content}</box> is not (x1,y1),(x2,y2) with x1<=x2, y1<=y2")


def box_text(box: Sequence[float], width: float, height: float) -> str:
  """`<box>(x1,y1),(x2,y2)</box>` for a pixel box [x1, y1, x2, y2] of a width x height image, in [0, 1000)."""
  x1, y1, x2, y2 = box
  scaled = (x1 / width, y1 / height, x2 / width, y2 / height)
  q = [min(BOX_RANGE - 1, max(0, int(v * BOX_RANGE))) for v in scaled]
  return f"<box>({q[0]},{q[1]}),({q[2]},{q[3]})</box>"


def caption_turns(caption: str, stage: int) -> list[tuple[str, str]]:
  """A one-image caption as turns: bare `<img></img>caption` in stage 1, the task prompt after (RECIPES §3.3)."""
  if stage == 1:
    return [("user", "<img></img>"), ("assistant", caption)]
  return [("user", f"<img></img>{CAPTION_PROMPT}"), ("assistant", f" {caption}")]


def strip_image_paths(text: str) -> tuple[str, list[str]]:
  """Empties every `<img>PATH</img>` span; returns the new text and the paths in order."""
  paths = [p.strip() for p in IMAGE_SPAN.findall(text)]
  return IMAGE_SPAN.sub("<img></img>", text), paths


_MAX_SEEN_SKIPS = 10_000  # distinct bad records remembered per process (to tell a new one from one met again)
_MAX_NAMED_SKIPS = 20  # bad records named one by one per process; past that, only the running totals


class SkipCounter:
  """Counts skipped records per reason in this process and logs a warning naming each bad record the first time
  it is skipped; a record met again (every epoch of a small source) only counts, with a line of totals at every
  power of two of skips (a 6-line file with 2 bad lines logged 151 lines in 3 steps). Only the first
  `_MAX_NAMED_SKIPS` bad records are named (a source of the wrong format logged a line for each of the 1000 records
  before the `TooManyBadRecordsError` that says what is wrong); later ones count towards the totals.

  Grain worker processes each hold their own counter; the warning carries the running count of that process.
  """

  def __init__(self, logger: logging.Logger | None = None):
    self._lock = threading.Lock()
    self._counts: collections.Counter = collections.Counter()
    self._consecutive = 0
    self._first_in_row: BadRecordError | None = None
    self._seen: set[str] = set()
    self._logger = logger or logging.getLogger("qwenvl_jax.data")

  def skip(self, error: BadRecordError, max_consecutive: int = 0, source: str = "a data source") -> None:
    """Counts and logs a skipped record of `source` (its spec, for the error).

    Raises:
      TooManyBadRecordsError: more than `max_consecutive` (> 0) records in a row were bad; a source where (nearly)
        every record is bad would otherwise make the pipeline spin forever without yielding a batch.
    """
    with self._lock:
      self._counts[_reason_kind(error.reason)] += 1
      self._consecutive += 1
      if self._consecutive == 1:
        self._first_in_row = error
      total, consecutive, first_in_row = sum(self._counts.values()), self._consecutive, self._first_in_row
      if 0 < max_consecutive < consecutive:
        self._consecutive, self._first_in_row = 0, None  # this run ends here; a next pipeline starts afresh
      new = error.record_id not in self._seen and len(self._seen) < _MAX_SEEN_SKIPS
      if new:
        self._seen.add(error.record_id)
      named, distinct = new and len(self._seen) <= _MAX_NAMED_SKIPS, len(self._seen)
    if named:
      last = ("; further bad records are counted, not named" if distinct == _MAX_NAMED_SKIPS else "")
      self._logger.warning("skipping %s (%d records skipped so far in this process%s)", error, total, last)
    elif total & (total - 1) == 0:
      more = "+" if distinct == _MAX_SEEN_SKIPS else ""
      self._logger.warning("%d records skipped so far in this process, %d%s distinct (%s)", total, distinct, more,
                           self.counts)
    if 0 < max_consecutive < consecutive:
      raise TooManyBadRecordsError(source, consecutive, str(first_in_row))

  def ok(self) -> None:
    """Notes a good record (ends a run of bad ones)."""
    self._consecutive = 0

  @property
  def counts(self) -> dict[str, int]:
    with self._lock:
      return dict(self._counts)

  @property
  def total(self) -> int:
    with self._lock:
      return sum(self._counts.values())

  def reset(self) -> None:
    """Starts afresh: no counts, and the next bad records are named again."""
    with self._lock:
      self._counts.clear()
      self._consecutive = 0
      self._first_in_row = None
      self._seen.clear()


def _reason_kind(reason: str) -> str:
  """A short category for counting: the reason up to its first ":" or "(" (e.g. "over-long"); an image's reason
  by what failed, whichever image it was ("image: image file not found", "image: cannot decode image": both were
  counted as "image 0")."""
  image = re.match(r"image \d+: (.*)", reason, re.S)
  if image:  # its reason names the bytes or file after a "<" or ":" ("cannot decode image <bytes>: ...")
    return "image: " + image.group(1).split(":")[0].split("(")[0].split("<")[0].strip()[:60]
  return reason.split(":")[0].split("(")[0].strip()[:60]


SKIPPED = SkipCounter()
