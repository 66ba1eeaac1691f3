"""Batched scoring: padding rows and padded text lengths change no score, shapes stay in their buckets, and the
scores are transformers' (cosine of its image_embeds and text_embeds) within 1e-5."""
import numpy as np
import PIL.Image
import pytest

from qwenvl_jax.clip import ClipSimilarity
from qwenvl_jax.clip.similarity import buckets
from tests.clip import reference

TEXTS = {"clip": ["a red square on the table", "green grass", "the blue sea", "a dog on the sky",
                  "photo of a cat " * 10],
         "chinese_clip": ["一只红色的狗在沙滩上", "绿色的草地", "蓝天", "公交车的照片", "照片" * 20]}


def _images(n):
  rng = np.random.default_rng(3)
  return [PIL.Image.fromarray(rng.integers(0, 256, (40 + 3 * i, 36, 3), dtype=np.uint8)) for i in range(n)]


def test_buckets():
  assert buckets(8, 32) == (8, 16, 32)
  assert buckets(8, 24) == (8, 16, 24)
  assert buckets(4, 4) == (4,)


@pytest.mark.parity
@pytest.mark.parametrize("family", ["clip", "chinese_clip"])
def test_padding_changes_no_score(family, clip_checkpoint, chinese_clip_checkpoint):
  folder, hf = clip_checkpoint if family == "clip" else chinese_clip_checkpoint
  sim = ClipSimilarity(folder, family, max_batch=4, min_bucket=2, text_buckets=(8,))
  images, texts = _images(5), TEXTS[family]
  base = sim(images[:3], texts[:3])                                # batch bucket 4 with one blank row; 8 tokens
  filled = sim(images[:4], texts[:4])                              # the blank row replaced by a real pair
  fewer = sim(images[:2], texts[:2])                               # batch bucket 2: no padding row
  longer = sim(images[:3] + images[4:], texts[:3] + texts[4:])     # the long caption: the full context length
  # Same compiled shapes, other content in the padding row: bit-identical.
  np.testing.assert_array_equal(base, filled[:3])
  # Other shapes (batch 2 vs 4; 77 or 52 tokens vs 8): equal up to the rounding of other matmul tilings.
  np.testing.assert_allclose(fewer, base[:2], atol=1e-6, rtol=0)
  np.testing.assert_allclose(longer[:3], base, atol=1e-6, rtol=0)
  want = reference.pair_scores(hf, folder, family, images[:3] + images[4:], texts[:3] + texts[4:],
                               sim.info.config.text_len)
  np.testing.assert_allclose(longer, want, atol=1e-5, rtol=0)
  assert np.ptp(want) > 1e-2
  # Calls of every size compiled no shape outside the buckets.
  for n in range(1, 5):
    sim(_images(n), ["a"] * n)
  assert sim._image_fn._cache_size() <= len(sim.batch_buckets)
  assert sim._text_fn._cache_size() <= len(sim.batch_buckets) * len(sim.text_buckets)


def test_more_pairs_than_a_batch_are_split(clip_checkpoint):
  sim = ClipSimilarity(clip_checkpoint[0], "clip", max_batch=4, min_bucket=2, text_buckets=(8,))
  images, texts = _images(4) * 2 + _images(1), TEXTS["clip"][:4] * 2 + ["a"]
  scores = sim(images, texts)
  assert scores.shape == (9,) and scores.dtype == np.float32
  np.testing.assert_array_equal(scores[:4], scores[4:8])
