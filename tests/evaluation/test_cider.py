"""Tests of CIDEr-D: hand-computed values and equality with pycocoevalcap's scorer when it is installed."""
import math
import random

import pytest

from qwenvl_jax.evaluation import cider


def test_ngram_counts():
  counts = cider.ngram_counts("a b a b")
  assert counts[("a",)] == 2 and counts[("a", "b")] == 2 and counts[("b", "a")] == 1
  assert counts[("a", "b", "a", "b")] == 1 and sum(counts.values()) == 4 + 3 + 2 + 1


def test_perfect_two_word_captions_score_five():
  # Two images, every n-gram has df 1, so each weighs log(2) - log(1). A perfect two-word match has cosine 1
  # for unigrams and bigrams and 0 for the empty 3- and 4-gram vectors: 10 * mean([1, 1, 0, 0]) = 5.
  score, per_image = cider.cider_d({1: "a b", 2: "c d"}, {1: ["a b"], 2: ["c d"]})
  assert score == pytest.approx(5.0)
  assert per_image == pytest.approx({1: 5.0, 2: 5.0})


def test_hand_computed_with_two_references_and_length_penalty():
  # All n-grams have df 1 (or 0 -> max(1, 0)), so every weight is l = log 2 and cancels in the cosines.
  # Image 1, candidate "a b" (1 bigram):
  #   vs "a b": cosines [1, 1, 0, 0], delta 0.
  #   vs "a c": unigrams {a, b}.{a, c} = l^2 / (sqrt(2) l * sqrt(2) l) = 1/2, bigram 0 -> [0.5, 0, 0, 0].
  #   sum [1.5, 1, 0, 0], mean 0.625, / 2 refs, * 10 = 3.125.
  # Image 2, candidate "x" (0 bigrams) vs "x y" (1 bigram): unigram cosine l^2 / (l * sqrt(2) l) = 1/sqrt(2),
  #   bigram 0 (candidate norm 0); delta = -1 -> penalty exp(-1 / 72): 10 * (1/sqrt(2)) e^(-1/72) / 4.
  image2 = 10 * (1 / math.sqrt(2)) * math.exp(-1 / 72) / 4
  score, per_image = cider.cider_d({1: "a b", 2: "x"}, {1: ["a b", "a c"], 2: ["x y"]})
  assert per_image[1] == pytest.approx(3.125)
  assert per_image[2] == pytest.approx(image2)
  assert score == pytest.approx((3.125 + image2) / 2)


def test_document_frequency_comes_from_the_evaluated_set():
  # With one image, log(#images) = 0 and every weight is 0 - log(max(1, df)) <= 0; all cosines vanish.
  assert cider.cider_d({1: "a b"}, {1: ["a b"]})[0] == 0.0
  # Adding an unrelated image changes the score of image 1 (idf is over the set).
  assert cider.cider_d({1: "a b", 2: "z"}, {1: ["a b"], 2: ["q"]})[1][1] == pytest.approx(5.0)


def test_clipping_limits_repeated_ngrams():
  # Candidate "a a a a" vs reference "a": the unigram term min(4l, l) * l is clipped to l^2.
  base = {2: "z"}, {2: ["q"]}
  _, repeated = cider.cider_d({1: "a a a a", **base[0]}, {1: ["a"], **base[1]})
  _, single = cider.cider_d({1: "a", **base[0]}, {1: ["a"], **base[1]})
  assert repeated[1] < single[1]


def test_bad_input_is_an_error():
  with pytest.raises(ValueError, match="same image ids"):
    cider.cider_d({1: "a"}, {2: ["a"]})
  with pytest.raises(ValueError, match="non-empty list"):
    cider.cider_d({1: "a"}, {1: []})
  with pytest.raises(ValueError, match="at least one image"):
    cider.cider_d({}, {})


def test_cider_from_raw_normalizes_like_coco():
  score, _ = cider.cider_from_raw({1: "A Dog.", 2: "The cat!"}, {1: ["a dog"], 2: ["the cat ."]})
  assert score == pytest.approx(5.0)


def test_equals_pycocoevalcap_on_tokenized_input():
  pycoco_cider = pytest.importorskip("pycocoevalcap.cider.cider")
  rng = random.Random(0)
  words = "a the man dog on in with red blue sitting table street cat of and".split()

  def caption():
    return " ".join(rng.choice(words) for _ in range(rng.randint(1, 12)))

  for _ in range(10):
    num_images = rng.randint(1, 6)
    refs = {i: [caption() for _ in range(rng.randint(1, 5))] for i in range(num_images)}
    cands = {i: caption() for i in range(num_images)}
    expected, expected_per_image = pycoco_cider.Cider().compute_score(refs, {i: [c] for i, c in cands.items()})
    score, per_image = cider.cider_d(cands, refs)
    assert score == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert [per_image[i] for i in range(num_images)] == pytest.approx(list(expected_per_image), rel=1e-12,
                                                                      abs=1e-12)


@pytest.mark.parity
def test_cider_from_raw_equals_cocoevalcap_pipeline_with_java(java_ptb_tokenize):
  """Raw captions through pycocoevalcap's Java PTBTokenizer + Cider, vs the pure-Python path."""
  pycoco_cider = pytest.importorskip("pycocoevalcap.cider.cider")
  refs = {
      1: ["A man riding a wave on top of a surfboard.", "A surfer rides a big wave!",
          "Man on a surf board, riding a wave."],
      2: ["Two dogs (one black) play in the snow.", "Dogs playing in the snow", "Two dogs in the snow."],
      3: ["A kitchen with stainless steel appliances.", "The kitchen's counters are granite; it's clean.",
          "A modern kitchen -- with a fridge and an oven."],
  }
  cands = {1: "A man is riding a wave on a surfboard.", 2: "two dogs playing in the snow",
           3: "A kitchen that has a fridge, an oven and a sink."}
  flat = [c for k in refs for c in refs[k]] + [cands[k] for k in refs]
  tokens = iter(java_ptb_tokenize(flat))  # one Java start for all captions
  gts = {k: [next(tokens) for _ in refs[k]] for k in refs}
  res = {k: [next(tokens)] for k in refs}
  expected, _ = pycoco_cider.Cider().compute_score(gts, res)
  score, _ = cider.cider_from_raw(cands, refs)
  assert score == pytest.approx(expected, rel=1e-12)
  assert score > 0.5


def test_constant_caption_baseline_chooses_on_the_selection_set_and_scores_on_the_other():
  from qwenvl_jax.evaluation.cider import constant_caption_baseline, cider_from_raw  # pylint: disable=C0415
  selection = {0: ["a red circle"], 1: ["a red circle"], 2: ["a blue square"]}
  references = {10: ["a blue square"], 11: ["a red circle"], 12: ["a green triangle"], 13: ["a blue square"]}
  score, caption = constant_caption_baseline(selection, references)
  assert caption == "a red circle"  # twice in the selection set, although "a blue square" fits `references` better
  assert score == cider_from_raw({i: "a red circle" for i in references}, references)[0]
  assert score < cider_from_raw({i: "a blue square" for i in references}, references)[0]
  with pytest.raises(ValueError, match="non-empty"):
    constant_caption_baseline({}, references)
