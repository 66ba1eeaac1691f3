"""The Qwen decoder against transformers' Qwen2ForCausalLM (same math, different names), plus cache and packing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from qwenvl_jax.model import LLMConfig, QwenLM, attention
from tests.model import torch_reference

CFG = LLMConfig(vocab_size=96, width=32, layers=2, heads=4, head_dim=8, mlp_dim=48, seq_length=64)


def _models(seed=0):
  sd = torch_reference.random_qwen_state_dict(CFG.vocab_size, CFG.width, CFG.layers, CFG.heads, CFG.mlp_dim, seed)
  ref = torch_reference.qwen2_from_qwen_weights(sd, CFG.vocab_size, CFG.width, CFG.layers, CFG.heads, CFG.mlp_dim)
  ours = QwenLM(CFG, dtype=jnp.float32, param_dtype=jnp.float32, remat_policy="none", rngs=nnx.Rngs(0))
  torch_reference.load_into(ours, torch_reference.qwen_weights_to_jax(sd, CFG.layers, CFG.heads))
  return ours, ref


@nnx.jit
def _forward(model, ids, positions, segment_ids, cache, cache_index):
  return model(model.embed(ids), positions=positions, segment_ids=segment_ids, cache=cache, cache_index=cache_index)


def _run(model, ids, positions=None, segment_ids=None, cache=None, cache_index=None):
  b, t = ids.shape
  positions = jnp.broadcast_to(jnp.arange(t), (b, t)) if positions is None else positions
  segment_ids = jnp.ones((b, t), jnp.int32) if segment_ids is None else segment_ids
  return _forward(model, jnp.asarray(ids), positions, segment_ids, cache, cache_index)


@pytest.mark.parity
def test_logits_match_qwen2_for_causal_lm():
  ours, ref = _models()
  ids = np.random.default_rng(0).integers(0, CFG.vocab_size, size=(2, 19))
  logits, _ = _run(ours, ids)
  with torch.no_grad():
    expected = ref(torch.from_numpy(ids)).logits.numpy()
  # float32 on both sides; differences are accumulation order only.
  np.testing.assert_allclose(np.asarray(logits), expected, rtol=2e-4, atol=2e-4)


@pytest.mark.parity
def test_right_padding_matches_attention_mask():
  ours, ref = _models(seed=1)
  ids = np.random.default_rng(1).integers(0, CFG.vocab_size, size=(2, 12))
  seg = np.ones((2, 12), np.int32)
  seg[1, 7:] = 0  # row 1 is right-padded after 7 tokens
  logits, _ = _run(ours, ids, segment_ids=jnp.asarray(seg))
  with torch.no_grad():
    expected = ref(torch.from_numpy(ids), attention_mask=torch.from_numpy(seg)).logits.numpy()
  np.testing.assert_allclose(np.asarray(logits)[0], expected[0], rtol=2e-4, atol=2e-4)
  np.testing.assert_allclose(np.asarray(logits)[1, :7], expected[1, :7], rtol=2e-4, atol=2e-4)


def test_packed_segments_do_not_see_each_other():
  ours, _ = _models()
  rng = np.random.default_rng(2)
  a, b = rng.integers(0, CFG.vocab_size, size=7), rng.integers(0, CFG.vocab_size, size=5)
  packed = np.concatenate([a, b, [0, 0]])[None]
  seg = np.array([[1] * 7 + [2] * 5 + [0, 0]])
  pos = np.array([list(range(7)) + list(range(5)) + [0, 0]])
  out, _ = _run(ours, packed, segment_ids=jnp.asarray(seg), positions=jnp.asarray(pos))
  alone_a, _ = _run(ours, a[None])
  alone_b, _ = _run(ours, b[None])
  np.testing.assert_allclose(np.asarray(out)[0, :7], np.asarray(alone_a)[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(out)[0, 7:12], np.asarray(alone_b)[0], rtol=1e-5, atol=1e-5)


def test_cached_decoding_equals_full_forward():
  ours, _ = _models()
  ids = np.random.default_rng(3).integers(0, CFG.vocab_size, size=(2, 10))
  full, _ = _run(ours, ids)
  cache = ours.init_cache(2, 16)
  prefill, cache = _run(ours, ids[:, :6], cache=cache, cache_index=0)
  steps = [prefill]
  for t in range(6, 10):
    pos = jnp.full((2, 1), t)
    step, cache = _run(ours, ids[:, t:t + 1], cache=cache, cache_index=t, positions=pos)
    steps.append(step)
  np.testing.assert_allclose(np.concatenate([np.asarray(s) for s in steps], axis=1), np.asarray(full),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [None, jnp.int8])
def test_a_prompt_fill_writes_the_rows_it_names_as_a_cached_prefill_does(dtype, monkeypatch):
  """`features(rows=...)` (the serving prefill): prompts right-padded, written straight into cache rows 3 and 0 of
  a 4-row cache whose row 0 held another request; a third prompt goes to row 4 (past the cache: padding, dropped).
  Logits, the written keys and values and the segment ids are those of a prefill into a cache of its own (the
  path it replaced), the untouched rows stay as they were, and decoding after it equals the full forward. The
  8-token prompts attend in blocks of 4 queries (`attention.QUERY_BLOCK`, 512 outside this test)."""
  monkeypatch.setattr(attention, "QUERY_BLOCK", 4)
  ours, _ = _models()
  rng = np.random.default_rng(4)
  ids = rng.integers(0, CFG.vocab_size, size=(3, 8))
  lengths = np.array([8, 5, 3])
  seg = (np.arange(8)[None] < lengths[:, None]).astype(np.int32)
  pos = np.where(seg, np.arange(8)[None], 0)
  rows = jnp.asarray([3, 0, 4], jnp.int32)
  big = ours.init_cache(4, 16, dtype=dtype)
  # Row 0's previous request: slots 0 .. 11 hold keys (segment 1); row 1 another request that stays.
  _, big = _run(ours, rng.integers(0, CFG.vocab_size, size=(4, 12)), cache=big, cache_index=0)
  before = jax.tree.map(np.asarray, big)

  @nnx.jit
  def fill(model, cache):
    x = model.embed(jnp.asarray(ids))
    h, cache = model.features(x, positions=jnp.asarray(pos), segment_ids=jnp.asarray(seg), cache=cache,
                              cache_index=0, rows=rows)
    return model.lm_head(h), cache

  logits, filled = fill(ours, big)
  own, own_cache = _run(ours, ids, positions=jnp.asarray(pos), segment_ids=jnp.asarray(seg),
                        cache=ours.init_cache(3, 8, dtype=dtype), cache_index=0)
  real = seg.astype(bool)
  # int8: the attention of the fill and of a cached prefill round alike to ~1e-7, which can move a later layer's
  # key by one int8 step (seen: one step, logits 7e-3 apart); float32: rounding only.
  exact = dtype is None
  np.testing.assert_allclose(np.asarray(logits)[real], np.asarray(own)[real], rtol=1e-5, atol=1e-5 if exact else 0.03)
  fields = [f for f in ("k", "v", "k_scale", "v_scale") if getattr(filled, f) is not None]
  for name in fields:
    got, want, old = (np.asarray(getattr(c, name)).astype(np.float32) for c in (filled, own_cache, before))
    for prompt, row in ((0, 3), (1, 0)):
      n = lengths[prompt]
      np.testing.assert_allclose(got[:, row, :, :n], want[:, prompt, :, :n], rtol=1e-6 if exact else 0.02,
                                 atol=1e-6 if exact or name.endswith("scale") else 1)
    np.testing.assert_array_equal(got[:, 1:3], old[:, 1:3])  # rows no prompt went to
  segments = np.asarray(filled.segment_ids)
  np.testing.assert_array_equal(segments[3], np.pad(seg[0], (0, 8)))
  np.testing.assert_array_equal(segments[0], np.pad(seg[1], (0, 8)))  # the earlier request's slots: empty
  np.testing.assert_array_equal(segments[1:3], before.segment_ids[1:3])
  # Decoding row 3 (the 8-token prompt) and row 0 (5 tokens) continues as the full forward of each prompt would.
  nxt = rng.integers(0, CFG.vocab_size, size=(4, 1))
  step, _ = _run(ours, nxt, positions=jnp.asarray([[5], [0], [0], [8]]), segment_ids=jnp.ones((4, 1), jnp.int32),
                 cache=filled, cache_index=jnp.asarray([5, 0, 0, 8], jnp.int32))
  for prompt, row in ((0, 3), (1, 0)):
    whole = np.concatenate([ids[prompt, :lengths[prompt]], nxt[row]])[None]
    full, _ = _run(ours, whole)
    atol = 1e-5 if dtype is None else 0.05  # int8 keys and values: the quantization's error
    np.testing.assert_allclose(np.asarray(step)[row, 0], np.asarray(full)[0, -1], rtol=1e-4, atol=atol)


def test_bf16_divisor_is_rounded_like_the_reference():
  # Gotcha 14: torch.full([], sqrt(128), dtype=bf16) == 11.3125.
  from qwenvl_jax.model.qwen import SelfAttention
  cfg = LLMConfig(vocab_size=8, width=256, layers=1, heads=2, head_dim=128, mlp_dim=8)
  attn = SelfAttention(cfg, dtype=jnp.bfloat16, param_dtype=jnp.float32, impl="xla", rngs=nnx.Rngs(0))
  assert attn.scale == pytest.approx(1 / 11.3125)
  attn32 = SelfAttention(cfg, dtype=jnp.float32, param_dtype=jnp.float32, impl="xla", rngs=nnx.Rngs(0))
  assert attn32.scale == pytest.approx(1 / np.sqrt(128))
