"""The Beam + TFDS job end to end: exact decisions and counts, the dataset the stage-1 reader reads, the report,
never overwriting, and the same job on two DirectRunner worker processes through the command line."""
import collections
import dataclasses
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds
from apache_beam.options.pipeline_options import DirectOptions, StandardOptions

from qwenvl_jax import errors
from qwenvl_jax.cleaning import CleanConfig, CleanJob, DominantColorScorer, RULES, run_clean, scoring
from qwenvl_jax.cleaning.clip_scorer import ClipScorerFactory
from qwenvl_jax.cleaning.pipeline import (LOCAL_RUNNER, NoPairsKeptError, beam_options_from_string,
                                           local_runner_if_direct)
from qwenvl_jax.cleaning import report as report_lib
from qwenvl_jax.cleaning.report import sample_rank
from qwenvl_jax.data.config import default_data_config
from qwenvl_jax.data.images import preprocess_image
from qwenvl_jax.data.pipeline import make_dataset
from qwenvl_jax.data.sources import make_source
from qwenvl_jax.text import QwenTokenizer
from tests import background
from tests.cleaning import cases as cases_lib
from tests.cleaning.cases import case_ids
from tests.training.helpers import live_children, process_alive

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
COLUMN_CFG = CleanConfig(score_key="clip", min_similarity=0.3, max_text_units=30, sample_size=2)


def _patterns(folder):
  return (str(folder / "*.jsonl"), str(folder / "*.jsonl.gz"), str(folder / "*.parquet"))


def _expected_counts(expected: dict[str, str]) -> dict[str, int]:
  counts = collections.Counter(expected.values())
  return {rule: counts.get(rule, 0) for rule in RULES}


def _dataset(dataset_dir):
  builder = tfds.builder_from_directory(dataset_dir)
  return builder, builder.as_data_source(split="train", decoders={"image": tfds.decode.SkipDecoding()})


@pytest.fixture(scope="module")
def column_run(clean_inputs, tmp_path_factory):
  folder, cases = clean_inputs
  job = CleanJob(inputs=_patterns(folder), output_dir=str(tmp_path_factory.mktemp("out")), config=COLUMN_CFG)
  return job, run_clean(job), {cid: c for cid, c in case_ids(cases).items()}


def test_report_counts_every_rule_exactly(column_run):
  job, report, cases = column_run
  expected = {cid: c.with_column for cid, c in cases.items()}
  assert report["rejected"] == _expected_counts(expected)
  assert report["kept"] == sum(v == "kept" for v in expected.values())
  assert report["num_pairs"] == len(cases) and report["num_shards"] == 3
  assert report["config"] == COLUMN_CFG.to_json() and report["dataset"] == job.dataset_dir
  assert json.loads(pathlib.Path(job.report).read_text()) == report
  assert [p.name for p in pathlib.Path(job.output_dir).iterdir() if "incomplete" in p.name] == []


def test_report_samples_are_the_lowest_ranked_rejects_of_their_rule(column_run, clean_inputs):
  _, report, cases = column_run
  folder, _ = clean_inputs
  for rule, count in report["rejected"].items():
    samples = report["samples"].get(rule, [])
    assert len(samples) == min(count, COLUMN_CFG.sample_size), rule
    # Example keys are "<shard path>:<row>", default ids "<shard name>:<row>".
    ids = [cid for cid, c in cases.items() if c.with_column == rule]
    ranked = sorted(ids, key=lambda cid: sample_rank(str(folder / cid)))
    assert [s["id"] for s in samples] == ranked[:COLUMN_CFG.sample_size], rule
    assert all(s["reason"] and s["source"] == s["id"] for s in samples)


def test_dataset_holds_exactly_the_kept_pairs(column_run):
  job, _, cases = column_run
  builder, data = _dataset(job.dataset_dir)
  assert builder.info.file_format.value == "array_record"
  assert builder.info.metadata["clean"]["config"] == COLUMN_CFG.to_json()
  got = {ex["id"].decode(): ex["text"].decode() for ex in data}
  assert got == {cid: c.cleaned for cid, c in cases.items() if c.with_column == "kept"}


def test_stage1_reader_reads_the_output(column_run):
  job, _, cases = column_run
  source = make_source(f"array_record:{job.dataset_dir}", stage=1, image_size=32)
  records = [source.parse(source.items[i]) for i in range(len(source.items))]
  assert sorted(r.id for r in records) == sorted(cid for cid, c in cases.items() if c.with_column == "kept")
  for record in records:
    assert record.turns[-1] == ("assistant", cases[record.id].cleaned)
    pixels = preprocess_image(record.images[0], 32)
    assert pixels.dtype == np.uint8 and pixels.shape == (32, 32, 3)


def test_stage1_grain_pipeline_batches_the_output(column_run, qwen_tiktoken_path):
  job, report, cases = column_run
  config = default_data_config(1)
  config.update(source=f"array_record:{job.dataset_dir}", num_workers=0, strict=True, shuffle=False,
                num_epochs=1, packing=False)
  tok = QwenTokenizer(qwen_tiktoken_path)
  ds = make_dataset(config, tok, process_index=0, process_count=1, global_batch=2, seq_len=48, max_images=1,
                    image_size=28, stage=1, image_tokens=4)
  batches = list(ds)
  assert len(batches) == report["kept"] // 2
  captions = collections.Counter()
  for batch in batches:
    assert batch["images"].shape == (2, 1, 28, 28, 3) and batch["image_mask"].all()
    for row, mask in zip(batch["targets"], batch["loss_mask"]):
      captions[tok.decode([int(t) for t, m in zip(row, mask) if m and t != tok.eod_id]).strip()] += 1
  # Every row is a kept caption (the last odd pair is dropped with the incomplete batch).
  assert sum(captions.values()) == 2 * len(batches)
  assert not captions - collections.Counter(c.cleaned for c in cases.values() if c.with_column == "kept")


def test_existing_outputs_are_never_overwritten(column_run, clean_inputs, tmp_path):
  job, report, _ = column_run
  folder, _ = clean_inputs
  info = pathlib.Path(job.dataset_dir) / "dataset_info.json"
  before = info.read_bytes(), pathlib.Path(job.report).read_bytes()
  with pytest.raises(FileExistsError, match="output dataset"):
    run_clean(CleanJob(inputs=_patterns(folder), output_dir=job.output_dir, report_path=str(tmp_path / "r.json"),
                       skip_similarity=True))
  with pytest.raises(FileExistsError, match="report"):
    run_clean(CleanJob(inputs=_patterns(folder), output_dir=str(tmp_path / "new"), report_path=job.report,
                       skip_similarity=True))
  assert (info.read_bytes(), pathlib.Path(job.report).read_bytes()) == before
  assert not (tmp_path / "new").exists() and not (tmp_path / "r.json").exists()


def test_a_report_path_that_names_a_folder_is_refused_before_the_job_runs(clean_inputs, tmp_path):
  """--report=reports/ ran the whole job and wrote the dataset, then refused to publish the report ("reports/
  already exists": the partial report had made the folder), so a rerun with a file name was refused too."""
  folder, _ = clean_inputs
  (tmp_path / "existing").mkdir()
  for report in (str(tmp_path / "reports") + os.sep, str(tmp_path / "existing")):
    with pytest.raises(errors.ConfigError, match="is a folder") as info:
      run_clean(CleanJob(inputs=_patterns(folder), output_dir=str(tmp_path / "out"), report_path=report,
                         skip_similarity=True))
    assert "clean_report.json" in info.value.hint
  assert not (tmp_path / "out").exists() and not (tmp_path / "reports").exists()


def test_job_settings_are_checked(clean_inputs, tmp_path):
  folder, _ = clean_inputs
  with pytest.raises(ValueError, match="not both"):
    CleanJob(inputs=_patterns(folder), output_dir=str(tmp_path), config=COLUMN_CFG,
             scorer_factory=DominantColorScorer)
  with pytest.raises(ValueError, match="matches no file"):
    run_clean(CleanJob(inputs=[str(folder / "*.csv")], output_dir=str(tmp_path), skip_similarity=True))
  # Without scores the similarity filter cannot run: the job refuses unless told to skip it (issue 17).
  with pytest.raises(errors.ConfigError, match="similarity filter .* has no scores") as info:
    CleanJob(inputs=_patterns(folder), output_dir=str(tmp_path))
  assert "--score_key" in info.value.hint and "--skip_similarity" in info.value.hint
  with pytest.raises(errors.ConfigError, match="contradicts"):
    CleanJob(inputs=_patterns(folder), output_dir=str(tmp_path), config=COLUMN_CFG, skip_similarity=True)
  skipped = CleanJob(inputs=_patterns(folder), output_dir=str(tmp_path), skip_similarity=True)
  assert skipped.similarity_filter.startswith("skipped")


@pytest.mark.slow
def test_all_rejected_still_reports_why(tmp_path):
  (tmp_path / "in.jsonl").write_text('{"text": 7, "image": "x.jpg"}\n' * 3)
  job = CleanJob(inputs=[str(tmp_path / "in.jsonl")], output_dir=str(tmp_path / "out"), skip_similarity=True)
  with pytest.raises(NoPairsKeptError, match="all 3 input pairs were rejected") as info:
    run_clean(job)
  # One line that points at the columns (the report says which is wrong), and how to run again.
  assert isinstance(info.value, errors.UserError)
  assert "columns 'text' (--text_key), 'image' (--image_key) with values of the right type" in str(info.value)
  assert "--report=NEW" in info.value.hint
  report = json.loads(pathlib.Path(job.report).read_text())
  assert report["kept"] == 0 and report["rejected"]["malformed"] == 3
  assert "column 'text' is a int, not a string" in report["samples"]["malformed"][0]["reason"]


def test_shards_of_one_file_name_in_two_folders_give_their_pairs_distinct_ids(tmp_path):
  """Both pairs were stored under the id 'part-0.jsonl:1' (the default id named the shard by its file name)."""
  (tmp_path / "red.jpg").write_bytes(cases_lib.encode())
  for year, text in (("2023", "a red square on a wooden table"), ("2024", "a red circle on a wooden table")):
    (tmp_path / year).mkdir()
    (tmp_path / year / "part-0.jsonl").write_text(json.dumps({"text": text, "image": "../red.jpg"}) + "\n")
  job = CleanJob(inputs=[str(tmp_path / "*" / "part-0.jsonl")], output_dir=str(tmp_path / "out"),
                 skip_similarity=True)
  run_clean(job)
  _, data = _dataset(job.dataset_dir)
  assert sorted((ex["id"].decode(), ex["text"].decode()) for ex in data) == [
      ("2023/part-0.jsonl:1", "a red square on a wooden table"),
      ("2024/part-0.jsonl:1", "a red circle on a wooden table")]
  report = json.loads(pathlib.Path(job.report).read_text())
  assert report["duplicate_ids"] == {"ids": 0, "pairs": 0, "samples": []}
  assert report_lib.duplicate_ids_warning(report) is None


def test_an_id_several_kept_pairs_carry_is_reported_across_shards(tmp_path):
  """Two shards that both hold the --id_key value 'a' (and one that only one holds): the dataset keeps every pair,
  as the ids are the user's; the report and the command's warning line say which ids repeat (they were silent)."""
  (tmp_path / "red.jpg").write_bytes(cases_lib.encode())
  rows = {"s0": [("a", "a red square on a wooden table"), ("b", "a red circle on a wooden table")],
          "s1": [("a", "a red triangle on a wooden table"), ("c", "a red star on a wooden table")],
          "s2": [("c", "a red heart on a wooden table"), ("d", "a red cross on a wooden table")]}
  for shard, pairs in rows.items():
    (tmp_path / f"{shard}.jsonl").write_text("".join(
        json.dumps({"uid": uid, "text": text, "image": "red.jpg"}) + "\n" for uid, text in pairs))
  job = CleanJob(inputs=[str(tmp_path / "*.jsonl")], output_dir=str(tmp_path / "out"), skip_similarity=True,
                 config=CleanConfig(id_key="uid", sample_size=1))
  report = run_clean(job)
  assert report["kept"] == 6
  assert report["duplicate_ids"] == {"ids": 2, "pairs": 4, "samples": [{"id": "a", "pairs": 2}]}
  assert json.loads(pathlib.Path(job.report).read_text())["duplicate_ids"] == report["duplicate_ids"]
  assert report_lib.duplicate_ids_warning(report) == (
      "warning: 2 id(s) are carried by more than one kept pair (4 pairs, e.g. 'a'): see duplicate_ids in the report")


def test_a_column_no_row_holds_is_refused_before_the_job_starts(tmp_path):
  """A misspelt --score_key rejected every pair as malformed after the whole job ran, and the error blamed the text
  and image columns."""
  (tmp_path / "in.jsonl").write_text('{"caption": "a red bus", "image": "x.jpg", "clip": 0.3}\n' * 3)
  def clean(**cfg):
    job = CleanJob(inputs=[str(tmp_path / "in.jsonl")], output_dir=str(tmp_path / "out"),
                   config=CleanConfig(**{"text_key": "caption", "score_key": "clip", **cfg}))
    return run_clean(job)
  with pytest.raises(errors.ConfigError, match=r"--score_key='clipp': none of the first 3 rows of .*in.jsonl has a "
                                               r"column 'clipp'") as info:
    clean(score_key="clipp")
  assert info.value.hint == "did you mean 'clip'? the rows hold ['caption', 'clip', 'image']"
  with pytest.raises(errors.ConfigError, match=r"--text_key='text': none of the first 3 rows"):
    clean(text_key="text")
  # The column's scores are cosine similarities (all in [-1, 1] here): a threshold outside rejects every pair.
  with pytest.raises(errors.ConfigError, match=r"min_similarity=5.0 is above 1.0, the highest of the 'clip' scores"):
    clean(min_similarity=5.0)
  with pytest.raises(errors.ConfigError, match=r"min_similarity_by_language\['zh'\]=-3.0 is below -1.0"):
    clean(min_similarity_by_language={"zh": -3.0})
  assert not (tmp_path / "out").exists()


def test_a_threshold_outside_a_scorers_range_is_refused():
  """Similarities are cosine in [-1, 1] (CLIP), or in the range a plugin declares; a threshold outside it rejects
  every pair (or none)."""
  dominant = scoring.SpecFactory("qwenvl_jax.cleaning.scoring:DominantColorScorer")
  assert dominant.score_range == (0.0, 1.0) and scoring.score_range(dominant) == (0.0, 1.0)
  assert scoring.score_range(ClipScorerFactory) == (-1.0, 1.0)
  job = lambda **kwargs: CleanJob(inputs=["unused"], output_dir="unused", **kwargs)
  with pytest.raises(errors.ConfigError, match=r"min_similarity=5.0 is above 1.0, the highest of the scores of "
                                               r"SpecFactory\('qwenvl_jax.cleaning.scoring:DominantColorScorer'\)"):
    job(scorer_factory=dominant, config=CleanConfig(min_similarity=5.0))
  with pytest.raises(errors.ConfigError, match=r"min_similarity=-0.5 is below 0.0") as info:
    job(scorer_factory=dominant, config=CleanConfig(min_similarity=-0.5))
  assert "0.0 keeps every pair" in info.value.hint
  # A language's scorer is held to its own threshold: zh's 2.0 is refused, the default's 0.5 is fine.
  with pytest.raises(errors.ConfigError, match=r"min_similarity_by_language\['zh'\]=2.0 is above 1.0"):
    job(scorer_factory=dominant, language_scorer_factories={"zh": dominant},
        config=CleanConfig(min_similarity=0.5, min_similarity_by_language={"zh": 2.0}))
  job(scorer_factory=dominant, language_scorer_factories={"zh": DominantColorScorer},
      config=CleanConfig(min_similarity=0.5, min_similarity_by_language={"zh": 0.9}))
  # A plugin that declares no range takes any threshold (its scale is unknown).
  job(scorer_factory=lambda: (lambda images, texts: [0.0] * len(images)), config=CleanConfig(min_similarity=50.0))


_MISTAKES = [(["--score_key=clip", "--languages=xx"], "unknown language code 'xx'"),
             (["--score_key=clipp"], "--score_key='clipp': none of the first 1 rows"),
             (["--score_key=clip", "--min_similarity=5"], "min_similarity=5.0 is above 1.0"),
             (["--score_key=clip", "--min_similarity=0.95"], "all 1 input pairs were rejected")]


def _cli_mistakes(folder):
  """One `python -m qwenvl_jax.clean` per case of `_MISTAKES` (a Beam start-up each), writing to `out<i>`:
  commands of a job registered in tests/background.py, which runs them from the session's start on the core the
  other tests leave idle."""
  (folder / "img.png").write_bytes(cases_lib.encode(size=(120, 120), fmt="PNG"))
  (folder / "in.jsonl").write_text(json.dumps({"text": "a red square on a wooden table", "image": "img.png",
                                               "clip": 0.9}) + "\n")
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
  return [background.Command([sys.executable, "-m", "qwenvl_jax.clean", f"--input={folder / 'in.jsonl'}",
                              f"--output_dir={folder / f'out{i}'}", *flags], env, folder, check=False)
          for i, (flags, _) in enumerate(_MISTAKES)]


cli_mistakes = background.finished_work(__name__, "cli_mistakes", _cli_mistakes)


@pytest.mark.slow
def test_command_line_mistakes_are_one_error_line_without_beam_logs(cli_mistakes):
  """Every pair rejected (an unknown language, a misspelt score column, an impossible threshold) printed ~35 Beam
  INFO lines and a Beam traceback before the error line, after the whole job ran; now the settings are refused
  before the job starts, and a job whose pairs are all rejected still ends in one line."""
  folder, runs = cli_mistakes
  assert len(runs) == len(_MISTAKES)
  for i, ((flags, message), proc) in enumerate(zip(_MISTAKES, runs)):
    assert proc.returncode == 2, (flags, proc.stderr[-3000:])
    # Only the error and its hint (and TFDS's progress bar, drawn with carriage returns, when the job ran).
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "Generating splits" not in line]
    assert len(lines) == 2 and lines[0].startswith("error: ") and message in lines[0], (flags, proc.stderr)
    assert lines[1].startswith("  hint: "), (flags, proc.stderr)
    assert not (folder / f"out{i}" / "cleaned_pairs").exists()
  assert [(folder / f"out{i}").exists() for i in range(len(_MISTAKES))] == [False, False, False, True]  # a report


_TWO_WORKER_CASES: list = []  # the cases `_two_worker_run` wrote (its factory runs in this process)


def _two_worker_run(folder):
  """The command line on two DirectRunner worker processes with a scorer: a job registered in tests/background.py,
  run from the session's start on the core the other tests leave idle (its own copy of the inputs)."""
  inputs = folder / "inputs"
  inputs.mkdir()
  _TWO_WORKER_CASES.append(cases_lib.write_inputs(inputs))
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
  return [background.Command(
      [sys.executable, "-m", "qwenvl_jax.clean", f"--input={','.join(_patterns(inputs))}",
       f"--output_dir={folder / 'out'}", "--max_text_units=30", "--min_similarity=0.5", "--sample_size=1",
       "--scorer=qwenvl_jax.cleaning.scoring:DominantColorScorer",
       "--beam_pipeline_options=direct_num_workers=2,direct_running_mode=multi_processing"], env, folder)]


two_worker_run = background.finished_work(__name__, "two_worker_run", _two_worker_run)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_command_line_on_two_direct_runner_workers_with_a_scorer(two_worker_run):
  folder, (result,) = two_worker_run
  out, (cases,) = folder / "out", _TWO_WORKER_CASES
  assert result.returncode == 0, result.stderr[-3000:]
  by_id = case_ids(cases)
  expected = {cid: c.with_scorer for cid, c in by_id.items()}
  report = json.loads((out / "clean_report.json").read_text())
  assert report["rejected"] == _expected_counts(expected)
  assert report["scorer"] == "SpecFactory('qwenvl_jax.cleaning.scoring:DominantColorScorer')"
  _, data = _dataset(out / "cleaned_pairs" / "1.0.0")
  got = {ex["id"].decode(): ex["text"].decode() for ex in data}
  assert got == {cid: c.cleaned for cid, c in by_id.items() if c.with_scorer == "kept"}
  assert f"kept {len(got)} of {len(by_id)} pairs" in result.stdout
  # Nothing is downloaded: TFDS's download lines are noise (issue 17); the report says how pairs were scored.
  assert "Downloading and preparing" not in result.stdout + result.stderr
  # Each worker process printed ~20 Beam INFO lines of its own on stderr (and a warning about Dataflow's main
  # session, twice); they reach the console through the job's logging now, which shows INFO at --verbosity=0.
  info = [line for line in result.stderr.splitlines() if re.match(r"INFO:|I\d{4} |.*severity: INFO", line)]
  assert not info and "semi_persistent_directory" not in result.stderr, result.stderr[-3000:]
  assert report["similarity_filter"] == f"scorer {report['scorer']} >= 0.5"
  assert report["duplicate_ids"]["ids"] == 0 and "warning:" not in result.stderr  # the derived ids are distinct


@pytest.mark.parametrize("text, runner", [
    ("", LOCAL_RUNNER),
    ("runner=DirectRunner,direct_num_workers=2", LOCAL_RUNNER),
    ("runner=direct", LOCAL_RUNNER),
    ("runner=DataflowRunner,project=p", "DataflowRunner"),
])
def test_direct_runner_means_the_local_engine_and_others_pass_through(text, runner):
  options = local_runner_if_direct(beam_options_from_string(text))
  assert options.view_as(StandardOptions).runner == runner
  if "direct_num_workers" in text:
    assert options.view_as(DirectOptions).direct_num_workers == 2


@pytest.mark.parametrize("beam_options", [
    "",
    # Worker processes, and Beam's in-process gRPC workers, sent back only the text of the worker's traceback:
    # the command printed a RuntimeError traceback (and each worker its own, on its stderr) instead of the line.
    pytest.param("direct_num_workers=2,direct_running_mode=multi_processing", marks=pytest.mark.multiprocess),
    "direct_num_workers=2,direct_running_mode=multi_threading",
])
def test_a_shard_cut_short_stops_the_job_with_one_error_and_no_beam_traceback(clean_inputs, tmp_path, caplog, capfd,
                                                                              beam_options):
  folder, _ = clean_inputs
  data = (folder / "c.jsonl.gz").read_bytes()
  (tmp_path / "z.jsonl.gz").write_bytes(data[:len(data) - 12])  # the first shard checked is whole; this one is cut
  job = CleanJob(inputs=(str(folder / "a.jsonl"), str(tmp_path / "z.jsonl.gz")), output_dir=str(tmp_path / "out"),
                 config=COLUMN_CFG)
  with pytest.raises(errors.InputFormatError) as raised:
    run_clean(job, beam_options_from_string(beam_options))
  # The worker's own error, as every runner gives it (no Beam step name, no text of the carrier).
  assert raised.value.message == (f"input shard {tmp_path / 'z.jsonl.gz'} cannot be read after row 1: EOFError: "
                                  "Compressed file ended before the end-of-stream marker was reached")
  assert raised.value.hint == "re-download or re-write the shard, or leave it out of --input"
  assert not [r for r in caplog.records if r.exc_info or "z.jsonl.gz" in r.getMessage()], caplog.text
  err = capfd.readouterr().err  # the worker processes' stderr too
  assert "Traceback" not in err and "z.jsonl.gz" not in err, err
  assert not any((tmp_path / "out").glob("*")), list((tmp_path / "out").glob("**/*"))  # nor the report's partial


def _interrupting_scorer():
  def score(images, texts):
    raise KeyboardInterrupt  # Ctrl-C while a batch is scored (where a CLIP job spends its time)
  return score


def test_ctrl_c_inside_the_job_is_a_keyboard_interrupt_without_beam_traceback(clean_inputs, tmp_path, caplog):
  """Beam re-raised it as "RuntimeError: KeyboardInterrupt [while running ...]" with ~200 lines of traceback, so the
  command's "interrupted" line (exit 130) never showed."""
  folder, _ = clean_inputs
  job = CleanJob(inputs=_patterns(folder), output_dir=str(tmp_path / "out"), scorer_factory=_interrupting_scorer,
                 config=dataclasses.replace(COLUMN_CFG, score_key=None))
  with pytest.raises(KeyboardInterrupt):
    run_clean(job)
  assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records]
  assert not pathlib.Path(job.dataset_dir).exists() and not pathlib.Path(job.report).exists()


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads the worker processes from /proc")
def test_ctrl_c_on_two_worker_processes_is_one_line_and_leaves_no_process(tmp_path):
  """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) while two worker processes clean: 90-160
  lines of tracebacks from the workers and from the job's Beam threads came before "interrupted"."""
  (tmp_path / "img.png").write_bytes(cases_lib.encode(size=(64, 64), fmt="PNG"))
  row = {"text": "a red square on a wooden table", "image": "img.png"}
  (tmp_path / "in.jsonl").write_text("".join(json.dumps(dict(row, text=f"{row['text']} {i}")) + "\n"
                                             for i in range(20000)))  # far more than a few seconds of work
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
  proc = subprocess.Popen(
      [sys.executable, "-m", "qwenvl_jax.clean", f"--input={tmp_path / 'in.jsonl'}", f"--output_dir={tmp_path / 'out'}",
       "--skip_similarity", "--beam_pipeline_options=direct_num_workers=2,direct_running_mode=multi_processing"],
      cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
  try:
    deadline = time.monotonic() + 120
    while len(live_children(proc.pid)) < 2 and proc.poll() is None and time.monotonic() < deadline:
      time.sleep(0.1)
    time.sleep(2)  # the workers are importing or cleaning
    assert proc.poll() is None, proc.communicate()
    workers = list(live_children(proc.pid))
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
  finally:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)
  lines = [line for line in stderr.splitlines() if line.strip() and "Generating splits" not in line]
  assert proc.returncode == 130 and lines == ["interrupted"], (proc.returncode, stderr[-3000:])
  deadline = time.monotonic() + 30  # the workers end on their own (and may wait a moment to be reaped)
  while any(map(process_alive, workers)) and time.monotonic() < deadline:
    time.sleep(0.1)
  assert len(workers) == 2 and not [w for w in workers if process_alive(w)]
  assert not (tmp_path / "out" / "cleaned_pairs" / "1.0.0").exists()


@pytest.mark.parametrize("text, message", [
    # Beam's parser printed its whole usage (150 lines) and exited; the job had already made the output folder.
    ("direct_num_workers=2,direct_running_mode=multiprocessing", "invalid choice: 'multiprocessing'"),
    ("direct_num_workers=two", "invalid int value: 'two'"),
    # Beam warned and ignored it: the job ran on one worker.
    ("direct_num_wrkers=2,direct_running_mode=multi_processing", "did you mean 'direct_num_workers'?"),
    ("runner=DirectRunner,direct_num_worker=2", "has no option 'direct_num_worker'"),
])
def test_beam_options_the_local_runner_would_refuse_or_ignore_are_one_config_error(text, message):
  with pytest.raises(errors.ConfigError, match=message):
    beam_options_from_string(text)


def test_other_runners_keep_options_of_their_own():
  # A portable runner forwards options the Python SDK does not define to its job server.
  options = beam_options_from_string("runner=PortableRunner,job_endpoint=localhost:8099,flink_conf_dir=/etc/flink")
  assert options.get_all_options(retain_unknown_options=True)["flink_conf_dir"] == "/etc/flink"


def test_importing_the_cleaning_job_prints_no_beam_bigquery_notice():
  proc = subprocess.run([sys.executable, "-c", "import qwenvl_jax.cleaning"], capture_output=True, text=True,
                        timeout=120, cwd=pathlib.Path(__file__).resolve().parents[2])
  assert proc.returncode == 0 and "apitools" not in proc.stderr, proc.stderr
