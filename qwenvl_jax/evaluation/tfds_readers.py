"""Prepared TFDS datasets as evaluation examples: data specs, the public schemas per task kind, lazy images.

Specs (`config.data_path`, `config.few_shot_path`; the dataset is read, never downloaded):
  tfds:NAME[/CONFIG][:VERSION][:SPLIT]   `tfds.builder(NAME[/CONFIG][:VERSION], data_dir=config.tfds_data_dir)`,
                                         e.g. `tfds:ref_coco/refcoco_unc:validation`,
                                         `tfds:coco_captions/2014:VERSION:test`
  array_record:FOLDER[:SPLIT]            the dataset folder holding dataset_info.json
                                         (`tfds.builder_from_directory`): `array_record:/data/tfds/x/1.0.0:test`
SPLIT is any TFDS split expression (`validation`, `test[:100]`); without one the caller's default applies (the
runner: `test` for the evaluated data, `train` for few-shot examples). VERSION (`1.1.0`, TFDS's `NAME:VERSION`)
is told from a split by its form. Give it for datasets whose TFDS builder code needs TensorFlow (`coco_captions`):
TFDS then reads the prepared files without the code, as it does for names it has no code for.

Schemas, by task kind (feature names and types of `builder.info.features`; `?` = optional):
  caption           `coco_captions`-like {image, image/id?, captions: Sequence({text})}: one example per image,
                    references = all its captions, id = image/id (else the record index); or
                    {image, text, id?}: one reference, id = id (else the record index)
  grounding         `ref_coco`-like {image, image/id?, objects: Sequence({bbox, refexp: Sequence({raw})})}: one
                    example per (object, referring expression), like the official jsonl (one line per sentence),
                    id "IMAGE/OBJECT/REF" (IMAGE = image/id, else the record index; OBJECT, REF = 0-based
                    positions); or the flat {image, bbox, sent | refexp, id?}: one example per record. `bbox` is a
                    `BBoxFeature` (normalized ymin, xmin, ymax, xmax): it is scaled to pixel xyxy with the image
                    size read from the encoded image's header (PIL reads the header only), as the metric needs.
  vqa               {image, question, answers: Sequence(Text) | answer: Text, question_id?}: references = the
                    answers (none on test splits), id = question_id (else the record index)
  multiple_choice   {image, question, choices: Sequence(Text), answer?: int, hint?, index?}: id = record index,
                    as the official jsonl; at most 5 choices; an empty hint becomes "N/A"
Reading nested sequences (`objects/refexp/raw`) needs no TensorFlow with tfds 4.9.10 (its numpy parser rebuilds
the ragged rows); *writing* such a dataset does need TensorFlow, which is why the flat grounding schema exists.

Images stay in the dataset: each example's `image` is a stable pseudo-path `tfds:FULL_NAME:SPLIT/INDEX` (shown
in the prompt as `<img>...</img>` and in the results, never opened) and `image_loader` reads the encoded bytes
of record INDEX when the runner needs them, so a large split is never held in memory.

Every unusable input raises `EvalDataError` naming the spec and, for values, the record and the field.
"""
import functools
import io
import math
import re
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from qwenvl_jax.evaluation.readers import EvalDataError, EvalExample, ExampleId

SPEC_KINDS = ("tfds", "array_record")
MAX_CHOICES = 5
_VERSION = re.compile(r"^\d+\.(\d+|\*)\.(\d+|\*)$")
_CACHED_RECORDS = 16  # the few images consecutive examples share (ref_coco: all sentences of one image)


def is_spec(path: Any) -> bool:
  """Whether `path` names a TFDS dataset (`tfds:` or `array_record:`) rather than a file."""
  return isinstance(path, str) and path.partition(":")[0] in SPEC_KINDS and ":" in path


def parse_spec(spec: str, default_split: str) -> Tuple[str, str]:
  """`(dataset spec, split)`: `tfds:NAME[/CONFIG][:VERSION]` or `array_record:FOLDER`, and the split.

  The split of `array_record:` starts at the first ':' after the folder's last '/' (so `gs://...` folders work).

  Raises:
    EvalDataError: not a spec, or an empty name, version or split.
  """
  if not is_spec(spec):
    raise EvalDataError(f"{spec!r} is not a tfds:NAME[/CONFIG][:VERSION][:SPLIT] or array_record:FOLDER[:SPLIT] "
                        f"spec")
  kind, _, rest = spec.partition(":")
  if kind == "tfds":
    target, sep, split = rest.partition(":")
    version, vsep, after = split.partition(":")
    if _VERSION.match(version):
      target, sep, split = f"{target}:{version}", vsep, after
  else:
    cut = rest.find(":", rest.rfind("/") + 1)
    target, sep, split = (rest, "", "") if cut < 0 else (rest[:cut], ":", rest[cut + 1:])
  if not target or target.startswith(":"):
    raise EvalDataError(f"{spec!r}: no dataset {'name' if kind == 'tfds' else 'folder'} before the split")
  if sep and not split:
    raise EvalDataError(f"{spec!r}: empty split after ':'")
  return f"{kind}:{target}", split or default_split


def read_examples(spec: str, kind: str, *, data_dir: Optional[str] = None,
                  default_split: str = "test") -> List[EvalExample]:
  """The evaluation examples of a TFDS split, by the schema of task kind `kind` (module docstring).

  Args:
    spec: `tfds:NAME[/CONFIG][:VERSION][:SPLIT]` or `array_record:FOLDER[:SPLIT]`.
    kind: `caption`, `vqa`, `grounding` or `multiple_choice`.
    data_dir: TFDS data_dir of `tfds:` specs (None: TFDS's default).
    default_split: the split when the spec names none.

  Returns:
    The examples in record order, each with `image_loader` set.

  Raises:
    EvalDataError: the dataset or split is not prepared, its features match no schema of `kind` (the message
      lists the features found and the schemas expected), or a record holds an unusable value.
  """
  from qwenvl_jax.data import sources  # pylint: disable=import-outside-toplevel  (imports grain and TFDS)
  if kind not in _SCHEMAS:
    raise ValueError(f"unknown task kind {kind!r}; expected one of {sorted(_SCHEMAS)}")
  dataset, split = parse_spec(spec, default_split)
  try:
    builder, data = sources.open_tfds(dataset, split=split, data_dir=data_dir or None)
  except (ValueError, FileNotFoundError) as e:
    raise EvalDataError(str(e)) from e
  features = builder.info.features
  schema = next((s for s in _SCHEMAS[kind] if s.matches(features)), None)
  if schema is None:
    raise EvalDataError(
        f"{spec}: the features of {builder.info.full_name} match no {kind} schema.\n  found: "
        f"{describe_features(features)}\n  expected one of:\n    " +
        "\n    ".join(s.description for s in _SCHEMAS[kind]))
  images = _RecordImages(data, f"tfds:{_safe(builder.info.full_name)}:{_safe(split)}", spec)
  examples, seen = [], {}
  for index in range(len(data)):
    record = _Record(spec, index, data[index])
    for example in schema.convert(record, images):
      if example.example_id in seen:
        raise EvalDataError(f"{spec}: duplicate example id {example.example_id!r} (records {seen[example.example_id]} "
                            f"and {index})")
      seen[example.example_id] = index
      examples.append(example)
  return examples


def describe_features(features) -> str:
  """A one-line summary of a TFDS feature tree: `image: Image, captions: Sequence({id: int64, text: Text})`."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  if isinstance(features, tfds.features.FeaturesDict):
    return ", ".join(f"{k}: {describe_features(features[k])}" for k in sorted(features.keys()))
  if isinstance(features, tfds.features.Sequence):
    inner = features.feature
    text = describe_features(inner)
    return f"Sequence({{{text}}})" if isinstance(inner, tfds.features.FeaturesDict) else f"Sequence({text})"
  if type(features).__name__ in ("Tensor", "Scalar"):
    return np.dtype(features.np_dtype).name + ("" if not features.shape else str(list(features.shape)))
  return type(features).__name__


# ----------------------------------------------------------------------------------------------------------------
# Records and their images
# ----------------------------------------------------------------------------------------------------------------

def _safe(text: str) -> str:
  """`text` without the characters that could end an `<img>...</img>` span or form a special token."""
  return re.sub(r"[<>\s]", "_", text)


class _RecordImages:
  """Lazy access to the encoded `image` of each record (a few recent records cached)."""

  def __init__(self, data, prefix: str, spec: str):
    self.data, self.prefix, self.spec = data, prefix, spec
    self.read = functools.lru_cache(maxsize=_CACHED_RECORDS)(self._read)

  def path(self, index: int) -> str:
    return f"{self.prefix}/{index}"

  def loader(self, index: int) -> Callable[[], bytes]:
    return functools.partial(self.read, index)

  def _read(self, index: int) -> bytes:
    try:
      value = self.data[index]["image"]
    except Exception as e:  # pylint: disable=broad-except  (any storage error, named)
      raise EvalDataError(f"{self.spec}: cannot read the image of record {index}: {e!r}") from e
    if isinstance(value, np.ndarray) and value.dtype == object and value.shape == ():
      value = value.item()
    if not isinstance(value, (bytes, np.bytes_)):
      raise EvalDataError(f"{self.spec}: record {index}: the image is {type(value).__name__}, expected encoded bytes")
    return bytes(value)


class _Record:
  """One TFDS example with typed access whose errors name the spec, the record and the field."""

  def __init__(self, spec: str, index: int, values: Dict[str, Any]):
    self.spec, self.index, self.values = spec, index, values

  def fail(self, name: str, problem: str):
    raise EvalDataError(f"{self.spec}: record {self.index}: feature {name!r} {problem}")

  def text(self, name: str, value: Any = ..., *, non_empty: bool = True) -> str:
    value = self.values[name] if value is ... else value
    if isinstance(value, np.ndarray) and value.shape == ():
      value = value.item()
    if isinstance(value, (bytes, np.bytes_)):
      try:
        value = bytes(value).decode("utf-8")
      except UnicodeDecodeError:
        self.fail(name, "is not UTF-8 text")
    if not isinstance(value, str) or (non_empty and not value.strip()):
      self.fail(name, f"must be {'non-empty ' if non_empty else ''}text, got {value!r}")
    return value

  def texts(self, name: str, value: Any = ...) -> Tuple[str, ...]:
    value = self.values[name] if value is ... else value
    return tuple(self.text(name, v, non_empty=False) for v in np.asarray(value, dtype=object).reshape(-1))

  def identifier(self, name: str) -> ExampleId:
    """An int or text id feature as a JSON-able id."""
    value = self.values[name]
    if isinstance(value, (bytes, np.bytes_, str)) or (isinstance(value, np.ndarray) and value.dtype == object):
      return self.text(name)
    value = np.asarray(value)
    if value.shape != () or value.dtype.kind not in "iu":
      self.fail(name, f"must be an integer or text id, got {value!r}")
    return int(value)

  def optional_id(self, name: str) -> ExampleId:
    return self.identifier(name) if name in self.values else self.index

  def image_size(self) -> Tuple[int, int]:
    """(width, height) from the encoded image's header (no pixel decoding)."""
    data = self.values["image"]
    try:
      with Image.open(io.BytesIO(bytes(data))) as image:
        return image.size
    except Exception as e:  # pylint: disable=broad-except  (PIL raises many kinds on garbage)
      self.fail("image", f"is not a readable encoded image ({e})")

  def pixel_box(self, name: str, box: Any, size: Tuple[int, int]) -> Tuple[float, float, float, float]:
    """A normalized (ymin, xmin, ymax, xmax) box as pixel (x1, y1, x2, y2) of an image of `size`."""
    box = np.asarray(box, np.float64).reshape(-1)
    if box.shape != (4,) or not all(math.isfinite(v) for v in box):
      self.fail(name, f"must be 4 finite numbers (ymin, xmin, ymax, xmax), got {box.tolist()}")
    ymin, xmin, ymax, xmax = box.tolist()
    if not (0.0 <= ymin <= ymax <= 1.0 and 0.0 <= xmin <= xmax <= 1.0):
      self.fail(name, f"must be normalized ymin <= ymax, xmin <= xmax in [0, 1], got {box.tolist()}")
    width, height = size
    return (xmin * width, ymin * height, xmax * width, ymax * height)


# ----------------------------------------------------------------------------------------------------------------
# Schemas
# ----------------------------------------------------------------------------------------------------------------

class _Schema:
  """A feature layout of one task kind: how to recognise it and how to turn a record into examples.

  `required` features must exist with the checked type, `optional` ones may be absent but not of another type,
  and at least one of `any_of` (when given) must exist with its type.
  """

  def __init__(self, description: str, convert: Callable[["_Record", "_RecordImages"], List[EvalExample]], *,
               required: Dict[str, Callable[[Any], bool]], optional: Optional[Dict[str, Callable[[Any], bool]]] = None,
               any_of: Optional[Dict[str, Callable[[Any], bool]]] = None):
    self.description, self.convert = description, convert
    self.required, self.optional, self.any_of = required, optional or {}, any_of or {}

  def matches(self, features) -> bool:
    keys = set(features.keys())
    present = lambda checks: [k in keys and check(features[k]) for k, check in checks.items()]
    return (all(present(self.required)) and all(k not in keys or c(features[k]) for k, c in self.optional.items())
            and (not self.any_of or any(present(self.any_of))))


def _is(*names: str) -> Callable[[Any], bool]:
  return lambda feature: type(feature).__name__ in names


def _is_int(feature) -> bool:
  if type(feature).__name__ == "ClassLabel":
    return True
  return (type(feature).__name__ in ("Tensor", "Scalar") and not feature.shape
          and np.dtype(feature.np_dtype).kind in "iu")


def _is_id(feature) -> bool:
  return _is_int(feature) or _is("Text")(feature)


def _sequence_of(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
  return lambda feature: type(feature).__name__ == "Sequence" and check(feature.feature)


def _dict_with(**checks: Callable[[Any], bool]) -> Callable[[Any], bool]:
  def check(feature) -> bool:
    return (type(feature).__name__ == "FeaturesDict" and
            all(k in feature.keys() and c(feature[k]) for k, c in checks.items()))
  return check


def _example(record: _Record, images: _RecordImages, example_id: ExampleId, **kwargs) -> EvalExample:
  return EvalExample(example_id=example_id, image=images.path(record.index),
                     image_loader=images.loader(record.index), **kwargs)


def _coco_captions(record: _Record, images: _RecordImages) -> List[EvalExample]:
  captions = record.values["captions"]
  return [_example(record, images, record.optional_id("image/id"),
                   references=record.texts("captions/text", captions["text"]))]


def _caption_pairs(record: _Record, images: _RecordImages) -> List[EvalExample]:
  return [_example(record, images, record.optional_id("id"), references=(record.text("text", non_empty=False),))]


def _ref_coco(record: _Record, images: _RecordImages) -> List[EvalExample]:
  objects = record.values["objects"]
  raws = objects["refexp"]["raw"]  # per object the array of its sentences (the numpy parser's ragged rows)
  boxes = list(objects["bbox"])
  if len(boxes) != len(raws):
    record.fail("objects", f"has {len(boxes)} boxes but {len(raws)} referring-expression lists")
  if not any(len(r) for r in raws):
    return []
  size = record.image_size()
  image_key = record.optional_id("image/id")
  out = []
  for j, (box, sentences) in enumerate(zip(boxes, raws)):
    pixels = record.pixel_box(f"objects/bbox[{j}]", box, size)
    for r, sentence in enumerate(record.texts(f"objects/refexp/raw[{j}]", sentences)):
      if not sentence.strip():
        record.fail(f"objects/refexp/raw[{j}][{r}]", "is empty")
      out.append(_example(record, images, f"{image_key}/{j}/{r}", fields={"expr": sentence}, bbox=pixels,
                          size=size))
  return out


def _flat_grounding(record: _Record, images: _RecordImages) -> List[EvalExample]:
  name = "sent" if "sent" in record.values else "refexp"
  size = record.image_size()
  return [_example(record, images, record.optional_id("id"), fields={"expr": record.text(name)},
                   bbox=record.pixel_box("bbox", record.values["bbox"], size), size=size)]


def _vqa(record: _Record, images: _RecordImages) -> List[EvalExample]:
  if "answers" in record.values:
    references = record.texts("answers")
  elif "answer" in record.values:
    references = (record.text("answer", non_empty=False),)
  else:
    references = ()
  return [_example(record, images, record.optional_id("question_id"), fields={"question": record.text("question")},
                   references=references)]


def _multiple_choice(record: _Record, images: _RecordImages) -> List[EvalExample]:
  choices = record.texts("choices")
  if not 1 <= len(choices) <= MAX_CHOICES:
    record.fail("choices", f"must hold 1 to {MAX_CHOICES} options, got {len(choices)}")
  answer = None
  if "answer" in record.values:
    answer = int(np.asarray(record.values["answer"]))
    if not 0 <= answer < len(choices):
      record.fail("answer", f"must be an index into the {len(choices)} choices, got {answer}")
  hint = record.text("hint", non_empty=False) if "hint" in record.values else ""
  meta = {"index": record.identifier("index")} if "index" in record.values else {}
  return [_example(record, images, record.index, fields={"hint": hint if hint.strip() else "N/A",
                                                         "question": record.text("question")},
                   choices=choices, answer_index=answer, meta=meta)]


_IMAGE, _TEXT = _is("Image"), _is("Text")
_SCHEMAS: Dict[str, Sequence[_Schema]] = {
    "caption": (
        _Schema("coco_captions-like {image: Image, image/id?: int, captions: Sequence({text: Text})}", _coco_captions,
                required={"image": _IMAGE, "captions": _sequence_of(_dict_with(text=_TEXT))},
                optional={"image/id": _is_id}),
        _Schema("{image: Image, text: Text, id?: int | Text}", _caption_pairs,
                required={"image": _IMAGE, "text": _TEXT}, optional={"id": _is_id}),
    ),
    "grounding": (
        _Schema("ref_coco-like {image: Image, image/id?: int, objects: Sequence({bbox: BBoxFeature, "
                "refexp: Sequence({raw: Text})})}", _ref_coco,
                required={"image": _IMAGE, "objects": _sequence_of(_dict_with(
                    bbox=_is("BBoxFeature"), refexp=_sequence_of(_dict_with(raw=_TEXT))))},
                optional={"image/id": _is_id}),
        _Schema("flat {image: Image, bbox: BBoxFeature, sent | refexp: Text, id?: int | Text}", _flat_grounding,
                required={"image": _IMAGE, "bbox": _is("BBoxFeature")}, optional={"id": _is_id},
                any_of={"sent": _TEXT, "refexp": _TEXT}),
    ),
    "vqa": (
        _Schema("{image: Image, question: Text, answers?: Sequence(Text) | answer?: Text, question_id?: int | Text}",
                _vqa, required={"image": _IMAGE, "question": _TEXT},
                optional={"answers": _sequence_of(_TEXT), "answer": _TEXT, "question_id": _is_id}),
    ),
    "multiple_choice": (
        _Schema("{image: Image, question: Text, choices: Sequence(Text), answer?: int, hint?: Text, index?: int}",
                _multiple_choice, required={"image": _IMAGE, "question": _TEXT, "choices": _sequence_of(_TEXT)},
                optional={"answer": _is_int, "hint": _TEXT, "index": _is_id}),
    ),
}
