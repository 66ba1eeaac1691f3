"""The pluggable image-text similarity scorer of the cleaning job, and a trivial deterministic one for tests.

A scorer is any callable `scorer(images, texts) -> float[B]`: `images` is a list of B RGB `PIL.Image`s at their
stored resolution, `texts` the B cleaned captions; higher means more similar. A factory may declare the range its
scores lie in as a `score_range = (low, high)` attribute; the job then refuses a threshold outside it before it
starts (`score_range`). The job builds one scorer per Beam
worker (scorers usually hold a model) from a zero-argument factory, so what travels to the workers is the factory,
never the model:

  - in Python: `CleanJob(..., scorer_factory=MyScorer)` where `MyScorer()` returns the scorer;
  - on the command line: `--scorer=my_package.my_module:MyScorer` (imported on each worker).

Built in (`make_factory`): `clip:<checkpoint dir>` and `chinese_clip:<checkpoint dir>` score with a JAX CLIP loaded
from a Hugging Face CLIPModel / ChineseCLIPModel folder (`cleaning.clip_scorer`, `qwenvl_jax.clip`): the cosine
similarity of the L2-normalised embeddings, the CLIP score that `CleanConfig.min_similarity` is tuned for. Pairs
are scored in batches of `CleanConfig.batch_size`.
"""
import importlib
import math
from typing import Callable, Protocol, Sequence

import numpy as np
import PIL.Image

from qwenvl_jax import errors


class Scorer(Protocol):
  """Image-text similarity of a batch of pairs."""

  def __call__(self, images: Sequence[PIL.Image.Image], texts: Sequence[str]) -> Sequence[float]:
    """Returns float[B]: the similarity of images[b] and texts[b]."""


ScorerFactory = Callable[[], Scorer]


def load_scorer_factory(spec: str) -> ScorerFactory:
  """Resolves "package.module:attribute" to a scorer factory (a class or a zero-argument function)."""
  module_name, sep, attr = spec.partition(":")
  if not sep or not module_name or not attr:
    raise ValueError(f"scorer spec {spec!r} is not of the form 'package.module:attribute'")
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    raise ValueError(f"scorer spec {spec!r}: cannot import module {module_name!r}: {e}") from e
  factory = module
  for part in attr.split("."):
    if not hasattr(factory, part):
      raise ValueError(f"scorer spec {spec!r}: {module_name!r} has no attribute {attr!r}")
    factory = getattr(factory, part)
  if not callable(factory):
    raise ValueError(f"scorer spec {spec!r} names a {type(factory).__name__}, not a callable factory")
  return factory


MODEL_PREFIXES = ("clip:", "chinese_clip:")


def make_factory(spec: str, platform: str = "cpu", max_batch: int = 32) -> ScorerFactory:
  """The factory a command-line spec names: "clip:DIR", "chinese_clip:DIR" or a plugin "package.module:attr".

  `platform` is where a CLIP scorer runs: "cpu" (default; any number of workers per host) or "auto" (JAX's default
  backend, the host's GPU/TPU: one scoring worker per host); `max_batch` is the largest batch it compiles for
  (the job's `batch_size`). A plugin module named `clip` or `chinese_clip` cannot be named here (the prefixes are
  taken).

  Raises:
    ValueError: a malformed spec, a plugin that cannot be imported, or a checkpoint that is missing or does not
      match its config (checked here, on the launching machine, before any data is read).
  """
  family, sep, rest = spec.partition(":")
  if sep and spec.startswith(MODEL_PREFIXES):
    if not rest:
      raise errors.ConfigError(f"scorer spec {spec!r} names no checkpoint folder")
    # Imported here so a job without a model scorer never loads JAX.
    from qwenvl_jax.cleaning import clip_scorer  # pylint: disable=import-outside-toplevel
    return clip_scorer.ClipScorerFactory(family, rest, platform, max_batch)
  return SpecFactory(spec)


# The cosine similarity of L2-normalized embeddings: the scores of the CLIP scorers and of a score column of them.
COSINE_RANGE = (-1.0, 1.0)


def score_range(factory) -> tuple[float, float] | None:
  """The (lowest, highest) score the scorers `factory` builds can give, when it declares one (a `score_range`
  attribute: the CLIP factories' cosine [-1, 1], or a plugin's own); None when unknown."""
  value = getattr(factory, "score_range", None)
  return (float(value[0]), float(value[1])) if value is not None else None


class SpecFactory:
  """A picklable factory that imports a scorer spec on the worker that calls it; `score_range` is the plugin
  factory's own, when it declares one."""

  def __init__(self, spec: str):
    factory = load_scorer_factory(spec)  # Fail on the launching machine, not on every worker.
    self.spec = spec
    self.score_range = score_range(factory)

  def __call__(self) -> Scorer:
    return load_scorer_factory(self.spec)()

  def __repr__(self) -> str:
    return f"SpecFactory({self.spec!r})"


def check_scores(scores, n: int, scorer) -> list[float]:
  """The scorer's output as n finite floats.

  Raises:
    ValueError: naming the scorer, when the output has another shape or holds NaN/inf (a broken scorer must stop
      the job rather than silently keep or drop pairs).
  """
  arr = np.asarray(scores, dtype=np.float64)
  if arr.shape != (n,):
    raise ValueError(f"scorer {scorer!r} returned shape {arr.shape} for a batch of {n} pairs, expected ({n},)")
  if not np.all(np.isfinite(arr)):
    raise ValueError(f"scorer {scorer!r} returned non-finite scores {arr.tolist()}")
  return [float(s) for s in arr]


_COLOR_NAMES = ("red", "green", "blue")


class DominantColorScorer:
  """Test scorer: 1.0 when the caption names the image's dominant channel ("red", "green" or "blue"), else 0.0.

  Deterministic and model-free, so tests can state which pairs it rejects; it stands in for a real CLIP-style
  scorer (use `min_similarity=0.5` with it).
  """
  score_range = (0.0, 1.0)

  def __call__(self, images: Sequence[PIL.Image.Image], texts: Sequence[str]) -> list[float]:
    scores = []
    for image, text in zip(images, texts, strict=True):
      means = np.asarray(image.convert("RGB"), dtype=np.float64).reshape(-1, 3).mean(axis=0)
      color = _COLOR_NAMES[int(np.argmax(means))]
      scores.append(1.0 if color in text.lower().split() else 0.0)
    return scores

  def __repr__(self) -> str:
    return "DominantColorScorer()"


def is_number(value) -> bool:
  """Whether a score-column value is a usable finite number (bools and strings are not)."""
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
    return False
  return math.isfinite(float(value))
