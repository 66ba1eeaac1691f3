"""`scan_unroll`: unrolling the layer scans changes the program, not the numbers; the `small` preset's size."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qwenvl_jax import sharding
from qwenvl_jax.model import QwenVL, get_preset


def _loss_and_grads(cfg, batch):
  model = QwenVL(cfg, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)

  def loss(state):
    logits = nnx.merge(graphdef, state)(batch["ids"], images=batch["images"], image_mask=batch["mask"]).logits
    return jnp.mean(logits ** 2)

  return jax.jit(jax.value_and_grad(loss))(state)


@pytest.mark.slow
def test_unrolled_layers_give_the_scanned_loss_and_gradients():
  rng = np.random.default_rng(0)
  # 56 px (16 patches) and 24 tokens keep the two compiles short.
  base = get_preset("tiny", dtype="float32", remat_policy="none").with_image_size(56)
  ids = rng.integers(0, 1000, (2, 24)).astype(np.int32)
  ids[:, :16] = base.image_pad_id
  batch = dict(ids=ids, images=rng.integers(0, 256, (2, 1, 56, 56, 3)).astype(np.uint8),
               mask=np.ones((2, 1), bool))
  loss_scan, grads_scan = _loss_and_grads(base, batch)
  unrolled = get_preset("tiny", dtype="float32", remat_policy="none", scan_unroll=True).with_image_size(56)
  loss_unroll, grads_unroll = _loss_and_grads(unrolled, batch)
  # float32, same parameters and math in another program order: equal to rounding.
  np.testing.assert_allclose(loss_unroll, loss_scan, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(grads_unroll), jax.tree.leaves(grads_scan)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def test_small_preset_has_about_110m_parameters():
  cfg = get_preset("small")
  _, state = sharding.abstract_model(lambda: QwenVL(cfg, rngs=nnx.Rngs(0)))
  assert sharding.count_params(state) == 111_886_080
  assert cfg.image_tokens == 64 and cfg.llm.vocab_size == 8192
