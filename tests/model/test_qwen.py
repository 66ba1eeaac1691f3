"""The Qwen decoder against transformers' Qwen2ForCausalLM (same math, different names), plus cache and packing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from qwenvl_jax.model import LLMConfig, QwenLM
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


def test_bf16_divisor_is_rounded_like_the_reference():
  # Gotcha 14: torch.full([], sqrt(128), dtype=bf16) == 11.3125.
  from qwenvl_jax.model.qwen import SelfAttention
  cfg = LLMConfig(vocab_size=8, width=256, layers=1, heads=2, head_dim=128, mlp_dim=8)
  attn = SelfAttention(cfg, dtype=jnp.bfloat16, param_dtype=jnp.float32, impl="xla", rngs=nnx.Rngs(0))
  assert attn.scale == pytest.approx(1 / 11.3125)
  attn32 = SelfAttention(cfg, dtype=jnp.float32, param_dtype=jnp.float32, impl="xla", rngs=nnx.Rngs(0))
  assert attn32.scale == pytest.approx(1 / np.sqrt(128))
