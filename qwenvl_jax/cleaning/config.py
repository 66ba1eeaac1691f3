"""The cleaning job's settings and its fixed, documented order of rejection rules.

Stage 1 of Qwen-VL kept 1.4B of 5B crawled image-text pairs (RECIPES §3.3). The paper lists its filters but gives
no thresholds, so every number below is this project's default, chosen for 224-px stage-1 training, and each can
be changed from the command line.

Rule order (a pair is attributed to the FIRST rule that rejects it; cheap text checks run before the image is
fetched and decoded, and the similarity score, the most expensive check, runs last):

  1. malformed          the input row is not a pair: bad JSON, missing or wrongly typed text / image / score field
  2. text_too_short     fewer than `min_text_units` units after cleaning (see `text.text_units`)
  3. text_too_long      more than `max_text_units` units after cleaning
  4. emoji              the cleaned text contains an emoji (text-presentation symbols such as (c) are not emoji)
  5. language           the detected language of the cleaned text is not one of `languages` (default en, zh)
  6. image_unreadable   the image cannot be fetched or read (missing file, failed URL, over `max_image_bytes`)
  7. image_undecodable  the bytes are not a decodable image (corrupt, truncated, over `max_image_pixels`)
  8. aspect_ratio       long side / short side > `max_aspect_ratio`
  9. image_too_small    short side < `min_image_side`
  10. low_similarity    image-text similarity < the threshold of the caption's language (`min_similarity`, or
                        `min_similarity_by_language`), from the score column or a scorer (CLIP, Chinese-CLIP, plugin)

Text cleaning (HTML stripping and removal of irregular patterns, see `text.clean_text`) is not a rejection: it
rewrites the text before rules 2-5 look at it, and the cleaned text is what the dataset stores.
"""
import dataclasses
import difflib
import math
from typing import Any

from qwenvl_jax import errors
from qwenvl_jax.cleaning import text as text_lib

RULES = (
    "malformed",
    "text_too_short",
    "text_too_long",
    "emoji",
    "language",
    "image_unreadable",
    "image_undecodable",
    "aspect_ratio",
    "image_too_small",
    "low_similarity",
)

# The score LAION-5B kept English pairs at (OpenAI CLIP ViT-B/32 cosine similarity). Thresholds do not transfer
# between models: another CLIP (or Chinese-CLIP) needs its own value, read off the report's score histogram.
DEFAULT_MIN_SIMILARITY = 0.28


@dataclasses.dataclass(frozen=True, kw_only=True)
class CleanConfig:
  """How input rows are read and which pairs are kept.

  Attributes:
    text_key: input column holding the caption.
    image_key: input column holding the image: encoded bytes, a path (absolute, or relative to `image_root`, or
      else to the input shard's folder), an http(s) URL, a `data:` URL, or a {"bytes": ..., "path": ...} struct
      (the Hugging Face datasets image layout; in JSONL "bytes" is base64).
    id_key: input column with a record id; None derives "<shard file name>:<row>" (JSONL line number from
      1, Parquet row index from 0; shards of one file name in several folders are named with as many of their
      folders as tell them apart, `sources.shard_names`).
    score_key: input column with a precomputed image-text similarity (e.g. a CLIP score); None = no column.
    image_root: folder that relative image paths are resolved against; None = the shard's folder.
    languages: ISO 639-1 codes (as `py3langid` reports them) a caption may be in; a code it never reports is
      refused (`text.known_languages`).
    min_text_units, max_text_units: caption length bounds, inclusive, in `text.text_units`.
    max_aspect_ratio: largest accepted long side / short side.
    min_image_side: smallest accepted short side, in pixels.
    min_similarity: smallest accepted score; only used when a score column or a scorer is given. The job refuses
      a threshold outside the range the scores lie in (CLIP's cosine similarity: [-1, 1]; a plugin's declared
      `score_range`; a score column whose first rows all lie in [-1, 1]), which would reject every pair or none.
    min_similarity_by_language: per detected language, a threshold replacing `min_similarity` (e.g. {"zh": 0.3}
      for pairs a Chinese-CLIP scorer scores).
    max_image_bytes: larger files are rejected as unreadable (protects workers from giant downloads).
    max_image_pixels: larger images are rejected as undecodable before their pixels are decoded.
    max_stored_side: when set, kept images whose long side exceeds it are downscaled (bicubic) and stored as
      JPEG; None stores every image at its original size.
    jpeg_quality: quality of images the job re-encodes (non-RGB, non-JPEG/PNG, or downscaled ones).
    url_timeout_s: seconds for the whole fetch of one URL (lookup, connect, headers, body, redirects).
    batch_size: pairs per scorer call; with a scorer a worker holds this many decoded images at once.
    sample_size: rejected pairs kept per rule in the report.
  """
  text_key: str = "text"
  image_key: str = "image"
  id_key: str | None = None
  score_key: str | None = None
  image_root: str | None = None
  languages: tuple[str, ...] = ("en", "zh")
  min_text_units: int = 3
  max_text_units: int = 128
  max_aspect_ratio: float = 3.0
  min_image_side: int = 100
  min_similarity: float = DEFAULT_MIN_SIMILARITY
  min_similarity_by_language: dict[str, float] = dataclasses.field(default_factory=dict)
  max_image_bytes: int = 64 * 2**20
  max_image_pixels: int = 89_478_485  # PIL's own decompression-bomb warning threshold
  max_stored_side: int | None = None
  jpeg_quality: int = 95
  url_timeout_s: float = 10.0
  batch_size: int = 32
  sample_size: int = 20

  def __post_init__(self):
    for name in ("text_key", "image_key"):
      if not getattr(self, name):
        raise errors.ConfigError(f"CleanConfig.{name} must be a non-empty column name")
    keys = [k for k in (self.text_key, self.image_key, self.id_key, self.score_key) if k]
    if len(set(keys)) != len(keys):
      raise errors.ConfigError(f"CleanConfig columns must be distinct, got text/image/id/score keys {keys}")
    if isinstance(self.languages, str) or not self.languages:
      raise errors.ConfigError(f"CleanConfig.languages must be a non-empty tuple of codes, got {self.languages!r}")
    object.__setattr__(self, "languages", tuple(self.languages))
    for code in self.languages:
      _check_language(code, "languages")
    _check_int(self, "min_text_units", 0)
    _check_int(self, "max_text_units", 1)
    if self.min_text_units > self.max_text_units:
      raise errors.ConfigError(f"CleanConfig.min_text_units={self.min_text_units} > "
                               f"max_text_units={self.max_text_units}")
    if not (math.isfinite(self.max_aspect_ratio) and self.max_aspect_ratio >= 1.0):
      raise errors.ConfigError(f"CleanConfig.max_aspect_ratio must be a finite number >= 1, "
                               f"got {self.max_aspect_ratio}")
    _check_int(self, "min_image_side", 1)
    if not math.isfinite(self.min_similarity):
      raise errors.ConfigError(f"CleanConfig.min_similarity must be finite, got {self.min_similarity}")
    object.__setattr__(self, "min_similarity_by_language", dict(self.min_similarity_by_language))
    for language, value in self.min_similarity_by_language.items():
      _check_language(language, "min_similarity_by_language")
      if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise errors.ConfigError(f"CleanConfig.min_similarity_by_language[{language!r}] must be finite, got {value!r}")
    _check_int(self, "max_image_bytes", 1)
    _check_int(self, "max_image_pixels", 1)
    if self.max_stored_side is not None:
      _check_int(self, "max_stored_side", 1)
    if not 1 <= self.jpeg_quality <= 100:
      raise errors.ConfigError(f"CleanConfig.jpeg_quality must be in [1, 100], got {self.jpeg_quality}")
    if not self.url_timeout_s > 0:
      raise errors.ConfigError(f"CleanConfig.url_timeout_s must be > 0, got {self.url_timeout_s}")
    _check_int(self, "batch_size", 1)
    _check_int(self, "sample_size", 0)

  def threshold(self, language: str) -> float:
    """The lowest accepted similarity score of a caption detected as `language`."""
    return float(self.min_similarity_by_language.get(language, self.min_similarity))

  def column_flags(self) -> list[tuple[str, str]]:
    """(input column, the flag that names it) of each column the job reads (the unset optional ones left out)."""
    return [(key, flag) for key, flag in ((self.text_key, "--text_key"), (self.image_key, "--image_key"),
                                          (self.id_key, "--id_key"), (self.score_key, "--score_key")) if key]

  def threshold_settings(self) -> list[tuple[str, float, str | None]]:
    """(setting name, value, language or None for every other one) of each similarity threshold."""
    return [("min_similarity", self.min_similarity, None)] + [
        (f"min_similarity_by_language[{lang!r}]", float(value), lang)
        for lang, value in self.min_similarity_by_language.items()]

  def to_json(self) -> dict[str, Any]:
    """The settings as JSON-ready data (stored in the report and in the dataset's metadata)."""
    out = dataclasses.asdict(self)
    out["languages"] = list(self.languages)
    return out


def _check_int(cfg: CleanConfig, name: str, lowest: int) -> None:
  value = getattr(cfg, name)
  if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
    raise errors.ConfigError(f"CleanConfig.{name} must be an integer >= {lowest}, got {value!r}")


def _check_language(code: Any, field: str) -> None:
  """Refuses a language code the detector never reports (a pair could never match it, or every pair would miss)."""
  known = text_lib.known_languages()
  if code in known:
    return
  if code in text_lib.LANGUAGE_ALIASES:
    raise errors.ConfigError(f"CleanConfig.{field}: {code!r} is detected as {text_lib.LANGUAGE_ALIASES[code]!r} "
                             f"(written Chinese of every variety counts as 'zh')")
  close = difflib.get_close_matches(str(code).lower(), sorted(known), n=3)
  raise errors.ConfigError(f"CleanConfig.{field}: unknown language code {code!r}; the language detector (py3langid) "
                           f"reports {len(known)} ISO 639 codes, and a caption is only ever one of them",
                           hint=(f"did you mean {' or '.join(map(repr, close))}? " if close else "")
                           + "e.g. en, zh, de, fr, es, ja, ko, ru")


def check_threshold_range(name: str, value: float, low: float, high: float, scores: str) -> None:
  """Refuses a similarity threshold outside the [low, high] range the scores (described by `scores`) lie in.

  Raises:
    errors.ConfigError: above `high` every scored pair would be rejected; below `low` none would.
  """
  if value > high:
    raise errors.ConfigError(f"{name}={value} is above {high}, the highest of {scores} (in [{low}, {high}]): every "
                             "scored pair would be rejected", f"choose a threshold in [{low}, {high}]")
  if value < low:
    raise errors.ConfigError(f"{name}={value} is below {low}, the lowest of {scores} (in [{low}, {high}]): no pair "
                             "would be rejected for its similarity",
                             f"{low} keeps every pair (and scores them for the report's histogram); "
                             "--skip_similarity skips the filter")
