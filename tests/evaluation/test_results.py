"""Tests of sharding, the resume ledgers, merging and the never-overwriting results file."""
import json
import os

import pytest

from qwenvl_jax import errors
from qwenvl_jax.evaluation import results, tasks
from qwenvl_jax.evaluation.readers import EvalExample


@pytest.mark.parametrize("n, k", [(0, 3), (5, 1), (7, 3), (8, 4), (2, 5)])
def test_shard_partitions_in_order(n, k):
  items = list(range(n))
  shards = [results.shard(items, k, i) for i in range(k)]
  assert sum(shards, []) == items
  sizes = [len(s) for s in shards]
  # The first n % k shards hold one more item.
  assert sizes == [n // k + (i < n % k) for i in range(k)]
  with pytest.raises(ValueError):
    results.shard(items, k, k)


def test_ledger_round_trip_and_torn_last_line(tmp_path):
  ledger = results.PredictionLedger(tmp_path, 0)
  ledger.append([{"id": 1, "prediction": "a"}, {"id": "q2", "prediction": "b", "extra": {"n": 3}}])
  # A crash in the middle of the next line leaves a torn tail: reading ignores it...
  with open(ledger.path, "a") as f:
    f.write('{"id": 3, "predi')
  records = results.read_ledgers(tmp_path)
  assert set(records) == {1, "q2"} and records["q2"]["extra"] == {"n": 3}
  # ...and reopening the ledger cuts it, so the next record starts on a line of its own.
  ledger = results.PredictionLedger(tmp_path, 0)
  ledger.append([{"id": 3, "prediction": "c"}])
  assert {k: v["prediction"] for k, v in results.read_ledgers(tmp_path).items()} == {1: "a", "q2": "b", 3: "c"}


def test_ledger_errors(tmp_path):
  with pytest.raises(ValueError, match="needs 'id' and 'prediction'"):
    results.PredictionLedger(tmp_path, 0).append([{"id": 1}])
  (tmp_path / "process-00001.jsonl").write_text(
      '{"id": 1, "prediction": "a"}\nnot json\n{"id": 2, "prediction": "b"}\n')
  with pytest.raises(ValueError, match=r"process-00001.jsonl:2: unreadable ledger line"):
    results.read_ledgers(tmp_path)
  (tmp_path / "process-00001.jsonl").write_text('{"id": 1, "prediction": "a"}\n')
  (tmp_path / "process-00002.jsonl").write_text('{"id": 1, "prediction": "b"}\n')
  with pytest.raises(ValueError, match="example 1 has two different predictions"):
    results.read_ledgers(tmp_path)


def test_run_settings_are_recorded_then_checked(tmp_path):
  directory = tmp_path / "out.json.partial"
  settings = {"task": "flickr", "few_shot": 0, "buckets": (64, 128)}
  results.check_run_settings(directory, settings)
  assert json.loads((directory / "run.json").read_text()) == {"task": "flickr", "few_shot": 0, "buckets": [64, 128]}
  results.check_run_settings(directory, dict(settings))  # the same settings resume
  # No prediction yet (the run failed before its first batch): nothing to mix, the new settings are recorded.
  results.check_run_settings(directory, dict(settings, task="textvqa_val"))
  assert json.loads((directory / "run.json").read_text())["task"] == "textvqa_val"
  results.check_run_settings(directory, dict(settings))
  results.PredictionLedger(directory, 0).append([{"id": 1, "prediction": "a"}])
  with pytest.raises(ValueError, match=r"holds 1 predictions of a run with other settings \(few_shot: 0 -> 4\); "
                                       r".*rerun with the settings recorded in .*run.json"):
    results.check_run_settings(directory, dict(settings, few_shot=4, seed=1))
  # A setting a later version added (the int4 group size) is not in an earlier run.json: the run resumes.
  results.check_run_settings(directory, dict(settings, quantize_group_size=128))
  # A recorded value in another spelling matches once resolved the caller's way.
  upper = lambda key, value: value.upper() if key == "task" else value
  results.check_run_settings(directory, dict(settings, task="FLICKR"), resolve_recorded=upper)
  # Ledgers of a version that recorded no settings are taken as they are, and the settings recorded from then on.
  legacy = tmp_path / "legacy"
  results.PredictionLedger(legacy, 0).append([{"id": 1, "prediction": "a"}])
  results.check_run_settings(legacy, settings)
  assert (legacy / "run.json").exists() and set(results.read_ledgers(legacy)) == {1}


def test_a_ledger_folder_without_predictions_is_discarded(tmp_path):
  directory = tmp_path / "out.json.partial"
  settings = {"task": "flickr", "buckets": (64,)}
  results.check_run_settings(directory, settings)
  (directory / "process-00000.jsonl").write_text("")
  assert not results.discard_unstarted(directory, dict(settings, task="other"))  # another run's settings
  assert results.discard_unstarted(directory, settings) and not directory.exists()
  results.check_run_settings(directory, settings)
  results.PredictionLedger(directory, 0).append([{"id": 1, "prediction": "a"}])
  assert not results.discard_unstarted(directory, settings) and set(results.read_ledgers(directory)) == {1}
  other = tmp_path / "other.partial"
  results.check_run_settings(other, settings)
  (other / "notes.txt").write_text("mine")
  assert not results.discard_unstarted(other, settings) and (other / "notes.txt").exists()  # not the job's
  assert not results.discard_unstarted(tmp_path / "missing.partial", settings)


def test_a_url_output_is_refused_not_written_to_a_local_folder(tmp_path, monkeypatch):
  """pathlib read `gs://bucket/o.json` as the local path `gs:/bucket/o.json`, and the results went there."""
  monkeypatch.chdir(tmp_path)
  for url in ("gs://bucket/o.json", "s3://bucket/dir/o.json"):
    with pytest.raises(errors.ConfigError, match=f"the results file {url} is a URL"):
      results.check_output_free(url)
  assert list(tmp_path.iterdir()) == []


def test_a_folder_output_is_refused_not_written_as_a_file_named_like_it(tmp_path, monkeypatch):
  """`results/` (pathlib drops the slash) became a results file named `results`; an existing folder was "a results
  file that already exists"."""
  monkeypatch.chdir(tmp_path)
  (tmp_path / "old").mkdir()
  for folder in ("results/", "old"):
    with pytest.raises(errors.ConfigError, match=f"the results file {folder} is a folder") as info:
      results.check_output_free(folder)
    assert info.value.hint == f"e.g. {os.path.join(folder, 'TASK.json')}"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]


def test_merge_reports_missing_and_unknown_ids():
  examples = [EvalExample(example_id=i, image="x") for i in range(3)]
  records = {0: {"prediction": "a"}, 2: {"prediction": "c"}, 1: {"prediction": "b"}}
  assert results.merge_predictions(records, examples) == ["a", "b", "c"]
  with pytest.raises(ValueError, match=r"1 of 3 examples have no prediction yet, e.g. \[1\]"):
    results.merge_predictions({0: {"prediction": "a"}, 2: {"prediction": "c"}}, examples)
  with pytest.raises(ValueError, match=r"ids that are not in the evaluated examples, e.g. \[7\]"):
    results.merge_predictions({**records, 7: {"prediction": "z"}}, examples)


def test_write_results_never_overwrites(tmp_path):
  out = tmp_path / "res.json"
  results.write_results(out, {"score": 1.0})
  assert json.loads(out.read_text()) == {"score": 1.0}
  assert out.stat().st_mode & 0o777 == 0o644
  with pytest.raises(FileExistsError, match="never overwritten"):
    results.write_results(out, {"score": 2.0})
  assert json.loads(out.read_text()) == {"score": 1.0}
  assert sorted(p.name for p in tmp_path.iterdir()) == ["res.json"]      # no temporary file left
  with pytest.raises(ValueError):                                         # NaN is not JSON
    results.write_results(tmp_path / "nan.json", {"score": float("nan")})
  assert not (tmp_path / "nan.json").exists()
  # A missing folder is created (issue 17); a file in its way is named.
  results.check_output_free(tmp_path / "missing" / "deeper" / "res.json")
  assert (tmp_path / "missing" / "deeper").is_dir()
  with pytest.raises(FileExistsError, match="a file is in the way"):
    results.check_output_free(tmp_path / "res.json" / "sub" / "x.json")


def test_resumed_run_with_another_process_count_then_finalize(tmp_path):
  task = tasks.get_task("ocrvqa_val")
  examples = [EvalExample(example_id=i, image=f"{i}.jpg", fields={"question": "?"}, references=(f"a{i}",))
              for i in range(7)]
  answer = lambda e: f"a{e.example_id}" if e.example_id % 2 == 0 else "wrong"
  out = tmp_path / "ocrvqa.json"
  ledgers = results.partial_dir(out)
  # First run: 2 processes, each finishes only its first example, then the job dies.
  for index in range(2):
    mine = results.shard(examples, 2, index)
    results.PredictionLedger(ledgers, index).append([{"id": mine[0].example_id, "prediction": answer(mine[0])}])
  with pytest.raises(ValueError, match="5 of 7 examples have no prediction"):
    results.finalize(task, examples, ledgers, out)
  # Second run: 3 processes agree on what is left and split it.
  done = results.read_ledgers(ledgers)
  todo = [e for e in examples if e.example_id not in done]
  assert [e.example_id for e in todo] == [1, 2, 3, 5, 6]
  for index in range(3):
    results.PredictionLedger(ledgers, index).append(
        [{"id": e.example_id, "prediction": answer(e)} for e in results.shard(todo, 3, index)])
  payload = results.finalize(task, examples, ledgers, out, config={"checkpoint": "ckpt/1"})
  # Even ids 0, 2, 4, 6 are right: 4 / 7.
  written = json.loads(out.read_text())
  assert written == payload
  assert written["score"] == pytest.approx(4 / 7) and written["num_examples"] == 7
  assert [r["id"] for r in written["predictions"]] == list(range(7))
  assert written["predictions"][0] == {"id": 0, "image": "0.jpg", "prediction": "a0", "score": 1.0,
                                       "references": ["a0"]}
  assert written["config"] == {"checkpoint": "ckpt/1"}
  assert not ledgers.exists()  # the ledgers are removed once the results file holds every prediction
  with pytest.raises(FileExistsError):
    results.finalize(task, examples, ledgers, out)


def test_finalize_removes_only_the_files_it_wrote_in_the_ledger_folder(tmp_path):
  """The ledger folder was removed whole once the results were written: a folder of that name holding the user's
  files lost them."""
  task = tasks.get_task("ocrvqa_val")
  examples = [EvalExample(example_id=0, image="0.jpg", fields={"question": "?"}, references=("a",))]
  out = tmp_path / "ocrvqa.json"
  ledgers = results.partial_dir(out)
  ledgers.mkdir()
  (ledgers / "notes.txt").write_text("mine")
  results.PredictionLedger(ledgers, 0).append([{"id": 0, "prediction": "a"}])
  results.finalize(task, examples, ledgers, out)
  assert json.loads(out.read_text())["score"] == 1.0
  assert sorted(p.name for p in ledgers.iterdir()) == ["notes.txt"]


def test_the_summary_line_of_a_submission_split_says_it_has_no_metric():
  """It printed `vqav2_testdev None None`."""
  payload = {"task": "vqav2_testdev", "metric": None, "score": None, "details": {}, "num_examples": 6}
  assert results.summary_line(payload, "out/t.json") == (
      "vqav2_testdev: 6 predictions, no metric (a submission split) -> out/t.json")
  payload = {"task": "flickr", "metric": "cider", "score": 0.5, "details": {"tokenizer": "ptb"}, "num_examples": 6}
  assert results.summary_line(payload, "out/f.json") == "flickr cider 0.5 (caption tokenizer: ptb)"
