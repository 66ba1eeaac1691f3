"""Stage-1 web-scale cleaning of image-text pairs (the Qwen-VL paper's filters) as a TFDS + Apache Beam job.

Public surface:
  CleanConfig, RULES                      settings and the fixed order of rejection rules (`config`)
  CleanJob, run_clean, NoPairsKeptError   run a job with any Beam runner (`pipeline`)
  clean_batch, RawPair, Kept, Rejected    the keep/drop decision without Beam (`filters`)
  Scorer, DominantColorScorer             pluggable image-text similarity (`scoring`)
Entry point: `python -m qwenvl_jax.clean --input=... --output_dir=...`.
"""
from qwenvl_jax.cleaning.config import RULES, CleanConfig
from qwenvl_jax.cleaning.filters import Kept, RawPair, Rejected, clean_batch
from qwenvl_jax.cleaning.pipeline import CleanJob, NoPairsKeptError, beam_options_from_string, run_clean
from qwenvl_jax.cleaning.scoring import DominantColorScorer, Scorer, SpecFactory

__all__ = [
    "beam_options_from_string", "clean_batch", "CleanConfig", "CleanJob", "DominantColorScorer", "Kept",
    "NoPairsKeptError", "RawPair", "Rejected", "RULES", "run_clean", "Scorer", "SpecFactory",
]
