"""Multiple choice by likelihood ranking (ScienceQA-IMG, SEED-Bench, MMBench), RECIPES §2.4.

The reference does not generate: for each option letter L it appends the tokens of `" L"` to the prompt, left-
pads all options of a batch with eod, runs one forward pass on `tokens[:, :-1]`, takes the per-token
cross-entropy against `tokens[:, 1:]`, scores each option by the mean CE over its last `len(tokens(" L"))`
positions and picks the argmin (the first one on ties, as `torch.argmin`). Acc@1 against the integer answer.

Here are the model-free parts: the option prompt text, the choice and the accuracy. The forward pass, the
per-token CE (`model.losses.token_cross_entropy`) and the reduction to option losses (`inference.scoring`) sit
in the layers below, which the evaluation runner calls.

Letters: K options, T tokens, V vocab.
"""
from typing import Sequence, Tuple

import numpy as np

OPTION_LETTERS = ("A", "B", "C", "D", "E")


def format_options(choices: Sequence[str]) -> str:
  """`"A. first\\nB. second..."`, the options block of the official prompt."""
  if not choices or len(choices) > len(OPTION_LETTERS):
    raise ValueError(f"need 1 to {len(OPTION_LETTERS)} choices, got {len(choices)}: {list(choices)!r}")
  return "\n".join(f"{OPTION_LETTERS[i]}. {c}" for i, c in enumerate(choices))


def option_suffixes(num_choices: int) -> Tuple[str, ...]:
  """The texts appended to the prompt, one per option: `" A"`, `" B"`, ..."""
  if not 1 <= num_choices <= len(OPTION_LETTERS):
    raise ValueError(f"need 1 to {len(OPTION_LETTERS)} choices, got {num_choices}")
  return tuple(" " + letter for letter in OPTION_LETTERS[:num_choices])


def choose_option(option_loss: Sequence[float]) -> int:
  """Index of the option with the lowest loss; the first one on ties.

  Raises:
    ValueError: no options, or a NaN loss (a NaN would make any choice arbitrary).
  """
  losses = np.asarray(option_loss, np.float64)
  if losses.ndim != 1 or losses.size == 0:
    raise ValueError(f"option losses must be a non-empty 1-D list, got {option_loss!r}")
  if np.isnan(losses).any():
    raise ValueError(f"option losses contain NaN: {losses.tolist()}")
  return int(np.argmin(losses))


def choice_accuracy(predictions: Sequence[int], answers: Sequence[int]) -> dict:
  """Acc@1 in [0, 1] of chosen option indices against the integer answers, and the per-example scores."""
  if len(predictions) != len(answers):
    raise ValueError(f"{len(predictions)} predictions for {len(answers)} answers")
  if not predictions:
    raise ValueError("choice_accuracy needs at least one example")
  scores = [1.0 if int(p) == int(a) else 0.0 for p, a in zip(predictions, answers)]
  return {"accuracy": sum(scores) / len(scores), "per_example": scores}
