"""The cleaning job as an Apache Beam pipeline inside a TFDS Beam dataset builder.

```
shard paths ─Reshuffle─ read rows ─Reshuffle─ batch ─ clean_batch ─┬─ kept ────► TFDS ArrayRecord dataset
                                                                  ├─ rejected ─► counts + samples ─► JSON report
                                                                  └─ scored ───► histogram + samples ┘
```
`run_clean(job, beam_options)` checks the inputs and that nothing would be overwritten, builds the `CleanedPairs`
TFDS dataset (`<output_dir>/cleaned_pairs/1.0.0/`, features `qwenvl_jax.data.features.image_text_features()`,
ArrayRecord shards) with whatever Beam runner the options name (by default the DirectRunner's local engine, see
`LOCAL_RUNNER`), and writes the report.
Each rule also has a Beam counter (namespace `qwenvl_clean`), so a runner's UI shows progress while the job runs.
Scorers (a model each, e.g. CLIP) are built once per worker process, whatever number of DoFn instances and threads
the runner gives it (Beam's `Shared`), and score each `BatchElements` batch in one call.

The rows are reshuffled twice: after listing the shards (so shards spread over workers) and after reading them (so
one big shard does not leave every other worker idle). The TFDS writer then shuffles by example key
("<shard path>:<row>"), so the dataset's order is deterministic whatever the runner.
"""
import argparse
import dataclasses
import difflib
import functools
import os
import tempfile
import uuid
from typing import Any, Sequence

import apache_beam as beam
import tensorflow_datasets as tfds
from apache_beam.utils import shared
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.options.pipeline_options import StandardOptions
from etils import epath

from qwenvl_jax import errors
from qwenvl_jax.cleaning import config as config_lib
from qwenvl_jax.cleaning import failures
from qwenvl_jax.cleaning import filters
from qwenvl_jax.cleaning import report as report_lib
from qwenvl_jax.cleaning import scoring
from qwenvl_jax.cleaning import sources
from qwenvl_jax.cleaning.config import RULES, CleanConfig
from qwenvl_jax.data import features

DATASET_NAME = "cleaned_pairs"
DATASET_VERSION = "1.0.0"
METRICS_NAMESPACE = "qwenvl_clean"
# Beam's DirectRunner first tries its Prism runner, which downloads a binary from the internet, and falls back to
# its in-process engine (FnApiRunner) when that fails; naming the engine directly never downloads and starts faster.
# It honours `direct_num_workers` and `direct_running_mode` (in_memory, multi_threading, multi_processing) like
# DirectRunner. The job's subclass starts worker processes whose logs go through the job and that leave quietly on
# Ctrl-C (`local_runner`); named as a string, which Beam resolves when the job runs.
LOCAL_RUNNER = "qwenvl_jax.cleaning.local_runner.LocalRunner"
_DIRECT_RUNNER_NAMES = ("direct", "directrunner")


class NoPairsKeptError(errors.UserError, RuntimeError):
  """Every pair was rejected, so there is no dataset to write (the data or the settings are the user's)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class CleanJob:
  """One cleaning run.

  Attributes:
    inputs: file patterns (globs allowed) of JSONL/Parquet shards.
    output_dir: TFDS data dir; the dataset goes to `<output_dir>/cleaned_pairs/1.0.0/`.
    report_path: where the JSON report goes; None = `<output_dir>/clean_report.json`.
    config: filter settings.
    input_format: "auto" (from file names), "jsonl" or "parquet".
    scorer_factory: zero-argument callable building the image-text scorer on each worker (see `scoring`); it
      must be picklable. None = no scorer (the score column, if configured, is still used).
    language_scorer_factories: per detected caption language, a factory of the scorer for that language's pairs
      (e.g. {"zh": a Chinese-CLIP factory}); other languages go to `scorer_factory`.
    skip_similarity: run without the image-text similarity filter. Without a score column or a scorer the job
      refuses to run unless this is set, rather than silently keeping pairs of any similarity.
  """
  inputs: tuple[str, ...]
  output_dir: str
  report_path: str | None = None
  config: CleanConfig = CleanConfig()
  input_format: str = "auto"
  scorer_factory: scoring.ScorerFactory | None = None
  language_scorer_factories: dict[str, scoring.ScorerFactory] = dataclasses.field(default_factory=dict)
  skip_similarity: bool = False

  def __post_init__(self):
    if isinstance(self.inputs, str):
      object.__setattr__(self, "inputs", (self.inputs,))
    object.__setattr__(self, "inputs", tuple(self.inputs))
    if not self.output_dir:
      raise ValueError("CleanJob.output_dir must be a folder path")
    if self.input_format not in sources.FORMATS:
      raise ValueError(f"CleanJob.input_format must be one of {sources.FORMATS}, got {self.input_format!r}")
    object.__setattr__(self, "language_scorer_factories", dict(self.language_scorer_factories))
    factories = [f for f in (self.scorer_factory, *self.language_scorer_factories.values()) if f is not None]
    if factories and self.config.score_key:
      raise ValueError(f"give either a score column (score_key={self.config.score_key!r}) or a scorer "
                       f"({factories[0]!r}), not both")
    for factory in factories:
      if not callable(factory):
        raise ValueError(f"CleanJob scorer factories must be callable, got {factory!r}")
    scored = bool(factories) or bool(self.config.score_key)
    if not scored and not self.skip_similarity:
      raise errors.ConfigError(
          f"the image-text similarity filter (min_similarity={self.config.min_similarity}) has no scores",
          "give --score_key=COLUMN (precomputed CLIP scores in the input) or --scorer=SPEC (computed by the job), "
          "or pass --skip_similarity to clean without this filter")
    if scored and self.skip_similarity:
      raise errors.ConfigError("--skip_similarity contradicts the score column / scorer given",
                               "drop --skip_similarity, or the --score_key / --scorer")
    self._check_thresholds()

  def _check_thresholds(self) -> None:
    """Refuses a similarity threshold outside the scores its scorer can give (`scoring.score_range`: CLIP's cosine
    [-1, 1]), which would reject every pair, or none."""
    cfg, own = self.config, self.language_scorer_factories
    for name, value, language in cfg.threshold_settings():
      if language is None:  # min_similarity: captions of every language without a threshold of its own
        factories = [f for lang, f in own.items() if lang not in cfg.min_similarity_by_language]
        factories += [self.scorer_factory] if self.scorer_factory is not None else []
      else:
        factories = [f for f in (own.get(language, self.scorer_factory),) if f is not None]
      for factory in factories:
        bounds = scoring.score_range(factory)
        if bounds is not None:
          config_lib.check_threshold_range(name, value, *bounds, f"the scores of {factory!r}")

  def scorers_description(self) -> dict[str, str] | None:
    """Which scorer scores which captions, for the report ("*" = every language without its own)."""
    out = {"*": repr(self.scorer_factory)} if self.scorer_factory is not None else {}
    out.update({lang: repr(f) for lang, f in sorted(self.language_scorer_factories.items())})
    return out or None

  @property
  def similarity_filter(self) -> str:
    """What the low_similarity rule does in this job, for the report."""
    if self.skip_similarity:
      return "skipped (skip_similarity): no pair was rejected for its image-text similarity"
    cfg = self.config
    by_language = f" ({cfg.min_similarity_by_language} by language)" if cfg.min_similarity_by_language else ""
    if cfg.score_key:
      return f"score column {cfg.score_key!r} >= {cfg.min_similarity}{by_language}"
    parts = [f"scorer {f!r} >= {cfg.threshold(lang)} for {lang} captions"
             for lang, f in sorted(self.language_scorer_factories.items())]
    if self.scorer_factory is not None:
      parts.append(f"scorer {self.scorer_factory!r} >= {cfg.min_similarity}{by_language}"
                   + (" for other captions" if parts else ""))
    return "; ".join(parts)

  @property
  def dataset_dir(self) -> str:
    return os.path.join(self.output_dir, DATASET_NAME, DATASET_VERSION)

  @property
  def report(self) -> str:
    return self.report_path or os.path.join(self.output_dir, "clean_report.json")


class _Scorers:
  """The scorers of one worker process (a class, because Beam's `Shared` holds its objects by weak reference)."""

  def __init__(self, default: scoring.ScorerFactory | None, by_language: dict[str, scoring.ScorerFactory]):
    self.default = default() if default is not None else None
    self.by_language = {lang: factory() for lang, factory in by_language.items()}


@failures.carry_user_errors
def _read_shard(shard: tuple[str, str], input_format: str, image_root: str | None):
  """`sources.read_shard` of a (path, name) on a worker (a truncated shard's InputFormatError reaches `run_clean`
  whatever the runner)."""
  path, name = shard
  yield from sources.read_shard(path, input_format, image_root, name=name)


class _CleanBatchFn(beam.DoFn):
  """Runs `filters.clean_batch` on a batch; kept pairs go to the main output, rejected ones to "rejected", and
  every scored pair (kept or not) to "scored" for the report's score histograms."""

  def __init__(self, cfg: CleanConfig, scorer_factory: scoring.ScorerFactory | None,
               language_scorer_factories: dict[str, scoring.ScorerFactory] | None = None):
    self._cfg = cfg
    self._scorer_factory = scorer_factory
    self._language_factories = dict(language_scorer_factories or {})
    self._shared = shared.Shared()
    self._scorers = None
    self._kept = beam.metrics.Metrics.counter(METRICS_NAMESPACE, "kept")
    self._rejected = {rule: beam.metrics.Metrics.counter(METRICS_NAMESPACE, rule) for rule in RULES}

  @failures.carry_user_errors
  def setup(self):
    if self._scorer_factory is not None or self._language_factories:
      # One model per worker process: every DoFn instance of the process (one per thread or bundle) shares it.
      tag = repr((self._scorer_factory, sorted(self._language_factories.items())))
      self._scorers = self._shared.acquire(lambda: _Scorers(self._scorer_factory, self._language_factories),
                                           tag=tag)

  @failures.carry_user_errors
  def process(self, batch: Sequence[filters.RawPair]):
    scorers = self._scorers
    outcomes = filters.clean_batch(batch, self._cfg, scorers.default if scorers else None,
                                   scorers.by_language if scorers else None)
    for outcome in outcomes:
      if isinstance(outcome, filters.Kept):
        self._kept.inc()
        yield outcome.key, outcome.example()
      else:
        self._rejected[outcome.rule].inc()
        yield beam.pvalue.TaggedOutput("rejected", outcome)
      if outcome.score is not None:
        yield beam.pvalue.TaggedOutput("scored", report_lib.scored_record(outcome, self._cfg))


class _DuplicateIds(beam.CombineFn):
  """(id, kept pairs carrying it) of the ids several kept pairs carry -> the report's `duplicate_ids`: how many
  such ids, how many pairs carry them, and the `sample_size` smallest of them (the same whatever the runner)."""

  def __init__(self, sample_size: int):
    super().__init__()
    self._sample_size = sample_size

  def create_accumulator(self):
    return 0, 0, []

  def add_input(self, mutable_accumulator, element):
    ids, pairs, sample = mutable_accumulator
    return ids + 1, pairs + element[1], sorted(sample + [tuple(element)])[:self._sample_size]

  def merge_accumulators(self, accumulators):
    ids = pairs = 0
    sample: list = []
    for more_ids, more_pairs, more in accumulators:
      ids, pairs, sample = ids + more_ids, pairs + more_pairs, sorted(sample + list(more))[:self._sample_size]
    return ids, pairs, sample

  def extract_output(self, accumulator):
    ids, pairs, sample = accumulator
    return {"ids": ids, "pairs": pairs, "samples": [{"id": i, "pairs": n} for i, n in sample]}


@failures.carry_user_errors
def _write_report(_, *, path: str, header: dict, counts: dict, samples: dict, kept: int, histogram: list,
                  near_threshold: list, sample_size: int, duplicate_ids: dict) -> None:
  similarity = report_lib.similarity_section(histogram=histogram, near_threshold=near_threshold,
                                             sample_size=sample_size)
  report_lib.write_partial(path, report_lib.build_report(counts=counts, samples=samples, kept=kept, header=header,
                                                         similarity=similarity, duplicate_ids=duplicate_ids))


class CleanPairs(beam.PTransform):
  """PBegin -> PCollection[(key, example)] of kept pairs; writes the report (to `report_path`) as a side effect."""

  def __init__(self, *, shards: Sequence[str], config: CleanConfig, input_format: str,
               scorer_factory: scoring.ScorerFactory | None, report_path: str, header: dict,
               language_scorer_factories: dict[str, scoring.ScorerFactory] | None = None):
    super().__init__()
    self._shards = list(shards)
    self._cfg = config
    self._input_format = input_format
    self._scorer_factory = scorer_factory
    self._language_factories = dict(language_scorer_factories or {})
    self._report_path = report_path
    self._header = header

  def expand(self, pbegin):
    cfg = self._cfg
    pairs = (
        pbegin
        | "ListShards" >> beam.Create(sorted(sources.shard_names(self._shards).items()))
        | "SpreadShards" >> beam.Reshuffle()
        | "ReadShards" >> beam.FlatMap(_read_shard, self._input_format, cfg.image_root)
        | "SpreadPairs" >> beam.Reshuffle())
    outcomes = (
        pairs
        | "Batch" >> beam.BatchElements(min_batch_size=1, max_batch_size=cfg.batch_size)
        | "Clean" >> beam.ParDo(_CleanBatchFn(cfg, self._scorer_factory, self._language_factories))
        .with_outputs("rejected", "scored", main="kept"))
    kept, rejected, scored = outcomes.kept, outcomes.rejected, outcomes.scored
    histogram = (scored
                 | "ScoreBin" >> beam.Map(lambda s: ((s["language"], s["side"], report_lib.score_bin(s["score"])), 1))
                 | "CountPerBin" >> beam.CombinePerKey(sum))
    near_threshold = (scored
                      | "SideOfThreshold" >> beam.Map(lambda s: ((s["language"], s["side"]), s))
                      | "NearestPerSide" >> beam.combiners.Top.PerKey(max(cfg.sample_size, 1),
                                                                      key=report_lib.closeness))

    counts = (rejected
              | "RuleOf" >> beam.Map(lambda r: (r.rule, 1))
              | "CountPerRule" >> beam.CombinePerKey(sum))
    if cfg.sample_size:
      samples = (rejected
                 | "RankSample" >> beam.Map(lambda r: (r.rule, (report_lib.sample_rank(r.key), r.sample())))
                 | "SamplePerRule" >> beam.combiners.Top.PerKey(cfg.sample_size, key=lambda rs: rs[0], reverse=True))
    else:
      samples = pbegin | "NoSamples" >> beam.Create([])
    num_kept = kept | "CountKept" >> beam.combiners.Count.Globally()
    duplicate_ids = (kept
                     | "IdOf" >> beam.Map(lambda key_example: (key_example[1]["id"], 1))
                     | "PairsPerId" >> beam.CombinePerKey(sum)
                     | "Repeated" >> beam.Filter(lambda id_pairs: id_pairs[1] > 1)
                     | "DuplicateIds" >> beam.CombineGlobally(_DuplicateIds(cfg.sample_size)))
    _ = (pbegin
         | "ReportSeed" >> beam.Create([None])
         | "WriteReport" >> beam.Map(
             _write_report, path=self._report_path, header=self._header, sample_size=cfg.sample_size,
             counts=beam.pvalue.AsDict(counts), samples=beam.pvalue.AsDict(samples),
             kept=beam.pvalue.AsSingleton(num_kept), histogram=beam.pvalue.AsList(histogram),
             near_threshold=beam.pvalue.AsList(near_threshold),
             duplicate_ids=beam.pvalue.AsSingleton(duplicate_ids)))
    return kept


class CleanedPairs(tfds.core.GeneratorBasedBuilder):
  """The TFDS dataset of cleaned stage-1 image-text pairs (one "train" split, ArrayRecord)."""

  VERSION = tfds.core.Version(DATASET_VERSION)
  RELEASE_NOTES = {DATASET_VERSION: "Web image-text pairs cleaned with the Qwen-VL stage-1 filters."}
  # TFDS looks for a checksums file beside a builder's source through `code_path`, and for builders inside a
  # package that lookup imports `importlib_resources`, which TFDS 4.9.10 does not install. This builder downloads
  # nothing, so it has no checksums file and no source path to search.
  code_path = None

  # TFDS prints "Downloading and preparing dataset ..." and "... downloaded and prepared" to stdout around the
  # build; this builder downloads nothing and the job prints its own summary, so both lines are dropped.
  def _log_download_bytes(self) -> None:
    pass

  def _log_download_done(self) -> None:
    pass

  def __init__(self, *, transform: CleanPairs | None = None, metadata: dict | None = None, **kwargs):
    self._transform = transform
    self._clean_metadata = metadata or {}
    super().__init__(file_format="array_record", **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Image-text pairs kept by qwenvl_jax.cleaning (Qwen-VL stage-1 filters).",
        features=features.image_text_features(),
        metadata=tfds.core.MetadataDict(self._clean_metadata),
    )

  def _split_generators(self, dl_manager, pipeline):
    del dl_manager  # Nothing is downloaded: the inputs are the job's shards.
    if self._transform is None:
      raise ValueError("CleanedPairs builds only through run_clean(); read an existing dataset with "
                       "tfds.builder_from_directory or tfds.data_source")
    return {"train": pipeline | "CleanPairs" >> self._transform}

  def _generate_examples(self):
    raise NotImplementedError("examples come from the CleanPairs transform of _split_generators")


def beam_options_from_string(text: str) -> PipelineOptions:
  """Beam options from TFDS's comma-separated syntax: "runner=DataflowRunner,project=my-project".

  Raises:
    errors.ConfigError: a value Beam refuses (`direct_running_mode=multiprocessing`: Beam's parser printed its
      150-line usage and exited); or, for the local runner, an option no Beam options class defines (a misspelt
      `direct_num_workers` was a warning, and the job ran on one worker). Other runners may take options of their
      own (a portable runner forwards unknown ones to its job server), so only the local runner is strict.
  """
  flags = [f"--{item.strip()}" for item in text.split(",") if item.strip()] if text else []
  options = PipelineOptions(flags)
  options.get_all_options(add_extra_args_fn=functools.partial(_check_beam_flags, flags),
                          retain_unknown_options=True)
  return options


def _check_beam_flags(flags: list[str], parser: argparse.ArgumentParser) -> None:
  """Parses `flags` with Beam's parser of every options class (`PipelineOptions.get_all_options` hands it over
  complete), raising a one-line ConfigError where Beam would print its usage and exit, or would ignore a flag."""
  def refuse(message: str):
    raise errors.ConfigError(f"--beam_pipeline_options: {message}",
                             "options are key=value pairs separated by commas, e.g. "
                             "direct_num_workers=8,direct_running_mode=multi_processing")
  parser.error = refuse
  known, unknown = parser.parse_known_args(flags)
  runner = known.runner
  if unknown and (runner is None or (isinstance(runner, str) and runner.lower() in _DIRECT_RUNNER_NAMES)):
    name = unknown[0].split("=", 1)[0].lstrip("-")
    close = difflib.get_close_matches(name, sorted(vars(known)), n=1)
    refuse(f"the local DirectRunner has no option {name!r}" + (f"; did you mean {close[0]!r}?" if close else ""))


def local_runner_if_direct(options: PipelineOptions | None) -> PipelineOptions:
  """The options with no runner, or the DirectRunner, replaced by `LOCAL_RUNNER` (see there why)."""
  options = options if options is not None else PipelineOptions([])
  standard = options.view_as(StandardOptions)
  if standard.runner is None or (isinstance(standard.runner, str)
                                 and standard.runner.lower() in _DIRECT_RUNNER_NAMES):
    standard.runner = LOCAL_RUNNER
  return options


def run_clean(job: CleanJob, beam_options: PipelineOptions | None = None) -> dict[str, Any]:
  """Runs the cleaning job to completion; returns the report (also written to `job.report`).

  Args:
    job: inputs, output and settings.
    beam_options: runner and its options; None or DirectRunner = Beam's local engine (`LOCAL_RUNNER`), in this
      process unless `direct_running_mode` says otherwise.

  Raises:
    ValueError: an input pattern matches nothing, or a shard's format is unknown.
    FileExistsError: the dataset version folder or the report already exists (nothing is overwritten).
    errors.ConfigError: the report path names a folder.
    NoPairsKeptError: every pair was rejected.
  """
  shards = sources.match_shards(job.inputs, job.input_format)
  _check_columns(shards[0], job)
  if epath.Path(job.dataset_dir).exists():
    raise FileExistsError(f"output dataset {job.dataset_dir} already exists; choose another output_dir")
  if job.report.endswith(("/", os.sep)) or epath.Path(job.report).is_dir():
    # A folder was refused only after the whole job had run and written the dataset (the partial report made it).
    raise errors.ConfigError(f"the report {job.report} is a folder; --report names the report's JSON file itself",
                             f"e.g. --report={os.path.join(job.report, 'clean_report.json')}")
  if epath.Path(job.report).exists():
    raise FileExistsError(f"report {job.report} already exists; choose another report path")
  options = local_runner_if_direct(beam_options)
  header = {
      "inputs": list(job.inputs),
      "num_shards": len(shards),
      "config": job.config.to_json(),
      "scorer": repr(job.scorer_factory) if job.scorer_factory is not None else None,
      "scorers": job.scorers_description(),
      "similarity_filter": job.similarity_filter,
      "dataset": job.dataset_dir,
  }

  def transform(partial: str) -> CleanPairs:
    return CleanPairs(shards=shards, config=job.config, input_format=job.input_format,
                      scorer_factory=job.scorer_factory, report_path=partial, header=header,
                      language_scorer_factories=job.language_scorer_factories)

  # The pipeline writes the report under a unique name; it becomes `job.report` only once the job is done.
  partial = f"{job.report}.incomplete-{uuid.uuid4().hex}"
  builder = CleanedPairs(transform=transform(partial), metadata={"clean": header}, data_dir=job.output_dir)
  with tempfile.TemporaryDirectory(prefix="qwenvl_clean_") as download_dir:
    try:
      with failures.quiet_failures():
        builder.download_and_prepare(
            download_dir=download_dir, download_config=tfds.download.DownloadConfig(beam_options=options))
    except Exception as e:  # Beam wraps worker errors in runner-specific types; only these are handled.
      if _interrupted(e):
        # Ctrl-C inside a DoFn came back as "RuntimeError: KeyboardInterrupt [while running ...]" and a traceback;
        # the command prints "interrupted" for a KeyboardInterrupt (nothing was published: rerun as it was).
        raise KeyboardInterrupt from None
      user_error = failures.user_error_in(e)
      if user_error is None and failures.EMPTY_DATASET not in str(e):
        raise
      epath.Path(partial).unlink(missing_ok=True)
      dataset_folder = epath.Path(job.dataset_dir).parent  # TFDS leaves it behind, empty
      if dataset_folder.is_dir() and not any(dataset_folder.iterdir()):
        dataset_folder.rmdir()
      if user_error is not None:
        # Worker processes send back their traceback as text: the error is rebuilt from it, so every runner ends
        # with the line the in-process one gives.
        raise user_error from e
      # TFDS refuses to write an empty dataset, and the failed run may have stopped before writing the report,
      # so the cleaning runs again without the dataset to tell the user why everything was dropped.
      partial = f"{job.report}.incomplete-{uuid.uuid4().hex}"
      with beam.Pipeline(options=options) as p:
        _ = p | "CleanPairs" >> transform(partial)
      report = _publish(partial, job.report)
      rejected = {k: v for k, v in report["rejected"].items() if v}
      cfg = job.config
      named = [f"{key!r} ({flag})" for key, flag in cfg.column_flags()]
      columns = (f"; every pair was malformed: do the rows hold the columns {', '.join(named)} with values of "
                 "the right type?" if set(rejected) == {"malformed"} else "")
      raise NoPairsKeptError(f"all {report['num_pairs']} input pairs were rejected, so no dataset was written; "
                             f"rejections per rule: {rejected}{columns}",
                             f"read the report {job.report} (its samples say why), then move it away or pass "
                             "--report=NEW to run again") from e
  return _publish(partial, job.report)


# Rows of the first shard whose columns are checked before the job starts.
_PEEK_ROWS = 100


def _interrupted(error: BaseException) -> bool:
  """Whether a KeyboardInterrupt is among the exceptions `error` was raised from (Beam re-raises one that hits a
  DoFn as a RuntimeError)."""
  seen = set()
  while error is not None and id(error) not in seen:
    if isinstance(error, KeyboardInterrupt):
      return True
    seen.add(id(error))
    error = error.__cause__ or error.__context__
  return False


def _check_columns(shard: str, job: CleanJob) -> None:
  """Refuses, before the job starts, a configured column that none of the first rows of `shard` holds (every pair
  would be rejected as malformed), and, for a score column whose values there are all cosine similarities in
  [-1, 1], a threshold outside that range.

  Raises:
    errors.ConfigError: naming the flag, the column and the columns the rows do hold.
  """
  rows = sources.peek_rows(shard, job.input_format, _PEEK_ROWS)
  if not rows:
    return
  cfg = job.config
  columns = sorted({key for row in rows for key in row if row[key] is not None})
  for key, flag in cfg.column_flags():
    if key not in columns:
      close = difflib.get_close_matches(key, columns, n=1)
      raise errors.ConfigError(f"{flag}={key!r}: none of the first {len(rows)} rows of {shard} has a column {key!r}",
                               (f"did you mean {close[0]!r}? " if close else "") + f"the rows hold {columns}")
  if cfg.score_key:
    scores = [float(row[cfg.score_key]) for row in rows if scoring.is_number(row.get(cfg.score_key))]
    low, high = scoring.COSINE_RANGE
    if scores and all(low <= score <= high for score in scores):
      for name, value, _ in cfg.threshold_settings():
        config_lib.check_threshold_range(name, value, low, high,
                                         f"the {cfg.score_key!r} scores of the first rows of {shard}")


def _publish(partial: str, final: str) -> dict[str, Any]:
  """Moves the report the pipeline wrote to its final path (which must still be free); returns it."""
  report = report_lib.read(partial)
  report_lib.write_new(final, report)
  epath.Path(partial).unlink()
  return report
