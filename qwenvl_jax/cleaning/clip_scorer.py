"""The CLIP scorers of the cleaning job: `--scorer=clip:DIR`, `--scorer_zh=chinese_clip:DIR`.

`ClipScorerFactory("clip", dir)` is what travels to the Beam workers: a picklable description of a checkpoint,
checked on the launching machine when it is built (config, every tensor's name and shape from the file headers,
tokenizer and image-processor files; no weights and no input data are read), so a missing or wrongly shaped
checkpoint stops the job with one line before it starts. On a worker, calling it loads the model
(`qwenvl_jax.clip.ClipSimilarity`); the job's DoFn does that once per worker process (`pipeline._CleanBatchFn`).

The score is the cosine similarity of the L2-normalized image and text embeddings, the scale LAION's thresholds
are on (0.28 for OpenAI ViT-B/32 in LAION-5B English).
"""
from __future__ import annotations

import os

from qwenvl_jax.cleaning import scoring
from qwenvl_jax.clip import similarity
from qwenvl_jax.clip.config import FAMILIES
from qwenvl_jax.clip.loading import check_checkpoint


class ClipScorerFactory:
  """Builds a `ClipSimilarity` scorer for one checkpoint; checks the checkpoint when constructed.

  Raises (constructor):
    qwenvl_jax.clip.CheckpointError (a ValueError): one line naming what is missing or wrong.
  """
  score_range = scoring.COSINE_RANGE

  def __init__(self, family: str, directory: str | os.PathLike, platform: str = "cpu",
               max_batch: int = similarity.DEFAULT_MAX_BATCH):
    if family not in FAMILIES:
      raise ValueError(f"unknown CLIP family {family!r}; known: {FAMILIES}")
    if platform not in similarity.PLATFORMS:
      raise ValueError(f"scorer platform must be one of {similarity.PLATFORMS}, got {platform!r}")
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
      raise ValueError(f"scorer max_batch must be a positive integer, got {max_batch!r}")
    self.family = family
    self.platform = platform
    self.max_batch = max_batch
    self.directory = os.path.abspath(os.fspath(directory))
    check_checkpoint(self.directory, family)

  def __call__(self) -> similarity.ClipSimilarity:
    return similarity.ClipSimilarity(self.directory, self.family, platform=self.platform, max_batch=self.max_batch)

  def __repr__(self) -> str:
    return f"{self.family}:{self.directory}" + ("" if self.platform == "cpu" else f" (platform {self.platform})")
