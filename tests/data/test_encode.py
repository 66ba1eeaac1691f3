"""Tests of record encoding: the texts, labels and images of one example per stage (byte tokenizer)."""
import numpy as np
import pytest

from qwenvl_jax.data import records as rec
from qwenvl_jax.data.encode import ExampleEncoder
from tests.data import helpers

Q, S = 3, 8


def _encoder(tok, stage, seq_len=400, max_images=2):
  return ExampleEncoder(tok, stage, Q, S, seq_len, max_images)


def _image(value):
  return np.full((5, 7, 3), value, np.uint8)


def _decode_supervised(tok, ex):
  return tok.decode(ex["targets"][ex["loss_mask"] > 0])


def test_stage2_vqa(byte_tokenizer):
  tok = byte_tokenizer
  record = rec.Record("v", "vqa", [("user", "<img></img>What colour? Answer:"), ("assistant", " red")], [_image(9)])
  ex = _encoder(tok, 2)(record)
  assert tok.decode(ex["input_ids"]) == "<img><imgpad><imgpad><imgpad></img>What colour? Answer: red<|endoftext|>"
  assert _decode_supervised(tok, ex) == " red<|endoftext|>"
  assert ex["images"].shape == (1, S, S, 3) and np.all(ex["images"] == 9)
  assert ex["input_ids"].dtype == np.int32 and ex["loss_mask"].dtype == np.float32
  assert ex["loss_mask"][-1] == 0 and ex["targets"][-1] == tok.eod_id


def test_stage3_official_labels(byte_tokenizer):
  tok = byte_tokenizer
  turns = [("user", "Picture 1: <img></img>\nHi"), ("assistant", "Hello"), ("user", "Bye"), ("assistant", "Ciao")]
  ex = _encoder(tok, 3)(rec.Record("c", "chat", turns, [_image(1)]))
  assert tok.decode(ex["input_ids"]) == (
      "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
      "<|im_start|>user\nPicture 1: <img><imgpad><imgpad><imgpad></img>\nHi<|im_end|>\n"
      "<|im_start|>assistant\nHello<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"
      "<|im_start|>assistant\nCiao<|im_end|>\n")
  # finetune.py: every <|im_start|> (but the first token), every <|im_end|> + "\n", assistant content.
  assert _decode_supervised(tok, ex) == ("<|im_end|>\n<|im_start|><|im_end|>\n<|im_start|>Hello<|im_end|>\n"
                                         "<|im_start|><|im_end|>\n<|im_start|>Ciao<|im_end|>\n")


def test_image_order_is_kept(byte_tokenizer):
  turns = [("user", "<img></img><img></img>which?"), ("assistant", "2")]
  ex = _encoder(byte_tokenizer, 2)(rec.Record("m", "vqa", turns, [_image(10), _image(20)]))
  assert np.all(ex["images"][0] == 10) and np.all(ex["images"][1] == 20)
  assert np.sum(ex["input_ids"] == byte_tokenizer.img_pad_id) == 2 * Q


@pytest.mark.parametrize("record,message", [
    (rec.Record("long", "caption", [("user", "<img></img>"), ("assistant", "x" * 500)], [_image(0)]), "over-long"),
    (rec.Record("many", "vqa", [("user", "<img></img>" * 3), ("assistant", "x")], [_image(0)] * 3), "max_images"),
    (rec.Record("img", "caption", [("user", "<img></img>"), ("assistant", "x")], [b"junk"]), "image 0"),
    (rec.Record("pad", "vqa", [("user", "a <imgpad> b"), ("assistant", "x")], []), "imgpad"),
    (rec.Record("turns", "chat", [("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d")], []),
     "one prompt and one answer"),
])
def test_bad_records(byte_tokenizer, record, message):
  with pytest.raises(rec.BadRecordError, match=message) as e:
    _encoder(byte_tokenizer, 2)(record)
  assert repr(record.id) in str(e.value)


def test_expected_text_helpers_agree_with_hand_written_strings():
  # The pipeline tests compare against these helpers: pin them to literal strings once.
  turns = [("user", "<img></img>Q:"), ("assistant", " A")]
  assert helpers.expected_raw_text(turns, 1) == "<img><imgpad></img>Q: A<|endoftext|>"
  assert helpers.expected_chatml_supervised(turns) == "<|im_end|>\n<|im_start|><|im_end|>\n<|im_start|> A<|im_end|>\n"


def test_truncate_cuts_like_finetune_and_drops_cut_images(byte_tokenizer):
  tok = byte_tokenizer
  turns = [("user", "Picture 1: <img></img>\nPicture 2: <img></img>\nSame?"), ("assistant", "No, they differ.")]
  record = rec.Record("t", "chat", turns, [_image(1), _image(2)])
  full = _encoder(tok, 3)(record)
  n = len(full["input_ids"])
  cut = ExampleEncoder(tok, 3, Q, S, n - 5, 2, truncate=True)(record)
  np.testing.assert_array_equal(cut["input_ids"], full["input_ids"][:n - 5])
  # A cut inside the second image span removes that span and its image.
  inside = int(np.flatnonzero(full["input_ids"] == tok.img_pad_id)[-2])
  cut = ExampleEncoder(tok, 3, Q, S, inside, 2, truncate=True)(record)
  assert cut["images"].shape[0] == 1 and np.all(cut["images"][0] == 1)
  assert np.sum(cut["input_ids"] == tok.img_pad_id) == Q
  assert tok.decode(cut["input_ids"]).endswith("</img>\nPicture 2: ")
  with pytest.raises(rec.BadRecordError, match="over-long"):
    ExampleEncoder(tok, 3, Q, S, n - 5, 2)(record)
