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
from qwenvl_jax.evaluation.readers import EvalDataError, EvalExample


def load_image(example: EvalExample, image_root: str, image_size: int) -> np.ndarray:
  """uint8[S, S, 3]: the example's image (the bytes of its `image_loader`, else its file, relative paths under
  `image_root`) with the data pipeline's PIL preprocessing.

  Raises:
    EvalDataError: a missing, unreadable or corrupt image, naming the example.
  """
  try:
    if example.image_loader is not None:
      source = example.image_loader()
    else:
      path = example.image
      source = path if not image_root or os.path.isabs(path) else os.path.join(image_root, path)
    return image_lib.preprocess_image(source, image_size)
  except (image_lib.ImageError, EvalDataError) as e:
    raise EvalDataError(f"example {example.example_id!r} (image {example.image}): {e}") from e


class PromptEncoder:
  """What the model is shown for each example: the raw prompt (few-shot: its shots' prompts and answers first),
  its ids with the image spans expanded, and the preprocessed images, in order."""

  def __init__(self, task: tasks_lib.EvalTask, tok: qtext.Tokenizer, *, image_tokens: int, image_size: int,
               image_root: str = "", shots: few_shot_lib.ShotSampler | None = None):
    self.task, self.tok, self.shots = task, tok, shots
    self.image_tokens, self.image_size, self.image_root = image_tokens, image_size, image_root

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
    return context.tokens + list(suffix), [load_image(e, self.image_root, self.image_size) for e in shown]
