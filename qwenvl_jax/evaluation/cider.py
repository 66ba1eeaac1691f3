"""CIDEr-D exactly as pycocoevalcap's `Cider().compute_score` computes it (the number Qwen-VL reports).

For a set of images, each with one candidate caption and its reference captions (already normalised, see
`ptb_tokenizer.tokenize`; `cider_from_raw` does both):
- n-grams n = 1..4 of whitespace tokens; document frequency df(g) = number of *images of the evaluated set*
  whose references contain g (so the score of one image depends on the whole set);
- tf-idf vector per caption and n: tf(g) * (log(#images) - log(max(1, df(g))));
- per reference and n: the clipped cosine sum_g min(c_g, r_g) * r_g / (|c| |r|) (0 when a norm is 0), times
  the Gaussian length penalty exp(-(delta^2) / (2 sigma^2)), sigma = 6, where delta is the difference of the
  *bigram* counts of candidate and reference (pycocoevalcap counts length at n-gram index 1, which equals
  the word-count difference whenever both captions have a word);
- image score = 10 * mean over n of (sum over references) / #references; corpus score = mean over images.
The corpus score is on pycocoevalcap's scale (papers print 100x: Qwen-VL's Flickr30K 85.8 is 0.858 here).
"""
import math
from collections import Counter
from typing import Dict, Hashable, List, Mapping, Sequence, Tuple

import numpy as np

from qwenvl_jax.evaluation import ptb_tokenizer

NGRAM_ORDER = 4
SIGMA = 6.0

NGram = Tuple[str, ...]


def ngram_counts(caption: str, n: int = NGRAM_ORDER) -> Counter:
  """Counts of every k-gram, k = 1..n, of a whitespace-tokenized caption."""
  words = caption.split()
  counts: Counter = Counter()
  for k in range(1, n + 1):
    for i in range(len(words) - k + 1):
      counts[tuple(words[i:i + k])] += 1
  return counts


def _to_vector(counts: Counter, df: Mapping[NGram, float], log_num_images: float, n: int):
  """Per-order tf-idf dicts, their norms, and the bigram count pycocoevalcap uses as the length."""
  vec: List[Dict[NGram, float]] = [dict() for _ in range(n)]
  norm = [0.0] * n
  length = 0
  for ngram, tf in counts.items():
    order = len(ngram) - 1
    value = float(tf) * (log_num_images - math.log(max(1.0, df.get(ngram, 0.0))))
    vec[order][ngram] = value
    norm[order] += value ** 2
    if order == 1:
      length += tf
  return vec, [math.sqrt(v) for v in norm], length


def _similarity(hyp, ref, n: int, sigma: float) -> np.ndarray:
  (vec_h, norm_h, len_h), (vec_r, norm_r, len_r) = hyp, ref
  delta = float(len_h - len_r)
  val = np.zeros(n)
  for k in range(n):
    for ngram, value in vec_h[k].items():
      ref_value = vec_r[k].get(ngram, 0.0)
      val[k] += min(value, ref_value) * ref_value
    if norm_h[k] != 0 and norm_r[k] != 0:
      val[k] /= norm_h[k] * norm_r[k]
    val[k] *= np.e ** (-(delta ** 2) / (2 * sigma ** 2))
  return val


def cider_d(
    candidates: Mapping[Hashable, str],
    references: Mapping[Hashable, Sequence[str]],
    *,
    n: int = NGRAM_ORDER,
    sigma: float = SIGMA,
) -> Tuple[float, Dict[Hashable, float]]:
  """CIDEr-D of tokenized captions: (corpus score, {image id: image score}).

  Args:
    candidates: image id -> the candidate caption (space-separated tokens).
    references: image id -> its reference captions (at least one each), same ids as `candidates`.

  Raises:
    ValueError: the two id sets differ, an image has no reference, or there are no images.
  """
  if set(candidates) != set(references):
    missing = sorted(map(str, set(references) - set(candidates)))[:5]
    extra = sorted(map(str, set(candidates) - set(references)))[:5]
    raise ValueError(f"candidates and references must have the same image ids; without a candidate: "
                     f"{missing}, without references: {extra}")
  if not candidates:
    raise ValueError("cider_d needs at least one image")
  ids = list(references)
  ref_counts = {}
  df: Counter = Counter()
  for image_id in ids:
    refs = references[image_id]
    if isinstance(refs, str) or not refs:
      raise ValueError(f"image {image_id!r}: references must be a non-empty list of captions, got {refs!r}")
    ref_counts[image_id] = [ngram_counts(r, n) for r in refs]
    df.update({g for counts in ref_counts[image_id] for g in counts})
  log_num_images = math.log(float(len(ids)))
  scores = {}
  for image_id in ids:
    hyp = _to_vector(ngram_counts(candidates[image_id], n), df, log_num_images, n)
    total = np.zeros(n)
    for counts in ref_counts[image_id]:
      total += _similarity(hyp, _to_vector(counts, df, log_num_images, n), n, sigma)
    scores[image_id] = float(np.mean(total) / len(ref_counts[image_id]) * 10.0)
  return float(np.mean([scores[i] for i in ids])), scores


def cider_from_raw(
    candidates: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]]
) -> Tuple[float, Dict[Hashable, float]]:
  """`cider_d` after pycocoevalcap's PTB normalisation of raw candidate and reference captions.

  As pycocoevalcap's `COCOEvalCap`, all references go through the tokenizer in one call (image by image, in
  `references` order) and all candidates in another: the Java tokenizer sees the next caption when it ends one.
  """
  for image_id, refs in references.items():
    if isinstance(refs, str):
      raise ValueError(f"image {image_id!r}: references must be a list of captions, got the string {refs!r}")
  flat = ptb_tokenizer.tokenize([r for refs in references.values() for r in refs])
  tokenized_refs, start = {}, 0
  for image_id, refs in references.items():
    tokenized_refs[image_id] = flat[start:start + len(refs)]
    start += len(refs)
  tokenized_cands = dict(zip(candidates, ptb_tokenizer.tokenize(list(candidates.values()))))
  return cider_d(tokenized_cands, tokenized_refs)


def constant_caption_baseline(selection: Mapping[Hashable, Sequence[str]],
                              references: Mapping[Hashable, Sequence[str]]) -> Tuple[float, str]:
  """The chance level of captioning: CIDEr on `references` of the best image-independent caption.

  A model that ignores its images writes one caption for every image. The caption is chosen on a separate
  `selection` set (its reference caption with the best corpus CIDEr there when given to every image), then scored
  on `references`: choosing on the evaluated set itself would favour a caption that happens to match a few of its
  images exactly, which on a small set is worth several CIDEr points. Raw captions (PTB-normalised here).

  Returns:
    (corpus CIDEr on `references`, the chosen raw caption).
  """
  if not selection or not references:
    raise ValueError("constant_caption_baseline needs a non-empty selection set and reference set")
  flat = ptb_tokenizer.tokenize([r for refs in selection.values() for r in refs])
  selection_refs, start = {}, 0
  for i, refs in selection.items():
    selection_refs[i] = flat[start:start + len(refs)]
    start += len(refs)
  # Every distinct reference caption is a candidate; its tokens are already in `selection_refs`.
  candidates: Dict[str, str] = {}
  for i, refs in selection.items():
    for raw, tokens in zip(refs, selection_refs[i]):
      candidates.setdefault(raw, tokens)
  best, chosen = -1.0, ""
  for caption, tokens in candidates.items():
    score, _ = cider_d({i: tokens for i in selection_refs}, selection_refs)
    if score > best:
      best, chosen = score, caption
  score, _ = cider_from_raw({i: chosen for i in references}, references)
  return score, chosen
