"""Batched CLIP similarity of (image, text) pairs in a bounded set of compiled shapes.

Letters: B pairs asked for, Bb batch bucket, Tb text-length bucket, S image side, P projection width.

`ClipSimilarity(dir, family)` loads a checkpoint once (`clip.loading`) and scores any number of pairs:
images are resized and cropped on the host (`clip.images.prepare`), texts tokenized (`clip.tokenizers`), then the
pairs go to the device in chunks of at most `max_batch`, each padded to the smallest batch bucket that holds it
(powers of two from `min_bucket` up to `max_batch`) and each text chunk to the smallest length bucket that holds
its longest encoding. So the image tower compiles at most once per batch bucket and the text tower once per
(batch bucket, length bucket), whatever sizes the caller's batches have: nothing recompiles in steady state.

Where it runs (`platform`): "cpu" (the default) keeps JAX in the worker process on the CPU and never opens an
accelerator, so any number of worker processes can score side by side on one host; "auto" uses JAX's default
backend (the GPU or TPU of the host), which one process per host can own, so run one scoring worker per accelerator
host then.

Padding never changes a score: padding images are black, padding texts are the encoding of "" and every row is
computed independently (attention never mixes rows; BERT masks padding tokens; the causal CLIP text tower never
lets the end-of-text token see the padding after it). Truncating a text to a length bucket drops only padding.
"""
from __future__ import annotations

import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwenvl_jax.clip import images as images_lib
from qwenvl_jax.clip.loading import load_clip
from qwenvl_jax.data.images import ImageLike

DEFAULT_MAX_BATCH = 32
DEFAULT_MIN_BUCKET = 8
# Captions of web pairs are mostly under 16 CLIP tokens and nearly all under 32; the context caps the last bucket.
DEFAULT_TEXT_BUCKETS = (16, 32)
PLATFORMS = ("cpu", "auto")


def buckets(low: int, high: int) -> tuple[int, ...]:
  """Powers of two from `low` while below `high`, then `high` itself: (8, 16, 32) for (8, 32), (8, 16, 24)."""
  if not 1 <= low <= high:
    raise ValueError(f"need 1 <= low <= high, got {low}, {high}")
  out, b = [], low
  while b < high:
    out.append(b)
    b *= 2
  return tuple(out) + (high,)


def _fit(size: int, sizes: Sequence[int]) -> int:
  return next(s for s in sizes if s >= size)


class ClipSimilarity:
  """A scorer: `scorer(images, texts)` -> float32[B] cosine similarities (the CLIP score), one per pair.

  Satisfies `qwenvl_jax.cleaning.scoring.Scorer`. Thread-safe (jitted calls and the Rust tokenizer are), so one
  instance can serve every thread of a worker process.
  """

  def __init__(self, directory: str | os.PathLike, family: str, *, max_batch: int = DEFAULT_MAX_BATCH,
               min_bucket: int = DEFAULT_MIN_BUCKET, text_buckets: Sequence[int] = DEFAULT_TEXT_BUCKETS,
               dtype=jnp.float32, platform: str = "cpu"):
    """Loads the checkpoint (raises `CheckpointError` when it is missing or malformed).

    Args:
      directory: a transformers save_pretrained folder of a CLIPModel ("clip") or ChineseCLIPModel
        ("chinese_clip").
      family: "clip" or "chinese_clip".
      max_batch: most pairs per device call (larger inputs are split).
      min_bucket: smallest padded batch.
      text_buckets: padded text lengths below the tokenizer's context (which is always the last bucket).
      dtype: compute dtype of the towers (float32 on CPU; bfloat16 is an option on accelerators).
      platform: "cpu" or "auto" (JAX's default backend), see the module docstring.
    """
    if platform not in PLATFORMS:
      raise ValueError(f"platform must be one of {PLATFORMS}, got {platform!r}")
    if platform == "cpu" and not jax.config.jax_platforms:
      # Before JAX starts its backends in this process: then it never opens the host's GPU/TPU, which another
      # worker process may own. If the backends are already up, the explicit placement below still keeps the
      # model on the CPU.
      jax.config.update("jax_platforms", "cpu")
    self.device = jax.devices("cpu")[0] if platform == "cpu" else jax.devices()[0]
    model, self.info = load_clip(directory, family, dtype=dtype)
    self.directory, self.family = os.fspath(directory), family
    self.batch_buckets = buckets(min(min_bucket, max_batch), max_batch)
    context = self.info.config.text_len
    self.text_buckets = tuple(sorted({t for t in text_buckets if t < context} | {context}))
    self._graphdef, state = nnx.split(model)
    self._state = jax.device_put(state, self.device)
    side = self.info.config.vision.image_size
    self._blank_image = np.zeros((side, side, 3), np.uint8)
    self._blank_text = self.info.tokenizer.encode([""])[0]

    def image_embeds(state, images):
      return nnx.merge(self._graphdef, state).image_embeds(images)

    def text_embeds(state, ids, mask):
      return nnx.merge(self._graphdef, state).text_embeds(ids, mask)

    self._image_fn = jax.jit(image_embeds)
    self._text_fn = jax.jit(text_embeds)

  def prepare_images(self, images: Sequence[ImageLike]) -> np.ndarray:
    """uint8[B, S, S, 3]: each image resized and cropped as the checkpoint's image processor does."""
    return np.stack([images_lib.prepare(image, self.info.image_spec) for image in images])

  def embed(self, pixels: np.ndarray, encoded: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Unit image and text embeddings float32[B, P] of prepared pixels and token ids, B <= max_batch."""
    n = len(encoded)
    if pixels.shape[0] != n or not 1 <= n <= self.batch_buckets[-1]:
      raise ValueError(f"embed takes 1..{self.batch_buckets[-1]} pairs, got {pixels.shape[0]} images, {n} texts")
    rows = _fit(n, self.batch_buckets)
    padded = np.concatenate([pixels, np.broadcast_to(self._blank_image, (rows - n,) + pixels.shape[1:])])
    texts = list(encoded) + [self._blank_text] * (rows - n)
    length = _fit(max(len(e) for e in texts), self.text_buckets)
    ids, mask = self.info.tokenizer.pad(texts, length)
    put = lambda x: jax.device_put(x, self.device)  # noqa: E731
    image = np.asarray(self._image_fn(self._state, put(padded)))[:n]
    text = np.asarray(self._text_fn(self._state, put(ids), put(mask)))[:n]
    return image, text

  def __call__(self, images: Sequence[ImageLike], texts: Sequence[str]) -> np.ndarray:
    """float32[B]: cosine similarity of images[b] (bytes, path, PIL or uint8[H, W, 3]) and texts[b]."""
    if len(images) != len(texts):
      raise ValueError(f"{len(images)} images but {len(texts)} texts")
    out = np.empty((len(texts),), np.float32)
    step = self.batch_buckets[-1]
    for start in range(0, len(texts), step):
      stop = min(start + step, len(texts))
      image, text = self.embed(self.prepare_images(images[start:stop]),
                               self.info.tokenizer.encode(texts[start:stop]))
      out[start:stop] = np.sum(image * text, axis=-1)
    return out

  def __repr__(self) -> str:
    return f"ClipSimilarity({self.family}:{self.directory})"
