"""Held-out synthetic evaluation sets written in the official file formats (RECIPES §2.2, §2.5).

A model trained on the built-in synthetic dataset (`qwenvl_jax.data.synthetic`) can be scored end to end by the
real evaluation job on images it never saw: the sets are drawn with another seed than training (default 12345 vs
the trainer's 0) and rendered at the model's resolution.

  root = pathlib.Path("synthetic_eval")
  write_caption_set(root, n=100, image_size=224)    # root/captions.json   (COCO style, `flickr` / `nocaps`)
  write_grounding_set(root, n=100, image_size=224)  # root/grounding.jsonl (RefCOCO style, `refcoco_*`)
  python -m qwenvl_jax.evaluate --config=configs/eval/refcoco_val.py \\
      --config.data_path=synthetic_eval/grounding.jsonl \\
      --config.image_root=synthetic_eval --config.model=tiny --config.image_size=224 ...

Ground-truth boxes are the `<box>` text of the record mapped back to pixels (x / 1000 * size), so they agree with
what the model was taught to within size / 1000 pixels. `max_shapes` must match the training data's
(`--config.data.synthetic_max_shapes`).

Chance is the best image-independent answer (`caption_chance_level`, `grounding_chance_level`), not random weights,
which write no caption or box worth scoring.
"""
import json
import os
import pathlib
from typing import Union

from qwenvl_jax.data.synthetic import MAX_SHAPES, synthetic_record
from qwenvl_jax.evaluation import cider, grounding, readers

EVAL_SEED = 12345
PathLike = Union[str, os.PathLike]


def _image(root: pathlib.Path, record, i: int) -> str:
  (root / "images").mkdir(parents=True, exist_ok=True)
  name = f"images/{record.task}_{i}.png"
  record.images[0].save(root / name)
  return name


def _fresh(path: pathlib.Path) -> pathlib.Path:
  if path.exists():
    raise FileExistsError(f"{path} exists; evaluation sets are never overwritten (choose another folder)")
  return path


def write_caption_set(root: PathLike, *, n: int, image_size: int, seed: int = EVAL_SEED,
                      max_shapes: int = MAX_SHAPES) -> str:
  """Writes `root/captions.json` (COCO style: images [{id, image}], annotations [{image_id, caption}]) and its
  images; returns the JSON path."""
  root = pathlib.Path(root)
  path = _fresh(root / "captions.json")
  images, annotations = [], []
  for i in range(n):
    record = synthetic_record(i, task="caption", image_size=image_size, seed=seed, max_shapes=max_shapes)
    images.append({"id": i, "image": _image(root, record, i)})
    annotations.append({"id": i, "image_id": i, "caption": record.turns[-1][1].strip()})
  path.write_text(json.dumps({"images": images, "annotations": annotations}))
  return str(path)


def write_grounding_set(root: PathLike, *, n: int, image_size: int, seed: int = EVAL_SEED,
                        max_shapes: int = MAX_SHAPES) -> str:
  """Writes `root/grounding.jsonl` (one `{image, sent, bbox, width, height}` per line, bbox xyxy in pixels) and
  its images; returns the JSONL path."""
  root = pathlib.Path(root)
  path = _fresh(root / "grounding.jsonl")
  lines = []
  for i in range(n):
    record = synthetic_record(i, task="grounding", image_size=image_size, seed=seed, max_shapes=max_shapes)
    prompt, answer = record.turns[0][1], record.turns[1][1]
    sentence = prompt.split("<ref>", 1)[1].split("</ref>", 1)[0]
    box = grounding.parse_box(answer)
    if box is None:
      raise AssertionError(f"synthetic grounding record {i} has no box: {answer!r}")
    pixels = [v / 1000 * image_size for v in box]
    lines.append(json.dumps({"image": _image(root, record, i), "sent": sentence, "bbox": pixels,
                             "width": image_size, "height": image_size}))
  path.write_text("\n".join(lines) + "\n")
  return str(path)


def caption_chance_level(data_path: PathLike, selection_root: PathLike, *, image_size: int,
                         max_shapes: int = MAX_SHAPES, n: int = 64) -> tuple[float, str]:
  """(CIDEr, caption) of the best image-independent caption on the caption set `data_path`, the caption chosen on
  `n` captions written to `selection_root` with the trainer's seed (0), as `cider.constant_caption_baseline`."""
  selection = write_caption_set(selection_root, n=n, image_size=image_size, seed=0, max_shapes=max_shapes)
  references = lambda path: {e.example_id: list(e.references) for e in readers.read_caption_json(path)}
  return cider.constant_caption_baseline(references(selection), references(data_path))


def grounding_chance_level(data_path: PathLike) -> tuple[float, tuple[float, float, float, float]]:
  """(accuracy, relative box) of the best image-blind box on the grounding set `data_path`
  (`grounding.best_constant_box_accuracy`)."""
  examples = readers.read_grounding_jsonl(data_path)
  return grounding.best_constant_box_accuracy([e.bbox for e in examples], [e.size for e in examples])
