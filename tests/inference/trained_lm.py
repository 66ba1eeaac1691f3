"""A tiny text-only Qwen-VL trained in a few seconds on a peaked Markov chain, for tests that need logits with real
margins (quantization agreement): at random init every logit is near zero and greedy tokens are a coin toss.

The chain: 256 states (token ids 8..263); from each state one successor has probability 0.85, the rest is spread
over three others. After training the model's greedy continuation follows the likely successors, with a margin
that int8 rounding should not flip and int4 sometimes may.
"""
from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from qwenvl_jax.model import QwenVL, tiny

STATES, OFFSET = 256, 8


def chain(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """(successors int[STATES, 4], probabilities float[4]) of the Markov chain."""
  rng = np.random.default_rng(seed)
  succ = np.stack([rng.permutation(STATES)[:4] for _ in range(STATES)])
  return succ, np.array([0.85, 0.05, 0.05, 0.05])


def sample(n: int, length: int, seed: int) -> np.ndarray:
  """int32[n, length] token sequences of the chain."""
  succ, p = chain()
  rng = np.random.default_rng(seed)
  out = np.zeros((n, length), np.int64)
  out[:, 0] = rng.integers(0, STATES, n)
  for t in range(1, length):
    pick = rng.choice(4, size=n, p=p)
    out[:, t] = succ[out[:, t - 1], pick]
  return (out + OFFSET).astype(np.int32)


def train_tiny_lm(steps: int = 150, *, batch: int = 16, length: int = 32, seed: int = 0) -> QwenVL:
  """A float32 tiny QwenVL trained with Adam on `sample` sequences (next-token cross-entropy)."""
  model = QwenVL(tiny(dtype="float32", param_dtype="float32", remat_policy="none"), rngs=nnx.Rngs(seed))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = optax.adam(3e-3)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, tokens):
    def loss_fn(p):
      logits = nnx.merge(graphdef, p, rest)(tokens[:, :-1]).logits.astype(jnp.float32)
      return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  data = sample(steps * batch, length, seed + 1)
  for i in range(steps):
    params, opt_state, _ = step(params, opt_state, jnp.asarray(data[i * batch:(i + 1) * batch]))
  return nnx.merge(graphdef, params, rest)
