"""Tests of the official evaluation file readers, valid and malformed."""
import json

import pytest

from qwenvl_jax.evaluation import readers
from qwenvl_jax.evaluation.readers import EvalDataError


def _jsonl(tmp_path, rows, name="data.jsonl"):
  path = tmp_path / name
  path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
  return path


def test_vqa_jsonl(tmp_path):
  path = _jsonl(tmp_path, [
      {"image": "a.jpg", "question": "What?", "question_id": 7, "answer": "cat"},
      {"image": "b.jpg", "question": "Which?", "question_id": "q8", "answer": ["x", "y"]},
      {"image": "c.jpg", "question": "Who?", "question_id": 9},
  ])
  examples = readers.read_vqa_jsonl(path)
  assert [e.example_id for e in examples] == [7, "q8", 9]
  assert [e.references for e in examples] == [("cat",), ("x", "y"), ()]
  assert examples[0].image == "a.jpg" and examples[0].fields == {"question": "What?"}


@pytest.mark.parametrize("line, message", [
    ('{"image": "a.jpg", "question": "q"}', "data.jsonl:2: field 'question_id' is missing"),
    ('{"image": "a.jpg", "question": "q", "question_id": 1.5}', "data.jsonl:2: field 'question_id' must be"),
    ('{"image": "", "question": "q", "question_id": 2}', "data.jsonl:2: field 'image' must be a non-empty"),
    ('{"image": "a.jpg", "question": 3, "question_id": 2}', "data.jsonl:2: field 'question'"),
    ('{"image": "a.jpg", "question": "q", "question_id": 2, "answer": []}', "data.jsonl:2: field 'answer'"),
    ('{"image": "a.jpg", "question": "q", "question_id": 1}', "data.jsonl:2: duplicate question_id 1"),
    ('{"image": "a.jpg", "question": "q", "question_id": 2', "data.jsonl:2: not valid JSON"),
    ('["a.jpg"]', "data.jsonl:2: expected a JSON object"),
    ("", "data.jsonl:2: empty line"),
])
def test_vqa_jsonl_malformed_lines_name_line_and_field(tmp_path, line, message):
  path = _jsonl(tmp_path, [{"image": "a.jpg", "question": "q", "question_id": 1}, line])
  with pytest.raises(EvalDataError, match=message):
    readers.read_vqa_jsonl(path)


def test_missing_file_is_a_clear_error(tmp_path):
  with pytest.raises(EvalDataError, match="cannot open evaluation file .*nope.jsonl"):
    readers.read_vqa_jsonl(tmp_path / "nope.jsonl")


def test_vqa_annotations_attach(tmp_path):
  path = tmp_path / "ann.json"
  path.write_text(json.dumps({"annotations": [
      {"question_id": 7, "answers": [{"answer": "cat", "answer_id": 1}] * 10, "question_type": "what",
       "answer_type": "other"}]}))
  annotations = readers.read_vqa_annotations(path)
  assert annotations[7]["answers"] == ("cat",) * 10
  example = readers.EvalExample(example_id=7, image="a.jpg", references=("cat",))
  (attached,) = readers.attach_vqa_annotations([example], annotations)
  assert attached.references == ("cat",) * 10
  assert attached.meta == {"question_type": "what", "answer_type": "other"}
  with pytest.raises(EvalDataError, match=r"1 question_id\(s\) have no annotation .*\[8\]"):
    readers.attach_vqa_annotations([readers.EvalExample(example_id=8, image="b.jpg")], annotations)
  # A question_id written as text in the data file and as a number in the annotations: the hint says so.
  with pytest.raises(EvalDataError) as e:
    readers.attach_vqa_annotations([readers.EvalExample(example_id="7", image="a.jpg")], annotations)
  assert e.value.hint == ("question_id '7' (str) in the data file is 7 (int) in the annotation file: write both as "
                          "the same type")


def test_vqa_annotations_malformed(tmp_path):
  path = tmp_path / "ann.json"
  path.write_text(json.dumps({"annotations": [{"question_id": 1, "answers": [{"answer": 3}]}]}))
  with pytest.raises(EvalDataError, match=r"annotations\[0\]: field 'answers\[0\]'"):
    readers.read_vqa_annotations(path)
  path.write_text(json.dumps({"questions": []}))
  with pytest.raises(EvalDataError, match="'annotations' list"):
    readers.read_vqa_annotations(path)


def test_caption_json(tmp_path):
  path = tmp_path / "caps.json"
  path.write_text(json.dumps({
      "images": [{"id": 1, "image": "1.jpg"}, {"id": 2, "image": "2.jpg"}],
      "annotations": [{"image_id": 2, "caption": "b"}, {"image_id": 1, "caption": "a"},
                      {"image_id": 2, "caption": "c"}]}))
  examples = readers.read_caption_json(path)
  assert [(e.example_id, e.image, e.references) for e in examples] == [(1, "1.jpg", ("a",)),
                                                                      (2, "2.jpg", ("b", "c"))]


@pytest.mark.parametrize("data, message", [
    ({"images": [{"id": 1}]}, r"images\[0\]: field 'image' is missing"),
    ({"images": [{"id": 1, "image": "a"}, {"id": 1, "image": "b"}]}, "duplicate image id 1"),
    ({"images": [{"id": 1, "image": "a"}], "annotations": [{"image_id": 5, "caption": "x"}]},
     r"annotations\[0\]: field 'image_id' 5 is not the id"),
    ({"images": [{"id": 1, "image": "a"}], "annotations": [{"image_id": 1}]},
     r"annotations\[0\]: field 'caption' is missing"),
    ([], "'images' list"),
])
def test_caption_json_malformed(tmp_path, data, message):
  path = tmp_path / "caps.json"
  path.write_text(json.dumps(data))
  with pytest.raises(EvalDataError, match=message):
    readers.read_caption_json(path)


def test_grounding_jsonl(tmp_path):
  path = _jsonl(tmp_path, [{"image": "a.jpg", "sent": "left dog", "bbox": [1, 2, 30.5, 40], "width": 640,
                            "height": 480}])
  (example,) = readers.read_grounding_jsonl(path)
  assert example.example_id == 0 and example.fields == {"expr": "left dog"}
  assert example.bbox == (1.0, 2.0, 30.5, 40.0) and example.size == (640, 480)


@pytest.mark.parametrize("change, message", [
    ({"bbox": [1, 2, 3]}, "field 'bbox' must be"),
    ({"bbox": [1, 2, "3", 4]}, "field 'bbox' must be"),
    ({"bbox": [10, 2, 3, 4]}, "field .bbox. must have x2 >= x1"),
    ({"width": 0}, "field 'width' must be positive"),
    ({"height": None}, "field 'height' must be a finite number"),
    ({"sent": ""}, "field 'sent'"),
])
def test_grounding_jsonl_malformed(tmp_path, change, message):
  row = {"image": "a.jpg", "sent": "dog", "bbox": [1, 2, 3, 4], "width": 10, "height": 10}
  path = _jsonl(tmp_path, [row, {**row, **change}])
  with pytest.raises(EvalDataError, match="data.jsonl:2: " + message):
    readers.read_grounding_jsonl(path)


def test_multiple_choice_jsonl(tmp_path):
  path = _jsonl(tmp_path, [
      {"image": "a.jpg", "hint": "", "question": "Which?", "choices": ["x", "y"], "answer": 1},
      {"image": "b.jpg", "hint": "It is hot.", "question": "What?", "choices": ["p", "q", "r"], "index": 42},
  ])
  first, second = readers.read_multiple_choice_jsonl(path)
  assert first.fields == {"hint": "N/A", "question": "Which?"} and first.answer_index == 1
  assert second.choices == ("p", "q", "r") and second.answer_index is None and second.meta == {"index": 42}
  assert [first.example_id, second.example_id] == [0, 1]


@pytest.mark.parametrize("change, message", [
    ({"choices": []}, "field 'choices' must be a list of 1 to 5"),
    ({"choices": list("abcdef")}, "field 'choices' must be a list of 1 to 5"),
    ({"answer": 2}, "field 'answer' must be an index into the 2 choices"),
    ({"answer": True}, "field 'answer'"),
    ({"hint": 5}, "field 'hint'"),
])
def test_multiple_choice_jsonl_malformed(tmp_path, change, message):
  row = {"image": "a.jpg", "hint": None, "question": "q", "choices": ["x", "y"], "answer": 0}
  path = _jsonl(tmp_path, [{**row, **change}])
  with pytest.raises(EvalDataError, match="data.jsonl:1: " + message):
    readers.read_multiple_choice_jsonl(path)


def test_resolve_images():
  examples = [readers.EvalExample(example_id=i, image=p)
              for i, p in enumerate(["data/coco/1.jpg", "/abs/2.jpg", "gs://bucket/3.jpg"])]
  resolved = readers.resolve_images(examples, "/qwen")
  assert [e.image for e in resolved] == ["/qwen/data/coco/1.jpg", "/abs/2.jpg", "gs://bucket/3.jpg"]
  assert resolved[0].example_id == 0
