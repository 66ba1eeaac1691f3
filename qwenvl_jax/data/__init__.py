"""Data pipeline of the three training stages (DESIGN §4): sources, preprocessing, packing, grain iterators.

Use:
```python
from qwenvl_jax import data
cfg = data.default_data_config(stage=2)            # embedded as config.data by configs/stage2.py
it = data.make_train_iterator(cfg, tokenizer, process_index=jax.process_index(),
                              process_count=jax.process_count(), global_batch=64, seq_len=2048, max_images=4,
                              image_size=448, stage=2, image_tokens=256)
batch = data.to_global_batch(next(it), mesh, rules)   # dict of global jax.Arrays (rules: sharding.load_rules)
state = it.get_state()                             # JSON-able; it.set_state(state) resumes on the next batch
```
Sources: `synthetic` (built in, no download), `jsonl:PATH`, `qwen_finetune_json:PATH`, `tfds:NAME`,
`array_record:PATH` (write these with `build_image_text_dataset` / `build_conversation_dataset`).
"""
from qwenvl_jax.data.config import STAGE2_MIXTURE
from qwenvl_jax.data.config import default_data_config
from qwenvl_jax.data.encode import ExampleEncoder
from qwenvl_jax.data.global_batch import to_global_batch
from qwenvl_jax.data.images import CLIP_MEAN
from qwenvl_jax.data.images import CLIP_STD
from qwenvl_jax.data.images import ImageError
from qwenvl_jax.data.images import normalize
from qwenvl_jax.data.images import preprocess_image
from qwenvl_jax.data.pipeline import make_dataset
from qwenvl_jax.data.pipeline import make_train_iterator
from qwenvl_jax.data.records import SKIPPED
from qwenvl_jax.data.records import TASKS
from qwenvl_jax.data.records import BadRecordError
from qwenvl_jax.data.records import Record
from qwenvl_jax.data.sources import make_source
from qwenvl_jax.data.synthetic import synthetic_record
from qwenvl_jax.data.synthetic import train_synthetic_tokenizer


def build_image_text_dataset(*args, **kwargs) -> str:
  """`tfds_builders.build_image_text_dataset` (imported on use: TFDS is slow to import)."""
  from qwenvl_jax.data import tfds_builders  # pylint: disable=g-import-not-at-top
  return tfds_builders.build_image_text_dataset(*args, **kwargs)


def build_conversation_dataset(*args, **kwargs) -> str:
  """`tfds_builders.build_conversation_dataset` (imported on use: TFDS is slow to import)."""
  from qwenvl_jax.data import tfds_builders  # pylint: disable=g-import-not-at-top
  return tfds_builders.build_conversation_dataset(*args, **kwargs)

__all__ = [
    "BadRecordError", "build_conversation_dataset", "build_image_text_dataset", "CLIP_MEAN", "CLIP_STD",
    "default_data_config", "ExampleEncoder", "ImageError", "make_dataset", "make_source", "make_train_iterator",
    "normalize", "preprocess_image", "Record", "SKIPPED", "STAGE2_MIXTURE", "synthetic_record", "TASKS",
    "to_global_batch", "train_synthetic_tokenizer",
]
