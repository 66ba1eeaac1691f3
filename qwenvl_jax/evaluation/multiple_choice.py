"""Multiple choice by likelihood ranking (ScienceQA-IMG, SEED-Bench, MMBench), RECIPES §2.4.

The reference does not generate: for each option letter L it appends the tokens of `" L"` to the prompt, left-
pads all options of a batch with eod, runs one forward pass on `tokens[:, :-1]`, takes the per-token
cross-entropy against `tokens[:, 1:]`, scores each option by the mean CE over its last `len(tokens(" L"))`
positions and picks the argmin (the first one on ties, as `torch.argmin`). Acc@1 against the integer answer.

Here are the model-free parts: the option prompt text, the padded option batch, the per-token CE
(pure, jit-able), the reduction to option losses, the choice and the accuracy.

Letters: K options, T tokens, V vocab.
"""
from typing import Sequence, Tuple

import jax
import jax.numpy as jnp
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


def build_option_batch(
    prompt_ids: Sequence[int], option_ids: Sequence[Sequence[int]], pad_id: int
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Left-padded prompt + option sequences of one question.

  Args:
    prompt_ids: the tokens of the formatted prompt.
    option_ids: per option the tokens of its suffix (`" A"` ...), each non-empty.
    pad_id: the padding id (the reference pads with eod).

  Returns:
    tokens int32[K, T] (left-padded), mask bool[K, T] (True on real tokens) and target_lengths int32[K].
  """
  if not option_ids or any(len(o) == 0 for o in option_ids):
    raise ValueError(f"every option needs at least one token, got {list(map(list, option_ids))!r}")
  sequences = [list(prompt_ids) + list(o) for o in option_ids]
  length = max(len(s) for s in sequences)
  tokens = np.full((len(sequences), length), pad_id, np.int32)
  mask = np.zeros((len(sequences), length), bool)
  for k, seq in enumerate(sequences):
    tokens[k, length - len(seq):] = seq
    mask[k, length - len(seq):] = True
  return tokens, mask, np.asarray([len(o) for o in option_ids], np.int32)


def token_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Per-token cross-entropy float32[K, T] of logits float[K, T, V] against targets int32[K, T] (pure)."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]


def option_losses(token_losses: np.ndarray, target_lengths: Sequence[int]) -> np.ndarray:
  """float64[K] mean CE over each option's last `target_lengths[k]` positions of token_losses float[K, T-1]."""
  token_losses = np.asarray(token_losses, np.float64)
  if token_losses.ndim != 2 or token_losses.shape[0] != len(target_lengths):
    raise ValueError(f"token_losses must be [K={len(target_lengths)}, T], got shape {token_losses.shape}")
  out = np.empty(len(target_lengths))
  for k, n in enumerate(target_lengths):
    if not 1 <= n <= token_losses.shape[1]:
      raise ValueError(f"option {k}: target length {n} outside 1..{token_losses.shape[1]}")
    out[k] = token_losses[k, -n:].mean()
  return out


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
