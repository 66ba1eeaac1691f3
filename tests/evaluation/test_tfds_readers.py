"""Tests of the TFDS evaluation sources: specs, each public schema -> examples (ids, references, pixel boxes),
lazily read images, and the errors for unknown schemas and bad values."""
import importlib.util
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from qwenvl_jax.evaluation import get_task
from qwenvl_jax.evaluation import tfds_readers
from qwenvl_jax.evaluation.readers import EvalDataError
from qwenvl_jax.text import SentencePieceTokenizer, formatting, train_sentencepiece
from tests.evaluation import tfds_fakes
from tests.evaluation.tfds_fakes import png

BBox = tfds.features.BBox


def test_parse_spec():
  assert tfds_readers.parse_spec("tfds:coco_captions", "test") == ("tfds:coco_captions", "test")
  assert tfds_readers.parse_spec("tfds:ref_coco/refcocoplus_unc:testA", "test") == (
      "tfds:ref_coco/refcocoplus_unc", "testA")
  assert tfds_readers.parse_spec("tfds:x:validation[:10]", "test") == ("tfds:x", "validation[:10]")
  assert tfds_readers.parse_spec("array_record:/d/x/1.0.0", "train") == ("array_record:/d/x/1.0.0", "train")
  assert tfds_readers.parse_spec("array_record:gs://b/x/1.0.0:test[:5]", "train") == (
      "array_record:gs://b/x/1.0.0", "test[:5]")
  assert tfds_readers.is_spec("tfds:x") and tfds_readers.is_spec("array_record:/x")
  assert not tfds_readers.is_spec("data/flickr30k/test.json") and not tfds_readers.is_spec("tfds")
  # TFDS's NAME:VERSION: a version is told from a split by its form.
  assert tfds_readers.parse_spec("tfds:ref_coco/refcoco_unc:1.1.0:validation", "test") == (
      "tfds:ref_coco/refcoco_unc:1.1.0", "validation")
  assert tfds_readers.parse_spec("tfds:x:1.0.0", "train") == ("tfds:x:1.0.0", "train")
  assert tfds_readers.parse_spec("tfds:x:1.*.*:test", "train") == ("tfds:x:1.*.*", "test")
  with pytest.raises(EvalDataError, match="empty split"):
    tfds_readers.parse_spec("tfds:x:1.0.0:", "test")
  with pytest.raises(EvalDataError, match="empty split"):
    tfds_readers.parse_spec("tfds:coco_captions:", "test")
  with pytest.raises(EvalDataError, match="no dataset name"):
    tfds_readers.parse_spec("tfds::test", "test")


def test_coco_captions_one_example_per_image_with_all_captions(tmp_path):
  records = [{"image": png(10 * i), "image/id": 100 + i,
              "objects": [{"bbox": BBox(0.1, 0.1, 0.5, 0.5), "label": 3}],
              "captions": [{"id": 2 * i, "text": f"first {i}"}, {"id": 2 * i + 1, "text": f"second {i}"}]}
             for i in range(3)]
  tfds_fakes.prepare(tfds_fakes.EvalCocoCaptions, tmp_path, {"test": records, "train": records[:1]})
  examples = get_task("flickr").read("tfds:eval_coco_captions", tfds_data_dir=str(tmp_path))
  assert sorted(e.example_id for e in examples) == [100, 101, 102]
  assert all(type(e.example_id) is int for e in examples)  # pylint: disable=unidiomatic-typecheck  (JSON ids)
  for e in examples:
    i = e.example_id - 100
    assert e.references == (f"first {i}", f"second {i}")
    assert e.image_loader() == png(10 * i)  # the encoded bytes, read from the record on demand
    assert e.image.startswith("tfds:eval_coco_captions/1.0.0:test/")
  assert len({e.image for e in examples}) == 3
  train = get_task("flickr").read("tfds:eval_coco_captions", tfds_data_dir=str(tmp_path), tfds_split="train")
  assert [e.example_id for e in train] == [100]
  # With a version, TFDS reads the prepared files without the builder code (which for coco_captions needs TF).
  pinned = get_task("flickr").read("tfds:eval_coco_captions:1.0.0:train", tfds_data_dir=str(tmp_path))
  assert [(e.example_id, e.references) for e in pinned] == [(100, ("first 0", "second 0"))]
  # The same examples again: ids, order and pseudo-paths are stable.
  again = get_task("flickr").read("tfds:eval_coco_captions:test", tfds_data_dir=str(tmp_path))
  assert [(e.example_id, e.image) for e in again] == [(e.example_id, e.image) for e in examples]


def test_caption_pairs_and_array_record_folder(tmp_path):
  folder = tfds_fakes.prepare(tfds_fakes.EvalCaptionPairs, tmp_path, {
      "validation": [{"image": png(1), "text": "a dog"}, {"image": png(2), "text": "a cat"}]})
  examples = get_task("nocaps").read(f"array_record:{folder}:validation")
  # Without an id feature the id is the record index (TFDS orders records by a hash of their key).
  assert [e.example_id for e in examples] == [0, 1]
  assert sorted((e.references, e.image_loader()) for e in examples) == [(("a cat",), png(2)), (("a dog",), png(1))]
  with pytest.raises(EvalDataError, match="cannot read split 'test'"):
    get_task("nocaps").read(f"array_record:{folder}")


def test_ref_coco_one_example_per_sentence_with_pixel_boxes(tmp_path):
  records = [
      {"image": png(1, width=40, height=20), "image/id": 7, "objects": [
          {"id": 70, "bbox": BBox(ymin=0.25, xmin=0.1, ymax=0.75, xmax=0.5),
           "refexp": [{"refexp_id": 1, "raw": "left dog"}, {"refexp_id": 2, "raw": "the brown dog"}]},
          {"id": 71, "bbox": BBox(ymin=0.0, xmin=0.5, ymax=1.0, xmax=1.0),
           "refexp": [{"refexp_id": 3, "raw": "right cat"}]}]},
      {"image": png(2, width=30, height=50), "image/id": 8, "objects": [
          {"id": 80, "bbox": BBox(ymin=0.1, xmin=0.2, ymax=0.3, xmax=0.4), "refexp": []},
          {"id": 81, "bbox": BBox(ymin=0.5, xmin=0.0, ymax=0.9, xmax=0.3),
           "refexp": [{"refexp_id": 4, "raw": "bottom bird"}]}]},
      {"image": png(3), "image/id": 9, "objects": []},
  ]
  tfds_fakes.prepare(tfds_fakes.EvalRefCoco, tmp_path, {"validation": records})
  examples = get_task("refcoco_val").read("tfds:eval_ref_coco:validation", tfds_data_dir=str(tmp_path))
  assert "tensorflow" not in sys.modules  # read without TensorFlow, nested sequences included
  got = {e.example_id: e for e in examples}
  assert sorted(got) == ["7/0/0", "7/0/1", "7/1/0", "8/1/0"]
  assert got["7/0/1"].fields == {"expr": "the brown dog"} and got["7/1/0"].fields == {"expr": "right cat"}
  np.testing.assert_allclose(got["7/0/0"].bbox, (4, 5, 20, 15), rtol=1e-6)  # x * 40, y * 20
  np.testing.assert_allclose(got["7/1/0"].bbox, (20, 0, 40, 20), rtol=1e-6)
  np.testing.assert_allclose(got["8/1/0"].bbox, (0, 25, 9, 45), rtol=1e-6)  # x * 30, y * 50
  assert got["7/0/0"].size == (40, 20) and got["8/1/0"].size == (30, 50)
  assert got["7/0/0"].image == got["7/1/0"].image != got["8/1/0"].image
  assert got["8/1/0"].image_loader() == png(2, width=30, height=50)


def test_flat_grounding_schema(tmp_path):
  tfds_fakes.prepare(tfds_fakes.EvalFlatGrounding, tmp_path, {"test": [
      {"image": png(1, width=10, height=10), "id": "a", "bbox": BBox(0.0, 0.0, 0.5, 1.0), "sent": "top"}]})
  (example,) = get_task("refcocog_test").read("tfds:eval_flat_grounding", tfds_data_dir=str(tmp_path))
  assert (example.example_id, example.fields, example.size) == ("a", {"expr": "top"}, (10, 10))
  np.testing.assert_allclose(example.bbox, (0, 0, 10, 5))


def test_vqa_answers_and_single_answer(tmp_path):
  tfds_fakes.prepare(tfds_fakes.EvalVqa, tmp_path, {"test": [
      {"image": png(1), "question_id": 5, "question": "What colour?", "answers": ["red", "red", "dark red"]},
      {"image": png(2), "question_id": 6, "question": "How many?", "answers": []}]})
  tfds_fakes.prepare(tfds_fakes.EvalVqaSingleAnswer, tmp_path, {"test": [
      {"image": png(3), "question": "Which shape?", "answer": "circle"}]})
  vqa = get_task("okvqa_val").read("tfds:eval_vqa", tfds_data_dir=str(tmp_path))
  assert sorted((e.example_id, e.fields, e.references) for e in vqa) == [
      (5, {"question": "What colour?"}, ("red", "red", "dark red")), (6, {"question": "How many?"}, ())]
  (single,) = get_task("ocrvqa_test").read("tfds:eval_vqa_single_answer", tfds_data_dir=str(tmp_path))
  assert (single.example_id, single.references) == (0, ("circle",))


def test_multiple_choice(tmp_path):
  tfds_fakes.prepare(tfds_fakes.EvalMultipleChoice, tmp_path, {"test": [
      {"image": png(1), "question": "Which?", "hint": "", "choices": ["a", "b", "c"], "answer": 2},
      {"image": png(2), "question": "Why?", "hint": "because", "choices": ["x", "y"], "answer": 0}]})
  examples = get_task("scienceqa_test_img").read("tfds:eval_multiple_choice", tfds_data_dir=str(tmp_path))
  assert [e.example_id for e in examples] == [0, 1]
  assert sorted((e.fields["hint"], e.choices, e.answer_index) for e in examples) == [
      ("N/A", ("a", "b", "c"), 2), ("because", ("x", "y"), 0)]


def test_bad_values_are_named(tmp_path):
  tfds_fakes.prepare(tfds_fakes.EvalMultipleChoice, tmp_path, {"test": [
      {"image": png(1), "question": "Which?", "hint": "", "choices": ["a", "b"], "answer": 0},
      {"image": png(1), "question": "Which?", "hint": "", "choices": ["a", "b"], "answer": 4}]})
  with pytest.raises(EvalDataError, match=r"record \d: feature 'answer' must be an index into the 2 choices"):
    get_task("scienceqa_test_img").read("tfds:eval_multiple_choice", tfds_data_dir=str(tmp_path))
  tfds_fakes.prepare(tfds_fakes.EvalFlatGrounding, tmp_path, {"test": [
      {"image": b"not an image", "id": "a", "bbox": BBox(0.0, 0.0, 0.5, 1.0), "sent": "top"}]})
  with pytest.raises(EvalDataError, match=r"record 0: feature 'image' is not a readable encoded image"):
    get_task("refcoco_val").read("tfds:eval_flat_grounding", tfds_data_dir=str(tmp_path))
  tfds_fakes.prepare(tfds_fakes.EvalVqa, tmp_path, {"test": [
      {"image": png(1), "question_id": 5, "question": "A?", "answers": ["x"]},
      {"image": png(2), "question_id": 5, "question": "B?", "answers": ["y"]}]})
  with pytest.raises(EvalDataError, match=r"duplicate example id 5 \(records 0 and 1\)"):
    get_task("vqav2_val").read("tfds:eval_vqa", tfds_data_dir=str(tmp_path))


def test_unknown_schema_lists_features_and_expected_schemas(tmp_path):
  tfds_fakes.prepare(tfds_fakes.EvalUnknownSchema, tmp_path, {"test": [{"image": png(1), "label": 3}]})
  with pytest.raises(EvalDataError) as info:
    get_task("flickr").read("tfds:eval_unknown_schema", tfds_data_dir=str(tmp_path))
  message = str(info.value)
  assert "match no caption schema" in message and "found: image: Image, label: int64" in message
  assert "coco_captions-like" in message and "{image: Image, text: Text" in message
  # A schema of another kind is not accepted either: captions are not VQA.
  tfds_fakes.prepare(tfds_fakes.EvalCaptionPairs, tmp_path, {"test": [{"image": png(1), "text": "a dog"}]})
  with pytest.raises(EvalDataError, match="match no vqa schema"):
    get_task("vqav2_val").read("tfds:eval_caption_pairs", tfds_data_dir=str(tmp_path))


def test_builder_code_that_needs_tensorflow_is_a_clear_error(tmp_path):
  if importlib.util.find_spec("tensorflow") is not None:
    pytest.skip("TensorFlow is installed: TFDS's coco_captions code can be constructed")
  with pytest.raises(EvalDataError, match=r"builder code of 'coco_captions/2014' needs a module .* add its version"):
    get_task("flickr").read("tfds:coco_captions/2014:test", tfds_data_dir=str(tmp_path))


def test_missing_dataset_is_a_clear_error(tmp_path):
  with pytest.raises(EvalDataError, match="no TFDS dataset 'no_such_dataset_xyz' is registered or prepared"):
    get_task("flickr").read("tfds:no_such_dataset_xyz", tfds_data_dir=str(tmp_path))
  with pytest.raises(EvalDataError, match="missing does not exist"):
    get_task("flickr").read(f"array_record:{tmp_path}/missing")
  with pytest.raises(EvalDataError, match="not a prepared TFDS dataset folder"):
    get_task("flickr").read(f"array_record:{tmp_path}")


def test_pseudo_path_survives_the_image_span_parsing(tmp_path):
  """The prompt's `<img>PSEUDO-PATH</img>` is one image span whose path is the pseudo-path (no special tokens)."""
  tfds_fakes.prepare(tfds_fakes.EvalCaptionPairs, tmp_path, {"test": [{"image": png(1), "text": "a dog"}]})
  (example,) = get_task("flickr").read("tfds:eval_caption_pairs:test[:1]", tfds_data_dir=str(tmp_path))
  assert example.image == "tfds:eval_caption_pairs/1.0.0:test[:1]/0"
  tok = SentencePieceTokenizer(train_sentencepiece(["Describe the image in English: a dog"] * 4, tmp_path / "sp",
                                                   vocab_size=300))
  encoded = formatting.encode_with_images(tok, get_task("flickr").prompt(example), n_image_tokens=4)
  assert encoded.image_paths == [example.image]
  assert encoded.ids[:6] == [tok.img_start_id] + [tok.img_pad_id] * 4 + [tok.img_end_id]
