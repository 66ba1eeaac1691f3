"""The keep/drop decision for input rows, in the fixed rule order of `config.RULES`; no Beam in here.

`clean_batch(pairs, cfg, scorer, language_scorers)` turns a batch of `RawPair`s into `Kept` or `Rejected` outcomes,
one per pair and in order. Per pair it validates the row, cleans the text, runs the text rules, reads and decodes
the image, runs the image rules and the score-column rule; the survivors of a batch are then scored together, each
by the scorer of its detected language (`language_scorers`, e.g. Chinese-CLIP for "zh") or else by `scorer`, and
compared with the threshold of that language (`CleanConfig.threshold`). A pair is attributed to the first rule that
rejects it. Nothing a row holds can make this raise; only
a broken scorer (wrong output shape, NaN) does, on purpose.
"""
import dataclasses
from typing import Any, Mapping, Sequence

from qwenvl_jax.cleaning import images as images_lib
from qwenvl_jax.cleaning import scoring
from qwenvl_jax.cleaning import text as text_lib
from qwenvl_jax.cleaning.config import CleanConfig

_REPORT_TEXT_CHARS = 300


@dataclasses.dataclass(frozen=True)
class MalformedRow:
  """Stands in for an input row that could not be parsed (e.g. a line that is not JSON)."""
  reason: str


@dataclasses.dataclass(frozen=True)
class RawPair:
  """One input row, before cleaning.

  Attributes:
    key: unique and stable across runs ("<shard path>:<row>": JSONL line number from 1, Parquet row index from
      0); the TFDS example key.
    source: the same with the shard's name instead of its path (its file name, with as many folders as tell it
      from the job's other shards of that name: `sources.shard_names`), for people reading reports and default
      ids; unique within a job, as the key.
    row: the parsed row (a dict of columns) or a `MalformedRow`.
    root: folder that relative image paths of this row resolve against.
  """
  key: str
  source: str
  row: Any
  root: str


@dataclasses.dataclass(frozen=True)
class Kept:
  """A pair that passed every rule; `example()` is what the dataset stores."""
  key: str
  id: str
  text: str
  image: bytes
  width: int
  height: int
  score: float | None
  language: str = ""

  def example(self) -> dict[str, Any]:
    """The TFDS example (`qwenvl_jax.data.features.image_text_features`)."""
    return {"id": self.id, "image": self.image, "text": self.text}


@dataclasses.dataclass(frozen=True)
class Rejected:
  """A dropped pair: the rule that dropped it, why, and enough of the row to look it up."""
  key: str
  id: str
  source: str
  rule: str
  reason: str
  text: str
  image: str
  cleaned: str = ""
  language: str = ""
  score: float | None = None

  def sample(self) -> dict[str, str]:
    """JSON-ready record for the report's sample of this rule ("cleaned" is empty before text cleaning ran)."""
    return {"id": self.id, "source": self.source, "reason": self.reason, "text": self.text,
            "cleaned": self.cleaned, "image": self.image}


@dataclasses.dataclass
class _Candidate:
  """A pair that passed every per-pair rule, waiting for the batched scorer."""
  pair: RawPair
  id: str
  text: str
  decoded: images_lib.DecodedImage
  score: float | None
  language: str


class _Reject(Exception):
  def __init__(self, rule: str, reason: str, cleaned: str = "", language: str = "", score: float | None = None):
    super().__init__(reason)
    self.rule = rule
    self.reason = reason
    self.cleaned = cleaned
    self.language = language
    self.score = score


def _field(row: dict, key: str) -> Any:
  if key not in row or row[key] is None:
    raise _Reject("malformed", f"missing column {key!r}")
  return row[key]


def _check_pair(pair: RawPair, cfg: CleanConfig) -> _Candidate:
  """Runs every rule but the scorer on one pair; raises `_Reject` at the first failing rule."""
  row = pair.row
  if isinstance(row, MalformedRow):
    raise _Reject("malformed", row.reason)
  if not isinstance(row, dict):
    raise _Reject("malformed", f"row is a {type(row).__name__}, not an object")
  raw_text = _field(row, cfg.text_key)
  if not isinstance(raw_text, str):
    raise _Reject("malformed", f"column {cfg.text_key!r} is a {type(raw_text).__name__}, not a string")
  image_field = _field(row, cfg.image_key)
  pair_id = pair.source
  if cfg.id_key:
    pair_id = _field(row, cfg.id_key)
    if isinstance(pair_id, bool) or not isinstance(pair_id, (str, int)) or pair_id == "":
      raise _Reject("malformed", f"column {cfg.id_key!r} is {pair_id!r}, not a non-empty string or integer")
    pair_id = str(pair_id)
  score = None
  if cfg.score_key:
    score = _field(row, cfg.score_key)
    if not scoring.is_number(score):
      raise _Reject("malformed", f"column {cfg.score_key!r} is {score!r}, not a finite number")
    score = float(score)

  text = text_lib.clean_text(raw_text)
  try:
    decoded, language = _check_cleaned(text, image_field, score, pair.root, cfg)
  except _Reject as e:
    e.cleaned = text
    raise
  return _Candidate(pair=pair, id=pair_id, text=text, decoded=decoded, score=score, language=language)


def _check_cleaned(text: str, image_field: Any, score: float | None, root: str,
                   cfg: CleanConfig) -> tuple[images_lib.DecodedImage, str]:
  """The rules after text cleaning, in order; returns the decoded image and language of a pair passing them all."""
  units = text_lib.text_units(text)
  if units < cfg.min_text_units:
    raise _Reject("text_too_short", f"{units} units < min_text_units={cfg.min_text_units}")
  if units > cfg.max_text_units:
    raise _Reject("text_too_long", f"{units} units > max_text_units={cfg.max_text_units}")
  if text_lib.has_emoji(text):
    raise _Reject("emoji", "text contains emoji")
  language = text_lib.detect_language(text)
  if language not in cfg.languages:
    raise _Reject("language", f"language {language!r} not in {list(cfg.languages)}")

  try:
    data = images_lib.read_image_bytes(
        image_field, root=root, max_bytes=cfg.max_image_bytes, timeout_s=cfg.url_timeout_s)
  except images_lib.ImageReadError as e:
    raise _Reject("image_unreadable", str(e)) from e
  try:
    decoded = images_lib.decode_image(data, max_pixels=cfg.max_image_pixels)
  except images_lib.ImageDecodeError as e:
    raise _Reject("image_undecodable", str(e)) from e
  long_side, short_side = max(decoded.width, decoded.height), min(decoded.width, decoded.height)
  if long_side > cfg.max_aspect_ratio * short_side:
    raise _Reject("aspect_ratio", f"{decoded.width}x{decoded.height}: aspect ratio "
                  f"{long_side / short_side:.2f} > max_aspect_ratio={cfg.max_aspect_ratio}")
  if short_side < cfg.min_image_side:
    raise _Reject("image_too_small", f"{decoded.width}x{decoded.height}: short side {short_side} px "
                  f"< min_image_side={cfg.min_image_side}")
  threshold = cfg.threshold(language)
  if score is not None and score < threshold:
    raise _Reject("low_similarity", f"score {score:.4f} < min_similarity={threshold} ({language})",
                  language=language, score=score)
  return decoded, language


def _short(value: Any) -> str:
  text = value if isinstance(value, str) else repr(value)
  return text if len(text) <= _REPORT_TEXT_CHARS else text[:_REPORT_TEXT_CHARS] + "..."


def _make_rejected(pair: RawPair, cfg: CleanConfig, rule: str, reason: str, cleaned: str = "", language: str = "",
                   score: float | None = None) -> Rejected:
  row = pair.row if isinstance(pair.row, dict) else {}
  pair_id = row.get(cfg.id_key) if cfg.id_key else None
  return Rejected(
      key=pair.key,
      id=str(pair_id) if isinstance(pair_id, (str, int)) and pair_id != "" else pair.source,
      source=pair.source,
      rule=rule,
      reason=reason,
      text=_short(row[cfg.text_key]) if row.get(cfg.text_key) is not None else "",
      image=_short(images_lib.describe(row[cfg.image_key])) if row.get(cfg.image_key) is not None else "",
      cleaned=_short(cleaned),
      language=language,
      score=score,
  )


def clean_batch(pairs: Sequence[RawPair], cfg: CleanConfig, scorer: scoring.Scorer | None = None,
                language_scorers: Mapping[str, scoring.Scorer] | None = None) -> list[Kept | Rejected]:
  """Decides every pair of a batch; returns one outcome per pair, in input order.

  Args:
    pairs: the batch.
    cfg: thresholds and column names.
    scorer: when given, pairs that pass every other rule are scored together and dropped as "low_similarity"
      below `cfg.threshold(language)`; the batch's decoded images are then held until the scorer has run.
    language_scorers: scorers for captions of one detected language ("zh" -> a Chinese-CLIP scorer); they take
      precedence over `scorer` for that language. A pair whose language has no scorer here and `scorer` None is
      not scored.

  Raises:
    ValueError: a scorer returned a wrong number of scores or a non-finite score.
  """
  routes = dict(language_scorers or {})
  outcomes: list[Kept | Rejected | _Candidate] = []
  for pair in pairs:
    try:
      candidate = _check_pair(pair, cfg)
    except _Reject as e:
      outcomes.append(_make_rejected(pair, cfg, e.rule, e.reason, e.cleaned, e.language, e.score))
      continue
    # Unscored pairs drop their decoded pixels at once, so without a scorer a batch holds one image at a time.
    scored = routes.get(candidate.language, scorer) is not None
    outcomes.append(candidate if scored else _finish(candidate, cfg, scored=False))
  groups: dict[int, list[_Candidate]] = {}
  for candidate in (o for o in outcomes if isinstance(o, _Candidate)):
    groups.setdefault(id(routes.get(candidate.language, scorer)), []).append(candidate)
  for group in groups.values():
    group_scorer = routes.get(group[0].language, scorer)
    raw = group_scorer([c.decoded.image for c in group], [c.text for c in group])
    for candidate, score in zip(group, scoring.check_scores(raw, len(group), group_scorer)):
      candidate.score = score
  return [_finish(o, cfg, scored=True) if isinstance(o, _Candidate) else o for o in outcomes]


def _finish(candidate: _Candidate, cfg: CleanConfig, scored: bool) -> Kept | Rejected:
  threshold = cfg.threshold(candidate.language)
  if scored and candidate.score < threshold:
    return _make_rejected(candidate.pair, cfg, "low_similarity",
                          f"score {candidate.score:.4f} < min_similarity={threshold} ({candidate.language})",
                          candidate.text, candidate.language, candidate.score)
  return Kept(
      key=candidate.pair.key,
      id=candidate.id,
      text=candidate.text,
      image=images_lib.encode_for_storage(
          candidate.decoded, max_side=cfg.max_stored_side, jpeg_quality=cfg.jpeg_quality),
      width=candidate.decoded.width,
      height=candidate.decoded.height,
      score=candidate.score,
      language=candidate.language,
  )
