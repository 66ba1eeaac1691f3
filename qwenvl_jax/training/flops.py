"""Analytic model FLOPs of one train step, for MFU (MaxText accounting) and the planner.

Letters: B rows, M image slots per row, T tokens, P patches per image (grid**2 at the configured resolution),
W / Fv / Lv ViT width / MLP width / depth, Q resampler queries, D / F / L / N·H / V LLM width / MLP width / depth /
attention width / vocabulary.

Only matmul FLOPs count (2 per multiply-add); norms, softmax, RoPE and the embedding lookup are ignored, and
rematerialization is not counted (model FLOPs, not hardware FLOPs). Every one of the B·M image slots is computed
by the model (a fixed-shape batch), so all of them count. Attention scores and values are 2·2·T²·N·H per row
and layer forward, halved for causal attention (MaxText since PR #1988); the ViT and resampler attention is full.

Each matmul term is charged 1x its forward FLOPs, +1x for the weight gradient if its weight trains, +1x for the
gradient w.r.t. its input if anything upstream of it trains. So a fully trained part costs 6·N per token (the
usual rule), a frozen tower nothing trains behind (the stage-3 ViT, cut by stop_gradient) costs 2·N, and a
frozen tower that gradients still cross on their way to trainable weights (the stage-1 LLM, between the loss and
the adapter) costs 4·N: forward plus input gradients, no weight gradients. Layers of a scanned stack share one
parameter path, so a stack counts as trainable or frozen as a whole (and a trained stack's first layer is charged
the input gradient of the later ones, a 1/L overestimate when nothing before the stack trains).

`train_step_flops` is a pure function of (QwenVLConfig, batch shape, trainable predicate), so the planner can
reuse it for any topology.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from qwenvl_jax.model.config import QwenVLConfig


@dataclasses.dataclass(frozen=True)
class _Term:
  name: str  # a representative parameter path (decides trainability), or '' for weightless attention cores
  forward: float  # forward FLOPs of the whole batch
  owner: str  # the parameter path whose trainability makes a weightless term's input gradient necessary


@dataclasses.dataclass(frozen=True)
class StepFlops:
  """FLOPs of one train step (whole global batch), split by tower, and the forward-only total."""

  vision: float
  adapter: float
  llm: float
  forward: float

  @property
  def total(self) -> float:
    return self.vision + self.adapter + self.llm


def _terms(cfg: QwenVLConfig, batch: int, seq_len: int, max_images: int) -> list[tuple[str, _Term]]:
  """(tower, term) in data-flow order (input to loss)."""
  v, r, l = cfg.vision, cfg.resampler, cfg.llm
  images = batch * max_images
  p, w, q, d = v.num_patches, v.width, r.num_queries, l.width
  tokens = batch * seq_len
  attn_width = l.heads * l.head_dim
  terms = [
      ("vision", _Term("visual/conv1", 2 * images * p * v.patch_size ** 2 * 3 * w, "")),
      ("vision", _Term("visual/blocks/attn/qkv/kernel", v.layers * 2 * images * p * w * 3 * w, "")),
      ("vision", _Term("", v.layers * 2 * 2 * images * p * p * w, "visual/blocks/attn/qkv/kernel")),
      ("vision", _Term("visual/blocks/attn/out/kernel", v.layers * 2 * images * p * w * w, "")),
      ("vision", _Term("visual/blocks/mlp/fc/kernel", v.layers * 2 * images * p * w * v.mlp_dim, "")),
      ("vision", _Term("visual/blocks/mlp/proj/kernel", v.layers * 2 * images * p * v.mlp_dim * w, "")),
      ("adapter", _Term("adapter/resampler/kv_proj/kernel", 2 * images * p * w * d, "")),
      # The queries do not depend on the image, but the model projects them once per image (broadcast batch).
      ("adapter", _Term("adapter/resampler/attn/q/kernel", 2 * images * q * d * d, "")),
      ("adapter", _Term("adapter/resampler/attn/k/kernel", 2 * images * p * d * d, "")),
      ("adapter", _Term("adapter/resampler/attn/v/kernel", 2 * images * p * d * d, "")),
      ("adapter", _Term("", 2 * 2 * images * q * p * d, "adapter/resampler/attn/q/kernel")),
      ("adapter", _Term("adapter/resampler/attn/out/kernel", 2 * images * q * d * d, "")),
      ("adapter", _Term("adapter/proj", 2 * images * q * d * d, "")),
      ("llm", _Term("llm/blocks/attn/qkv/kernel", l.layers * 2 * tokens * d * 3 * attn_width, "")),
      # Causal: half of the T x T score and value matmuls (MaxText accounting).
      ("llm", _Term("", l.layers * 2 * 2 * batch * seq_len * seq_len * attn_width / 2,
                    "llm/blocks/attn/qkv/kernel")),
      ("llm", _Term("llm/blocks/attn/out/kernel", l.layers * 2 * tokens * attn_width * d, "")),
      ("llm", _Term("llm/blocks/mlp/w1/kernel", l.layers * 2 * tokens * d * l.mlp_dim * 2, "")),
      ("llm", _Term("llm/blocks/mlp/c_proj/kernel", l.layers * 2 * tokens * l.mlp_dim * d, "")),
      ("llm", _Term("llm/lm_head/kernel", 2 * tokens * d * l.vocab_size, "")),
  ]
  return terms


# Parameters before the first matmul of each tower in data-flow order: they make later input gradients necessary
# even though they are not matmul weights themselves.
_LEADING_PARAMS = {
    "visual/blocks/attn/qkv/kernel": ("visual/positional_embedding", "visual/ln_pre/scale",
                                      "visual/blocks/ln_1/scale"),
    "adapter/resampler/attn/q/kernel": ("adapter/resampler/query", "adapter/resampler/pos_embed",
                                        "adapter/resampler/ln_q/scale", "adapter/resampler/ln_kv/scale"),
    "adapter/proj": ("adapter/ln_post/scale",),
    "llm/blocks/attn/qkv/kernel": ("llm/wte/embedding", "llm/blocks/ln_1/scale"),
    "llm/lm_head/kernel": ("llm/ln_f/scale",),
}


def train_step_flops(cfg: QwenVLConfig, *, batch: int, seq_len: int, max_images: int,
                     is_trainable: Callable[[str], bool]) -> StepFlops:
  """Model FLOPs of one train step over a global batch.

  Args:
    cfg: the model config (resolution included: P = cfg.vision.num_patches).
    batch: B, global rows per step (all micro-batches together).
    seq_len: T.
    max_images: M image slots per row (all computed, real or not).
    is_trainable: path -> whether that parameter trains (e.g. `lambda p: not is_frozen(p)`).

  Returns:
    StepFlops by tower, with the forward-only total for reference.
  """
  if min(batch, seq_len) < 1 or max_images < 0:
    raise ValueError(f"need batch, seq_len >= 1 and max_images >= 0, got {batch}, {seq_len}, {max_images}")
  totals = {"vision": 0.0, "adapter": 0.0, "llm": 0.0}
  forward = 0.0
  upstream_trains = False
  for tower, term in _terms(cfg, batch, seq_len, max_images):
    if term.name:
      leading = any(is_trainable(p) for p in _LEADING_PARAMS.get(term.name, ()))
      upstream_trains = upstream_trains or leading
      own = is_trainable(term.name)
      # In a scanned stack every layer but the first has its own stack's weights upstream.
      stacked = "/blocks/" in term.name and own
      factor = 1 + int(own) + int(upstream_trains or stacked)
      upstream_trains = upstream_trains or own
    else:
      # A weightless attention core needs its backward (2x: scores and values) iff its projections or anything
      # before them train.
      factor = 1 + 2 * int(upstream_trains or is_trainable(term.owner))
    totals[tower] += factor * term.forward
    forward += term.forward
  return StepFlops(vision=totals["vision"], adapter=totals["adapter"], llm=totals["llm"], forward=forward)


def count_matmul_params(cfg: QwenVLConfig) -> dict[str, int]:
  """Matmul weights per tower (what the 6·N rule multiplies), for cross-checking the terms above."""
  v, r, l = cfg.vision, cfg.resampler, cfg.llm
  w, d, attn_width = v.width, l.width, l.heads * l.head_dim
  return {
      "vision": v.patch_size ** 2 * 3 * w + v.layers * (3 * w * w + w * w + 2 * w * v.mlp_dim),
      "adapter": w * d + 4 * d * d + d * d,
      "llm": l.layers * (3 * d * attn_width + attn_width * d + 3 * d * l.mlp_dim) + d * l.vocab_size,
  }
