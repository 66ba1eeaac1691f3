"""Random-access sources of records: synthetic, JSONL (+ image folder), Qwen fine-tune JSON, TFDS, ArrayRecord.

A source is a grain `MapDataset` of raw items plus a `parse(item) -> Record` function; parsing happens in the
pipeline's map so one malformed entry becomes one bad record (skipped or fatal), never a failed epoch. Specs:

  synthetic                   synthetic.synthetic_record, one dataset per task
  jsonl:PATH                  one JSON object per line: {"id"?, "image": path | "images": [paths], "text": caption}
                              or {"id"?, "task"?, "conversations": [...]}; paths relative to `image_root` (default:
                              the file's folder)
  qwen_finetune_json:PATH     the official fine-tuning file (RECIPES §1.1): one JSON list of
                              {"id", "conversations": [{"from": "user"|"assistant", "value"}]}, images as
                              `<img>PATH</img>` in the text
  tfds:NAME                   a prepared TFDS dataset read with `tfds.data_source` (never downloads): the two schemas
                              of features.py, `coco_captions`-like ({image, captions: {text}}; one caption per image,
                              chosen from (seed, id)) and `ref_coco`-like ({image, objects: {bbox, refexp: {raw}}};
                              tfds 4.9.10 reads its nested sequences without TensorFlow, writing them needs it)
  array_record:PATH           a TFDS dataset folder (the one holding dataset_info.json) written with ArrayRecord
"""
import dataclasses
import json
import os
from typing import Any, Callable

import grain
import numpy as np

from qwenvl_jax.data import records as rec
from qwenvl_jax.data.records import TASKS
from qwenvl_jax.data.synthetic import MAX_SHAPES, check_max_shapes, synthetic_record

# Accepted role names of conversation files; the official format uses "user" / "assistant".
_ROLE_ALIASES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}
# Large enough never to repeat within a run, small enough for grain's index arithmetic.
SYNTHETIC_SIZE = 1 << 30


@dataclasses.dataclass(frozen=True)
class Source:
  """A random-access dataset of raw items and the function that turns one into a `Record` (or raises)."""
  name: str
  items: grain.MapDataset
  parse: Callable[[Any], rec.Record]


def make_source(spec: str, *, stage: int, image_size: int, seed: int = 0, task: str | None = None,
                image_root: str | None = None, split: str = "train", data_dir: str | None = None,
                synthetic_max_shapes: int = MAX_SHAPES) -> Source:
  """The source named by `spec` (see the module docstring).

  Args:
    spec: the source spec string.
    stage: 1, 2 or 3; decides the caption format of image-text pairs.
    image_size: S; the synthetic source renders at it.
    seed: seed of the synthetic source.
    task: the synthetic task, or the task given to records whose source does not name one.
    image_root: folder image paths are relative to.
    split: TFDS split.
    data_dir: TFDS data_dir.
    synthetic_max_shapes: the synthetic source draws 1..this shapes per scene.
  """
  kind, _, arg = spec.partition(":")
  if kind == "synthetic":
    task = task or ("caption" if stage == 1 else "chat" if stage == 3 else None)
    if task not in TASKS:
      raise ValueError(f"the synthetic source needs a task in {TASKS}, got {task!r}")
    items = grain.MapDataset.range(SYNTHETIC_SIZE)
    check_max_shapes(synthetic_max_shapes, "synthetic_max_shapes")  # at build time, not at the first record
    return Source(f"synthetic/{task}", items, _SyntheticParser(task, image_size, seed, stage, synthetic_max_shapes))
  if not arg:
    if kind.endswith((".jsonl", ".json")) or os.sep in kind:  # a bare path: the kind was left out
      guess = ("jsonl" if kind.endswith(".jsonl") else "qwen_finetune_json" if kind.endswith(".json") else
               "array_record")
      raise ValueError(f"source spec {spec!r} is a path without its kind; did you mean {guess}:{spec}? (kinds: "
                       "synthetic, jsonl:PATH, qwen_finetune_json:PATH, tfds:NAME, array_record:PATH)")
    raise ValueError(f"source spec {spec!r} needs an argument after ':'")
  if kind == "jsonl":
    path = _existing_file(arg, spec)
    if _first_char(path) == "[":  # every line of it would be a bad record: 1000 in a row end the run
      raise ValueError(f"source {spec!r}: {path} holds one JSON list, not one JSON object per line; did you mean "
                       f"qwen_finetune_json:{path}?")
    root = image_root or os.path.dirname(os.path.abspath(path))
    return Source(spec, grain.MapDataset.source(_JsonlLines(path)), _JsonParser(path, root, stage, task))
  if kind == "qwen_finetune_json":
    path = _existing_file(arg, spec)
    root = image_root or os.path.dirname(os.path.abspath(path))
    with open(path, encoding="utf-8-sig") as f:  # a file an editor saved with a BOM was "Unexpected UTF-8 BOM"
      try:
        entries = json.load(f)
      except json.JSONDecodeError as e:
        lines = e.msg == "Extra data" and _first_char(path) == "{"  # one object per line
        raise ValueError(f"{path} is not valid JSON ({e}); the fine-tuning format is one JSON list"
                         + (f"; one JSON object per line is read by jsonl:{path}" if lines else "")) from e
    if not isinstance(entries, list):
      raise ValueError(f"{path} holds a JSON {type(entries).__name__}; the fine-tuning format is one JSON list")
    items = grain.MapDataset.source([(i, e) for i, e in enumerate(entries)])
    return Source(spec, items, _JsonParser(path, root, stage, task or "chat"))
  if kind in ("tfds", "array_record"):
    builder, data = open_tfds(spec, split=split, data_dir=data_dir)
    items = grain.MapDataset.source(data)
    features = set(builder.info.features.keys())
    return Source(spec, items, _TfdsParser(builder.info.name, features, stage, task, seed))
  raise ValueError(f"unknown source spec {spec!r}: expected synthetic, jsonl:PATH, qwen_finetune_json:PATH, "
                   "tfds:NAME or array_record:PATH")


def open_tfds(spec: str, *, split: str, data_dir: str | None = None) -> tuple[Any, Any]:
  """A prepared TFDS dataset (never downloaded) and one of its splits as a random-access data source.

  Args:
    spec: `tfds:NAME[/CONFIG][:VERSION]` (a registered or prepared dataset under `data_dir`; with a version TFDS
      reads the prepared files without the builder code) or `array_record:FOLDER` (the folder holding
      dataset_info.json, read with `tfds.builder_from_directory`).
    split: a TFDS split (`train`, `validation[:100]`, ...).
    data_dir: TFDS data_dir of `tfds:` specs (None: TFDS's default).

  Returns:
    (builder, data source): `data[i]` is the i-th example as nested numpy values; a top-level `image` feature
    is left encoded (bytes), every other feature decoded (no TensorFlow needed, nested sequences included).

  Raises:
    ValueError: an unknown dataset, or a split that is not prepared.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (slow import, only when used)
  kind, _, arg = spec.partition(":")
  if kind not in ("tfds", "array_record") or not arg:
    raise ValueError(f"{spec!r} is not a tfds:NAME or array_record:FOLDER spec")
  if kind == "tfds":
    try:
      builder = tfds.builder(arg, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
      raise ValueError(f"{spec!r}: no TFDS dataset {arg!r} is registered or prepared under "
                       f"{data_dir or 'the default TFDS data_dir'} (datasets are never downloaded)") from e
    except ImportError as e:  # the dataset's builder code imports a module that is not installed (TensorFlow)
      raise ValueError(f"{spec!r}: TFDS's builder code of {arg!r} needs a module that is not installed ({e}); a "
                       f"prepared copy is read without the code: add its version (tfds:NAME[/CONFIG]:VERSION) or "
                       f"name its folder (array_record:FOLDER)") from e
  else:
    folder = _existing(arg, spec)
    try:
      builder = tfds.builder_from_directory(folder)
    except OSError as e:
      raise ValueError(f"{spec!r}: {arg} is not a prepared TFDS dataset folder (the one holding "
                       f"dataset_info.json): {e}") from e
  decoders = {"image": tfds.decode.SkipDecoding()} if "image" in builder.info.features.keys() else None
  try:
    data = builder.as_data_source(split=split, decoders=decoders)
  except Exception as e:
    raise ValueError(f"cannot read split {split!r} of {spec!r}: is it prepared in {builder.data_dir}? ({e})") from e
  return builder, data


def _existing(path: str, spec: str) -> str:
  if not os.path.exists(path):
    raise FileNotFoundError(f"source {spec!r}: {path} does not exist")
  return path


def _existing_file(path: str, spec: str) -> str:
  """`path`, a file (a folder was 'error: PATH: Is a directory', naming neither the source nor the flag)."""
  if os.path.isdir(_existing(path, spec)):
    raise ValueError(f"source {spec!r}: {path} is a folder; {spec.partition(':')[0]}: reads one file")
  return path


def _first_char(path: str) -> str:
  """The first non-blank character of a text file ('' if none), read from its first 4 KiB."""
  with open(path, "rb") as f:
    return f.read(4096).decode("utf-8", "replace").lstrip("\ufeff \t\r\n")[:1]


@dataclasses.dataclass(frozen=True)
class _SyntheticParser:
  task: str
  image_size: int
  seed: int
  stage: int
  max_shapes: int = MAX_SHAPES

  def __call__(self, index: int) -> rec.Record:
    return synthetic_record(int(index), task=self.task, image_size=self.image_size, seed=self.seed,
                            stage=self.stage, max_shapes=self.max_shapes)


class _JsonlLines:
  """Random access to the lines of a text file through a byte-offset index (built once, at construction)."""

  def __init__(self, path: str):
    self.path = path
    offsets, numbers, pos = [], [], 0
    with open(path, "rb") as f:
      for number, line in enumerate(f, start=1):
        if line.strip():
          offsets.append(pos)
          numbers.append(number)
        pos += len(line)
    self._offsets = np.asarray(offsets, np.int64)
    self._numbers = np.asarray(numbers, np.int64)

  def __len__(self) -> int:
    return len(self._offsets)

  def __getitem__(self, index: int) -> tuple[str, bytes]:
    """(`path:line number`, the line's bytes) of the index-th non-blank line."""
    with open(self.path, "rb") as f:
      f.seek(int(self._offsets[index]))
      return f"{self.path}:{self._numbers[index]}", f.readline()


@dataclasses.dataclass(frozen=True)
class _JsonParser:
  """Parses a JSONL line (name, bytes) or a fine-tuning list entry (index, dict) into a Record."""
  path: str
  image_root: str
  stage: int
  task: str | None

  def where(self, item) -> str:
    """`path:line` of a JSONL item, `path[index]` of a fine-tuning list entry (for errors about the record)."""
    where, raw = item
    return where if isinstance(raw, bytes) else f"{self.path}[{where}]"

  def __call__(self, item) -> rec.Record:
    where, raw = item
    if isinstance(raw, bytes):
      try:
        entry = json.loads(raw)
      except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise rec.BadRecordError(where, f"malformed JSON: {e}") from e
    else:
      where, entry = f"{self.path}[{where}]", raw
    if not isinstance(entry, dict):
      raise rec.BadRecordError(where, f"expected a JSON object, got {type(entry).__name__}")
    rid = str(entry.get("id", where))
    if "conversations" in entry:
      return conversation_record(rid, entry["conversations"], task=entry.get("task", self.task or "chat"),
                                 image_root=self.image_root)
    if "text" in entry and ("image" in entry or "images" in entry):
      paths = entry["images"] if "images" in entry else [entry["image"]]
      if not isinstance(entry["text"], str) or len(paths) != 1 or not isinstance(paths[0], str):
        raise rec.BadRecordError(rid, "an image-text pair needs one image path and a string text")
      return rec.Record(rid, "caption", rec.caption_turns(entry["text"], self.stage),
                        [_resolve(paths[0], self.image_root, rid)])
    raise rec.BadRecordError(rid, f"neither 'conversations' nor 'image' + 'text' in keys {sorted(entry)}")


def _resolve(path: str, root: str, rid: str) -> str:
  rec.check_unicode(rid, "image path", path)
  if path.startswith(("http://", "https://")):
    raise rec.BadRecordError(rid, f"remote image {path} (the pipeline never downloads; fetch it first)")
  if os.path.isabs(path):
    return path
  joined = os.path.join(root, path)
  # The current folder is looked at first: it is local, while the image root may be a network mount (gcsfuse, NFS)
  # where every look is a round trip, on top of the read that opens the image later.
  if root and os.path.exists(path) and not os.path.exists(joined):
    # finetune.py opens a relative path from the current folder; here it is read under the data file's folder.
    raise rec.BadRecordError(rid, f"relative image path not under the image root: {path!r} is not in {root} (the "
                                  "data file's folder, or config.data.image_root) but in the current folder; set "
                                  f"--config.data.image_root={os.getcwd()}")
  return joined


def conversation_record(rid: str, conversations: Any, *, task: str = "chat", images: list | None = None,
                        image_root: str | None = None) -> rec.Record:
  """A Record from the official `conversations` list (RECIPES §1.1).

  A leading non-user turn is dropped as finetune.py does. Without `images`, image paths are read from the
  `<img>PATH</img>` spans (relative to `image_root`) and the spans are emptied.

  Raises:
    BadRecordError: not a list of {"from", "value"} dicts, unknown role, no turns left, an empty turn, no
      assistant turn, a relative image path found under the current folder but not under `image_root`.
  """
  if not isinstance(conversations, list) or not all(
      isinstance(t, dict) and isinstance(t.get("from"), str) and isinstance(t.get("value"), str)
      for t in conversations):
    raise rec.BadRecordError(rid, "'conversations' must be a list of {'from': str, 'value': str}")
  turns = []
  for t in conversations:
    role = _ROLE_ALIASES.get(t["from"].lower())
    if role is None:
      raise rec.BadRecordError(rid, f"unknown role {t['from']!r}")
    turns.append((role, t["value"]))
  if turns and turns[0][0] != "user":
    turns = turns[1:]
    if not turns:
      raise rec.BadRecordError(rid, "no user turn: its one turn is not from the user and is dropped (as finetune.py "
                                    "drops a leading non-user turn)")
  for i, (role, text) in enumerate(turns):
    if not text.strip():  # an empty answer teaches the model to answer nothing
      raise rec.BadRecordError(rid, f"empty {role} turn (turn {i})")
  if turns and not any(role == "assistant" for role, _ in turns):
    # Only the ChatML markers would be supervised: finetune.py trains on it without a word.
    raise rec.BadRecordError(rid, "no assistant turn: nothing to learn (turns alternate user, assistant, ...)")
  if images is None:
    paths = []
    stripped = []
    for role, text in turns:
      text, found = rec.strip_image_paths(text)
      stripped.append((role, text))
      paths += found
    turns = stripped
    images = [_resolve(p, image_root or "", rid) for p in paths]
  return rec.validate(rec.Record(rid, task, turns, list(images)))


class _TfdsParser:
  """Turns one TFDS example into a Record, by schema (features.py) or by known public dataset."""

  def __init__(self, name: str, features: set[str], stage: int, task: str | None, seed: int):
    self.name, self.features, self.stage, self.task, self.seed = name, features, stage, task, seed

  def __call__(self, example: dict) -> rec.Record:
    rid = _text(example.get("id", b"")) or f"{self.name}/{_text(example.get('image/id', b'?'))}"
    try:
      return self._parse(rid, example)
    except rec.BadRecordError:
      raise
    except (KeyError, IndexError, TypeError, ValueError) as e:
      # An external dataset whose example does not have the structure its features promise is a bad record.
      raise rec.BadRecordError(rid, f"unexpected {self.name} example structure: {e!r}") from e

  def _parse(self, rid: str, example: dict) -> rec.Record:
    if "conversations" in self.features:
      conv = example["conversations"]
      turns = [{"from": _text(f), "value": _text(v)} for f, v in zip(conv["from"], conv["value"])]
      task = _text(example.get("task", b"")) or self.task or "chat"
      return conversation_record(rid, turns, task=task, images=[bytes(b) for b in example["images"]])
    if "text" in self.features and "image" in self.features:
      return rec.Record(rid, "caption", rec.caption_turns(_text(example["text"]), self.stage), [example["image"]])
    if "captions" in self.features:
      texts = [_text(t) for t in example["captions"]["text"]]
      if not texts:
        raise rec.BadRecordError(rid, "no captions")
      caption = texts[_pick(self.seed, rid, len(texts))]
      return rec.Record(rid, "caption", rec.caption_turns(caption, self.stage), [example["image"]])
    if "objects" in self.features:
      return self._grounding(rid, example)
    raise rec.BadRecordError(rid, f"no adapter for the features {sorted(self.features)} of {self.name}")

  def _grounding(self, rid: str, example: dict) -> rec.Record:
    """ref_coco: a referring expression of one object -> its box (TFDS boxes are normalized ymin, xmin, ...)."""
    objects = example["objects"]
    # Nested sequences arrive as a dict of per-object lists: objects["refexp"]["raw"][i] = sentences of object i.
    raws = objects["refexp"]["raw"]
    if len(raws) != len(objects["bbox"]):
      raise rec.BadRecordError(rid, f"{len(objects['bbox'])} boxes but {len(raws)} referring-expression lists")
    pairs = [(i, _text(raw)) for i, sentences in enumerate(raws) for raw in sentences]
    if not pairs:
      raise rec.BadRecordError(rid, "no referring expressions")
    i, phrase = pairs[_pick(self.seed, rid, len(pairs))]
    ymin, xmin, ymax, xmax = (float(v) for v in objects["bbox"][i])
    box = rec.box_text((xmin, ymin, xmax, ymax), 1.0, 1.0)
    turns = [("user", f"<img></img><ref>{phrase}</ref>"), ("assistant", box)]
    return rec.validate(rec.Record(rid, "grounding", turns, [example["image"]]))


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, (bytes, np.bytes_)) else str(value)


def _pick(seed: int, rid: str, n: int) -> int:
  """A choice among n that is a pure function of (seed, record id), so resumed runs choose the same."""
  return int(np.random.default_rng([seed, *rid.encode("utf-8")[:64]]).integers(n))
