"""Model FLOPs per train step: the 6N / 4N / 2N rule per tower, causal halving, ViT per image at the resolution."""
import pytest

from qwenvl_jax.model import qwen_vl_7b, tiny
from qwenvl_jax.training import flops, optimizer


def _trainable(stage, fix_vit=True):
  is_frozen = optimizer.make_is_frozen(optimizer.stage_frozen_patterns(stage, fix_vit=fix_vit))
  return lambda p: not is_frozen(p)


def _llm_forward(cfg, b, t):
  """Hand count: (weight matmuls: 2 FLOPs per weight per token, causal attention: half of QK^T and AV)."""
  l = cfg.llm
  hd = l.heads * l.head_dim
  weights = l.layers * (l.width * 3 * hd + hd * l.width + 3 * l.width * l.mlp_dim) + l.width * l.vocab_size
  attention = l.layers * 2 * 2 * t * t * hd / 2
  return b * 2 * t * weights, b * attention


def _vit_forward(cfg, images):
  v = cfg.vision
  p = v.num_patches
  per_layer = 2 * p * (4 * v.width ** 2 + 2 * v.width * v.mlp_dim) + 2 * 2 * p * p * v.width
  return images * (2 * p * v.patch_size ** 2 * 3 * v.width + v.layers * per_layer)


@pytest.mark.parametrize("cfg", [tiny(), qwen_vl_7b()], ids=["tiny", "qwen_vl_7b"])
def test_towers_follow_the_stage(cfg):
  b, t, m = 4, 512, 2
  (llm_matmul, llm_attn), vit_fwd = _llm_forward(cfg, b, t), _vit_forward(cfg, b * m)
  s1 = flops.train_step_flops(cfg, batch=b, seq_len=t, max_images=m, is_trainable=_trainable(1))
  s2 = flops.train_step_flops(cfg, batch=b, seq_len=t, max_images=m, is_trainable=_trainable(2))
  s3 = flops.train_step_flops(cfg, batch=b, seq_len=t, max_images=m, is_trainable=_trainable(3))
  # Stage 2 trains everything: 6N per token for the LLM (3x forward).
  assert s2.llm == pytest.approx(3 * (llm_matmul + llm_attn), rel=1e-9)
  # Stage 1: the frozen LLM runs forward and passes gradients back to the adapter: weight matmuls 2x (4N, no
  # weight gradients), the attention core still 3x (gradients w.r.t. q, k and v).
  assert s1.llm == pytest.approx(2 * llm_matmul + 3 * llm_attn, rel=1e-9)
  # Stage 3: the frozen ViT is behind a stop_gradient: forward only (2N), per image at the resolution.
  assert s3.vision == pytest.approx(vit_fwd, rel=1e-9)
  # A trained ViT: 3x forward except the patch embedding, whose input (pixels) needs no gradient.
  conv1 = 2 * b * m * cfg.vision.num_patches * cfg.vision.patch_size ** 2 * 3 * cfg.vision.width
  assert s2.vision == pytest.approx(3 * vit_fwd - conv1, rel=1e-9)
  assert s1.forward == s2.forward == s3.forward
  # Training more never costs less.
  assert s2.total > max(s1.total, s3.total)


def test_resolution_scales_vit_flops():
  cfg = qwen_vl_7b()
  kw = dict(batch=1, seq_len=2048, max_images=1, is_trainable=_trainable(2))
  low = flops.train_step_flops(cfg.with_image_size(224), **kw)
  high = flops.train_step_flops(cfg.with_image_size(448), **kw)
  assert low.llm == high.llm
  # 4x the patches: matmuls 4x, attention 16x.
  assert 4 < high.vision / low.vision < 16


def test_matches_the_six_n_rule_for_long_contexts_approximately():
  cfg = qwen_vl_7b()
  b, t = 8, 2048
  step = flops.train_step_flops(cfg, batch=b, seq_len=t, max_images=0, is_trainable=_trainable(2))
  n_llm = flops.count_matmul_params(cfg)["llm"]
  # Attention adds a few percent at 2048 tokens on top of 6 N D (MaxText's numbers are in the same ballpark).
  assert 1.0 < step.llm / (6 * n_llm * b * t) < 1.15
  # The 7B decoder: 32 blocks of 202M matmul weights + a 622M lm_head (the embedding table does no matmul).
  assert 7.0e9 < n_llm < 7.2e9


def test_bad_shape():
  with pytest.raises(ValueError, match="batch"):
    flops.train_step_flops(tiny(), batch=0, seq_len=8, max_images=1, is_trainable=lambda p: True)
