"""Likelihood scoring for multiple choice: per-token cross-entropy of left-padded rows through one jitted forward.

Letters: B rows (questions x options), P padded length, V vocabulary.

The official `evaluate_multiple_choice.py` (RECIPES §2.4) appends `" A"`, `" B"`, … to the prompt, left-pads all
options with `<|endoftext|>`, runs one forward pass and scores each option by the mean cross-entropy over its own
tokens; the lowest loss wins. Here the rows are built by `decode.make_prompt_batch` (positions corrected per row
like generation, Gotcha 12), the per-token loss is `model.losses.token_cross_entropy` and `option_losses` reduces
it to one score per option (the choice itself is `evaluation.multiple_choice.choose_option`). The reference runs this
forward pass in eval mode, where dynamic NTK and logn scaling apply, so they are on here too (no-ops up to 2048
tokens).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx

from qwenvl_jax.inference import decode
from qwenvl_jax.model import losses


def token_losses(graphdef: nnx.GraphDef, state: nnx.State, batch: dict, *, logn: bool = True,
                 chunk_size: int = 512) -> jax.Array:
  """float32[B, P-1]: cross-entropy of token t+1 given tokens <= t, for every row. Pure.

  batch: `decode.PromptBatch` fields as arrays plus `rope_base` float32[B].
  chunk_size: tokens per chunk of the loss (`model.losses`): the [B, P, V] logits are never built whole.
  """
  model = nnx.merge(graphdef, state)
  hidden, _ = model.features(batch["input_ids"], images=batch.get("images"), image_mask=batch.get("image_mask"),
                             positions=batch["positions"], segment_ids=batch["segment_ids"],
                             rope_base=batch["rope_base"][:, None, None], logn=logn)
  head = model.llm.lm_head
  return losses.chunked_token_cross_entropy(hidden[:, :-1], head.kernel[...], batch["input_ids"][:, 1:],
                                            chunk_size=chunk_size, dtype=head.dtype)


def option_losses(token_losses: np.ndarray, target_lengths: Sequence[int]) -> np.ndarray:
  """float64[K] mean CE over each option's last `target_lengths[k]` positions of token_losses float[K, T-1].

  The official score of an option: its rows are right-aligned, so an option's own tokens are the last ones.
  """
  token_losses = np.asarray(token_losses, np.float64)
  if token_losses.ndim != 2 or token_losses.shape[0] != len(target_lengths):
    raise ValueError(f"token_losses must be [K={len(target_lengths)}, T], got shape {token_losses.shape}")
  out = np.empty(len(target_lengths))
  for k, n in enumerate(target_lengths):
    if not 1 <= n <= token_losses.shape[1]:
      raise ValueError(f"option {k}: target length {n} outside 1..{token_losses.shape[1]}")
    out[k] = token_losses[k, -n:].mean()
  return out


class LikelihoodScorer:
  """Jitted option scoring for one model.

  Usage:
    scorer = LikelihoodScorer(generator)      # shares the generator's weights
    losses = scorer.option_losses(prompt_ids, [ids(" A"), ids(" B")], images, pad_id=eod)   # float64[K]
  """

  def __init__(self, generator: decode.Generator, *, dynamic_ntk: bool = True, logn: bool = True):
    self.generator = generator
    self.dynamic_ntk = dynamic_ntk
    self._losses = jax.jit(lambda g, s, b: token_losses(g, s, b, logn=logn), static_argnums=(0,))

  def token_losses(self, batch: decode.PromptBatch | dict) -> np.ndarray:
    """float32[B, P-1] per-token losses of a prompt batch (rows right-aligned, so a row's last positions are
    its final tokens)."""
    return np.asarray(self.token_losses_on_device(batch))

  def token_losses_on_device(self, batch: decode.PromptBatch | dict) -> jax.Array:
    """`token_losses` without the copy to the host; `batch` may be a dict of (global) arrays with `rope_base`."""
    g = self.generator
    if isinstance(batch, decode.PromptBatch):
      arrays = {"input_ids": batch.input_ids, "segment_ids": batch.segment_ids, "positions": batch.positions,
                "rope_base": decode.rope_bases(batch.lengths, g.cfg, self.dynamic_ntk)}
      if batch.images is not None:
        arrays["images"], arrays["image_mask"] = batch.images, batch.image_mask
    else:
      arrays = batch
    return self._losses(g.graphdef, g.state, arrays)

  def option_losses(self, prompt_ids: Sequence[int], option_ids: Sequence[Sequence[int]],
                    images: Sequence[np.ndarray] | None = None, *, pad_id: int,
                    num_rows: int | None = None) -> np.ndarray:
    """float64[K]: mean cross-entropy of each option's tokens after the prompt (the official score)."""
    rows = [list(prompt_ids) + list(o) for o in option_ids]
    cfg = self.generator.cfg
    batch = decode.make_prompt_batch(rows, [list(images)] * len(rows) if images else None, pad_id=pad_id,
                                     image_pad_id=cfg.image_pad_id, image_tokens=cfg.image_tokens,
                                     num_rows=num_rows)
    token_loss = self.token_losses(batch)[:len(rows)]
    return option_losses(token_loss, [len(o) for o in option_ids])
