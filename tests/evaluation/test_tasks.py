"""Tests of the task registry: official prompts and lengths, reading, and metric dispatch."""
import json

import pytest

from qwenvl_jax import errors
from qwenvl_jax.evaluation import tasks
from qwenvl_jax.evaluation.readers import EvalDataError, EvalExample


@pytest.mark.parametrize("name, max_new, min_new, metric", [
    ("flickr", 30, 8, "cider"),
    ("nocaps", 30, 8, "cider"),
    ("vqav2_val", 10, 1, "vqa_accuracy"),
    ("vqav2_testdev", 10, 1, None),
    ("textvqa_val", 10, 1, "vqa_accuracy"),
    ("docvqa_val", 100, 1, "anls"),
    ("chartqa_test_human", 100, 1, "relaxed_accuracy"),
    ("gqa_testdev", 10, 1, "gqa_exact_match"),
    ("ocrvqa_test", 100, 1, "exact_match"),
    ("ai2diagram_test", 10, 1, "exact_match"),
    ("refcoco_testA", 28, 10, "grounding_accuracy"),
    ("refcocog_test", 28, 10, "grounding_accuracy"),
    ("scienceqa_test_img", 0, 0, "choice_accuracy"),
])
def test_official_lengths_and_metrics(name, max_new, min_new, metric):
  task = tasks.get_task(name)
  assert (task.max_new_tokens, task.min_new_tokens, task.metric) == (max_new, min_new, metric)


def test_unknown_task_lists_the_known_ones():
  with pytest.raises(KeyError, match="unknown evaluation task 'coco'.*flickr"):
    tasks.get_task("coco")


def test_invalid_task_definition():
  with pytest.raises(ValueError, match="min_new_tokens"):
    tasks.EvalTask(name="x", kind="vqa", metric="anls", max_new_tokens=1, min_new_tokens=2, data_file="x")
  with pytest.raises(ValueError, match="metric must be one of"):
    tasks.EvalTask(name="x", kind="vqa", metric="bleu", max_new_tokens=1, min_new_tokens=0, data_file="x")


def test_official_prompts():
  vqa = EvalExample(example_id=1, image="v.jpg", fields={"question": "What is it?"})
  assert tasks.get_task("vqav2_val").prompt(vqa) == "<img>v.jpg</img>What is it? Answer:"
  assert tasks.get_task("flickr").prompt(EvalExample(example_id=1, image="c.jpg")) == (
      "<img>c.jpg</img>Describe the image in English:")
  ref = EvalExample(example_id=0, image="r.jpg", fields={"expr": "the {left} dog"})
  assert tasks.get_task("refcoco_val").prompt(ref) == "<img>r.jpg</img><ref>the {left} dog</ref><box>"
  mc = EvalExample(example_id=0, image="s.jpg", fields={"hint": "N/A", "question": "Which?"}, choices=("x", "y"))
  assert tasks.get_task("scienceqa_test_img").prompt(mc) == (
      "<img>s.jpg</img>Context: N/A\nQuestion: Which?\nOptions: A. x\nB. y\nAnswer:")
  with pytest.raises(EvalDataError, match="lacks the prompt field 'question'"):
    tasks.get_task("vqav2_val").prompt(EvalExample(example_id=3, image="v.jpg"))


def test_few_shot_prefix():
  task = tasks.get_task("okvqa_val")
  shots = [EvalExample(example_id=i, image=f"{i}.jpg", fields={"question": f"Q{i}?"}, references=(f"a{i}",))
           for i in (1, 2)]
  assert task.few_shot_prefix(shots) == "<img>1.jpg</img>Q1? Answer: a1<img>2.jpg</img>Q2? Answer: a2"
  with pytest.raises(ValueError, match="only for captioning and VQA"):
    tasks.get_task("refcoco_val").few_shot_prefix(shots)


def test_read_vqa_with_annotation_and_score(tmp_path):
  data = tmp_path / "val.jsonl"
  data.write_text(json.dumps({"image": "a.jpg", "question": "How many?", "question_id": 5, "answer": "2"}) + "\n" +
                  json.dumps({"image": "b.jpg", "question": "Color?", "question_id": 6, "answer": "red"}) + "\n")
  ann = tmp_path / "ann.json"
  ann.write_text(json.dumps({"annotations": [
      {"question_id": 5, "answers": [{"answer": a} for a in ["2"] * 3 + ["3"] * 7],
       "question_type": "how many", "answer_type": "number"},
      {"question_id": 6, "answers": [{"answer": "red"}] * 10, "question_type": "what color",
       "answer_type": "other"}]}))
  task = tasks.get_task("vqav2_val")
  examples = task.read(data, annotation_path=ann)
  result = task.score(examples, ["two", "Red."])
  # (0.9 + 1.0) / 2 -> 95.0 (see test_vqa for the 0.9).
  assert result["score"] == 95.0
  assert result["details"]["per_answer_type"] == {"number": 90.0, "other": 100.0}
  # Without the annotation file the single jsonl answers cannot give VQA accuracy.
  with pytest.raises(ValueError, match="single answer"):
    task.score(task.read(data), ["two", "red"])


def test_an_annotation_file_given_to_a_task_that_reads_none_is_a_user_error(tmp_path):
  """A VQA command's --config.annotation_path kept for a caption or grounding task was a bare ValueError: a
  traceback instead of one line."""
  data = tmp_path / "ground.jsonl"
  data.write_text(json.dumps({"image": "a.jpg", "sent": "the dog", "bbox": [0, 0, 5, 5], "width": 9, "height": 9})
                  + "\n")
  with pytest.raises(errors.ConfigError, match=r"task 'refcoco_val' \(grounding\) reads no annotation file "
                                               r"\(annotation_path=ann.json\): only VQA tasks do"):
    tasks.get_task("refcoco_val").read(data, annotation_path="ann.json")


def test_score_dispatch_for_each_metric():
  ex = lambda i, refs: EvalExample(example_id=i, image=f"{i}.jpg", references=tuple(refs))
  # Relaxed: |10.4 - 10| / 10 = 0.04 passes; GQA: "It is a table." -> "table".
  assert tasks.get_task("chartqa_test_human").score([ex(1, ["10.4"]), ex(2, ["5"])], ["10", "7"])["score"] == 0.5
  assert tasks.get_task("gqa_testdev").score([ex(1, ["table"])], ["It is a table."])["score"] == 1.0
  assert tasks.get_task("docvqa_val").score([ex(1, ["hello"])], ["helo"])["score"] == pytest.approx(0.8)
  assert tasks.get_task("ocrvqa_val").score([ex(1, ["Harry"])], [" harry "])["score"] == 1.0
  # CIDEr of two perfect two-word captions over a two-image set: 5.0 (see test_cider).
  assert tasks.get_task("flickr").score([ex(1, ["A dog."]), ex(2, ["a cat"])], ["a dog", "A cat"])["score"] == (
      pytest.approx(5.0))
  grounding = EvalExample(example_id=0, image="g.jpg", bbox=(0, 0, 100, 100), size=(100, 200))
  result = tasks.get_task("refcoco_val").score([grounding, grounding], ["(0,0),(999,999)", "no box"])
  assert result["score"] == 0.5 and result["details"] == {"unparsed": 1}
  mc = EvalExample(example_id=0, image="s.jpg", choices=("x", "y"), answer_index=1)
  assert tasks.get_task("scienceqa_test_img").score([mc, mc], [1, 0])["score"] == 0.5
  assert tasks.get_task("vqav2_testdev").score([ex(1, [])], ["yes"])["score"] is None


def test_score_rejects_bad_predictions_and_missing_ground_truth():
  mc = EvalExample(example_id=0, image="s.jpg", choices=("x", "y"), answer_index=1)
  with pytest.raises(ValueError, match="must be int"):
    tasks.get_task("scienceqa_test_img").score([mc], ["B"])
  with pytest.raises(ValueError, match="outside its 2 choices"):
    tasks.get_task("scienceqa_test_img").score([mc], [2])
  with pytest.raises(ValueError, match="example 9 has no answers"):
    tasks.get_task("docvqa_val").score([EvalExample(example_id=9, image="d.jpg")], ["x"])
  with pytest.raises(ValueError, match="1 predictions for 0 examples"):
    tasks.get_task("docvqa_val").score([], ["x"])
