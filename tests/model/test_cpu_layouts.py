"""The CPU formulations (issue 16) change the program, not the numbers.

`attention_impl="xla_rows"` (row-wise attention, softmax normalized after the value matmul) against "xla", with
a segment-causal mask that has padding; `layers.flat_matmul` (2-D matmuls) against the einsum for every spec the
model uses and its fallback; and the whole model with `cpu_layouts=True` + "xla_rows" against the default
program, loss and gradients. All float32; tolerances are float rounding of reordered sums.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qwenvl_jax.model import QwenVL, attention, get_preset, layers


def _segments():
  # Row 0: two packed segments and right padding; row 1: one segment.
  seg = np.array([[1, 1, 1, 2, 2, 2, 0, 0], [1] * 8], np.int32)
  slots = jnp.arange(8, dtype=jnp.int32)
  return jnp.asarray(seg), attention.segment_causal_mask(jnp.asarray(seg), jnp.asarray(seg), slots, slots)


@pytest.mark.parametrize("masked", [False, True])
def test_row_attention_equals_xla_in_value_and_gradient(masked):
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(2, 8, 3, 4)).astype(np.float32)) for _ in range(3))
  seg, mask = _segments()
  mask = mask if masked else None
  real = (seg[:, :, None, None] > 0) if masked else jnp.ones((2, 8, 1, 1), bool)

  def loss(impl):
    # Padding queries' outputs are never used (their values are implementation-defined): weighted out.
    return lambda q, k, v: jnp.sum(jnp.where(real, attention.dot_product_attention(
        q, k, v, mask=mask, scale=0.5, impl=impl), 0.0) * v)

  want = jax.value_and_grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
  got = jax.jit(jax.value_and_grad(loss("xla_rows"), argnums=(0, 1, 2)))(q, k, v)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  for a, b in zip(got[1], want[1]):
    assert float(jnp.abs(b).max()) > 1e-3
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("spec,x_shape,k_shape", [
    ("btd,df->btf", (2, 5, 6), (6, 7)),
    ("btd,dknh->btknh", (2, 5, 6), (6, 3, 2, 4)),
    ("btnh,nhd->btd", (2, 5, 3, 4), (3, 4, 6)),
    ("blw,wnkh->blnkh", (2, 5, 6), (6, 2, 3, 4)),
    ("btd,df->btf", (2, 5, 24), (24, 3)),  # K >= 4 N: the weight gradient as (g^T x)^T
])
def test_flat_matmul_equals_the_einsum(spec, x_shape, k_shape):
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=x_shape).astype(np.float32))
  w = jnp.asarray(rng.normal(size=k_shape).astype(np.float32))
  np.testing.assert_allclose(layers.flat_matmul(spec, x, w), jnp.einsum(spec, x, w), rtol=1e-5, atol=1e-6)
  gx, gw = jax.grad(lambda x, w: jnp.sum(layers.flat_matmul(spec, x, w) ** 2), argnums=(0, 1))(x, w)
  ex, ew = jax.grad(lambda x, w: jnp.sum(jnp.einsum(spec, x, w) ** 2), argnums=(0, 1))(x, w)
  np.testing.assert_allclose(gx, ex, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gw, ew, rtol=1e-5, atol=1e-5)


def test_flat_matmul_falls_back_to_the_einsum_for_other_specs():
  x = jnp.arange(24.0).reshape(2, 3, 4)
  w = jnp.arange(12.0).reshape(3, 4)
  # Contracting a non-trailing letter: no free reshape to 2-D.
  np.testing.assert_array_equal(layers.flat_matmul("btd,tf->bdf", x, w), jnp.einsum("btd,tf->bdf", x, w))


def _loss_and_grads(cfg, batch):
  model = QwenVL(cfg, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)

  def loss(state):
    logits = nnx.merge(graphdef, state)(batch["ids"], images=batch["images"], image_mask=batch["mask"],
                                        segment_ids=batch["seg"]).logits
    return jnp.mean(jnp.where(batch["seg"][:, :, None] > 0, logits, 0.0) ** 2)

  return model, jax.jit(jax.value_and_grad(loss))(state)


@pytest.mark.slow
def test_cpu_model_gives_the_default_loss_and_gradients():
  rng = np.random.default_rng(0)
  base = get_preset("tiny", dtype="float32", remat_policy="none").with_image_size(56)
  ids = rng.integers(0, 1000, (2, 24)).astype(np.int32)
  ids[:, :16] = base.image_pad_id
  seg = np.ones((2, 24), np.int32)
  seg[0, 20:] = 0  # right padding
  batch = dict(ids=ids, images=rng.integers(0, 256, (2, 1, 56, 56, 3)).astype(np.uint8),
               mask=np.ones((2, 1), bool), seg=seg)
  _, (loss_ref, grads_ref) = _loss_and_grads(base, batch)
  cpu = get_preset("tiny", dtype="float32", remat_policy="none", attention_impl="xla_rows",
                   cpu_layouts=True).with_image_size(56)
  model, (loss_cpu, grads_cpu) = _loss_and_grads(cpu, batch)
  einsums = [m for _, m in nnx.iter_graph(model) if isinstance(m, layers.Einsum)]
  assert einsums and all(m.flat for m in einsums)  # the scanned blocks' projections too
  np.testing.assert_allclose(loss_cpu, loss_ref, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(grads_cpu), jax.tree.leaves(grads_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("patch", [14, 7])  # patch rows of 42 bytes (moved as uint16 pairs) and of 21 (as bytes)
def test_cpu_patch_cut_equals_the_default_conv(patch):
  from qwenvl_jax.model.config import VisionConfig  # pylint: disable=import-outside-toplevel
  from qwenvl_jax.model.vit import VisionTransformer  # pylint: disable=import-outside-toplevel
  cfg = VisionConfig(width=8, layers=1, heads=2, mlp_dim=16, patch_size=patch, image_size=4 * patch)
  images = jnp.asarray(np.random.default_rng(2).integers(0, 256, (3, 4 * patch, 4 * patch, 3)).astype(np.uint8))
  out = {}
  for cpu in (False, True):
    vit = VisionTransformer(cfg, dtype=jnp.float32, cpu_layouts=cpu, rngs=nnx.Rngs(0))
    out[cpu] = jax.jit(vit.patchify)(images)
  assert out[True].shape == (3, 16, 8)
  # Each patch feature is one (p, q, c) sum: a wrong cut order (rows and columns swapped, bytes of a pair
  # swapped) changes it far beyond rounding.
  np.testing.assert_allclose(out[True], out[False], rtol=1e-5, atol=1e-5)


def test_with_cpu_formulations_sets_the_cpu_options_and_unrolls_only_shallow_stacks():
  tiny_cpu = get_preset("tiny").with_cpu_formulations()
  assert (tiny_cpu.attention_impl, tiny_cpu.cpu_layouts, tiny_cpu.scan_unroll) == ("xla_rows", True, True)
  small_cpu = get_preset("small", attention_impl="cudnn").with_cpu_formulations()
  # A kernel chosen on purpose is kept; `small`'s 12-layer stacks keep their scan.
  assert (small_cpu.attention_impl, small_cpu.cpu_layouts, small_cpu.scan_unroll) == ("cudnn", True, 1)
  assert get_preset("tiny").with_cpu_formulations().llm == get_preset("tiny").llm  # the same model
