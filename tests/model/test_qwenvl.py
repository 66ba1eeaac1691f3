"""The composition: image features land in the `<imgpad>` slots in order, per row, for any number of images."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwenvl_jax.model import KVCache, ModelOutput, QwenVL, tiny

CFG = tiny(dtype="float32", remat_policy="none")
Q = CFG.image_tokens
PAD = CFG.image_pad_id
IMG_START, IMG_END = 5, 6


def _span():
  return [IMG_START] + [PAD] * Q + [IMG_END]


def _rows():
  # Row 0: text, image, text, image. Row 1: one image; its second slot is empty (image_mask False).
  row0 = [7, 8] + _span() + [9] + _span() + [10]
  row1 = [11] + _span() + [12, 13]
  t = max(len(row0), len(row1))
  ids = np.zeros((2, t), np.int32)
  ids[0, :len(row0)] = row0
  ids[1, :len(row1)] = row1
  return ids


@nnx.jit
def _embed(model, ids, images, mask):
  return model.embed(ids, images, mask), model.encode_images(images), model.llm.embed(ids)


@nnx.jit
def _logits(model, ids, images, mask):
  return model(ids, images=images, image_mask=mask).logits


def test_image_features_fill_imgpad_slots_in_order():
  model = QwenVL(CFG, rngs=nnx.Rngs(0))
  ids = _rows()
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, size=(2, 2, 224, 224, 3), dtype=np.uint8)
  mask = np.array([[True, True], [True, False]])
  x, feats, text = map(np.asarray, _embed(model, jnp.asarray(ids), jnp.asarray(images), jnp.asarray(mask)))
  assert not np.allclose(feats[0, 0], feats[0, 1])  # distinct images give distinct features
  pads0 = np.flatnonzero(ids[0] == PAD)
  np.testing.assert_allclose(x[0, pads0[:Q]], feats[0, 0], rtol=1e-6)
  np.testing.assert_allclose(x[0, pads0[Q:]], feats[0, 1], rtol=1e-6)
  pads1 = np.flatnonzero(ids[1] == PAD)
  np.testing.assert_allclose(x[1, pads1], feats[1, 0], rtol=1e-6)
  others = ids != PAD
  np.testing.assert_allclose(x[others], text[others], rtol=1e-6)  # `<img>`, `</img>` keep their embeddings


def test_empty_image_slot_does_not_influence_logits():
  model = QwenVL(CFG, rngs=nnx.Rngs(1))
  ids = jnp.asarray(_rows())
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, size=(2, 2, 224, 224, 3), dtype=np.uint8)
  mask = jnp.asarray([[True, True], [True, False]])
  a = _logits(model, ids, jnp.asarray(images), mask)
  images[1, 1] = 255 - images[1, 1]  # change only the unused slot of row 1
  b = _logits(model, ids, jnp.asarray(images), mask)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  images[1, 0] = 255 - images[1, 0]  # the used slot does matter
  c = _logits(model, ids, jnp.asarray(images), mask)
  assert not np.allclose(np.asarray(a)[1], np.asarray(c)[1])


def test_call_returns_one_type_with_or_without_a_cache():
  model = QwenVL(CFG, rngs=nnx.Rngs(3))
  ids = jnp.asarray([[7, 8, 9]], jnp.int32)
  plain = model(ids)
  assert isinstance(plain, ModelOutput) and plain.cache is None and plain.logits.shape == (1, 3, CFG.llm.vocab_size)
  cached = model(ids, cache=model.llm.init_cache(1, 8), cache_index=0)
  assert isinstance(cached, ModelOutput) and isinstance(cached.cache, KVCache)
  np.testing.assert_allclose(np.asarray(cached.logits), np.asarray(plain.logits), rtol=1e-5, atol=1e-5)


def test_stop_vision_grad_cuts_the_vit_backward():
  model = QwenVL(CFG, rngs=nnx.Rngs(2))
  ids = jnp.asarray(_rows())
  images = jnp.asarray(np.random.default_rng(2).integers(0, 256, size=(2, 2, 224, 224, 3), dtype=np.uint8))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(params, stop):
    m = nnx.merge(graphdef, params, rest)
    return m(ids, images=images, stop_vision_grad=stop).logits.astype(jnp.float32).mean()

  grads = jax.jit(jax.grad(loss), static_argnums=1)
  g_free, g_stop = grads(params, False), grads(params, True)
  vit_norm = lambda g: sum(float(jnp.abs(x).sum()) for x in jax.tree.leaves(g["visual"]))
  assert vit_norm(g_free) > 0 and vit_norm(g_stop) == 0
  assert sum(float(jnp.abs(x).sum()) for x in jax.tree.leaves(g_stop["adapter"])) > 0
