"""Tests of the record sources: JSONL pairs and conversations, the official fine-tuning JSON, spec errors."""
import io
import json

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from qwenvl_jax.data import records as rec
from qwenvl_jax.data.sources import conversation_record, make_source
from tests.data import helpers


def _all(source):
  out = []
  for i in range(len(source.items)):
    try:
      out.append(source.parse(source.items[i]))
    except rec.BadRecordError as e:
      out.append(e)
  return out


def test_jsonl_pairs_per_stage(tmp_path):
  path = helpers.write_image_text_jsonl(tmp_path, 3)
  for stage, prompt, answer in [(1, "<img></img>", "image number 2"),
                                (2, "<img></img>Generate the caption in English:", " image number 2")]:
    records = _all(make_source(f"jsonl:{path}", stage=stage, image_size=8))
    assert [r.id for r in records] == ["pair0", "pair1", "pair2"]
    assert records[2].turns == [("user", prompt), ("assistant", answer)]
    assert records[2].images == [str(tmp_path / "imgs" / "2.png")]


def test_jsonl_bad_lines_become_bad_records(tmp_path):
  path = tmp_path / "x.jsonl"
  path.write_text('{"id": "ok", "image": "a.png", "text": "t"}\n\n{broken\n[1, 2]\n{"id": "k", "foo": 1}\n'
                  '{"id": "url", "image": "http://x/y.jpg", "text": "t"}\n')
  records = _all(make_source(f"jsonl:{path}", stage=1, image_size=8))
  assert isinstance(records[0], rec.Record)  # blank lines are not records
  assert [type(r) for r in records[1:]] == [rec.BadRecordError] * 4
  assert "x.jsonl:3" in str(records[1]) and "malformed JSON" in str(records[1])
  assert "JSON object" in str(records[2])
  assert "'k'" in str(records[3]) and "conversations" in str(records[3])
  assert "never downloads" in str(records[4])


def test_qwen_finetune_json(tmp_path):
  (tmp_path / "img").mkdir()
  entries = [
      {"id": "identity_0", "conversations": [
          {"from": "user", "value": "Picture 1: <img>img/a.jpg</img>\nWhat is this?"},
          {"from": "assistant", "value": "<ref>A cat</ref><box>(1,2),(30,40)</box>"}]},
      {"id": "identity_1", "conversations": [
          {"from": "assistant", "value": "I speak first and am dropped."},
          {"from": "user", "value": "Picture 1: <img>/abs/b.png</img>\nPicture 2: <img>img/c.png</img>\nSame?"},
          {"from": "assistant", "value": "No."}]},
      {"id": "identity_2", "conversations": [{"from": "robot", "value": "x"}]},
      {"id": "identity_3", "conversations": [
          {"from": "user", "value": "<img>img/a.jpg</img>"},
          {"from": "assistant", "value": "<box>(1,2),(3,4000)</box>"}]},
  ]
  path = tmp_path / "train.json"
  path.write_text(json.dumps(entries))
  r0, r1, r2, r3 = _all(make_source(f"qwen_finetune_json:{path}", stage=3, image_size=8))
  assert r0.task == "chat" and r0.images == [str(tmp_path / "img" / "a.jpg")]
  assert r0.turns[0] == ("user", "Picture 1: <img></img>\nWhat is this?")
  assert r1.turns[0][0] == "user" and len(r1.turns) == 2
  assert r1.images == ["/abs/b.png", str(tmp_path / "img" / "c.png")]
  assert isinstance(r2, rec.BadRecordError) and "robot" in str(r2) and "identity_2" in str(r2)
  assert isinstance(r3, rec.BadRecordError) and "outside" in str(r3)


def test_finetune_json_mistakes_are_named_bad_records(tmp_path, monkeypatch):
  """An entry without an assistant turn trained on the ChatML markers alone and an empty answer taught the model to
  answer nothing, without a word (as finetune.py does); a picture written relative to the current folder (where
  finetune.py opens it) was 'image file not found: <the JSON's folder>/...'."""
  (tmp_path / "data").mkdir()
  (tmp_path / "img").mkdir()
  (tmp_path / "img" / "a.png").write_bytes(b"")  # only its existence is looked at here
  ask = {"from": "user", "value": "What is it?"}
  entries = [
      {"id": "unanswered", "conversations": [ask]},
      {"id": "empty_answer", "conversations": [ask, {"from": "assistant", "value": " \n"}]},
      {"id": "empty_question", "conversations": [{"from": "user", "value": ""}, {"from": "assistant", "value": "A"}]},
      {"id": "answer_only", "conversations": [{"from": "assistant", "value": "A"}]},
      {"id": "cwd_relative", "conversations": [{"from": "user", "value": "Picture 1: <img>img/a.png</img>\nWhat?"},
                                               {"from": "assistant", "value": "A"}]},
  ]
  path = tmp_path / "data" / "train.json"
  path.write_text(json.dumps(entries))
  monkeypatch.chdir(tmp_path)
  records = _all(make_source(f"qwen_finetune_json:{path}", stage=3, image_size=8))
  assert all(isinstance(r, rec.BadRecordError) for r in records), records
  assert [str(r) for r in records] == [
      "bad record 'unanswered': no assistant turn: nothing to learn (turns alternate user, assistant, ...)",
      "bad record 'empty_answer': empty assistant turn (turn 1)",
      "bad record 'empty_question': empty user turn (turn 0)",
      "bad record 'answer_only': no user turn: its one turn is not from the user and is dropped (as finetune.py "
      "drops a leading non-user turn)",
      f"bad record 'cwd_relative': relative image path not under the image root: 'img/a.png' is not in "
      f"{tmp_path / 'data'} (the data file's folder, or config.data.image_root) but in the current folder; set "
      f"--config.data.image_root={tmp_path}"]
  fixed = make_source(f"qwen_finetune_json:{path}", stage=3, image_size=8, image_root=str(tmp_path))
  assert fixed.parse(fixed.items[4]).images == [str(tmp_path / "img" / "a.png")]


def test_qwen_finetune_json_must_be_a_list(tmp_path):
  path = tmp_path / "t.json"
  path.write_text('{"id": 1}')
  with pytest.raises(ValueError, match="one JSON list"):
    make_source(f"qwen_finetune_json:{path}", stage=3, image_size=8)
  path.write_text("[{")
  with pytest.raises(ValueError, match="not valid JSON"):
    make_source(f"qwen_finetune_json:{path}", stage=3, image_size=8)


def test_a_file_of_the_other_json_kind_or_a_folder_is_named_with_the_kind_to_use(tmp_path):
  """A JSON list read as jsonl: was 1000 bad records in a row ('malformed JSON' per line of an indented file, or
  'expected a JSON object, got list'), then an error naming neither kind; a JSONL file read as
  qwen_finetune_json: said 'Extra data' only; a folder was 'PATH: Is a directory', naming no source."""
  entry = {"id": "a", "conversations": [{"from": "user", "value": "hi"}, {"from": "assistant", "value": "yo"}]}
  listed, compact, lines = tmp_path / "train.json", tmp_path / "compact.json", tmp_path / "train.jsonl"
  listed.write_text(json.dumps([entry, entry], indent=1))
  compact.write_text("\ufeff" + json.dumps([entry]))
  lines.write_text(json.dumps(entry) + "\n" + json.dumps(entry) + "\n")
  for path in (listed, compact):
    with pytest.raises(ValueError, match=f"holds one JSON list.*did you mean qwen_finetune_json:{path}"):
      make_source(f"jsonl:{path}", stage=3, image_size=8)
  with pytest.raises(ValueError, match=f"not valid JSON.*one JSON object per line is read by jsonl:{lines}"):
    make_source(f"qwen_finetune_json:{lines}", stage=3, image_size=8)
  for kind in ("jsonl", "qwen_finetune_json"):
    with pytest.raises(ValueError, match=f"{tmp_path} is a folder; {kind}: reads one file"):
      make_source(f"{kind}:{tmp_path}", stage=3, image_size=8)
  # Each file read as its own kind still works.
  assert len(make_source(f"jsonl:{lines}", stage=3, image_size=8).items) == 2
  assert len(make_source(f"qwen_finetune_json:{listed}", stage=3, image_size=8).items) == 2
  assert len(make_source(f"qwen_finetune_json:{compact}", stage=3, image_size=8).items) == 1  # with its BOM


def test_conversation_record_with_given_images():
  r = conversation_record("x", [{"from": "human", "value": "<img></img>hi"}, {"from": "gpt", "value": "yo"}],
                          images=[b"bytes"])
  assert r.turns == [("user", "<img></img>hi"), ("assistant", "yo")] and r.images == [b"bytes"]
  with pytest.raises(rec.BadRecordError, match="list of"):
    conversation_record("x", "not a list")


def test_spec_errors(tmp_path):
  with pytest.raises(ValueError, match="unknown source spec"):
    make_source("csv:/x", stage=1, image_size=8)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    make_source(f"jsonl:{tmp_path}/none.jsonl", stage=1, image_size=8)
  with pytest.raises(ValueError, match="needs an argument"):
    make_source("jsonl:", stage=1, image_size=8)
  # A bare path (the kind left out) said "needs an argument after ':'"
  for path, kind in ((f"{tmp_path}/pairs.jsonl", "jsonl"), (f"{tmp_path}/train.json", "qwen_finetune_json"),
                     (f"{tmp_path}/records", "array_record")):
    with pytest.raises(ValueError, match=f"is a path without its kind; did you mean {kind}:{path}"):
      make_source(path, stage=1, image_size=8)
  with pytest.raises(ValueError, match="task"):
    make_source("synthetic", stage=2, image_size=8)


def test_synthetic_source_defaults_per_stage():
  assert make_source("synthetic", stage=1, image_size=8).name == "synthetic/caption"
  assert make_source("synthetic", stage=3, image_size=8).name == "synthetic/chat"
  source = make_source("synthetic", stage=2, image_size=8, task="ocr")
  assert source.parse(source.items[5]).id == "synthetic/ocr/5"


def _png(value):
  buf = io.BytesIO()
  Image.fromarray(np.full((6, 9, 3), value, np.uint8)).save(buf, format="PNG")
  return buf.getvalue()


class FakeCocoCaptions(tfds.core.GeneratorBasedBuilder):
  """The feature layout of TFDS `coco_captions` (image, image/id, captions {id, text}), three tiny examples."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(encoding_format="jpeg"), "image/id": np.int64,
        "captions": tfds.features.Sequence({"id": np.int64, "text": tfds.features.Text()})}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for i in range(3):
      yield i, {"image": _png(10 * i), "image/id": i,
                "captions": [{"id": 2 * i, "text": f"first {i}"}, {"id": 2 * i + 1, "text": f"second {i}"}]}


def test_tfds_coco_captions_by_name(tmp_path):
  FakeCocoCaptions(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  source = make_source("tfds:fake_coco_captions", stage=2, image_size=8, data_dir=str(tmp_path))
  records = sorted((source.parse(source.items[i]) for i in range(3)), key=lambda r: r.id)
  for i, r in enumerate(records):
    assert r.id == f"fake_coco_captions/{i}" and r.task == "caption"
    assert r.turns[0] == ("user", "<img></img>Generate the caption in English:")
    assert r.turns[1][1] in (f" first {i}", f" second {i}")
    assert r.images == [_png(10 * i)]
  with pytest.raises(ValueError, match="cannot read split 'test'"):
    make_source("tfds:fake_coco_captions", stage=2, image_size=8, data_dir=str(tmp_path), split="test")


def test_tfds_ref_coco_grounding_records(tmp_path):
  """`ref_coco` nests sentences in objects: every record becomes one (object, sentence) grounding example whose
  normalized TFDS box (ymin, xmin, ymax, xmax) is written in the reference's [0, 1000) xyxy text."""
  from tests.evaluation import tfds_fakes  # pylint: disable=import-outside-toplevel
  box = tfds.features.BBox
  records = [
      {"image": tfds_fakes.png(1), "image/id": 7, "objects": [
          {"id": 70, "bbox": box(ymin=0.25, xmin=0.1, ymax=0.75, xmax=0.5),
           "refexp": [{"refexp_id": 1, "raw": "left dog"}]},
          {"id": 71, "bbox": box(ymin=0.0, xmin=0.5, ymax=1.0, xmax=1.0), "refexp": []}]},
      {"image": tfds_fakes.png(2), "image/id": 8, "objects": [
          {"id": 80, "bbox": box(ymin=0.1, xmin=0.2, ymax=0.3, xmax=0.4), "refexp": []}]},
  ]
  tfds_fakes.prepare(tfds_fakes.EvalRefCoco, tmp_path, {"train": records})
  source = make_source("tfds:eval_ref_coco", stage=2, image_size=8, data_dir=str(tmp_path))
  first = source.parse(source.items[0])
  assert first.task == "grounding" and first.images == [tfds_fakes.png(1)]
  assert first.turns == [("user", "<img></img><ref>left dog</ref>"),
                         ("assistant", "<box>(100,250),(500,750)</box>")]
  with pytest.raises(rec.BadRecordError, match="no referring expressions"):
    source.parse(source.items[1])


def test_synthetic_source_max_shapes():
  source = make_source("synthetic", stage=2, image_size=32, task="grounded_caption", synthetic_max_shapes=1)
  assert all(source.parse(source.items[i]).turns[1][1].count("<box>") == 1 for i in range(10))
  with pytest.raises(ValueError, match="synthetic_max_shapes must be in"):
    make_source("synthetic", stage=2, image_size=32, task="vqa", synthetic_max_shapes=0)
