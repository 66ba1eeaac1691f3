"""The evaluation job end to end on a tiny random model and tiny generated datasets: sharded batches, resume,
every prediction in the results JSON, multiple choice by lowest loss, never overwriting results."""
import json
import os
import pathlib
import sys
import tempfile

import numpy as np
import pytest

from qwenvl_jax import errors
from qwenvl_jax.data.synthetic import synthetic_corpus, synthetic_record
from qwenvl_jax.evaluation import EvalDataError, EvalExample, few_shot, get_task, prompts, results, runner
from qwenvl_jax.evaluation import config as eval_config
from qwenvl_jax.evaluation import output_lock
from qwenvl_jax.inference import loading, model_source
from qwenvl_jax.text import SentencePieceTokenizer, formatting, train_sentencepiece
from tests import background, together
from tests.evaluation import tfds_fakes
from tests.training.helpers import REPO, subprocess_env


def _write_workdir(root: pathlib.Path):
  """A SentencePiece tokenizer, 10 grounding examples (0 and 9 identical) and 3 multiple-choice questions in `root`;
  returns (root, the tokenizer's path)."""
  tok = train_sentencepiece(synthetic_corpus(300), root / "sp", vocab_size=400)
  (root / "img").mkdir()
  lines = []
  for i in range(10):
    record = synthetic_record(i % 9, task="grounding", image_size=64)
    record.images[0].save(root / "img" / f"{i}.png")
    lines.append({"image": f"img/{i}.png", "sent": f"the {['red', 'blue', 'green'][i % 9 % 3]} circle",
                  "bbox": [4, 4, 40, 40], "width": 64, "height": 64})
  (root / "ground.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
  questions = [{"image": "img/0.png", "hint": "", "question": "Which colour?", "choices": ["red", "blue"],
                "answer": 0},
               {"image": "img/1.png", "hint": "a hint", "question": "Which shape?",
                "choices": ["circle", "square", "triangle"], "answer": 2},
               {"image": "img/0.png", "hint": "", "question": "Which colour?", "choices": ["red", "blue"],
                "answer": 1}]
  (root / "mc.jsonl").write_text("".join(json.dumps(x) + "\n" for x in questions))
  return root, tok


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """`_write_workdir` in a folder of the module's."""
  return _write_workdir(tmp_path_factory.mktemp("eval"))


def _config(task, root, tok, data, output, **overrides):
  c = eval_config.default_config(task)
  c.update(dict(output=str(root / output), data_path=str(root / data), image_root=str(root), model="tiny",
                tokenizer=str(tok), dtype="float32", per_device_batch_size=1, progress=False, buckets=(64,)))
  c.update(overrides)
  return c


@pytest.mark.slow
def test_grounding_run_resumes_and_writes_every_prediction(workdir, monkeypatch):
  root, tok = workdir
  config = _config("refcoco_val", root, tok, "ground.jsonl", "ground.json", max_batches=1)
  assert runner.run(config) is None  # stopped after one batch of 8 device rows
  ledger = results.partial_dir(root / "ground.json")
  first = results.read_ledgers(ledger)
  assert sorted(first) == list(range(8))
  assert not (root / "ground.json").exists()

  appended = []
  original_append = results.PredictionLedger.append
  def spy(self, records):
    appended.extend(r["id"] for r in records)
    return original_append(self, records)
  monkeypatch.setattr(results.PredictionLedger, "append", spy)
  payload = runner.run(_config("refcoco_val", root, tok, "ground.jsonl", "ground.json"))
  saved = json.loads((root / "ground.json").read_text())
  assert saved == payload
  assert [p["id"] for p in saved["predictions"]] == list(range(10))
  assert saved["metric"] == "grounding_accuracy" and 0.0 <= saved["score"] <= 1.0
  assert sorted(appended) == [8, 9]  # the resumed run only did the last two
  assert not ledger.exists()  # removed once ground.json holds every prediction
  predictions = {p["id"]: p["prediction"] for p in saved["predictions"]}
  assert all(predictions[i] == first[i]["prediction"] for i in range(8))
  # Examples 0 and 9 are the same image and prompt, in different runs and rows: the same greedy answer.
  assert predictions[0] == predictions[9]
  assert len(set(predictions.values())) > 1  # rows are not mixed up into one answer

  with pytest.raises(FileExistsError, match="never overwritten"):
    runner.run(_config("refcoco_val", root, tok, "ground.jsonl", "ground.json"))


@pytest.mark.slow
def test_multiple_choice_picks_the_lowest_option_loss(workdir):
  root, tok = workdir
  payload = runner.run(_config("scienceqa_test_img", root, tok, "mc.jsonl", "mc.json"))
  rows = payload["predictions"]
  assert [len(r["extra"]["option_losses"]) for r in rows] == [2, 3, 2]
  for r in rows:
    assert r["prediction"] == int(np.argmin(r["extra"]["option_losses"]))
  # Questions 0 and 2 are the same prompt and options: same losses, whatever row they ran in.
  np.testing.assert_allclose(rows[0]["extra"]["option_losses"], rows[2]["extra"]["option_losses"], rtol=1e-5)
  assert payload["score"] == pytest.approx(np.mean([r["prediction"] == r["answer_index"] for r in rows]))


@pytest.mark.slow
def test_tfds_caption_run_writes_every_prediction(workdir, tmp_path):
  root, tok = workdir
  records = [{"image": tfds_fakes.png(40 * i, width=12 + i, height=10), "image/id": 100 + i, "objects": [],
              "captions": [{"id": 2 * i, "text": f"a shape number {i}"}, {"id": 2 * i + 1, "text": "a shape"}]}
             for i in range(5)]
  tfds_fakes.prepare(tfds_fakes.EvalCocoCaptions, tmp_path, {"test": records})
  config = _config("flickr", root, tok, "unused", "unused")
  config.update(dict(data_path="tfds:eval_coco_captions:test", tfds_data_dir=str(tmp_path),
                     output=str(tmp_path / "flickr.json")))
  payload = runner.run(config)
  saved = json.loads((tmp_path / "flickr.json").read_text())
  assert saved == payload and saved["num_examples"] == 5
  assert saved["metric"] == "cider" and saved["score"] >= 0.0
  rows = {r["id"]: r for r in saved["predictions"]}
  assert sorted(rows) == [100, 101, 102, 103, 104]
  for image_id, row in rows.items():
    assert isinstance(row["prediction"], str) and row["prediction"]  # min_new_tokens = 8
    assert row["references"] == [f"a shape number {image_id - 100}", "a shape"]
    assert row["image"].startswith("tfds:eval_coco_captions/1.0.0:test/")
  assert saved["config"]["data_path"] == "tfds:eval_coco_captions:test"
  assert saved["config"]["tfds_data_dir"] == str(tmp_path)


def test_image_errors_name_the_example(tmp_path):
  good = tfds_fakes.png(3)
  image = prompts.load_image(EvalExample(example_id="q1", image="tfds:x:test/0", image_loader=lambda: good), "", 8)
  assert image.shape == (8, 8, 3) and image.dtype == np.uint8
  for data in (b"", b"not an image", good[:40]):
    bad = EvalExample(example_id="q2", image="tfds:x:test/1", image_loader=lambda data=data: data)
    with pytest.raises(EvalDataError, match=r"example 'q2' \(image tfds:x:test/1\)"):
      prompts.load_image(bad, "", 8)
  with pytest.raises(EvalDataError, match=r"example 7 \(image missing.png\): image file not found"):
    prompts.load_image(EvalExample(example_id=7, image="missing.png"), str(tmp_path), 8)


def _vqa_file(path, root, n):
  """n VQA questions on the workdir's images (absolute paths), one answer each."""
  lines = [{"question_id": 10 + i, "image": str(root / "img" / f"{i}.png"), "question": f"What is shape {i}?",
            "answer": f"shape {i}"} for i in range(n)]
  path.write_text("".join(json.dumps(x) + "\n" for x in lines))
  return path


def test_two_shot_vqa_prompt_the_model_sees(workdir, tmp_path):
  root, tok_path = workdir
  task = get_task("gqa_testdev")
  examples = task.read(_vqa_file(tmp_path / "vqa.jsonl", root, 3))
  sampler = few_shot.ShotSampler(few_shot.shot_pool(task, examples), k=2, seed=0)
  tok = SentencePieceTokenizer(str(tok_path))
  encoder = prompts.PromptEncoder(task, tok, image_tokens=4, image_size=16, shots=sampler)
  query = examples[1]
  text, shown = encoder.prompt(query)
  img = lambda i: str(root / "img" / f"{i}.png")
  # The other two questions of the file (the query is never its own shot), in the order drawn for (seed 0, id 11).
  assert text == (f"<img>{img(0)}</img>What is shape 0? Answer: shape 0"
                  f"<img>{img(2)}</img>What is shape 2? Answer: shape 2"
                  f"<img>{img(1)}</img>What is shape 1? Answer:")
  assert [e.example_id for e in shown] == [10, 12, 11]
  ids, images = encoder.encode(query)
  assert formatting.decode_with_images(tok, ids, [e.image for e in shown]) == text
  assert ids.count(tok.img_pad_id) == 3 * 4 and encoder.max_images == 3
  for image, example in zip(images, shown):
    np.testing.assert_array_equal(image, prompts.load_image(example, "", 16))
  assert not np.array_equal(images[0], images[2])


@pytest.mark.slow
def test_one_shot_vqa_run_records_few_shot(workdir, tmp_path):
  root, tok = workdir
  data = _vqa_file(tmp_path / "vqa.jsonl", root, 3)
  config = _config("gqa_testdev", root, tok, "unused", "unused", buckets=(128,))
  config.update(dict(data_path=str(data), output=str(tmp_path / "gqa.json"), few_shot=1, few_shot_path=str(data)))
  payload = runner.run(config)
  saved = json.loads((tmp_path / "gqa.json").read_text())
  assert saved == payload
  assert [r["id"] for r in saved["predictions"]] == [10, 11, 12]
  assert all(isinstance(r["prediction"], str) for r in saved["predictions"])
  assert (saved["config"]["few_shot"], saved["config"]["few_shot_path"], saved["config"]["seed"]) == (1, str(data), 0)


def test_few_shot_errors_come_before_any_work(workdir, tmp_path):
  root, tok = workdir
  data = _vqa_file(tmp_path / "vqa.jsonl", root, 3)
  for task, data_path in (("refcoco_val", "ground.jsonl"), ("scienceqa_test_img", "mc.jsonl")):
    config = _config(task, root, tok, data_path, "unused.json", few_shot=1, few_shot_path=str(data))
    with pytest.raises(ValueError, match="few-shot prompts exist only for captioning and VQA"):
      runner.run(config)
  with pytest.raises(ValueError, match="few_shot=2 needs config.few_shot_path"):
    runner.run(_config("gqa_testdev", root, tok, str(data), "unused.json", few_shot=2))
  with pytest.raises(errors.ConfigError, match=r"config.few_shot=-1 must be an integer >= 0"):
    runner.run(_config("gqa_testdev", root, tok, str(data), "unused.json", few_shot=-1))
  with pytest.raises(EvalDataError, match="only 2 few-shot examples remain for example 10"):
    runner.run(_config("gqa_testdev", root, tok, str(data), "unused.json", few_shot=3, few_shot_path=str(data),
                       max_examples=1))
  assert not (root / "unused.json.partial").exists()


class _Stop(Exception):
  """Raised in place of building the model: the run got past its checks and recorded its settings."""


def _stop_after_one_prediction(output):
  """An `EvalJob` stand-in that records one prediction in `output`'s ledgers (a run killed after its first batch)
  and stops: no model is built."""
  def stop(*args, **kwargs):
    results.PredictionLedger(results.partial_dir(output), 0).append([{"id": 10, "prediction": "x"}])
    raise _Stop
  return stop


def test_a_resumed_run_with_other_settings_is_refused(workdir, tmp_path, monkeypatch):
  root, tok = workdir
  data = _vqa_file(tmp_path / "vqa.jsonl", root, 3)
  Stop = _Stop
  monkeypatch.setattr(runner, "EvalJob", _stop_after_one_prediction(tmp_path / "gqa.json"))
  config = lambda **kw: _config("gqa_testdev", root, tok, str(data), str(tmp_path / "gqa.json"), **kw)
  with pytest.raises(Stop):
    runner.run(config())
  with pytest.raises(ValueError, match=r"other settings \(few_shot: 0 -> 1, few_shot_path: None -> '.*vqa.jsonl'\)"):
    runner.run(config(few_shot=1, few_shot_path=str(data)))
  with pytest.raises(ValueError, match=r"other settings \(data_path: '.*vqa.jsonl' -> '.*other.jsonl'\)"):
    runner.run(config(data_path=str(_vqa_file(tmp_path / "other.jsonl", root, 2))))
  with pytest.raises(Stop):
    runner.run(config())  # the same settings resume


def test_a_second_job_with_the_same_output_is_refused_and_leaves_the_first_ones_ledgers_alone(workdir, tmp_path,
                                                                                              monkeypatch):
  """Two jobs started with one output both wrote its ledger folder (each example predicted twice, and the first to
  finish removed the folder the other still wrote to)."""
  root, tok = workdir
  data = _vqa_file(tmp_path / "vqa.jsonl", root, 3)
  out = tmp_path / "gqa.json"
  monkeypatch.setattr(runner, "EvalJob", _stop_after_one_prediction(out))
  config = _config("gqa_testdev", root, tok, str(data), str(out))
  with pytest.raises(_Stop):
    runner.run(config)  # the first job, killed after its first batch
  before = {p.name: p.read_bytes() for p in results.partial_dir(out).iterdir()}
  first = output_lock.OutputLock(results.partial_dir(out))
  first.acquire(out)  # its rerun, still running
  try:
    with pytest.raises(errors.ConfigError, match=rf"another evaluation job \(pid {os.getpid()} on .*\) is writing "
                                                 rf"the results {out}") as refused:
      runner.run(config)
    assert "--config.output" in refused.value.hint
    assert {p.name: p.read_bytes() for p in results.partial_dir(out).iterdir()} == {
        **before, output_lock.LOCK_FILE: (results.partial_dir(out) / output_lock.LOCK_FILE).read_bytes()}
  finally:
    first.release()
  with pytest.raises(_Stop):
    runner.run(config)  # once it ended, the output is free again


def test_default_config_arguments():
  c = eval_config.default_config("flickr", "max_examples=5,progress=false,image_size=448")
  assert (c.task, c.max_examples, c.progress, c.image_size) == ("flickr", 5, False, 448)
  assert (c.data_path, c.per_device_batch_size) == ("data/flickr30k/flickr30k_karpathy_test.json", 4)
  with pytest.raises(ValueError, match=r"unknown config arg keys \['nope'\]"):
    eval_config.default_config("flickr", "nope=1")
  with pytest.raises(ValueError, match="progress='maybe' is not a boolean"):  # never read as False
    eval_config.default_config("flickr", "progress=maybe")
  with pytest.raises(ValueError, match="use --config.mesh=... instead"):
    eval_config.default_config("flickr", "mesh=4")
  with pytest.raises(KeyError, match="unknown evaluation task"):
    eval_config.default_config("no_such_task")


def test_an_existing_results_file_is_refused_before_any_work(workdir, tmp_path):
  root, tok = workdir
  out = tmp_path / "taken.json"
  out.write_text("{}")
  config = _config("refcoco_val", root, tok, "ground.jsonl", "unused.json")
  config.output = str(out)
  with pytest.raises(FileExistsError):
    runner.run(config)
  assert out.read_text() == "{}"


_WORKER = """
import sys
from qwenvl_jax.evaluation import config as eval_config, runner
coordinator, index, root, tok, output = sys.argv[1:]
c = eval_config.default_config("refcoco_val")
c.update(dict(output=output, data_path=root + "/ground.jsonl", image_root=root, model="tiny", tokenizer=tok,
              dtype="float32", per_device_batch_size=1, progress=False, buckets=(64,)))
c.distributed.coordinator, c.distributed.num_processes, c.distributed.process_id = coordinator, 2, int(index)
payload = runner.run(c)
print("RESULT", "none" if payload is None else len(payload["predictions"]))
"""


def _two_processes(folder):
  """Its own `_write_workdir`, and the refcoco evaluation of it by two jax.distributed processes of 4 devices each
  (`_WORKER`), started together by tests/together.py: a job registered in tests/background.py, run from the
  session's start on the core the other tests leave idle."""
  root, tok = _write_workdir(folder / "eval")
  env = subprocess_env(devices=4)
  processes = [{"argv": [sys.executable, "-c", _WORKER, "localhost:{free_port}", str(i), str(root), str(tok),
                         str(folder / "two.json")], "env": env, "cwd": REPO} for i in range(2)]
  return [background.Command(together.write_spec(folder / "processes", processes), env)]


two_processes = background.finished_work(__name__, "two_processes", _two_processes)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_give_the_single_process_predictions(two_processes):
  folder, (done,) = two_processes
  assert done.returncode == 0, done.stderr[-3000:]
  result, errs = together.read_result(folder / "processes")
  for code, err in zip(result["codes"], errs):
    assert code == 0, err[-3000:]
  outs = [(folder / "processes" / f"{i}.stdout").read_text().strip().splitlines()[-1] for i in range(2)]
  assert outs == ["RESULT 10", "RESULT none"]  # process 0 writes the results, process 1 returns nothing
  two = json.loads((folder / "two.json").read_text())
  # The same 8 devices in one process (4 + 4 here): same predictions, row for row.
  root, tok = folder / "eval", folder / "eval" / "sp.model"
  one = runner.run(_config("refcoco_val", root, tok, "ground.jsonl", "one.json"))
  assert [p["prediction"] for p in two["predictions"]] == [p["prediction"] for p in one["predictions"]]
  assert two["config"]["processes"] == 2 and two["config"]["devices"] == 8


@pytest.mark.slow
def test_synthetic_data_path_scores_a_held_out_set(workdir, tmp_path, monkeypatch):
  """`--config.data_path=synthetic` (the README's quick start): a held-out synthetic grounding set, written to a
  temporary folder that is gone afterwards, recorded as `synthetic` so a resumed run agrees with the first."""
  root, tok = workdir
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
  (tmp_path / "tmp").mkdir()
  config = _config("refcoco_val", root, tok, "unused", tmp_path / "out" / "synthetic.json", data_path="synthetic",
                   max_examples=3, image_size=56)
  payload = runner.run(config)
  assert payload["num_examples"] == 3 and payload["metric"] == "grounding_accuracy"
  assert [p["id"] for p in payload["predictions"]] == [0, 1, 2]
  assert payload["config"]["data_path"] == "synthetic"
  assert config.data_path == "synthetic"  # the caller's config is left as it was
  assert list((tmp_path / "tmp").iterdir()) == []  # the set's temporary folder is removed
  with pytest.raises(ValueError, match="has no synthetic held-out set"):
    runner.run(_config("textvqa_val", root, tok, "unused", tmp_path / "vqa.json", data_path="synthetic"))


def test_a_resumed_run_whose_checkpoint_now_resolves_to_another_step_is_refused(workdir, tmp_path, monkeypatch):
  """An evaluation of a run directory stopped, the run trained on, and the same command ran again: its checkpoint
  now resolves to a later step, whose predictions must not be merged with the earlier step's (they were, silently)."""
  root, tok = workdir
  data = _vqa_file(tmp_path / "vqa.jsonl", root, 3)
  Stop = _Stop
  monkeypatch.setattr(runner, "EvalJob", _stop_after_one_prediction(tmp_path / "gqa.json"))
  step = [4]
  monkeypatch.setattr(runner.model_source, "resolve", lambda *a, **k: model_source.ModelSource(
      f"/runs/r/checkpoints/{step[0]}/params", "tiny", None, str(tok), "raw", "/runs/r", step[0]))
  config = _config("gqa_testdev", root, tok, str(data), str(tmp_path / "gqa.json"), checkpoint="/runs/r")
  with pytest.raises(Stop):
    runner.run(config)
  step[0] = 8
  with pytest.raises(ValueError, match=r"other settings \(params: '/runs/r/checkpoints/4/params' -> "
                                       r"'/runs/r/checkpoints/8/params'\)"):
    runner.run(config)


def test_an_empty_data_file_is_one_error_before_any_work(workdir, tmp_path):
  """It was a traceback from the metric ("needs at least one example") after the model loaded, and left
  `OUT.partial/` behind, which then refused the corrected command."""
  root, tok = workdir
  (tmp_path / "empty.jsonl").write_text("")
  with pytest.raises(EvalDataError, match=r"empty.jsonl holds no examples of task 'ocrvqa_val'"):
    runner.run(_config("ocrvqa_val", root, tok, str(tmp_path / "empty.jsonl"), str(tmp_path / "out.json")))
  assert not (tmp_path / "out.json.partial").exists()


def test_data_without_the_metrics_ground_truth_is_refused_before_the_model_loads(workdir, tmp_path, monkeypatch):
  """A test split given to a val task, or VQA accuracy without the annotation file, generated every example and
  then failed in the metric with a traceback (a ValueError), leaving `OUT.partial/` behind."""
  root, tok = workdir
  data = tmp_path / "test.jsonl"
  data.write_text("".join(json.dumps({"question_id": 20 + i, "image": str(root / "img" / "0.png"),
                                      "question": "What?"}) + "\n" for i in range(2)))

  def no_model(*args, **kwargs):
    raise AssertionError("the model must not load before the ground truth is checked")
  monkeypatch.setattr(runner, "EvalJob", no_model)
  out = tmp_path / "out.json"
  with pytest.raises(EvalDataError, match=r"task 'docvqa_val': example 20 has no answers, which metric 'anls' "
                                          r"needs") as info:
    runner.run(_config("docvqa_val", root, tok, str(data), str(out)))
  assert info.value.hint == "is it a test split without answers? its predictions alone come from task docvqa_test"
  with pytest.raises(EvalDataError, match=r"every example has a single answer; VQA accuracy needs the human answers "
                                          r"of the official annotation file \(data/textvqa/"):
    runner.run(_config("textvqa_val", root, tok, str(_vqa_file(tmp_path / "vqa.jsonl", root, 3)), str(out),
                       annotation_path=""))
  assert not results.partial_dir(out).exists() and not out.exists()


def test_a_run_stopped_before_its_first_prediction_blocks_no_corrected_command(workdir, tmp_path, monkeypatch):
  root, tok = workdir
  data = _vqa_file(tmp_path / "vqa.jsonl", root, 3)
  out = tmp_path / "gqa.json"

  def fail(*args, **kwargs):
    raise _Stop  # e.g. the model failed to load: no prediction was made
  monkeypatch.setattr(runner, "EvalJob", fail)
  with pytest.raises(_Stop):
    runner.run(_config("gqa_testdev", root, tok, str(data), str(out)))
  assert not results.partial_dir(out).exists()  # nothing left behind
  # A folder an earlier version left with settings and no prediction is no progress to protect: a corrected command
  # (another data file) records its own settings and runs.
  results.check_run_settings(results.partial_dir(out), {"data_path": "/elsewhere/bad.jsonl"})
  monkeypatch.setattr(runner, "EvalJob", _stop_after_one_prediction(out))
  with pytest.raises(_Stop):
    runner.run(_config("gqa_testdev", root, tok, str(data), str(out)))
  recorded = json.loads((results.partial_dir(out) / "run.json").read_text())
  assert recorded["data_path"] == str(data.resolve())
  assert recorded["attention"] == "xla"  # a resume with other attention (other low bits) is another run


def test_a_resumed_run_accepts_its_checkpoint_and_data_written_another_way(workdir, tmp_path, monkeypatch):
  """The same checkpoint as a relative or absolute path, with a trailing slash or through a symlink, and the same
  data file relative or absolute, resume the run (they were refused, with the advice to move the folder away)."""
  root, tok = workdir
  monkeypatch.chdir(tmp_path)
  data = _vqa_file(tmp_path / "vqa.jsonl", root, 3)
  (tmp_path / "params").mkdir()
  (tmp_path / "link").symlink_to(tmp_path / "params")
  out = tmp_path / "gqa.json"
  # As model_source.resolve does for a params checkpoint: its absolute path, symlinks kept.
  monkeypatch.setattr(runner.model_source, "resolve", lambda checkpoint, **kwargs: model_source.ModelSource(
      os.path.abspath(checkpoint) if checkpoint else None, "tiny", None, str(tok), "raw"))
  monkeypatch.setattr(runner, "EvalJob", _stop_after_one_prediction(out))
  config = lambda checkpoint, data_path: _config("gqa_testdev", root, tok, "unused", str(out), checkpoint=checkpoint,
                                                 data_path=data_path)
  with pytest.raises(_Stop):
    runner.run(config(str(tmp_path / "params"), str(data)))
  for checkpoint, data_path in (("params", "vqa.jsonl"), ("params/", str(data)), ("./params//", "./vqa.jsonl"),
                                (str(tmp_path / "link"), str(data))):
    with pytest.raises(_Stop):
      runner.run(config(checkpoint, data_path))
  # A run.json that recorded the paths as typed (earlier versions) resumes too.
  run_json = results.partial_dir(out) / "run.json"
  recorded = json.loads(run_json.read_text())
  run_json.write_text(json.dumps(dict(recorded, checkpoint="params/", params=str(tmp_path / "params"),
                                      data_path="vqa.jsonl")))
  with pytest.raises(_Stop):
    runner.run(config(str(tmp_path / "params"), str(data)))
  # Another checkpoint is still refused.
  (tmp_path / "other").mkdir()
  with pytest.raises(errors.ConfigError, match=r"holds 1 predictions of a run with other settings \(checkpoint: "):
    runner.run(config("other", str(data)))


@pytest.mark.parametrize("overrides, message", [
    ({"few_shot": -2}, r"config.few_shot=-2 must be an integer >= 0 \(0 = none\)"),
    ({"image_size": -1}, r"config.image_size=-1 must be a positive integer \(0 or unset = the checkpoint's"),
    ({"quantize": "int4", "quantize_group_size": 0}, r"config.quantize_group_size=0 must be an integer >= 1"),
    ({"quantize_group_size": 0}, r"config.quantize_group_size=0 must be an integer >= 1"),
    ({"quantize": "int4", "quantize_group_size": 48}, r"group_size must be a power of two"),
    ({"quantize": "int3"}, r"unknown quantization mode 'int3'"),
])
def test_bad_config_values_are_refused_before_any_work(workdir, tmp_path, overrides, message):
  root, tok = workdir
  data = _vqa_file(tmp_path / "vqa.jsonl", root, 3)
  with pytest.raises(errors.ConfigError, match=message):
    runner.run(_config("gqa_testdev", root, tok, str(data), str(tmp_path / "out" / "gqa.json"), **overrides))
  assert not (tmp_path / "out").exists()


class _FakeJob:
  """An `EvalJob` stand-in: the model config the real job builds from its source (`loading.model_config`), and
  the answer "yes" to every question; nothing is compiled."""
  local_rows = 8

  def __init__(self, config, task, shots=None, *, source):
    del config, task, shots
    self.tok = SentencePieceTokenizer(source.tokenizer)
    self.cfg = loading.model_config(source.preset, self.tok, random_weights=True, image_size=source.image_size)

  def generate(self, chunk):
    del chunk
    return np.arange(self.local_rows), [self.tok.encode("yes")] * self.local_rows


@pytest.mark.parametrize("image_size, used", [(0, 224), (None, 224), (112, 112)])
def test_the_results_record_the_image_size_and_group_size_used(workdir, tmp_path, monkeypatch, image_size, used):
  """`image_size=0` (the checkpoint's, else the preset's) was recorded as 0; the int4 group size not at all."""
  root, tok = workdir
  data = _vqa_file(tmp_path / "vqa.jsonl", root, 3)
  monkeypatch.setattr(runner, "EvalJob", _FakeJob)
  payload = runner.run(_config("gqa_testdev", root, tok, str(data), str(tmp_path / "gqa.json"),
                               image_size=image_size, quantize="int4", quantize_group_size=64))
  assert payload["config"]["image_size"] == used  # 224: the tiny preset's own
  assert payload["config"]["quantize_group_size"] == 64
  assert [p["prediction"] for p in payload["predictions"]] == ["yes"] * 3



def test_the_results_record_how_the_weights_that_ran_are_quantized(workdir, tmp_path, monkeypatch):
  """A `convert --mode=quantize` checkpoint runs as stored int8 while `quantize` stays "none": the results said
  nothing of int8."""
  from qwenvl_jax.checkpoint import save_params  # pylint: disable=import-outside-toplevel
  root, tok = workdir
  data = _vqa_file(tmp_path / "vqa.jsonl", root, 3)
  monkeypatch.setattr(runner, "EvalJob", _FakeJob)  # nothing is restored: the record is what is tested
  params = tmp_path / "int8"
  save_params(params, {"w": np.zeros(3, np.float32)}, custom_metadata={
      "quantization": {"mode": "int8", "group_size": 128, "embeddings": True}})
  stored = runner.run(_config("gqa_testdev", root, tok, str(data), str(tmp_path / "a.json"), checkpoint=str(params)))
  assert stored["config"]["quantize"] == "none" and stored["config"]["weights_quantization"] == "int8 (as stored)"
  on_load = runner.run(_config("gqa_testdev", root, tok, str(data), str(tmp_path / "b.json"), quantize="int4",
                               quantize_group_size=64))
  assert on_load["config"]["weights_quantization"] == "int4 (on load, groups of 64)"
  plain = runner.run(_config("gqa_testdev", root, tok, str(data), str(tmp_path / "c.json")))
  assert plain["config"]["weights_quantization"] == "none"
  assert plain["config"]["attention"] == "xla"  # the attention that ran (--config.attention=splash on a TPU)


def _vqa_with_relative_image(folder):
  """A VQA file in `folder` whose one image, `img/a.png`, lies relative to that folder."""
  (folder / "img").mkdir(parents=True)
  synthetic_record(0, task="grounding", image_size=32).images[0].save(folder / "img" / "a.png")
  data = folder / "val.jsonl"
  data.write_text(json.dumps({"question_id": 1, "image": "img/a.png", "question": "What?", "answer": "a"}) + "\n")
  return data


def test_a_missing_image_is_refused_before_the_model_loads_and_points_at_image_root(workdir, tmp_path, monkeypatch):
  """Relative image paths are read under image_root (the current folder when unset), as the config documents; the
  error names --config.image_root and the data file's folder when the image is there."""
  root, tok = workdir
  data = _vqa_with_relative_image(tmp_path / "data")
  monkeypatch.chdir(tmp_path)

  def no_model(*args, **kwargs):
    raise AssertionError("the model must not load before the images are checked")
  monkeypatch.setattr(runner, "EvalJob", no_model)
  out = tmp_path / "out.json"
  with pytest.raises(EvalDataError, match=r"example 1 \(image img/a.png\): image file not found: img/a.png") as info:
    runner.run(_config("ocrvqa_val", root, tok, str(data), str(out), image_root=""))
  assert "--config.image_root is unset" in info.value.hint
  assert f"img/a.png exists relative to the data file's folder: pass --config.image_root={tmp_path / 'data'}" in (
      info.value.hint)
  assert not results.partial_dir(out).exists()
  with pytest.raises(EvalDataError, match="image file not found: /nowhere/img/a.png") as info:
    runner.run(_config("ocrvqa_val", root, tok, str(data), str(out), image_root="/nowhere"))
  assert "--config.image_root=/nowhere" in info.value.hint


def test_an_image_missing_while_running_names_image_root(tmp_path):
  data = _vqa_with_relative_image(tmp_path / "data")
  example = EvalExample(example_id=1, image="img/a.png")
  with pytest.raises(EvalDataError, match="image file not found") as info:
    prompts.load_image(example, str(tmp_path), 8, data_dir=str(data.parent))
  assert info.value.hint == (f"relative image paths of the data file are read under --config.image_root={tmp_path}; "
                             f"img/a.png exists relative to the data file's folder: pass "
                             f"--config.image_root={data.parent}")
  assert prompts.load_image(example, str(data.parent), 8).shape == (8, 8, 3)
  # During training the setting is the trainer's own (past the first images that are checked before it starts).
  with pytest.raises(EvalDataError) as info:
    prompts.load_image(example, str(tmp_path), 8, flag="--config.eval.image_root")
  assert info.value.hint.endswith("set --config.eval.image_root to the folder the data file's image paths are "
                                  "relative to") and "--config.image_root" not in info.value.hint


def test_a_resume_with_a_smaller_max_examples_scores_the_first_examples(workdir, tmp_path, monkeypatch,
                                                                          capsys):
  """Predictions past the new `max_examples` (an interrupted run of all of the file) failed the merge after the run
  with a ValueError traceback ("ids that are not in the evaluated examples"); ledgers of ids the data file lacks
  (the file changed) failed there too, after every remaining example ran: now before the model loads."""
  root, tok = workdir
  data = _vqa_file(tmp_path / "vqa.jsonl", root, 3)
  monkeypatch.setattr(runner, "EvalJob", _FakeJob)
  out = tmp_path / "gqa.json"
  results.PredictionLedger(results.partial_dir(out), 0).append([{"id": 10, "prediction": "x"},
                                                                  {"id": 12, "prediction": "z"}])
  payload = runner.run(_config("gqa_testdev", root, tok, str(data), str(out), max_examples=2))
  assert [(p["id"], p["prediction"]) for p in payload["predictions"]] == [(10, "x"), (11, "yes")]
  assert payload["num_examples"] == 2
  # The prediction past max_examples is not deleted with the ledgers: a rerun with more examples resumes from it.
  assert set(results.read_ledgers(results.partial_dir(out))) >= {12}
  assert "1 predictions past max_examples stay in" in capsys.readouterr().err

  other = tmp_path / "other.json"
  results.PredictionLedger(results.partial_dir(other), 0).append([{"id": 99, "prediction": "x"}])
  monkeypatch.setattr(runner, "EvalJob", lambda *a, **k: pytest.fail("the model must not load"))
  with pytest.raises(errors.ConfigError, match=r"holds 1 predictions for ids that are not in .*vqa.jsonl, e.g. "
                                               r"\[99\]: the data changed since that run started"):
    runner.run(_config("gqa_testdev", root, tok, str(data), str(other)))
  assert results.read_ledgers(results.partial_dir(other))  # the other data's predictions are kept

  # A synthetic set of max_examples examples is the start of a larger one: a resume with fewer scores those.
  monkeypatch.setattr(runner, "EvalJob", _FakeJob)
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
  synthetic = tmp_path / "synthetic.json"
  results.PredictionLedger(results.partial_dir(synthetic), 0).append(
      [{"id": i, "prediction": f"({i},0),(9,9)"} for i in range(4)])
  payload = runner.run(_config("refcoco_val", root, tok, "unused", str(synthetic), data_path="synthetic",
                               max_examples=2, image_size=56))
  assert [(p["id"], p["prediction"]) for p in payload["predictions"]] == [(0, "(0,0),(9,9)"), (1, "(1,0),(9,9)")]


def test_the_results_record_the_step_prompt_and_how_much_of_the_data_ran(workdir, tmp_path, monkeypatch):
  """A score of `max_examples=2` read like one of the whole file, and the step and prompt were not recorded."""
  from qwenvl_jax.checkpoint import save_params  # pylint: disable=import-outside-toplevel
  root, tok = workdir
  data = _vqa_file(tmp_path / "vqa.jsonl", root, 3)
  params = tmp_path / "run" / "checkpoints" / "8" / "params"
  save_params(params, {"w": np.zeros(3, np.float32)})
  monkeypatch.setattr(runner.model_source, "resolve", lambda *a, **k: model_source.ModelSource(
      str(params), "tiny", None, str(tok), "raw", str(tmp_path / "run"), 8))
  monkeypatch.setattr(runner, "EvalJob", _FakeJob)
  payload = runner.run(_config("gqa_testdev", root, tok, str(data), str(tmp_path / "gqa.json"),
                               checkpoint=str(tmp_path / "run"), max_examples=2))
  recorded = payload["config"]
  assert (recorded["step"], recorded["max_examples"], recorded["examples_in_data"]) == (8, 2, 3)
  assert recorded["prompt"] == "<img>{image}</img>{question} Answer:" and payload["num_examples"] == 2


def test_another_tasks_official_files_are_refused(workdir, tmp_path):
  """`--config=configs/eval/docvqa_val.py --config.task=chartqa_test_human` kept DocVQA's data file and scored it
  as ChartQA (relaxed accuracy, under ChartQA's name) without a word."""
  root, tok = workdir
  config = _config("docvqa_val", root, tok, "unused", str(tmp_path / "out.json"))
  config.update(dict(task="chartqa_test_human", data_path="data/docvqa/val.jsonl"))
  with pytest.raises(errors.ConfigError, match=r"config.data_path=data/docvqa/val.jsonl is the official file of "
                                               r"task 'docvqa_val', not of task 'chartqa_test_human'"):
    runner.run(config)
  config = eval_config.default_config("textvqa_val")
  config.update(dict(task="vqav2_val", data_path=str(tmp_path / "vqav2.jsonl"), output=str(tmp_path / "out.json")))
  with pytest.raises(errors.ConfigError, match=r"config.annotation_path=data/textvqa/textvqa_val_annotations.json "
                                               r"is the official file of task 'textvqa_val'"):
    runner.run(config)
  assert list(tmp_path.iterdir()) == []
