"""TFDS feature schemas of the datasets the pipeline reads (the contract with whoever writes them).

Two record kinds exist, both stored as TFDS ArrayRecord datasets (`file_format="array_record"`) and read without
TensorFlow through `tfds.data_source(..., decoders=...)`:

1. Image-text pairs (stage 1; what the web-scale cleaning job writes):
   ```
   id     Text                  unique, stable record id (used in warnings about bad records)
   image  Image(jpeg, RGB)      the encoded image file; bytes are stored as given (JPEG, PNG, ... all decode)
   text   Text                  the caption, plain text (no special tokens)
   ```
   Writers may add further features (e.g. `url`, `clip_score`); the pipeline reads only these three.

2. Conversations (stages 2 and 3; grounding, VQA, caption, OCR, chat, pure text):
   ```
   id             Text
   task           Text          one of TASKS, used by the stage-2 mixture
   images         Sequence(Tensor(bytes))   encoded image files, in order of their `<img></img>` spans
   conversations  Sequence({from: Text, value: Text})   alternating user / assistant turns
   ```
   The text holds one empty `<img></img>` per entry of `images`, in order (the path of the reference format is
   replaced by the bytes themselves), plus `<ref>`/`<box>` markup with integer coordinates in [0, 1000).
   Images are a sequence of raw byte tensors rather than `Image` features because TFDS cannot skip decoding
   inside a `Sequence` without TensorFlow, and the pipeline must see the original bytes to resize them exactly
   as the reference does (PIL bicubic on the decoded file).

Both schemas were verified to write (`download_and_prepare(file_format="array_record")`) and read
(`tfds.data_source`) with tensorflow-datasets 4.9.10 and no TensorFlow installed.
"""
import numpy as np
import tensorflow_datasets as tfds

from qwenvl_jax.data.records import TASKS  # noqa: F401  (re-exported: the values of the `task` feature)



def image_text_features() -> tfds.features.FeaturesDict:
  """The FeaturesDict of a stage-1 image-text pair dataset."""
  return tfds.features.FeaturesDict({
      "id": tfds.features.Text(),
      "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
      "text": tfds.features.Text(),
  })


def conversation_features() -> tfds.features.FeaturesDict:
  """The FeaturesDict of a multi-task / chat dataset (stages 2 and 3)."""
  return tfds.features.FeaturesDict({
      "id": tfds.features.Text(),
      "task": tfds.features.Text(),
      "images": tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.object_)),
      "conversations": tfds.features.Sequence({
          "from": tfds.features.Text(),
          "value": tfds.features.Text(),
      }),
  })

