r"""Stage-1 web-scale cleaning: JSONL/Parquet image-text shards -> a TFDS ArrayRecord dataset + a JSON report.

One machine (DirectRunner, in-process):
  python -m qwenvl_jax.clean --input='raw/*.jsonl' --output_dir=/data/tfds

Several local worker processes:
  python -m qwenvl_jax.clean --input='raw/*.parquet' --output_dir=/data/tfds \
    --beam_pipeline_options=direct_num_workers=8,direct_running_mode=multi_processing

Any Beam runner (options in TFDS's comma-separated syntax). Workers need this package and its requirements:
build it once (`pip wheel --no-deps -w dist .`) and ship it with `extra_package`; gs:// paths need
`apache-beam[gcp]` (shard listing) and `gcsfs` (TFDS and image reads go through etils.epath, TensorFlow-free):
  python -m qwenvl_jax.clean --input='gs://b/raw/*.parquet' --output_dir=gs://b/tfds \
    --beam_pipeline_options=runner=DataflowRunner,project=P,region=R,temp_location=gs://b/tmp,\
requirements_file=requirements.txt,extra_package=dist/qwenvl_jax-0.1.0-py3-none-any.whl

With the similarity filter scored by a JAX CLIP (Hugging Face CLIPModel / ChineseCLIPModel folders; Chinese
captions, as the job detects them, go to the Chinese-CLIP scorer, each language with its own threshold):
  python -m qwenvl_jax.clean --input='raw/*.parquet' --output_dir=/data/tfds \
    --scorer=clip:/ckpt/clip-vit-base-patch32 --min_similarity=0.28 \
    --scorer_zh=chinese_clip:/ckpt/chinese-clip-vit-base-patch16 --min_similarity_zh=0.3

The dataset lands in <output_dir>/cleaned_pairs/1.0.0/ (read it with `source=array_record:<that folder>` in the
stage-1 data config); the report in --report (default <output_dir>/clean_report.json). Existing outputs are never
overwritten. Rule order and thresholds: qwenvl_jax/cleaning/config.py.

The console shows the progress bar, the summary line and Beam's warnings and errors (local worker processes'
included); `--verbosity=0` adds Beam's INFO lines. A mistake found while the job runs (a shard cut short) is one
`error:` line and exit status 2 in every local running mode.
"""
import json
import logging
import sys

from absl import app
from absl import flags

from qwenvl_jax import cli

from qwenvl_jax.cleaning import config as config_lib
from qwenvl_jax.cleaning import pipeline
from qwenvl_jax.cleaning import report as report_lib
from qwenvl_jax.cleaning import scoring

_DEFAULTS = config_lib.CleanConfig()

_INPUT = flags.DEFINE_list("input", None, "Comma-separated file patterns of JSONL/Parquet shards.", required=True)
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "TFDS data dir the dataset is written to.", required=True)
_REPORT = flags.DEFINE_string("report", None, "JSON report path (default: <output_dir>/clean_report.json).")
_INPUT_FORMAT = flags.DEFINE_enum("input_format", "auto", ["auto", "jsonl", "parquet"], "Shard format.")
_BEAM_OPTIONS = flags.DEFINE_string(
    "beam_pipeline_options", "",
    "Beam options as 'key=value,key=value' (e.g. runner=DataflowRunner,project=...); default DirectRunner.")
_SCORER = flags.DEFINE_string(
    "scorer", None, "Image-text scorer: 'clip:<HF CLIPModel folder>', 'chinese_clip:<folder>', or a plugin factory "
    "'package.module:attribute' (see qwenvl_jax/cleaning/scoring.py).")
_SCORER_PLATFORM = flags.DEFINE_enum(
    "scorer_platform", "cpu", ["cpu", "auto"],
    "Where CLIP scorers run: cpu (any number of workers per host) or auto (the host's GPU/TPU; run one scoring "
    "worker per host, e.g. direct_num_workers=1).")
_SCORER_ZH = flags.DEFINE_string(
    "scorer_zh", None, "Scorer of captions detected as Chinese (e.g. 'chinese_clip:<folder>'); others use --scorer.")

_TEXT_KEY = flags.DEFINE_string("text_key", _DEFAULTS.text_key, "Caption column.")
_IMAGE_KEY = flags.DEFINE_string("image_key", _DEFAULTS.image_key, "Image column (bytes, path, URL or struct).")
_ID_KEY = flags.DEFINE_string("id_key", None, "Record id column (default: '<shard file>:<row>', with the folders "
                               "that tell apart shards of one file name).")
_SCORE_KEY = flags.DEFINE_string("score_key", None, "Precomputed image-text similarity column.")
_SKIP_SIMILARITY = flags.DEFINE_bool("skip_similarity", False, "Clean without the image-text similarity filter "
                                     "(needed when neither --score_key nor --scorer is given).")
_IMAGE_ROOT = flags.DEFINE_string("image_root", None, "Folder of relative image paths (default: the shard's).")
_LANGUAGES = flags.DEFINE_list("languages", list(_DEFAULTS.languages), "Accepted caption languages.")
_MIN_TEXT_UNITS = flags.DEFINE_integer("min_text_units", _DEFAULTS.min_text_units, "Shortest caption (units).")
_MAX_TEXT_UNITS = flags.DEFINE_integer("max_text_units", _DEFAULTS.max_text_units, "Longest caption (units).")
_MAX_ASPECT_RATIO = flags.DEFINE_float("max_aspect_ratio", _DEFAULTS.max_aspect_ratio, "Long side / short side.")
_MIN_IMAGE_SIDE = flags.DEFINE_integer("min_image_side", _DEFAULTS.min_image_side, "Smallest short side (px).")
_MIN_SIMILARITY = flags.DEFINE_float("min_similarity", _DEFAULTS.min_similarity, "Lowest accepted score.")
_MIN_SIMILARITY_ZH = flags.DEFINE_float("min_similarity_zh", None,
                                        "Lowest accepted score of Chinese captions (default: --min_similarity).")
_MAX_IMAGE_BYTES = flags.DEFINE_integer("max_image_bytes", _DEFAULTS.max_image_bytes, "Largest image file.")
_MAX_IMAGE_PIXELS = flags.DEFINE_integer("max_image_pixels", _DEFAULTS.max_image_pixels, "Largest image.")
_MAX_STORED_SIDE = flags.DEFINE_integer("max_stored_side", None, "Downscale kept images to this long side.")
_JPEG_QUALITY = flags.DEFINE_integer("jpeg_quality", _DEFAULTS.jpeg_quality, "Quality of re-encoded images.")
_URL_TIMEOUT_S = flags.DEFINE_float("url_timeout_s", _DEFAULTS.url_timeout_s, "Timeout of one URL fetch.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", _DEFAULTS.batch_size, "Pairs per scorer call.")
_SAMPLE_SIZE = flags.DEFINE_integer("sample_size", _DEFAULTS.sample_size, "Rejected pairs per rule in the report.")


def job_from_flags() -> pipeline.CleanJob:
  """The CleanJob the command line describes."""
  cfg = config_lib.CleanConfig(
      text_key=_TEXT_KEY.value, image_key=_IMAGE_KEY.value, id_key=_ID_KEY.value, score_key=_SCORE_KEY.value,
      image_root=_IMAGE_ROOT.value, languages=tuple(_LANGUAGES.value), min_text_units=_MIN_TEXT_UNITS.value,
      max_text_units=_MAX_TEXT_UNITS.value, max_aspect_ratio=_MAX_ASPECT_RATIO.value,
      min_image_side=_MIN_IMAGE_SIDE.value, min_similarity=_MIN_SIMILARITY.value,
      min_similarity_by_language={} if _MIN_SIMILARITY_ZH.value is None else {"zh": _MIN_SIMILARITY_ZH.value},
      max_image_bytes=_MAX_IMAGE_BYTES.value, max_image_pixels=_MAX_IMAGE_PIXELS.value,
      max_stored_side=_MAX_STORED_SIDE.value, jpeg_quality=_JPEG_QUALITY.value, url_timeout_s=_URL_TIMEOUT_S.value,
      batch_size=_BATCH_SIZE.value, sample_size=_SAMPLE_SIZE.value)
  return pipeline.CleanJob(
      inputs=tuple(_INPUT.value), output_dir=_OUTPUT_DIR.value, report_path=_REPORT.value, config=cfg,
      input_format=_INPUT_FORMAT.value,
      scorer_factory=_scorer_factory(_SCORER.value),
      language_scorer_factories={"zh": _scorer_factory(_SCORER_ZH.value)} if _SCORER_ZH.value else {},
      skip_similarity=_SKIP_SIMILARITY.value)


def _scorer_factory(spec: str | None) -> scoring.ScorerFactory | None:
  """The factory of a --scorer* flag value (CLIP checkpoints are checked here, before any data is read)."""
  if not spec:
    return None
  return scoring.make_factory(spec, _SCORER_PLATFORM.value, max_batch=_BATCH_SIZE.value)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; Beam options go in --beam_pipeline_options")
  cli.quiet_libraries()  # Beam's and TFDS's INFO lines would bury the result (or the error) line
  job = job_from_flags()  # a bad scorer checkpoint stops here with one line, before any data is read
  report = pipeline.run_clean(job, pipeline.beam_options_from_string(_BEAM_OPTIONS.value))
  logging.info("cleaning report (%s):\n%s", job.report,
               json.dumps({k: report[k] for k in ("num_pairs", "kept", "rejected")}, indent=2))
  print(f"kept {report['kept']} of {report['num_pairs']} pairs -> {job.dataset_dir}; report: {job.report}")
  warning = report_lib.duplicate_ids_warning(report)
  if warning:  # the dataset is written as it is; a user joining it back to the source by id must know
    print(warning, file=sys.stderr)


if __name__ == "__main__":
  cli.run(main)
