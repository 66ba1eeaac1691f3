"""Token cross-entropy of the model's logits, shared by training (the loss) and inference (likelihood scoring).

Letters: B rows, T tokens, V vocabulary.

Logits are upcast to float32 before the log-softmax (bf16 logits would lose the small differences between the
options of a multiple-choice question, and the training loss is reported in float32); the cross-entropy itself is
`optax.losses.softmax_cross_entropy_with_integer_labels` (logsumexp minus the target logit).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def token_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Per-token cross-entropy float32[B, T] of logits float[B, T, V] (any float dtype) against targets int[B, T].

  Pure and jit-able; `targets` must lie in [0, V).
  """
  return optax.losses.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                                targets.astype(jnp.int32))


def cross_entropy_sum(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Masked token cross-entropy in float32, as a sum and a count (so micro-batches add up exactly).

  Args:
    logits: float[B, T, V] (any float dtype; upcast before the log-softmax).
    targets: int32[B, T], already shifted by the pipeline.
    loss_mask: float32[B, T], 1 where the target is supervised.

  Returns:
    (sum of masked losses float32[], number of supervised tokens float32[]).
  """
  mask = loss_mask.astype(jnp.float32)
  return jnp.sum(token_cross_entropy(logits, targets) * mask), jnp.sum(mask)
