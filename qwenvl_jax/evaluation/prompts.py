"""What the model is shown for an evaluation example: the raw prompt (few-shot: its shots' prompts and answers
first), its ids with the image spans expanded, and the images with the data pipeline's PIL preprocessing.

Letters: S image side.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from qwenvl_jax import text as qtext
from qwenvl_jax.data import images as image_lib
from qwenvl_jax.evaluation import few_shot as few_shot_lib
from qwenvl_jax.evaluation import tasks as tasks_lib
from qwenvl_jax.evaluation import tfds_readers
from qwenvl_jax.evaluation.readers import EvalDataError, EvalExample


def image_path(image: str, image_root: str) -> str:
  """Where the evaluation reads the image a data file names: a relative path under `image_root` (unset: the
  current folder, as the official files' paths are relative to the Qwen-VL checkout); absolute paths as given."""
  return image if not image_root or os.path.isabs(image) else os.path.join(image_root, image)


def data_folder(data_path) -> str:
  """The folder of a local data file ("" for a TFDS spec, a URL or no path): where a missing relative image may be
  found instead."""
  path = os.fspath(data_path) if data_path else ""
  if not path or tfds_readers.is_spec(path) or "://" in path:
    return ""
  return os.path.dirname(os.path.abspath(path))


def missing_image_hint(image: str, image_root: str, data_dir: str = "", *,
                       flag: str = "--config.image_root") -> str | None:
  """The hint of an image file that is not where `image_path` looked: the image root `flag` in use and, when the
  file exists relative to the data file's folder `data_dir`, that folder."""
  if os.path.isabs(image):
    return None
  where = f"{flag}={image_root}" if image_root else f"the current folder ({flag} is unset)"
  hint = f"relative image paths of the data file are read under {where}"
  beside = os.path.join(data_dir, image) if data_dir else ""
  if beside and os.path.isfile(beside):
    return f"{hint}; {image} exists relative to the data file's folder: pass {flag}={data_dir}"
  return f"{hint}; set {flag} to the folder the data file's image paths are relative to"


def load_image(example: EvalExample, image_root: str, image_size: int, *, data_dir: str = "",
               flag: str = "--config.image_root") -> np.ndarray:
  """uint8[S, S, 3]: the example's image (the bytes of its `image_loader`, else its file, relative paths under
  `image_root`) with the data pipeline's PIL preprocessing.

  data_dir: the data file's folder, named in the hint of a missing image found there (`missing_image_hint`).
  flag: the setting of `image_root` the hint names.

  Raises:
    EvalDataError: a missing, unreadable or corrupt image, naming the example.
  """
  path = None
  try:
    if example.image_loader is not None:
      source = example.image_loader()
    else:
      source = path = image_path(example.image, image_root)
    return image_lib.preprocess_image(source, image_size)
  except (image_lib.ImageError, EvalDataError) as e:
    hint = (missing_image_hint(example.image, image_root, data_dir, flag=flag) if path and not os.path.exists(path)
            else None)
    raise EvalDataError(f"example {example.example_id!r} (image {example.image}): {e}", hint) from e


def check_images(examples: Sequence[EvalExample], image_root: str, data_dir: str = "", *, limit: int = 16,
                 flag: str = "--config.image_root") -> None:
  """Checks that the image files of the first `limit` distinct images of `examples` exist (a wrong image_root then
  fails before the model loads, not at the first batch); images read from a dataset record or a URL are skipped.
  flag: the setting of `image_root` the hint names.

  Raises:
    EvalDataError: naming the first example whose image file is missing, with `missing_image_hint`.
  """
  seen = set()
  for example in examples:
    if len(seen) >= limit:
      return
    if example.image_loader is not None or "://" in example.image or example.image in seen:
      continue
    seen.add(example.image)
    path = image_path(example.image, image_root)
    if not os.path.isfile(path):
      problem = "is a folder, not an image file" if os.path.isdir(path) else "image file not found"
      raise EvalDataError(f"example {example.example_id!r} (image {example.image}): {problem}: {path}",
                          missing_image_hint(example.image, image_root, data_dir, flag=flag))


class PromptEncoder:
  """What the model is shown for each example: the raw prompt (few-shot: its shots' prompts and answers first),
  its ids with the image spans expanded, and the preprocessed images, in order."""

  def __init__(self, task: tasks_lib.EvalTask, tok: qtext.Tokenizer, *, image_tokens: int, image_size: int,
               image_root: str = "", shots: few_shot_lib.ShotSampler | None = None, data_dir: str = "",
               image_root_flag: str = "--config.image_root"):
    """data_dir: the data file's folder, for the hint of a missing image (`missing_image_hint`), which names the
    setting `image_root_flag` (the trainer's is --config.eval.image_root)."""
    self.task, self.tok, self.shots = task, tok, shots
    self.image_tokens, self.image_size, self.image_root = image_tokens, image_size, image_root
    self.data_dir, self.image_root_flag = data_dir, image_root_flag

  @property
  def max_images(self) -> int:
    """Image slots a row needs: the query's and its shots'."""
    return 1 + (self.shots.k if self.shots else 0)

  def prompt(self, example: EvalExample) -> tuple[str, list[EvalExample]]:
    """The raw prompt text and the examples whose images it shows, in order (the shots', then the query's)."""
    shots = self.shots.draw(example) if self.shots else []
    return few_shot_lib.few_shot_prompt(self.task, example, shots), shots + [example]

  def encode(self, example: EvalExample, suffix: Sequence[int] = ()) -> tuple[list[int], list[np.ndarray]]:
    """The prompt's ids (image spans expanded, then `suffix`) and its images uint8[S, S, 3]."""
    text, shown = self.prompt(example)
    context = qtext.make_context(self.tok, text, chat_format="raw", n_image_tokens=self.image_tokens)
    if len(context.image_paths) != len(shown):
      raise EvalDataError(f"example {example.example_id!r}: its prompt holds {len(context.image_paths)} image spans, "
                          f"{len(shown)} expected (does a text field contain <img>...</img>?)")
    images = [load_image(e, self.image_root, self.image_size, data_dir=self.data_dir, flag=self.image_root_flag)
              for e in shown]
    return context.tokens + list(suffix), images
