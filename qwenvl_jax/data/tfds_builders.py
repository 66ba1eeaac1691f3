"""TFDS builders that write ArrayRecord datasets in the two schemas of features.py (no TensorFlow needed).

  QwenVlImageText       stage-1 image-text pairs from a JSONL file + image folder
                        (`{"id"?, "image": path, "text": caption}` per line)
  QwenVlConversations   multi-task / chat records from any record source: the official fine-tuning JSON, a JSONL of
                        conversations, or the synthetic dataset (a fixed number of records per task)

`build_image_text_dataset` / `build_conversation_dataset` prepare them under `data_dir` and return the dataset
folder, which the pipeline then reads as `array_record:FOLDER` (or `tfds:qwen_vl_image_text` with that data_dir).
Entries that would be bad records for the pipeline (malformed line, missing or corrupt image, bad box) are skipped
with a warning naming the entry, or stop the build when `strict`; images are stored as their original file bytes
(synthetic images as PNG), so the training-time resize is the reference's resize of the original file.
"""
import io
import os
from typing import Iterable, Iterator

import tensorflow_datasets as tfds
from PIL import Image

from qwenvl_jax.data import records as rec
from qwenvl_jax.data.features import conversation_features, image_text_features
from qwenvl_jax.data.images import ImageError, open_image
from qwenvl_jax.data.sources import make_source

_VERSION = tfds.core.Version("1.0.0")


class QwenVlImageText(tfds.core.GeneratorBasedBuilder):
  """Image-text pairs (features.image_text_features) from a JSONL file and an image folder."""
  VERSION = _VERSION
  RELEASE_NOTES = {"1.0.0": "First version."}

  def __init__(self, *, jsonl_path: str = "", image_root: str = "", strict: bool = False, **kwargs):
    self._jsonl_path, self._image_root, self._strict = jsonl_path, image_root, strict
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(features=image_text_features())

  def _split_generators(self, dl_manager):
    del dl_manager  # Local files only: nothing is ever downloaded.
    return {"train": self._generate_examples()}

  def _generate_examples(self) -> Iterator[tuple[str, dict]]:
    root = self._image_root or os.path.dirname(os.path.abspath(self._jsonl_path))
    source = make_source(f"jsonl:{self._jsonl_path}", stage=1, image_size=1, image_root=root)
    for i in range(len(source.items)):
      try:
        record = source.parse(source.items[i])
        if record.task != "caption":
          raise rec.BadRecordError(record.id, "not an image-text pair")
        yield record.id, {"id": record.id, "image": _image_bytes(record, 0), "text": record.turns[1][1]}
      except rec.BadRecordError as e:
        _skip_or_raise(e, self._strict)


class QwenVlConversations(tfds.core.GeneratorBasedBuilder):
  """Multi-task / chat records (features.conversation_features) from a record source spec."""
  VERSION = _VERSION
  RELEASE_NOTES = {"1.0.0": "First version."}

  def __init__(self, *, source: str = "", tasks: tuple[str, ...] = (), num_records: int = 0,
               image_root: str = "", image_size: int = 448, seed: int = 0, strict: bool = False, **kwargs):
    self._source, self._tasks, self._num_records = source, tuple(tasks), num_records
    self._image_root, self._image_size, self._seed, self._strict = image_root, image_size, seed, strict
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(features=conversation_features())

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples()}

  def _generate_examples(self) -> Iterator[tuple[str, dict]]:
    for record in self._records():
      try:
        rec.validate(record)
        images = [_image_bytes(record, i) for i in range(len(record.images))]
      except rec.BadRecordError as e:
        _skip_or_raise(e, self._strict)
        continue
      yield record.id, {
          "id": record.id, "task": record.task, "images": images,
          "conversations": [{"from": role, "value": text} for role, text in record.turns],
      }

  def _records(self) -> Iterable[rec.Record]:
    common = dict(stage=2, image_size=self._image_size, seed=self._seed, image_root=self._image_root or None)
    if self._source == "synthetic":
      if not self._tasks or self._num_records <= 0:
        raise ValueError("a synthetic conversation dataset needs tasks and num_records > 0")
      for task in self._tasks:
        source = make_source("synthetic", task=task, **common)
        for i in range(self._num_records):
          yield source.parse(i)
      return
    source = make_source(self._source, **common)
    limit = self._num_records or len(source.items)
    for i in range(min(limit, len(source.items))):
      try:
        yield source.parse(source.items[i])
      except rec.BadRecordError as e:
        _skip_or_raise(e, self._strict)


def _image_bytes(record: rec.Record, i: int) -> bytes:
  """The stored bytes of image i: the original file when there is one (checked to decode), else PNG."""
  image = record.images[i]
  try:
    if isinstance(image, (str, os.PathLike)):
      open_image(image)
      with open(image, "rb") as f:
        return f.read()
    if isinstance(image, (bytes, bytearray)):
      open_image(image)
      return bytes(image)
    pil = open_image(image) if not isinstance(image, Image.Image) else image.convert("RGB")
  except ImageError as e:
    raise rec.BadRecordError(record.id, f"image {i}: {e}") from e
  buf = io.BytesIO()
  pil.save(buf, format="PNG")
  return buf.getvalue()


def _skip_or_raise(error: rec.BadRecordError, strict: bool) -> None:
  if strict:
    raise error
  rec.SKIPPED.skip(error)


def _prepare(builder: tfds.core.DatasetBuilder) -> str:
  if os.path.exists(builder.data_dir):
    raise FileExistsError(f"{builder.data_dir} already exists; choose another data_dir or remove it yourself")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS))
  return builder.data_dir


def build_image_text_dataset(jsonl_path: str, data_dir: str, *, image_root: str = "", strict: bool = False) -> str:
  """Writes the image-text pairs of `jsonl_path` as an ArrayRecord TFDS dataset; returns its folder."""
  return _prepare(QwenVlImageText(jsonl_path=jsonl_path, image_root=image_root, strict=strict, data_dir=data_dir,
                                  file_format="array_record"))


def build_conversation_dataset(source: str, data_dir: str, *, tasks: Iterable[str] = (), num_records: int = 0,
                               image_root: str = "", image_size: int = 448, seed: int = 0,
                               strict: bool = False) -> str:
  """Writes the records of `source` (a source spec; `synthetic` needs `tasks` and `num_records` per task) as an
  ArrayRecord TFDS conversation dataset; returns its folder."""
  return _prepare(QwenVlConversations(source=source, tasks=tuple(tasks), num_records=num_records,
                                      image_root=image_root, image_size=image_size, seed=seed, strict=strict,
                                      data_dir=data_dir, file_format="array_record"))

