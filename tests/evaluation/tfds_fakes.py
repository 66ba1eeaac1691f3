"""Tiny prepared TFDS datasets (ArrayRecord, written without TensorFlow) in the public schemas of each task kind.

`prepare(builder_class, data_dir, examples)` writes one split per key of `examples`; every builder takes its
examples from the class attribute `EXAMPLES` so a test chooses the records. Images are small PNGs of chosen sizes.

Writing nested sequences (`objects/refexp/raw`) needs TensorFlow in tfds 4.9.10, only because the serializer asks
a `TensorInfo` for its TensorFlow dtype while flattening the ragged rows; `_ragged_writing_without_tf` answers with
the numpy dtype, which the serializer then converts exactly as it would the TensorFlow one (same bytes on disk).
Reading needs no such help: that is what these datasets test.
"""
import contextlib
import io

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image
from tensorflow_datasets.core.features import feature as feature_lib


def png(value: int, width: int = 9, height: int = 6) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(np.full((height, width, 3), value, np.uint8)).save(buf, format="PNG")
  return buf.getvalue()


class _Fake(tfds.core.GeneratorBasedBuilder):
  """Splits and examples from `EXAMPLES` ({split: [example dict]}), features from `FEATURES`."""
  VERSION = tfds.core.Version("1.0.0")
  FEATURES: dict = {}
  EXAMPLES: dict = {}

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(dict(self.FEATURES)))

  def _split_generators(self, dl_manager):
    return {split: self._generate_examples(split) for split in self.EXAMPLES}

  def _generate_examples(self, split):
    for i, example in enumerate(self.EXAMPLES[split]):
      yield i, example


class EvalCocoCaptions(_Fake):
  """`coco_captions` layout: image, image/id, objects (as the real one), captions {id, text}."""
  FEATURES = {"image": tfds.features.Image(encoding_format="png"), "image/id": np.int64,
              "objects": tfds.features.Sequence({"bbox": tfds.features.BBoxFeature(), "label": np.int64}),
              "captions": tfds.features.Sequence({"id": np.int64, "text": tfds.features.Text()})}


class EvalCaptionPairs(_Fake):
  FEATURES = {"image": tfds.features.Image(encoding_format="png"), "text": tfds.features.Text()}


class EvalRefCoco(_Fake):
  """`ref_coco` layout (the parts the reader uses): image, image/id, objects {id, bbox, refexp {refexp_id, raw}}."""
  FEATURES = {"image": tfds.features.Image(encoding_format="png"), "image/id": np.int64,
              "objects": tfds.features.Sequence({
                  "id": np.int64, "bbox": tfds.features.BBoxFeature(),
                  "refexp": tfds.features.Sequence({"refexp_id": np.int64, "raw": tfds.features.Text()})})}


class EvalFlatGrounding(_Fake):
  FEATURES = {"image": tfds.features.Image(encoding_format="png"), "id": tfds.features.Text(),
              "bbox": tfds.features.BBoxFeature(), "sent": tfds.features.Text()}


class EvalVqa(_Fake):
  FEATURES = {"image": tfds.features.Image(encoding_format="png"), "question_id": np.int64,
              "question": tfds.features.Text(), "answers": tfds.features.Sequence(tfds.features.Text())}


class EvalVqaSingleAnswer(_Fake):
  FEATURES = {"image": tfds.features.Image(encoding_format="png"), "question": tfds.features.Text(),
              "answer": tfds.features.Text()}


class EvalMultipleChoice(_Fake):
  FEATURES = {"image": tfds.features.Image(encoding_format="png"), "question": tfds.features.Text(),
              "hint": tfds.features.Text(), "choices": tfds.features.Sequence(tfds.features.Text()),
              "answer": np.int64}


class EvalUnknownSchema(_Fake):
  FEATURES = {"image": tfds.features.Image(encoding_format="png"), "label": np.int64}


@contextlib.contextmanager
def _ragged_writing_without_tf():
  original = feature_lib.TensorInfo.dtype
  feature_lib.TensorInfo.dtype = property(lambda self: self.np_dtype)
  try:
    yield
  finally:
    feature_lib.TensorInfo.dtype = original


def prepare(builder_class, data_dir, examples: dict) -> str:
  """Writes `examples` ({split: [example]}) as a prepared ArrayRecord dataset; returns its version folder."""
  builder_class.EXAMPLES = examples
  builder = builder_class(data_dir=str(data_dir), file_format="array_record")
  with _ragged_writing_without_tf():
    builder.download_and_prepare()
  return str(builder.data_dir)
