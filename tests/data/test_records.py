"""Tests of record validation, box text and bad-record accounting."""
import logging
import pickle

import pytest

from qwenvl_jax import errors
from qwenvl_jax.data import records as rec


def _record(turns, images=1, task="grounding"):
  return rec.Record("r1", task, turns, [b"img"] * images)


def test_valid_record_passes():
  r = _record([("user", "<img></img><ref>a cat</ref>"), ("assistant", "<box>(0,0),(999,999)</box>")])
  assert rec.validate(r) is r


@pytest.mark.parametrize("turns,images,message", [
    ([("user", "<img></img>"), ("assistant", "<box>(0,0),(1000,5)</box>")], 1, "outside"),
    ([("user", "<img></img>"), ("assistant", "<box>(-1,0),(5,5)</box>")], 1, "outside"),
    ([("user", "<img></img>"), ("assistant", "<box>(9,9),(5,5)</box>")], 1, "x1<=x2"),
    ([("user", "<img></img>"), ("assistant", "<box>(1,2)</box>")], 1, "malformed"),
    ([("user", "<img></img>"), ("assistant", "<box>(1,2),(3,4)")], 1, "unbalanced"),
    ([("user", "<img></img>"), ("assistant", "<quad>(1,2),(3,4)</quad>")], 1, "malformed"),
    ([("user", "<img></img><img></img>"), ("assistant", "x")], 1, "2 <img></img> spans but 1 images"),
    ([("user", "<img>"), ("assistant", "x")], 1, "unbalanced <img>"),
    ([("assistant", "x")], 0, "expected 'user'"),
    ([("user", "a"), ("user", "b")], 0, "alternate"),
    ([], 0, "no turns"),
])
def test_invalid_records_name_the_record_and_reason(turns, images, message):
  with pytest.raises(rec.BadRecordError, match=message) as e:
    rec.validate(_record(turns, images))
  assert "'r1'" in str(e.value)


def test_unknown_task():
  with pytest.raises(rec.BadRecordError, match="unknown task"):
    rec.validate(rec.Record("r", "dance", [("user", "x"), ("assistant", "y")]))


def test_quad_in_range_is_fine():
  rec.validate(_record([("user", "<img></img>OCR"), ("assistant", "<quad>(1,2),(3,4),(5,6),(7,8)</quad>")]))


def test_box_text_normalizes_to_thousandths_and_clamps():
  # 200 x 100 image: x / 200 * 1000, y / 100 * 1000, integers, last value 999 (coordinates live in [0, 1000)).
  assert rec.box_text((20, 10, 100, 50), 200, 100) == "<box>(100,100),(500,500)</box>"
  assert rec.box_text((0, 0, 200, 100), 200, 100) == "<box>(0,0),(999,999)</box>"


def test_caption_turns_per_stage():
  assert rec.caption_turns("a cat", 1) == [("user", "<img></img>"), ("assistant", "a cat")]
  assert rec.caption_turns("a cat", 2) == [("user", "<img></img>Generate the caption in English:"),
                                           ("assistant", " a cat")]


def test_strip_image_paths():
  text, paths = rec.strip_image_paths("Picture 1: <img>a/b.jpg</img>\nPicture 2: <img> c.png </img>\nhi")
  assert text == "Picture 1: <img></img>\nPicture 2: <img></img>\nhi"
  assert paths == ["a/b.jpg", "c.png"]


def test_skip_counter_counts_logs_and_stops_runs_of_bad_records(caplog):
  counter = rec.SkipCounter()
  with caplog.at_level(logging.WARNING, logger="qwenvl_jax.data"):
    counter.skip(rec.BadRecordError("a", "over-long: 9 tokens"))
    counter.skip(rec.BadRecordError("b", "over-long: 12 tokens"))
    counter.ok()
    counter.skip(rec.BadRecordError("c", "image 0: cannot decode"), max_consecutive=1)
  assert counter.total == 3 and counter.counts == {"over-long": 2, "image: cannot decode": 1}
  assert "'a'" in caplog.messages[0] and "'c'" in caplog.messages[2]
  with pytest.raises(RuntimeError, match="2 bad records in a row"):
    counter.skip(rec.BadRecordError("d", "x"), max_consecutive=1)


def test_a_run_of_bad_records_is_one_line_naming_the_source_and_the_first_bad_record():
  counter = rec.SkipCounter()
  counter.skip(rec.BadRecordError("a", "over-long"), max_consecutive=2, source="data source jsonl:/d.jsonl")
  counter.ok()
  counter.skip(rec.BadRecordError("b", "no 'text' key"), max_consecutive=2, source="data source jsonl:/d.jsonl")
  counter.skip(rec.BadRecordError("c", "image 0: cannot decode"), max_consecutive=2,
               source="data source jsonl:/d.jsonl")
  with pytest.raises(rec.TooManyBadRecordsError) as info:
    counter.skip(rec.BadRecordError("d", "x"), max_consecutive=2, source="data source jsonl:/d.jsonl")
  e = info.value
  assert str(e) == "data source jsonl:/d.jsonl: 3 bad records in a row, the first bad record 'b': no 'text' key"
  assert isinstance(e, errors.UserError) and "\n" not in str(e)
  back = pickle.loads(pickle.dumps(e))  # raised in a grain worker, re-raised in the trainer
  assert type(back) is rec.TooManyBadRecordsError and str(back) == str(e) and back.hint == e.hint


def test_skip_counter_names_a_bad_record_once_however_often_it_comes_round(caplog):
  counter = rec.SkipCounter()
  with caplog.at_level(logging.WARNING, logger="qwenvl_jax.data"):
    for _ in range(50):  # 50 epochs of a small source with two bad records
      counter.skip(rec.BadRecordError("f.jsonl:7", "malformed JSON"))
      counter.skip(rec.BadRecordError("f.jsonl:8", "image 0: cannot decode"))
      counter.ok()
  named = [m for m in caplog.messages if m.startswith("skipping")]
  assert len(named) == 2 and "'f.jsonl:7'" in named[0] and "'f.jsonl:8'" in named[1]
  assert counter.total == 100 and len(caplog.messages) == 2 + 5  # totals at 4, 8, 16, 32, 64 skips
  assert "64 records skipped so far in this process, 2 distinct" in caplog.messages[-1]


def test_skip_counter_names_only_the_first_bad_records(caplog):
  counter = rec.SkipCounter()
  with caplog.at_level(logging.WARNING, logger="qwenvl_jax.data"):
    for i in range(100):  # a source of the wrong format: every record bad, each a new one
      counter.skip(rec.BadRecordError(f"f.jsonl:{i + 1}", "no 'text' key"))
  named = [m for m in caplog.messages if m.startswith("skipping")]
  assert len(named) == rec._MAX_NAMED_SKIPS == 20
  assert "'f.jsonl:20'" in named[-1] and named[-1].endswith("further bad records are counted, not named)")
  assert caplog.messages[len(named):] == [
      "32 records skipped so far in this process, 32 distinct ({\"no 'text' key\": 32})",
      "64 records skipped so far in this process, 64 distinct ({\"no 'text' key\": 64})"]
  assert counter.total == 100


def test_skips_are_counted_by_what_failed():
  """A missing file and an undecodable one were both counted as "image 0" (and as "image 1" in a second slot)."""
  counter = rec.SkipCounter()
  for i, reason in enumerate(["image 0: image file not found: /d/a.png", "image 1: image file not found: /d/b.png",
                              "image 0: cannot decode image <bytes>: cannot identify image file <_io.BytesIO>",
                              "over-long: 900 tokens > seq_len=512",
                              "<box>(1,2),(3,4000)</box> has a coordinate outside [0, 1000)"]):
    counter.skip(rec.BadRecordError(f"r{i}", reason))
  assert counter.counts == {"image: image file not found": 2, "image: cannot decode image": 1, "over-long": 1,
                            "<box>": 1}
