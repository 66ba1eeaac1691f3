"""Evaluation during training (`config.eval_every`): the eval job's code on the trainer's parameters, scores in the
metrics log and TensorBoard; and the trainer's side of it (no eval_fn, bad settings)."""
import json
import pathlib

import pytest
from PIL import Image

from qwenvl_jax.evaluation import EvalDataError, during_training
from qwenvl_jax.training import train
from tests.training.helpers import REPO, read_losses, small_config


def _rows(workdir):
  return [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_scores_every_n_steps_reach_the_metrics_log_and_tensorboard(uninterrupted, tmp_path):
  """The `uninterrupted` run's config (its train step comes from the compilation cache), stopped at step 5."""
  config = small_config(2, tmp_path / "run", stop_at_step=5, eval_every=2, tensorboard=True,
                        **{"eval.max_examples": 8, "eval.per_device_batch_size": 1})
  evaluator = during_training.TrainingEvaluator(config)
  calls = []

  def eval_fn(step, model, **kwargs):
    calls.append(step)
    return evaluator(step, model, **kwargs)

  try:
    result = train(config, eval_fn)
  finally:
    evaluator.close()
  assert result.step == 5 and calls == [2, 4]  # not at the stop: a preempted run saves and leaves at once
  scores = {r["step"]: r for r in _rows(tmp_path / "run") if "eval/flickr/cider" in r}
  assert sorted(scores) == [2, 4]
  for row in scores.values():
    assert 0.0 <= row["eval/flickr/cider"] < 10.0 and row["eval/flickr/examples"] == 8
  # The training rows are all there, with the uninterrupted run's losses (evaluating changes nothing).
  losses = read_losses(tmp_path / "run")
  assert sorted(losses) == [1, 2, 3, 4, 5]
  assert all(losses[s] == uninterrupted[2][s] for s in losses)
  events = b"".join(p.read_bytes() for p in (tmp_path / "run" / "tensorboard").rglob("events.out.tfevents.*"))
  assert b"eval/flickr/cider" in events and b"train/loss" in events


def test_task_from_an_eval_config_file_and_the_synthetic_default(tmp_path):
  config = small_config(2, tmp_path, eval_every=5, **{"eval.task": str(REPO / "configs/eval/refcoco_val.py"),
                                                       "eval.max_examples": 3})
  evaluator = during_training.TrainingEvaluator(config)
  try:
    assert evaluator.task.name == "refcoco_val" and len(evaluator.examples) == 3
    assert "grounding.jsonl" in evaluator.data_path
  finally:
    evaluator.close()


@pytest.mark.parametrize("overrides, message", [
    ({"eval.task": "no_such_task"}, "no_such_task"),
    ({"eval.task": "configs/eval/nope.py"}, "no evaluation config file"),
    ({"eval.task": "vqav2_val"}, "no synthetic held-out set"),
    # A submission split (no metric) failed to log its score, None, at the first evaluation step.
    ({"eval.task": "docvqa_test"}, r"config.eval.task='docvqa_test' is a submission split: it has no metric"),
    ({"eval_every": -1}, "eval_every must be an integer"),
    ({"eval.per_device_batch_size": 0}, "per_device_batch_size"),
])
def test_bad_eval_settings_are_refused_before_training(tmp_path, overrides, message):
  config = small_config(2, tmp_path / "run", **{"eval_every": 2, **overrides})
  with pytest.raises((ValueError, KeyError, FileNotFoundError), match=message):
    during_training.TrainingEvaluator(config)
  assert not (tmp_path / "run").exists()


def test_eval_data_without_its_ground_truth_is_refused_before_training(tmp_path):
  """A test split's file (no answers) failed in the metric at the first evaluation step, after training to it."""
  data = tmp_path / "test.jsonl"
  data.write_text(json.dumps({"question_id": 1, "image": "a.png", "question": "What?"}) + "\n")
  config = small_config(2, tmp_path / "run", eval_every=2, **{"eval.task": "ocrvqa_val", "eval.data_path": str(data)})
  with pytest.raises(EvalDataError, match="example 1 has no answers, which metric 'exact_match' needs"):
    during_training.TrainingEvaluator(config)
  assert not (tmp_path / "run").exists()


def test_eval_images_under_the_wrong_root_are_refused_before_training(tmp_path, monkeypatch):
  """A wrong `eval.image_root` failed at the first evaluation step, after training to it; the runner checks the
  images before the model loads."""
  (tmp_path / "data" / "img").mkdir(parents=True)
  Image.new("RGB", (8, 8)).save(tmp_path / "data" / "img" / "a.png")
  data = tmp_path / "data" / "val.jsonl"
  data.write_text(json.dumps({"question_id": 1, "image": "img/a.png", "question": "What?", "answer": "a"}) + "\n")
  monkeypatch.chdir(tmp_path)
  config = small_config(2, tmp_path / "run", eval_every=2, **{"eval.task": "ocrvqa_val", "eval.data_path": str(data)})
  with pytest.raises(EvalDataError, match=r"example 1 \(image img/a.png\): image file not found") as info:
    during_training.TrainingEvaluator(config)
  assert f"exists relative to the data file's folder: pass --config.eval.image_root={tmp_path / 'data'}" in (
      info.value.hint)
  assert not (tmp_path / "run").exists()
  config.eval.image_root = str(tmp_path / "data")
  during_training.TrainingEvaluator(config).close()


def test_trainer_without_eval_fn_refuses_eval_every(tmp_path):
  with pytest.raises(ValueError, match="needs an eval_fn"):
    train(small_config(2, tmp_path / "run", eval_every=2))
  assert not (tmp_path / "run").exists()
