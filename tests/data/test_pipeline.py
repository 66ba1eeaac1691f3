"""Tests of the grain pipeline: batch contract, decoding per stage, packing isolation, resume, bad records, shards."""
import collections
import json
import logging

import numpy as np
import pytest

from qwenvl_jax.data import records as rec
from qwenvl_jax.data.config import default_data_config
from qwenvl_jax.data.pipeline import make_dataset, make_train_iterator
from qwenvl_jax.data.synthetic import synthetic_record
from tests.data import helpers

Q = 4  # image tokens per image
S = 16  # image side
T = 256  # sequence length (stage 3: 3 * T; the byte tokenizer spends one token per character)
M = 3  # image slots per row


def _config(stage, **overrides):
  c = default_data_config(stage)
  c.num_workers = 0
  c.read_threads = 1
  c.shuffle = False
  for k, v in overrides.items():
    setattr(c, k, v)
  return c


def _iterator(tok, stage, *, config=None, batch=2, process_index=0, process_count=1, seq_len=None, max_images=M):
  seq_len = seq_len or (3 * T if stage == 3 else T)
  return make_train_iterator(config or _config(stage), tok, process_index=process_index,
                             process_count=process_count, global_batch=batch, seq_len=seq_len,
                             max_images=max_images, image_size=S, stage=stage, image_tokens=Q)


def _segments(batch):
  """(row, segment id, token slice) of every packed example in the batch."""
  out = []
  for b in range(batch["segment_ids"].shape[0]):
    seg = batch["segment_ids"][b]
    for k in range(1, seg.max() + 1):
      idx = np.flatnonzero(seg == k)
      assert np.array_equal(idx, np.arange(idx[0], idx[-1] + 1)), "segment is not contiguous"
      out.append((b, k, slice(idx[0], idx[-1] + 1)))
  return out


def _expected_synthetic(stage, tasks, n):
  """text -> supervised text of the first n synthetic records of each task (shuffle off, one process), and how
  many of those records have each text (different scenes can share a caption)."""
  out, counts = {}, collections.Counter()
  for task in tasks:
    for i in range(n):
      turns = synthetic_record(i, task=task, image_size=S, stage=stage).turns
      if stage == 3:
        text, supervised = helpers.expected_chatml_text(turns, Q), helpers.expected_chatml_supervised(turns)
      else:
        text, supervised = helpers.expected_raw_text(turns, Q), helpers.expected_raw_supervised(turns)
      out[text] = supervised
      counts[text] += 1
  return out, counts


def test_batch_contract(byte_tokenizer):
  batch = next(_iterator(byte_tokenizer, 2, batch=3))
  expected = {"input_ids": (np.int32, (3, T)), "targets": (np.int32, (3, T)), "loss_mask": (np.float32, (3, T)),
              "segment_ids": (np.int32, (3, T)), "positions": (np.int32, (3, T)),
              "images": (np.uint8, (3, M, S, S, 3)), "image_mask": (np.bool_, (3, M))}
  assert {k: (v.dtype.type, v.shape) for k, v in batch.items()} == expected


@pytest.mark.parametrize("stage,tasks", [(1, ["caption"]), (2, list(default_data_config(2).mixture)),
                                         (3, ["chat"])])
def test_batches_decode_to_the_records_and_masks_line_up(byte_tokenizer, stage, tasks):
  tok = byte_tokenizer
  expected, counts = _expected_synthetic(stage, tasks, 64)
  it = _iterator(tok, stage, batch=2)
  seen = []
  for _ in range(3):
    batch = next(it)
    for b, k, sl in _segments(batch):
      ids, targets, mask = batch["input_ids"][b, sl], batch["targets"][b, sl], batch["loss_mask"][b, sl]
      text = tok.decode(ids)
      assert text in expected, text
      assert tok.decode(targets[mask > 0]) == expected[text]
      # Targets are the next token inside the segment; the last token predicts nothing.
      assert np.array_equal(targets[:-1], ids[1:]) and mask[-1] == 0
      np.testing.assert_array_equal(batch["positions"][b, sl], np.arange(sl.stop - sl.start))
      # No image placeholder and no image marker is ever a supervised target.
      assert not np.isin(targets[mask > 0], [tok.img_pad_id, tok.img_start_id, tok.img_end_id]).any()
      seen.append(text)
    pad = batch["segment_ids"] == 0
    assert not batch["loss_mask"][pad].any() and not batch["positions"][pad].any()
  # No example is emitted twice (beyond records that happen to share a text).
  assert seen and all(n <= counts[text] for text, n in collections.Counter(seen).items())
  if stage == 2:
    # The mixture draws from many tasks within a few rows.
    by_task = {t: _expected_synthetic(2, [t], 64)[0] for t in tasks}
    assert len({t for text in seen for t in tasks if text in by_task[t]}) > 3


def test_packing_never_lets_examples_attend_to_each_other(byte_tokenizer):
  tok = byte_tokenizer
  batch = next(_iterator(tok, 2, batch=2))
  assert batch["segment_ids"].max() >= 2, "the test needs packed rows"
  for b in range(2):
    seg = batch["segment_ids"][b]
    # The model's mask: same (non-padding) segment and causal.
    mask = (seg[:, None] == seg[None, :]) & (seg[:, None] > 0) & np.tril(np.ones((T, T), bool))
    for _, k, sl in [s for s in _segments(batch) if s[0] == b]:
      last = sl.stop - 1
      # What the last token of an example can see is exactly that example, nothing of its neighbours.
      assert tok.decode(batch["input_ids"][b][mask[last]]) == tok.decode(batch["input_ids"][b, sl])
      assert not mask[sl][:, seg != k].any()


def test_images_follow_their_examples_in_order(byte_tokenizer, tmp_path):
  tok = byte_tokenizer
  path = helpers.write_image_text_jsonl(tmp_path, 12)
  it = _iterator(tok, 1, config=_config(1, source=f"jsonl:{path}"), batch=2)
  checked = 0
  for _ in range(3):
    batch = next(it)
    for b in range(2):
      n_images = batch["image_mask"][b].sum()
      assert np.array_equal(batch["image_mask"][b], np.arange(M) < n_images)
      assert (batch["input_ids"][b] == tok.img_pad_id).sum() == Q * n_images
      for slot, (_, _, sl) in enumerate([s for s in _segments(batch) if s[0] == b]):
        number = int(tok.decode(batch["input_ids"][b, sl], skip_special_tokens=True).split()[-1])
        # Image i is solid red 10 * i: the slot of the k-th example of the row holds the k-th example's image.
        assert np.all(batch["images"][b, slot, ..., 0] == 10 * number)
        checked += 1
      assert not batch["images"][b, n_images:].any()
  assert checked >= 6


def test_padded_mode_has_one_example_per_row(byte_tokenizer):
  batch = next(_iterator(byte_tokenizer, 3, config=_config(3, packing=False), batch=3))
  assert np.all(batch["segment_ids"].max(axis=1) == 1)
  lengths = (batch["segment_ids"] == 1).sum(axis=1)
  for b in range(3):
    assert np.all(batch["segment_ids"][b, :lengths[b]] == 1) and np.all(batch["segment_ids"][b, lengths[b]:] == 0)
    assert np.all(batch["input_ids"][b, lengths[b]:] == byte_tokenizer.eod_id)


def test_multi_image_examples(byte_tokenizer):
  it = _iterator(byte_tokenizer, 3, batch=4)
  counts = [next(it)["image_mask"].sum(axis=1) for _ in range(4)]
  assert max(int(c.max()) for c in counts) == 2


@pytest.mark.parametrize("stage,packing", [(1, True), (2, True), (3, False)])
def test_resume_from_state_reproduces_the_next_batches(byte_tokenizer, stage, packing):
  config = _config(stage, shuffle=True, packing=packing)
  it = _iterator(byte_tokenizer, stage, config=config)
  for _ in range(3):
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # the state survives a JSON round trip (checkpoint files)
  expected = [next(it) for _ in range(3)]
  resumed = _iterator(byte_tokenizer, stage, config=config)
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)


@pytest.mark.slow
def test_resume_with_worker_processes(byte_tokenizer):
  config = _config(2, shuffle=True, num_workers=2)
  it = _iterator(byte_tokenizer, 2, config=config)
  for _ in range(2):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(2)]
  it.close()
  resumed = _iterator(byte_tokenizer, 2, config=config)
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  resumed.close()


def _bad_jsonl(tmp_path):
  path = helpers.write_image_text_jsonl(tmp_path, 6)
  (tmp_path / "imgs" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
  bad = [
      '{"id": "missing", "image": "imgs/nope.png", "text": "gone"}',
      '{"id": "corrupt", "image": "imgs/corrupt.png", "text": "broken"}',
      '{"id": "malformed", "image": "imgs/0.png", "text": ',
      json.dumps({"id": "box", "conversations": [
          {"from": "user", "value": "<img>imgs/1.png</img><ref>it</ref>"},
          {"from": "assistant", "value": "<box>(10,20),(1000,30)</box>"}]}),
      json.dumps({"id": "long", "image": "imgs/2.png", "text": "x" * (2 * T)}),
  ]
  lines = path.read_text().splitlines()
  # Interleave the bad records with the good ones so skipping cannot hide a misalignment.
  mixed = [line for pair in zip(lines, bad) for line in pair] + lines[len(bad):]
  path.write_text("\n".join(mixed) + "\n")
  return path


def test_bad_records_are_skipped_counted_and_named(byte_tokenizer, tmp_path, caplog):
  tok = byte_tokenizer
  path = _bad_jsonl(tmp_path)
  config = _config(2, source=f"jsonl:{path}", mixture={}, num_epochs=1, packing=False)
  rec.SKIPPED.reset()
  with caplog.at_level(logging.WARNING, logger="qwenvl_jax.data"):
    rows = list(_iterator(tok, 2, config=config, batch=1, seq_len=T))
  numbers = sorted(int(tok.decode(r["input_ids"][0], skip_special_tokens=True).split()[-1]) for r in rows)
  assert numbers == list(range(6))
  for r in rows:
    # Each surviving example still carries its own image.
    number = int(tok.decode(r["input_ids"][0], skip_special_tokens=True).split()[-1])
    assert np.all(r["images"][0, 0, ..., 0] == 10 * number)
  assert rec.SKIPPED.total == 5
  for name in ("missing", "corrupt", "pairs.jsonl:6", "box", "long"):
    assert any(name in m and "skipping" in m for m in caplog.messages), name


def test_strict_mode_fails_on_the_first_bad_record(byte_tokenizer, tmp_path):
  path = _bad_jsonl(tmp_path)
  config = _config(2, source=f"jsonl:{path}", mixture={}, num_epochs=1, packing=False, strict=True)
  with pytest.raises(rec.BadRecordError, match="missing"):
    list(_iterator(byte_tokenizer, 2, config=config, batch=1))


def test_two_processes_see_disjoint_shards(byte_tokenizer, tmp_path):
  tok = byte_tokenizer
  path = helpers.write_image_text_jsonl(tmp_path, 10)
  config = _config(1, source=f"jsonl:{path}", num_epochs=1, shuffle=True, packing=False)
  seen = []
  for process in range(2):
    rows = [r for batch in _iterator(tok, 1, config=config, batch=2, process_index=process, process_count=2)
            for r in batch["input_ids"]]
    assert len(rows) == 5  # global batch 2 over 2 processes: one row per process per step
    seen.append({tok.decode(r, skip_special_tokens=True) for r in rows})
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == {f"image number {i}" for i in range(10)}


def test_argument_errors(byte_tokenizer):
  with pytest.raises(ValueError, match="divisible"):
    _iterator(byte_tokenizer, 1, batch=3, process_count=2)
  with pytest.raises(ValueError, match="process_index"):
    _iterator(byte_tokenizer, 1, process_index=2, process_count=2)
  # Some tasks have their own source, another weighted task has none: the error names it and the way out.
  config = _config(2)
  config.mixture_sources = {"text": "jsonl:/nonexistent.jsonl"}
  config.source = "jsonl:/other.jsonl"
  with pytest.raises(ValueError, match=r"mixture_sources\.caption=SPEC"):
    make_dataset(config, byte_tokenizer, process_index=0, process_count=1, global_batch=1, seq_len=T,
                 max_images=M, image_size=S, stage=2, image_tokens=Q)
  # One non-synthetic source and no per-task sources: stage 2 reads that source as already mixed.
  config = _config(2, source="jsonl:/nonexistent.jsonl")
  with pytest.raises(FileNotFoundError, match="nonexistent.jsonl"):
    make_dataset(config, byte_tokenizer, process_index=0, process_count=1, global_batch=1, seq_len=T,
                 max_images=M, image_size=S, stage=2, image_tokens=Q)


def test_qwen_tokenizer_stage3(qwen_tiktoken_path):
  from qwenvl_jax.text import QwenTokenizer  # pylint: disable=g-import-not-at-top
  tok = QwenTokenizer(qwen_tiktoken_path)
  batch = next(_iterator(tok, 3, config=_config(3, packing=False), batch=2, seq_len=256))
  expected, _ = _expected_synthetic(3, ["chat"], 16)
  for b, _, sl in _segments(batch):
    text = tok.decode(batch["input_ids"][b, sl])
    assert text in expected
    mask = batch["loss_mask"][b, sl] > 0
    assert tok.decode(batch["targets"][b, sl][mask]) == expected[text]
    assert (batch["input_ids"][b] == 151859).sum() == Q * batch["image_mask"][b].sum()


def test_a_source_of_only_bad_records_fails_instead_of_spinning(byte_tokenizer):
  config = _config(3, max_consecutive_skips=20)
  with pytest.raises(RuntimeError, match="bad records in a row.*over-long"):
    next(_iterator(byte_tokenizer, 3, config=config, seq_len=32))


def test_stage2_mixture_weights_and_sources(byte_tokenizer, tmp_path):
  tok = byte_tokenizer
  path = helpers.write_image_text_jsonl(tmp_path, 25)
  config = _config(2, packing=False)
  config.mixture = {"caption": 3.0, "vqa": 1.0, "ocr": 0.0}
  config.mixture_sources = {"caption": f"jsonl:{path}"}
  it = _iterator(tok, 2, config=config, batch=8)
  texts = [tok.decode(r, skip_special_tokens=True) for _ in range(5) for r in next(it)["input_ids"]]
  captions = sum("Generate the caption in English: image number" in t for t in texts)
  questions = sum(" Answer: " in t for t in texts)
  assert captions + questions == 40 and captions == 30
  assert not any("OCR" in t for t in texts)


def test_packing_keeps_every_example_exactly_once(byte_tokenizer, tmp_path):
  tok = byte_tokenizer
  path = helpers.write_image_text_jsonl(tmp_path, 25)
  config = _config(1, source=f"jsonl:{path}", num_epochs=1, shuffle=True, packing_bins=3)
  seen = []
  for batch in _iterator(tok, 1, config=config, batch=1, seq_len=64):
    for b, _, sl in _segments(batch):
      seen.append(tok.decode(batch["input_ids"][b, sl], skip_special_tokens=True))
  assert sorted(seen) == sorted(f"image number {i}" for i in range(25))
