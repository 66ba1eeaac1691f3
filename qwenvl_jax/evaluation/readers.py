"""Readers of the official Qwen-VL evaluation files (RECIPES §2.2-2.5, 2.10) into `EvalExample`s.

Formats (one JSON object per line for JSONL):
- VQA jsonl: `{image, question, question_id, answer?}`; `answer` is a string (most datasets), a list of
  strings (DocVQA) or absent (test splits). For VQA accuracy the human answers come from the official VQA
  annotation JSON (`{"annotations": [{question_id, answers: [{answer}], question_type, answer_type}]}`), read
  with `read_vqa_annotations` and attached with `attach_vqa_annotations`.
- Caption JSON, COCO style: `{"images": [{id, image}], "annotations": [{image_id, caption}]}`; one example
  per image, its references are the captions of its annotations.
- Grounding jsonl (RefCOCO/+/g): `{image, sent, bbox, width, height}`, bbox xyxy in pixels.
- Multiple-choice jsonl (ScienceQA-IMG, MMBench): `{image, hint, question, choices, answer}`; `answer` is the
  0-based index of the right choice (absent on test splits), an empty or null hint becomes "N/A".
Files without an id field (grounding, multiple choice) number their examples by 0-based line index.

Every malformed input raises `EvalDataError` naming the file, the line (or JSON path) and the field.
"""
import dataclasses
import json
import math
import os
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

from qwenvl_jax import errors

ExampleId = Union[int, str]


class EvalDataError(errors.InputFormatError):
  """An evaluation file that is missing, not valid JSON, or has a missing or ill-typed field."""


@dataclasses.dataclass(frozen=True)
class EvalExample:
  """One evaluation example, independent of the task's prompt.

  Attributes:
    example_id: the question id (VQA), image id (captions) or 0-based line index (grounding, choice).
    image: the image path as written in the file (the prompt embeds it as `<img>{image}</img>`); with
      `image_loader`, a stable name of the image that is never opened (TFDS: `tfds:NAME:SPLIT/INDEX`).
    fields: the prompt's text fields besides the image (`question`, `expr`, `hint`, `options`).
    references: accepted answers (VQA: the human answers), or reference captions; empty when unknown.
    bbox: grounding ground truth, xyxy in pixels.
    size: (width, height) of the original image in pixels (grounding).
    choices: the options of a multiple-choice question.
    answer_index: the 0-based index of the right choice.
    meta: anything else the scorer or the results file may use (`question_type`, `answer_type`, `index`).
    image_loader: returns the encoded image bytes when the image is not a file (TFDS examples read their record
      lazily, so a split's images are not all held in memory); None: read the file `image`.
  """
  example_id: ExampleId
  image: str
  fields: Mapping[str, str] = dataclasses.field(default_factory=dict)
  references: Tuple[str, ...] = ()
  bbox: Optional[Tuple[float, float, float, float]] = None
  size: Optional[Tuple[float, float]] = None
  choices: Tuple[str, ...] = ()
  answer_index: Optional[int] = None
  meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  image_loader: Optional[Callable[[], bytes]] = dataclasses.field(default=None, repr=False, compare=False)


def _open_text(path: Union[str, os.PathLike]):
  try:
    return open(path, encoding="utf-8")
  except OSError as e:
    raise EvalDataError(f"cannot open evaluation file {os.fspath(path)!r}: {e.strerror}") from e


def iter_jsonl(path: Union[str, os.PathLike]) -> Iterator[Tuple[int, Dict[str, Any]]]:
  """Yields (1-based line number, object) for every line; blank lines and non-objects are errors."""
  with _open_text(path) as f:
    for lineno, line in enumerate(f, start=1):
      if not line.strip():
        raise EvalDataError(f"{os.fspath(path)}:{lineno}: empty line (one JSON object per line expected)")
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        raise EvalDataError(f"{os.fspath(path)}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from e
      if not isinstance(obj, dict):
        raise EvalDataError(f"{os.fspath(path)}:{lineno}: expected a JSON object, got {type(obj).__name__}")
      yield lineno, obj


def _load_json(path: Union[str, os.PathLike]) -> Any:
  with _open_text(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise EvalDataError(f"{os.fspath(path)}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from e


class _Fields:
  """Typed field access with errors that name the place (`file:line` or `file: images[3]`)."""

  def __init__(self, where: str, obj: Mapping[str, Any]):
    self.where, self.obj = where, obj

  def fail(self, name: str, problem: str):
    raise EvalDataError(f"{self.where}: field {name!r} {problem}")

  def get(self, name: str, default: Any = ...):
    if name not in self.obj:
      if default is ...:
        self.fail(name, "is missing")
      return default
    return self.obj[name]

  def string(self, name: str, *, non_empty: bool = True) -> str:
    value = self.get(name)
    if not isinstance(value, str) or (non_empty and not value.strip()):
      self.fail(name, f"must be a{' non-empty' if non_empty else ''} string, got {value!r}")
    return value

  def identifier(self, name: str) -> ExampleId:
    value = self.get(name)
    if isinstance(value, bool) or not isinstance(value, (int, str)):
      self.fail(name, f"must be an integer or a string, got {value!r}")
    return value

  def number(self, name: str, *, positive: bool = False) -> float:
    value = self.get(name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
      self.fail(name, f"must be a finite number, got {value!r}")
    if positive and value <= 0:
      self.fail(name, f"must be positive, got {value!r}")
    return value

  def answers(self, name: str) -> Tuple[str, ...]:
    """A string or a non-empty list of strings, as a tuple; () when the field is absent or null."""
    value = self.get(name, None)
    if value is None:
      return ()
    if isinstance(value, str):
      return (value,)
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
      return tuple(value)
    self.fail(name, f"must be a string or a non-empty list of strings, got {value!r}")


def _check_unique(seen: Dict[ExampleId, str], example_id: ExampleId, where: str, what: str):
  if example_id in seen:
    raise EvalDataError(f"{where}: duplicate {what} {example_id!r} (first at {seen[example_id]})")
  seen[example_id] = where


def read_vqa_jsonl(path: Union[str, os.PathLike]) -> List[EvalExample]:
  """VQA-style jsonl (VQAv2, OK-VQA, TextVQA, VizWiz, DocVQA, ChartQA, GQA, OCR-VQA, AI2D)."""
  examples, seen = [], {}
  for lineno, obj in iter_jsonl(path):
    f = _Fields(f"{os.fspath(path)}:{lineno}", obj)
    example_id = f.identifier("question_id")
    _check_unique(seen, example_id, f.where, "question_id")
    examples.append(EvalExample(example_id=example_id, image=f.string("image"),
                                fields={"question": f.string("question")}, references=f.answers("answer")))
  return examples


def read_vqa_annotations(path: Union[str, os.PathLike]) -> Dict[ExampleId, Dict[str, Any]]:
  """Official VQA annotation JSON -> {question_id: {"answers": (...), "question_type", "answer_type"}}."""
  data = _load_json(path)
  if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
    raise EvalDataError(f"{os.fspath(path)}: expected an object with an 'annotations' list")
  out: Dict[ExampleId, Dict[str, Any]] = {}
  seen: Dict[ExampleId, str] = {}
  for i, ann in enumerate(data["annotations"]):
    where = f"{os.fspath(path)}: annotations[{i}]"
    if not isinstance(ann, dict):
      raise EvalDataError(f"{where}: expected an object, got {type(ann).__name__}")
    f = _Fields(where, ann)
    question_id = f.identifier("question_id")
    _check_unique(seen, question_id, where, "question_id")
    answers = f.get("answers")
    if not isinstance(answers, list) or not answers:
      f.fail("answers", f"must be a non-empty list, got {answers!r}")
    texts = []
    for j, entry in enumerate(answers):
      if not isinstance(entry, dict) or not isinstance(entry.get("answer"), str):
        f.fail(f"answers[{j}]", f"must be an object with a string 'answer', got {entry!r}")
      texts.append(entry["answer"])
    out[question_id] = {"answers": tuple(texts), "question_type": ann.get("question_type"),
                        "answer_type": ann.get("answer_type")}
  return out


def attach_vqa_annotations(examples: Sequence[EvalExample], annotations: Mapping[ExampleId, Mapping[str, Any]],
                           *, source: str = "the annotation file") -> List[EvalExample]:
  """Replaces each example's references by its human answers and records the question/answer types.

  Raises:
    EvalDataError: an example's question_id is not in `annotations` (the first few are named).
  """
  missing = [e.example_id for e in examples if e.example_id not in annotations]
  if missing:
    by_text = {str(k): k for k in annotations}
    other = by_text.get(str(missing[0]))
    hint = None
    if other is not None:  # "262148000" in the data file, 262148000 in the annotations: equal only as text
      hint = (f"question_id {missing[0]!r} ({type(missing[0]).__name__}) in the data file is {other!r} "
              f"({type(other).__name__}) in {source}: write both as the same type")
    raise EvalDataError(f"{len(missing)} question_id(s) have no annotation in {source}, e.g. {missing[:5]}", hint)
  out = []
  for e in examples:
    ann = annotations[e.example_id]
    meta = dict(e.meta, question_type=ann.get("question_type"), answer_type=ann.get("answer_type"))
    out.append(dataclasses.replace(e, references=tuple(ann["answers"]), meta=meta))
  return out


def read_caption_json(path: Union[str, os.PathLike]) -> List[EvalExample]:
  """COCO-style caption JSON: one example per entry of `images`, references from `annotations`."""
  data = _load_json(path)
  name = os.fspath(path)
  if not isinstance(data, dict) or not isinstance(data.get("images"), list):
    raise EvalDataError(f"{name}: expected an object with an 'images' list")
  annotations = data.get("annotations", [])
  if not isinstance(annotations, list):
    raise EvalDataError(f"{name}: 'annotations' must be a list")
  images, seen = [], {}
  for i, entry in enumerate(data["images"]):
    if not isinstance(entry, dict):
      raise EvalDataError(f"{name}: images[{i}]: expected an object, got {type(entry).__name__}")
    f = _Fields(f"{name}: images[{i}]", entry)
    image_id = f.identifier("id")
    _check_unique(seen, image_id, f.where, "image id")
    images.append((image_id, f.string("image")))
  refs: Dict[ExampleId, List[str]] = {image_id: [] for image_id, _ in images}
  for i, ann in enumerate(annotations):
    if not isinstance(ann, dict):
      raise EvalDataError(f"{name}: annotations[{i}]: expected an object, got {type(ann).__name__}")
    f = _Fields(f"{name}: annotations[{i}]", ann)
    image_id = f.identifier("image_id")
    if image_id not in refs:
      f.fail("image_id", f"{image_id!r} is not the id of any entry of 'images'")
    refs[image_id].append(f.string("caption", non_empty=False))
  return [EvalExample(example_id=image_id, image=image, references=tuple(refs[image_id]))
          for image_id, image in images]


def read_grounding_jsonl(path: Union[str, os.PathLike]) -> List[EvalExample]:
  """RefCOCO-style jsonl: `{image, sent, bbox: [x1, y1, x2, y2] pixels, width, height}`."""
  examples = []
  for index, (lineno, obj) in enumerate(iter_jsonl(path)):
    f = _Fields(f"{os.fspath(path)}:{lineno}", obj)
    bbox = f.get("bbox")
    if (not isinstance(bbox, list) or len(bbox) != 4 or
        not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in bbox)):
      f.fail("bbox", f"must be [x1, y1, x2, y2] (4 finite numbers, pixels), got {bbox!r}")
    if bbox[2] < bbox[0] or bbox[3] < bbox[1]:
      f.fail("bbox", f"must have x2 >= x1 and y2 >= y1, got {bbox!r}")
    size = (f.number("width", positive=True), f.number("height", positive=True))
    examples.append(EvalExample(example_id=index, image=f.string("image"), fields={"expr": f.string("sent")},
                                bbox=tuple(float(v) for v in bbox), size=size))
  return examples


def read_multiple_choice_jsonl(path: Union[str, os.PathLike], *, max_choices: int = 5) -> List[EvalExample]:
  """ScienceQA/MMBench-style jsonl: `{image, hint, question, choices, answer}`."""
  examples = []
  for index, (lineno, obj) in enumerate(iter_jsonl(path)):
    f = _Fields(f"{os.fspath(path)}:{lineno}", obj)
    choices = f.get("choices")
    if (not isinstance(choices, list) or not 1 <= len(choices) <= max_choices or
        not all(isinstance(c, str) for c in choices)):
      f.fail("choices", f"must be a list of 1 to {max_choices} strings, got {choices!r}")
    answer = f.get("answer", None)
    if answer is not None and (isinstance(answer, bool) or not isinstance(answer, int) or
                               not 0 <= answer < len(choices)):
      f.fail("answer", f"must be an index into the {len(choices)} choices, got {answer!r}")
    hint = f.get("hint", None)
    if hint is not None and not isinstance(hint, str):
      f.fail("hint", f"must be a string or null, got {hint!r}")
    meta = {"index": obj["index"]} if "index" in obj else {}
    examples.append(EvalExample(
        example_id=index, image=f.string("image"),
        fields={"hint": hint if hint else "N/A", "question": f.string("question")},
        choices=tuple(choices), answer_index=answer, meta=meta))
  return examples


def resolve_images(examples: Sequence[EvalExample], root: Union[str, os.PathLike]) -> List[EvalExample]:
  """Examples with relative image paths joined onto `root` (the official files use paths relative to the
  Qwen-VL checkout, e.g. `data/coco/val2014/...`); absolute paths and URLs are kept."""
  out = []
  for e in examples:
    if os.path.isabs(e.image) or "://" in e.image:
      out.append(e)
    else:
      out.append(dataclasses.replace(e, image=os.path.join(os.fspath(root), e.image)))
  return out
