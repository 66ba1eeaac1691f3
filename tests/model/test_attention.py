"""Attention core: mask semantics, splash (Pallas interpreter on CPU, AOT for a TPU topology) vs xla, cuDNN errors."""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from qwenvl_jax import sharding
from qwenvl_jax.model import attention, get_preset, kernels, tiny
from qwenvl_jax.model.config import LLMConfig
from qwenvl_jax.model.qwen import QwenLM
from tests.training import helpers

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _loop_mask(q_seg, k_seg, q_slots, k_slots):
  """The mask rule written out element by element: same non-zero segment and key slot <= query slot."""
  b, t = q_seg.shape
  s = k_seg.shape[1]
  out = np.zeros((b, 1, t, s), bool)
  for i in range(b):
    for x in range(t):
      for y in range(s):
        out[i, 0, x, y] = q_seg[i, x] == k_seg[i, y] and k_seg[i, y] != 0 and k_slots[y] <= q_slots[x]
  return out


def _packed(rows):
  """int32[B, T] segment ids from per-row lists of (segment id, length)."""
  return np.array([sum(([sid] * n for sid, n in row), []) for row in rows], np.int32)


SEGMENTS = _packed([[(1, 5), (2, 4), (0, 3)],  # two packed documents, right padding
                    [(0, 4), (1, 8)],  # left padding (prefill)
                    [(3, 3), (7, 2), (3, 7)]])  # ids out of order and reused


def test_segment_causal_mask_matches_the_rule_for_training_rows():
  t = SEGMENTS.shape[1]
  slots = np.arange(t, dtype=np.int32)
  got = attention.segment_causal_mask(jnp.asarray(SEGMENTS), jnp.asarray(SEGMENTS), jnp.asarray(slots),
                                      jnp.asarray(slots))
  np.testing.assert_array_equal(np.asarray(got), _loop_mask(SEGMENTS, SEGMENTS, slots, slots))
  # Padding sees nothing and is never seen; every real token sees itself.
  pad = SEGMENTS == 0
  assert not np.asarray(got)[:, 0][pad].any()
  assert not np.asarray(got)[:, 0].transpose(0, 2, 1)[pad].any()
  assert np.asarray(got)[:, 0][:, np.arange(t), np.arange(t)][~pad].all()


def test_segment_causal_mask_for_decoding_offsets_query_slots_and_skips_empty_cache_slots():
  cache = np.zeros((2, 10), np.int32)
  cache[0, :6] = 1
  cache[1, 2:6] = 1  # left-padded prompt
  q_seg = np.ones((2, 1), np.int32)
  q_slots = np.array([6], np.int32)
  k_slots = np.arange(10, dtype=np.int32)
  k_seg = cache.copy()
  k_seg[:, 6] = 1  # the new token is written before attending
  got = attention.segment_causal_mask(jnp.asarray(q_seg), jnp.asarray(k_seg), jnp.asarray(q_slots),
                                      jnp.asarray(k_slots))
  np.testing.assert_array_equal(np.asarray(got), _loop_mask(q_seg, k_seg, q_slots, k_slots))
  np.testing.assert_array_equal(np.asarray(got)[1, 0, 0], [0, 0, 1, 1, 1, 1, 1, 0, 0, 0])
  per_row = attention.segment_causal_mask(jnp.asarray(q_seg), jnp.asarray(k_seg),
                                          jnp.asarray(np.broadcast_to(q_slots, (2, 1))),
                                          jnp.asarray(np.broadcast_to(k_slots, (2, 10))))
  np.testing.assert_array_equal(np.asarray(per_row), np.asarray(got))


def test_segment_labels_rebuild_the_mask_on_every_row_that_sees_a_key():
  t = SEGMENTS.shape[1]
  slots = jnp.arange(t, dtype=jnp.int32)
  mask = np.asarray(attention.segment_causal_mask(jnp.asarray(SEGMENTS), jnp.asarray(SEGMENTS), slots, slots))
  labels = np.asarray(attention.segment_labels_from_mask(jnp.asarray(mask)))
  rebuilt = (labels[:, :, None] == labels[:, None, :]) & np.tril(np.ones((t, t), bool))
  real = SEGMENTS != 0
  np.testing.assert_array_equal(rebuilt[real], mask[:, 0][real])
  assert (labels[~real] == -1).all()
  # Padding queries see at least themselves, so no row of the kernel is empty.
  assert rebuilt[:, np.arange(t), np.arange(t)].all()


def _qkv(b, t, s, n, h, dtype=jnp.float32, seed=0):
  keys = jax.random.split(jax.random.key(seed), 3)
  return tuple(jax.random.normal(kk, (b, length, n, h), jnp.float32).astype(dtype)
               for kk, length in zip(keys, (t, s, s)))


def _attention_and_grads(impl, q, k, v, mask, scale, weight):
  def loss(q, k, v):
    out = attention.dot_product_attention(q, k, v, mask=mask, scale=scale, impl=impl)
    return jnp.sum(out.astype(jnp.float32) * weight), out
  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  return out, grads


def _segment_mask(segments):
  slots = jnp.arange(segments.shape[1], dtype=jnp.int32)
  return attention.segment_causal_mask(jnp.asarray(segments), jnp.asarray(segments), slots, slots)


def test_splash_matches_xla_for_packed_causal_rows_and_their_gradients():
  # T = 20 is padded to a 128 block and H = 16 to 128 inside the kernel wrapper; both must be exact.
  b, t, n, h = SEGMENTS.shape[0], SEGMENTS.shape[1], 2, 16
  q, k, v = _qkv(b, t, t, n, h)
  mask = _segment_mask(SEGMENTS)
  real = jnp.asarray(SEGMENTS != 0)[:, :, None, None]
  # The loss only reads real tokens, as the training loss does: padding outputs differ between impls.
  weight = jnp.where(real, jax.random.normal(jax.random.key(5), q.shape), 0.0)
  ref, ref_grads = _attention_and_grads("xla", q, k, v, mask, 0.25, weight)
  with kernels.interpret_mode():
    got, got_grads = _attention_and_grads("splash", q, k, v, mask, 0.25, weight)
  np.testing.assert_allclose(np.where(real, got, 0), np.where(real, ref, 0), atol=2e-6, rtol=0)
  assert np.isfinite(np.asarray(got)).all()
  for name, g, r in zip("qkv", got_grads, ref_grads):
    np.testing.assert_allclose(g, r, atol=1e-5, rtol=0, err_msg=f"d{name}")


def test_splash_without_mask_for_cross_attention_and_head_dim_104_is_as_accurate_as_xla_in_bf16():
  # The resampler's shape class (fewer queries than keys) and ViT-bigG's head dim, both padded inside.
  q, k, v = _qkv(2, 16, 40, 2, 104)
  weight = jax.random.normal(jax.random.key(6), q.shape)
  exact, exact_grads = _attention_and_grads("xla", q, k, v, None, 1.0, weight)
  bf16 = [x.astype(jnp.bfloat16) for x in (q, k, v)]
  ref, ref_grads = _attention_and_grads("xla", *bf16, None, 1.0, weight)
  with kernels.interpret_mode():
    got, got_grads = _attention_and_grads("splash", *bf16, None, 1.0, weight)
  assert got.dtype == jnp.bfloat16 and got.shape == q.shape
  # bf16 rounds probabilities and partial products at different points in the two paths, so each is compared
  # with the float32 result: splash may not be clearly worse than the xla path it replaces.
  err = lambda a, b: float(jnp.max(jnp.abs(a.astype(jnp.float32) - b)))
  assert err(got, exact) <= 1.5 * err(ref, exact) + 1e-3
  for name, g, r, e in zip("qkv", got_grads, ref_grads, exact_grads):
    assert err(g, e) <= 1.5 * err(r, e) + 1e-3, f"d{name}: splash {err(g, e)}, xla {err(r, e)}"


def test_inference_attention_over_query_blocks_equals_the_whole_square(monkeypatch):
  """A long prompt's xla attention at inference runs over blocks of `QUERY_BLOCK` queries (here 4 of a 12-token
  prompt of 3 packed / padded rows): the same values as the whole [B, N, T, S] scores, in the cache's heads-major
  layout and in the serving fill's, and lengths that are not a multiple of the block run whole."""
  monkeypatch.setattr(attention, "QUERY_BLOCK", 4)
  q, k, v = _qkv(3, 12, 12, 2, 16)
  slots = jnp.arange(12)
  seg = jnp.asarray(SEGMENTS)
  mask = attention.segment_causal_mask(seg, seg, slots, slots)
  whole = attention.dot_product_attention(q, k, v, mask=mask, scale=0.3)
  calls = []
  real = attention.dot_product_attention
  monkeypatch.setattr(attention, "dot_product_attention",
                      lambda q, *a, **kw: calls.append(q.shape[1]) or real(q, *a, **kw))
  filled = attention.prefill_attention(q, k, v, mask=mask, scale=0.3)
  cached = attention.cache_attention(q, k.swapaxes(1, 2), v.swapaxes(1, 2), mask=mask, scale=0.3)
  rows = seg != 0  # padding queries see no key: their outputs are never used
  np.testing.assert_allclose(np.asarray(filled)[rows], np.asarray(whole)[rows], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(cached)[rows], np.asarray(whole)[rows], rtol=1e-6, atol=1e-6)
  assert calls == [4]  # one traced block (lax.map), not the 12 queries at once
  # As compiled: one block's float32 scores, never the whole square.
  text = jax.jit(lambda q, k, v, m: attention.cache_attention(q, k, v, mask=m, scale=0.3)).lower(
      q, k.swapaxes(1, 2), v.swapaxes(1, 2), mask).compile().as_text()
  assert "f32[3,2,4,12]" in text and "f32[3,2,12,12]" not in text
  odd = attention.cache_attention(q[:, :10], k.swapaxes(1, 2), v.swapaxes(1, 2), mask=mask[:, :, :10], scale=0.3)
  np.testing.assert_allclose(np.asarray(odd)[rows[:, :10]], np.asarray(whole)[:, :10][rows[:, :10]], rtol=1e-6,
                             atol=1e-6)


def test_splash_with_a_cache_keeps_the_xla_path():
  q, k, v = _qkv(1, 2, 12, 2, 16)
  q_seg = jnp.ones((1, 2), jnp.int32)
  k_seg = jnp.asarray([[1] * 7 + [0] * 5], jnp.int32)
  mask = attention.segment_causal_mask(q_seg, k_seg, jnp.asarray([5, 6]), jnp.arange(12))
  ref = attention.dot_product_attention(q, k, v, mask=mask, scale=0.3, impl="xla")
  got = attention.dot_product_attention(q, k, v, mask=mask, scale=0.3, impl="splash")  # no interpreter needed
  np.testing.assert_array_equal(got, ref)


def test_splash_turns_a_mask_that_is_not_segment_causal_into_nan():
  # A bidirectional square mask cannot be expressed as causal + segments: a loud NaN, never another mask.
  q, k, v = _qkv(1, 8, 8, 1, 16)
  mask = jnp.ones((1, 1, 8, 8), bool)
  with kernels.interpret_mode():
    got = attention.dot_product_attention(q, k, v, mask=mask, scale=1.0, impl="splash")
  assert np.isnan(np.asarray(got)).all()


def test_splash_under_a_mesh_splits_batch_and_heads_and_matches_xla():
  mesh = sharding.make_mesh({"fsdp": 2, "tensor": 2}, devices=jax.devices()[:4])
  segments = SEGMENTS[:2]
  b, t, n, h = 2, segments.shape[1], 2, 16
  q, k, v = _qkv(b, t, t, n, h)
  mask = _segment_mask(segments)
  ref = attention.dot_product_attention(q, k, v, mask=mask, scale=0.5, impl="xla")
  spec = NamedSharding(mesh, PartitionSpec("fsdp", None, "tensor", None))
  with kernels.interpret_mode(), sharding.use_rules(mesh, sharding.load_rules("fsdp_tp")):
    fn = jax.jit(lambda q, k, v, m: attention.dot_product_attention(q, k, v, mask=m, scale=0.5, impl="splash"))
    lowered = fn.lower(*(jax.device_put(x, spec) for x in (q, k, v)), mask)
    got = lowered.compile()(*(jax.device_put(x, spec) for x in (q, k, v)), mask)
  assert "shard_map" in lowered.as_text() or "sdy.manual_computation" in lowered.as_text()
  real = (segments != 0)[:, :, None, None]
  np.testing.assert_allclose(np.where(real, got, 0), np.where(real, ref, 0), atol=2e-6, rtol=0)


def test_splash_decoder_logits_match_xla():
  llm = LLMConfig(vocab_size=64, width=32, layers=2, heads=2, head_dim=16, mlp_dim=48, seq_length=64)
  make = lambda impl: QwenLM(llm, dtype=jnp.float32, param_dtype=jnp.float32, remat_policy="full", impl=impl,
                             rngs=nnx.Rngs(0))
  ref_model, splash_model = make("xla"), make("splash")
  nnx.update(splash_model, nnx.state(ref_model))
  rows = SEGMENTS[:2]
  segments = jnp.asarray(rows)
  starts = np.argmax(rows[:, :, None] == rows[:, None, :], axis=-1)
  positions = jnp.asarray(np.arange(rows.shape[1])[None] - starts, jnp.int32)
  x = jax.random.normal(jax.random.key(1), rows.shape + (llm.width,))
  run = nnx.jit(lambda m, x: m(x, positions=positions, segment_ids=segments).logits)
  ref = run(ref_model, x)
  with kernels.interpret_mode():
    got = run(splash_model, x)
  real = rows != 0
  np.testing.assert_allclose(np.asarray(got)[real], np.asarray(ref)[real], atol=1e-5, rtol=0)


def test_splash_outside_tpu_and_interpreter_is_an_error():
  q, k, v = _qkv(1, 8, 8, 1, 16)
  with pytest.raises(ValueError, match="splash.*TPU kernel.*'cpu'"):
    attention.dot_product_attention(q, k, v, mask=None, scale=1.0, impl="splash")


def test_cudnn_on_cpu_is_an_error_naming_the_backend():
  q, k, v = _qkv(1, 8, 8, 2, 16, dtype=jnp.bfloat16)
  with pytest.raises(ValueError, match="cudnn.*NVIDIA GPU.*'cpu'"):
    attention.dot_product_attention(q, k, v, mask=None, scale=1.0, impl="cudnn")
  # Through the model: the config's choice reaches the decoder's attention calls.
  llm = LLMConfig(vocab_size=32, width=16, layers=1, heads=2, head_dim=8, mlp_dim=16)
  model = QwenLM(llm, impl="cudnn", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="cudnn.*NVIDIA GPU"):
    model(jnp.ones((1, 4, 16), jnp.bfloat16), positions=jnp.zeros((1, 4), jnp.int32),
          segment_ids=jnp.ones((1, 4), jnp.int32))


def test_the_kernels_own_checks_run_before_tracing_for_every_backend():
  """`kernels.check_attention_impl`, which the trainer's config check calls with the backend, the compute dtype
  and the model's head dims: a GPU run of cudnn with a float32 compute dtype or a 256-wide head is refused too."""
  for impl, platform in [("xla", "cpu"), ("xla_rows", "gpu"), ("cudnn", "gpu"), ("splash", "tpu")]:
    kernels.check_attention_impl(impl, platform, dtype=jnp.bfloat16, head_dims=(104, 128, 128))
  with pytest.raises(ValueError, match="cudnn.*bfloat16 or float16.*float32"):
    kernels.check_attention_impl("cudnn", "gpu", dtype="float32")
  with pytest.raises(ValueError, match="cudnn.*head dim <= 128.*256"):
    kernels.check_attention_impl("cudnn", "gpu", dtype=jnp.bfloat16, head_dims=(64, 256))
  with pytest.raises(ValueError, match="splash.*TPU kernel.*'gpu'"):
    kernels.check_attention_impl("splash", "gpu")
  # The presets' three attentions (ViT, adapter, LLM) all have heads cuDNN takes.
  assert get_preset("qwen_vl_7b").attention_head_dims == (104, 128, 128)
  assert get_preset("mid").attention_head_dims == (64, 128, 128)


def test_unknown_impls_are_rejected():
  q, k, v = _qkv(1, 4, 4, 1, 8)
  with pytest.raises(ValueError, match="unknown attention impl 'flash'"):
    attention.dot_product_attention(q, k, v, mask=None, scale=1.0, impl="flash")
  with pytest.raises(ValueError, match="unknown attention_impl 'flash'"):
    tiny(attention_impl="flash")
  assert dataclasses.replace(tiny(), attention_impl="splash").attention_impl == "splash"


def _libtpu_available():
  try:
    import libtpu  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    return False
  return True


@pytest.mark.slow
@pytest.mark.skipif(not _libtpu_available(), reason="libtpu is not installed (pip install -r requirements-tpu-aot.txt)")
def test_tiny_model_with_splash_compiles_for_a_tpu_topology():
  # In a child process: libtpu's topology devices must not leak into this process's 8 CPU devices.
  code = textwrap.dedent("""
      import json
      import jax, jax.numpy as jnp
      from flax import nnx
      from jax.sharding import NamedSharding, PartitionSpec as P
      from qwenvl_jax import sharding
      from qwenvl_jax.model import QwenVL, tiny
      from qwenvl_jax.hardware import chips
      from qwenvl_jax.planning import aot, mesh as mesh_lib

      topo = chips.parse_topology("v5p:2x2x1")
      mesh = mesh_lib.build_mesh(mesh_lib.topology_devices(topo), ici=(1, 2, 2))
      rules = sharding.load_rules("fsdp_tp")
      cfg = tiny(attention_impl="splash", remat_policy="full")
      graphdef, state = sharding.abstract_model(lambda: QwenVL(cfg, rngs=nnx.Rngs(0)))
      params = aot.abstract_like(nnx.to_pure_dict(state),
                                nnx.to_pure_dict(sharding.state_shardings(state, rules, mesh)))
      rows = NamedSharding(mesh, P(("data", "fsdp")))
      b, t, s = 4, 64, cfg.vision.image_size
      ids = jax.ShapeDtypeStruct((b, t), jnp.int32, sharding=rows)
      images = jax.ShapeDtypeStruct((b, 1, s, s, 3), jnp.uint8, sharding=rows)

      def step(state, ids, images):
        def loss(state):
          model = nnx.merge(graphdef, state)
          logits = model(ids, images=images, image_mask=jnp.ones((b, 1), bool), segment_ids=(ids > 2) + 0).logits
          return jnp.mean(jnp.square(logits.astype(jnp.float32)))
        return jax.grad(loss)(state)

      with sharding.use_rules(mesh, rules):
        compiled = jax.jit(step).lower(params, ids, images).compile()
      hlo = compiled.as_text()
      print(json.dumps({"custom_calls": hlo.count("tpu_custom_call"),
                        "temp": compiled.memory_analysis().temp_size_in_bytes}))
      """)
  env = helpers.subprocess_env()
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO_ROOT,
                        timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  # ViT, resampler and decoder each run the kernel forward and backward (fused dq/dk/dv): at least 6 kernels.
  assert result["custom_calls"] >= 6, result
  assert result["temp"] > 0
