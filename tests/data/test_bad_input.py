"""Bad input that reached the pipeline in the fault-injection run (issue 17): lone surrogates, errors crossing the
grain worker boundary, an image path that is a folder, 16-bit grayscale PNGs."""
import json
import logging
import pickle

import numpy as np
import pytest
from PIL import Image

from qwenvl_jax import errors
from qwenvl_jax.data import images as images_lib
from qwenvl_jax.data import records as rec
from qwenvl_jax.data.config import default_data_config
from qwenvl_jax.data.pipeline import make_train_iterator
from qwenvl_jax.text import QwenTokenizer, SentencePieceTokenizer, train_sentencepiece
from tests.data import helpers

Q, S, T = 4, 16, 256


@pytest.fixture(scope="module")
def sp_tokenizer(tmp_path_factory):
  corpus = [f"image number {i} of a red square" for i in range(200)]
  return SentencePieceTokenizer(train_sentencepiece(corpus, tmp_path_factory.mktemp("sp") / "sp", vocab_size=320))


def _config(path, **overrides):
  c = default_data_config(2)
  c.update(dict(num_workers=0, read_threads=1, shuffle=False, source=f"jsonl:{path}", mixture={}, num_epochs=1,
                packing=False))
  c.update(overrides)
  return c


def _rows(tok, config):
  it = make_train_iterator(config, tok, process_index=0, process_count=1, global_batch=1, seq_len=T, max_images=2,
                           image_size=S, stage=2, image_tokens=Q)
  try:
    return list(it)
  finally:
    it.close()


def _surrogate_jsonl(tmp_path):
  """Four good pairs and, on line 3, a caption whose JSON holds an unpaired \\ud800 escape."""
  path = helpers.write_image_text_jsonl(tmp_path, 4)
  lines = path.read_text().splitlines()
  bad = '{"id": "lonely", "image": "imgs/0.png", "text": "a caption \\ud800 cut in half"}'
  path.write_text("\n".join(lines[:2] + [bad] + lines[2:]) + "\n")
  return path


def _tokenizers(request):
  yield request.getfixturevalue("sp_tokenizer")
  try:
    yield QwenTokenizer(request.getfixturevalue("qwen_tiktoken_path"))
  except pytest.skip.Exception:
    pass


def test_a_lone_surrogate_is_a_named_counted_skip(request, tmp_path, caplog):
  path = _surrogate_jsonl(tmp_path)
  for tok in _tokenizers(request):
    rec.SKIPPED.reset()
    with caplog.at_level(logging.WARNING, logger="qwenvl_jax.data"):
      rows = _rows(tok, _config(path))
    assert len(rows) == 4, tok
    assert rec.SKIPPED.total == 1
    assert any("lonely" in m and "pairs.jsonl:3" in m and "surrogate" in m for m in caplog.messages), caplog.messages


def test_strict_mode_names_the_file_and_line_of_a_lone_surrogate(sp_tokenizer, tmp_path):
  path = _surrogate_jsonl(tmp_path)
  with pytest.raises(rec.BadRecordError, match=r"lonely.*pairs\.jsonl:3.*lone surrogate U\+D800"):
    _rows(sp_tokenizer, _config(path, strict=True))


def test_sentencepiece_treats_lone_surrogates_like_tiktoken(request, sp_tokenizer):
  """tiktoken (the reference) writes U+FFFD for a lone surrogate and joins a split pair; SentencePiece's binding
  raised a bare RuntimeError."""
  for text in ("a\ud800b", "x\ud83d\ude00y", "\udcff"):
    expected = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    assert sp_tokenizer.encode(text) == sp_tokenizer.encode(expected)
    assert sp_tokenizer.decode(sp_tokenizer.encode(text)) == expected
  try:
    qwen = QwenTokenizer(request.getfixturevalue("qwen_tiktoken_path"))
  except pytest.skip.Exception:
    return
  assert qwen.decode(qwen.encode("a\ud800b")) == "a\ufffdb"


def test_bad_record_error_survives_pickling():
  e = rec.BadRecordError("rec7 (data.jsonl:9)", "image 0: image file not found: x.png")
  back = pickle.loads(pickle.dumps(e))
  assert type(back) is rec.BadRecordError
  assert (back.record_id, back.reason, str(back)) == (e.record_id, e.reason, str(e))
  assert isinstance(back, errors.UserError) and isinstance(back, ValueError)


@pytest.mark.parametrize("cls", [errors.UserError, errors.ConfigError, errors.UserFileNotFoundError,
                                 errors.UserFileExistsError, errors.InputFormatError,
                                 images_lib.ImageError])
def test_every_error_a_worker_can_raise_survives_pickling(cls):
  e = cls("the message", "the hint") if issubclass(cls, errors.UserError) else cls("the message")
  back = pickle.loads(pickle.dumps(e))
  assert type(back) is cls and str(back) == str(e)


@pytest.mark.slow
def test_strict_mode_with_worker_processes_shows_the_real_cause(byte_tokenizer, tmp_path):
  """The error of a bad record read in a grain worker process reaches the trainer with its record and reason."""
  path = helpers.write_image_text_jsonl(tmp_path, 6)
  with open(path, "a") as f:
    f.write(json.dumps({"id": "ghost", "image": "imgs/nope.png", "text": "gone"}) + "\n")
  with pytest.raises(rec.BadRecordError, match=r"ghost.*pairs\.jsonl:7.*image file not found") as info:
    _rows(byte_tokenizer, _config(path, strict=True, num_workers=2))
  assert info.value.reason.startswith("image 0")


def test_an_image_path_that_is_a_folder_is_named_as_such(tmp_path):
  with pytest.raises(images_lib.ImageError, match=f"{tmp_path} is a folder, not an image file"):
    images_lib.preprocess_image(str(tmp_path), S)


def test_sixteen_bit_grayscale_keeps_the_reference_numbers_and_warns_once(tmp_path, caplog):
  """PIL (hence the reference) clips 16-bit values to 255 on convert('RGB'); the numbers stay, the user is told."""
  values = np.array([[0, 100, 255, 256], [1000, 20000, 40000, 65535]], np.uint16)
  path = tmp_path / "deep.png"
  Image.fromarray(values).save(path)  # uint16 -> mode I;16
  assert Image.open(path).mode in ("I;16", "I")
  before = images_lib.sixteen_bit_image_count()
  with caplog.at_level(logging.WARNING, logger="qwenvl_jax.data"):
    first = images_lib.preprocess_image(str(path), 4)
    second = images_lib.preprocess_image(path.read_bytes(), 4)
  reference = np.asarray(Image.open(path).convert("RGB").resize((4, 4), Image.BICUBIC))
  np.testing.assert_array_equal(first, reference)
  np.testing.assert_array_equal(second, reference)
  assert images_lib.sixteen_bit_image_count() == before + 2
  warnings = [m for m in caplog.messages if "16-bit grayscale" in m]
  assert len(warnings) == (1 if before == 0 else 0)


def test_a_source_of_the_wrong_schema_is_one_line_naming_it_and_the_first_records_reason(sp_tokenizer, tmp_path):
  """Records without `text` (a `caption` key instead): every one is bad; the error names the source spec and why
  its first record is bad, instead of a RuntimeError listing counts by reason."""
  path = tmp_path / "pairs.jsonl"
  path.write_text("".join(json.dumps({"image": "a.png", "caption": f"caption {i}"}) + "\n" for i in range(5)))
  rec.SKIPPED.reset()
  with pytest.raises(rec.TooManyBadRecordsError) as info:
    _rows(sp_tokenizer, _config(path, num_epochs=0, max_consecutive_skips=8))
  message = str(info.value)
  assert message.startswith(f"data source jsonl:{path}: 9 bad records in a row, the first bad record "
                            f"'{path}:1': neither 'conversations' nor 'image' + 'text'"), message
  assert "\n" not in message and isinstance(info.value, errors.UserError)
