"""Stage-1 web-scale cleaning of image-text pairs (the Qwen-VL paper's filters) as a TFDS + Apache Beam job.

Public surface:
  CleanConfig, RULES                      settings and the fixed order of rejection rules (`config`)
  CleanJob, run_clean, NoPairsKeptError   run a job with any Beam runner (`pipeline`)
  clean_batch, RawPair, Kept, Rejected    the keep/drop decision without Beam (`filters`)
  Scorer, DominantColorScorer             pluggable image-text similarity (`scoring`)
Entry point: `python -m qwenvl_jax.clean --input=... --output_dir=...`.
"""
import logging as _logging


class _BeamGcpNotice(_logging.Filter):
  """apache_beam's import warns on the root logger that its BigQuery client is missing (the cleaning job reads no
  BigQuery); every `clean` run printed it. Applied to the import only."""

  def filter(self, record: _logging.LogRecord) -> bool:
    return "apitools not found" not in record.getMessage()


_notice = _BeamGcpNotice()
_logging.getLogger().addFilter(_notice)
try:
  import apache_beam  # noqa: F401  pylint: disable=unused-import  (imported here, under the filter)
finally:
  _logging.getLogger().removeFilter(_notice)

from qwenvl_jax.cleaning.config import RULES, CleanConfig  # noqa: E402
from qwenvl_jax.cleaning.filters import Kept, RawPair, Rejected, clean_batch  # noqa: E402
from qwenvl_jax.cleaning.pipeline import CleanJob, NoPairsKeptError, beam_options_from_string, run_clean  # noqa: E402
from qwenvl_jax.cleaning.scoring import DominantColorScorer, Scorer, SpecFactory  # noqa: E402

__all__ = [
    "beam_options_from_string", "clean_batch", "CleanConfig", "CleanJob", "DominantColorScorer", "Kept",
    "NoPairsKeptError", "RawPair", "Rejected", "RULES", "run_clean", "Scorer", "SpecFactory",
]
