"""Tests of the TFDS ArrayRecord builders: write without TensorFlow, read back through the pipeline."""
import numpy as np
import pytest

from qwenvl_jax.data import records as rec
from qwenvl_jax.data.config import default_data_config
from qwenvl_jax.data.images import preprocess_image
from qwenvl_jax.data.pipeline import make_train_iterator
from qwenvl_jax.data.sources import make_source
from qwenvl_jax.data.synthetic import synthetic_record
from qwenvl_jax.data.tfds_builders import build_conversation_dataset, build_image_text_dataset
from tests.data import helpers


def test_image_text_pairs_round_trip_and_feed_stage1(tmp_path, byte_tokenizer):
  path = helpers.write_image_text_jsonl(tmp_path, 5)
  (tmp_path / "imgs" / "bad.png").write_bytes(b"garbage")
  with open(path, "a") as f:
    f.write('{"id": "bad", "image": "imgs/bad.png", "text": "never stored"}\n{oops\n')
  rec.SKIPPED.reset()
  folder = build_image_text_dataset(str(path), str(tmp_path / "tfds"))
  assert rec.SKIPPED.total == 2
  specs = [(f"array_record:{folder}", {}), ("tfds:qwen_vl_image_text", {"data_dir": str(tmp_path / "tfds")})]
  for spec, kwargs in specs:
    source = make_source(spec, stage=1, image_size=8, **kwargs)
    records = sorted((source.parse(source.items[i]) for i in range(len(source.items))), key=lambda r: r.id)
    assert [r.id for r in records] == [f"pair{i}" for i in range(5)]
    assert records[3].turns == [("user", "<img></img>"), ("assistant", "image number 3")]
    # The stored image is the original file, byte for byte.
    assert records[3].images[0] == (tmp_path / "imgs" / "3.png").read_bytes()
  config = default_data_config(1)
  config.update(source=f"array_record:{folder}", num_workers=0, num_epochs=1, packing=False)
  rows = [b for b in make_train_iterator(config, byte_tokenizer, process_index=0, process_count=1, global_batch=1,
                                          seq_len=64, max_images=1, image_size=8, stage=1, image_tokens=2)]
  numbers = sorted(int(byte_tokenizer.decode(r["input_ids"][0], skip_special_tokens=True).split()[-1]) for r in rows)
  assert numbers == list(range(5))
  for r in rows:
    number = int(byte_tokenizer.decode(r["input_ids"][0], skip_special_tokens=True).split()[-1])
    assert np.all(r["images"][0, 0, ..., 0] == 10 * number)


def test_strict_build_fails_and_existing_output_is_never_overwritten(tmp_path):
  path = helpers.write_image_text_jsonl(tmp_path, 2)
  with open(path, "a") as f:
    f.write('{"id": "gone", "image": "imgs/none.png", "text": "x"}\n')
  with pytest.raises(rec.BadRecordError, match="gone"):
    build_image_text_dataset(str(path), str(tmp_path / "strict"), strict=True)
  build_image_text_dataset(str(path), str(tmp_path / "ok"))
  with pytest.raises(FileExistsError):
    build_image_text_dataset(str(path), str(tmp_path / "ok"))


def test_synthetic_conversations_round_trip(tmp_path):
  folder = build_conversation_dataset("synthetic", str(tmp_path / "tfds"), tasks=("grounding", "chat"),
                                      num_records=3, image_size=16)
  source = make_source(f"array_record:{folder}", stage=3, image_size=16)
  records = {r.id: r for r in (source.parse(source.items[i]) for i in range(len(source.items)))}
  assert len(records) == 6
  for task in ("grounding", "chat"):
    for i in range(3):
      want = synthetic_record(i, task=task, image_size=16)
      got = records[want.id]
      assert got.task == task and got.turns == want.turns
      assert len(got.images) == len(want.images)
      for g, w in zip(got.images, want.images):
        np.testing.assert_array_equal(preprocess_image(g, 16), preprocess_image(w, 16))
