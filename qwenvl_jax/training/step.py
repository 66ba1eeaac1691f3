"""The pure train step: masked cross-entropy, gradient accumulation, gradients w.r.t. trainable parameters only.

Letters: B global rows, A accumulation steps (micro-batches), b = B / A rows per micro-batch, T tokens, V vocab.

The parameter tree is split by the stage labels into a trainable and a frozen flat dict; `jax.value_and_grad`
differentiates only the trainable one, so no weight gradient of a frozen parameter is ever computed, and a frozen
ViT is additionally cut with `stop_gradient` at its output (`stop_vision_grad`) so its backward pass never runs.
The loss is the mean of the float32 token cross-entropy over the supervised tokens of the whole global batch: the
step sums losses and counts over micro-batches and divides once, so accumulation does not change the result.

The step is a pure function (no I/O) and is jitted by the loop with explicit in/out shardings.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from qwenvl_jax import sharding
from qwenvl_jax.model import losses
from qwenvl_jax.training.optimizer import split_by_labels
from qwenvl_jax.tree_paths import unflatten

BATCH_KEYS = ("input_ids", "targets", "loss_mask", "segment_ids", "positions", "images", "image_mask")


class TrainState(NamedTuple):
  """Everything the step updates. `params` is the nested pure dict of the model state; `opt_state` the optax
  state of the stage optimizer (frozen parameters have none)."""

  step: jax.Array  # int32[]
  params: Any
  opt_state: Any


def _constrain_batch(batch: dict) -> dict:
  return {k: sharding.constrain(v, ("act_batch",) + (None,) * (v.ndim - 1)) for k, v in batch.items()}


def make_loss_fn(graphdef: nnx.GraphDef, *, stop_vision_grad: bool, loss_chunk: int = 0) -> Callable:
  """loss_sum(trainable_flat, frozen_flat, batch, dropout_key=None) -> (sum of token losses, number of supervised
  tokens). dropout_key: the LoRA dropout's key for this micro-batch (None: no dropout).

  loss_chunk: > 0 computes the loss from the final hidden states `loss_chunk` tokens at a time
  (`model.losses.chunked_cross_entropy_sum`: the [b, T, V] logits never exist); 0 builds the full logits.
  """

  def loss_sum(trainable: dict, frozen: dict, batch: dict, dropout_key: jax.Array | None = None):
    model = nnx.merge(graphdef, unflatten({**frozen, **trainable}, sep="/"))
    kw = dict(images=batch["images"], image_mask=batch["image_mask"], positions=batch["positions"],
              segment_ids=batch["segment_ids"], stop_vision_grad=stop_vision_grad, dropout_key=dropout_key)
    if loss_chunk > 0:
      hidden, _ = model.features(batch["input_ids"], **kw)
      head = model.llm.lm_head
      return losses.chunked_cross_entropy_sum(hidden, head.kernel[...], batch["targets"], batch["loss_mask"],
                                              chunk_size=loss_chunk, dtype=head.dtype)
    logits = model(batch["input_ids"], **kw).logits
    return losses.cross_entropy_sum(logits, batch["targets"], batch["loss_mask"])

  return loss_sum


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, labels: Any,
                    schedule: optax.Schedule, *, accum_steps: int = 1, stop_vision_grad: bool = False,
                    loss_chunk: int = 0, dropout_seed: int | None = None
                    ) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
  """The train step (state, batch) -> (new state, metrics), to be jitted by the caller.

  Args:
    graphdef: the model's NNX graph definition.
    tx: the stage optimizer (`optimizer.make_optimizer`).
    labels: its label tree ('trainable' | 'frozen' per parameter).
    schedule: its learning-rate schedule (for the metrics).
    accum_steps: A; the global batch is split into A micro-batches of B / A rows, scanned sequentially.
    stop_vision_grad: cut the backward pass at the ViT output (set when the ViT is frozen).
    loss_chunk: tokens per chunk of the chunked loss (`make_loss_fn`); 0 = full logits.
    dropout_seed: LoRA dropout on, with keys fold_in(key(seed), step) (per micro-batch: then fold_in(., i)), so a
      resumed run draws the same masks; None = no dropout.

  Returns:
    A function of (TrainState, batch dict of DESIGN §4 arrays with B rows). Metrics (float32 scalars): loss
    (mean over supervised tokens), grad_norm (trainable gradients, before clipping), lr (of this step),
    supervised_tokens, images (real images in the batch), finite (1 if loss, gradients and updates are finite).
  """
  if accum_steps < 1:
    raise ValueError(f"accum_steps must be >= 1, got {accum_steps}")
  grad_fn = jax.value_and_grad(make_loss_fn(graphdef, stop_vision_grad=stop_vision_grad, loss_chunk=loss_chunk),
                               has_aux=True)

  def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    missing = set(BATCH_KEYS) - set(batch)
    if missing:
      raise KeyError(f"batch lacks {sorted(missing)}; DESIGN §4 batches have {BATCH_KEYS}")
    batch = {k: batch[k] for k in BATCH_KEYS}
    rows = batch["input_ids"].shape[0]
    if rows % accum_steps:
      raise ValueError(f"global batch of {rows} rows is not divisible by accum_steps={accum_steps}")
    trainable, frozen = split_by_labels(state.params, labels)
    step_key = None if dropout_seed is None else jax.random.fold_in(jax.random.key(dropout_seed), state.step)

    if accum_steps == 1:
      (loss_sum, count), grads = grad_fn(trainable, frozen, _constrain_batch(batch), step_key)
    else:
      # Row r goes to micro-batch r % A, so each micro-batch is spread over all data-parallel devices (a
      # contiguous split would leave most devices idle in each micro-step).
      def micro(x):
        x = x.reshape((rows // accum_steps, accum_steps) + x.shape[1:])
        return jnp.moveaxis(x, 1, 0)

      micro_batches = {k: micro(v) for k, v in batch.items()}

      def body(carry, xs):
        loss_acc, count_acc, grad_acc = carry
        mb, i = xs
        key = None if step_key is None else jax.random.fold_in(step_key, i)
        (loss_mb, count_mb), g = grad_fn(trainable, frozen, _constrain_batch(mb), key)
        grad_acc = jax.tree.map(lambda a, b: a + b.astype(a.dtype), grad_acc, g)
        return (loss_acc + loss_mb, count_acc + count_mb, grad_acc), None

      zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), trainable)
      (loss_sum, count, grads), _ = jax.lax.scan(body, (jnp.float32(0), jnp.float32(0), zeros),
                                                 (micro_batches, jnp.arange(accum_steps)))
      grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, trainable)

    denom = jnp.maximum(count, 1.0)
    loss = loss_sum / denom
    grads = jax.tree.map(lambda g: g / denom.astype(g.dtype), grads)
    grad_norm = optax.tree.norm(grads)
    # Frozen leaves get placeholder zeros: `set_to_zero` ignores them and their updates are never applied, so XLA
    # removes them; the full tree is only there to match the label structure of `multi_transform`.
    full_grads = unflatten({**grads, **{k: jnp.zeros_like(v) for k, v in frozen.items()}}, sep="/")
    updates, opt_state = tx.update(full_grads, state.opt_state, state.params)
    trainable_updates, _ = split_by_labels(updates, labels)
    update_norm = optax.tree.norm(trainable_updates)
    new_trainable = optax.apply_updates(trainable, trainable_updates)
    params = unflatten({**frozen, **new_trainable}, sep="/")
    metrics = {
        "loss": loss,
        "grad_norm": grad_norm,
        "lr": jnp.asarray(schedule(state.step), jnp.float32),
        "supervised_tokens": count,
        "images": jnp.sum(batch["image_mask"]).astype(jnp.float32),
        # A finite loss with non-finite updates (e.g. a NaN learning rate) would poison the next checkpoint.
        "finite": (jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(update_norm)).astype(jnp.float32),
    }
    return TrainState(state.step + 1, params, opt_state), metrics

  return train_step
