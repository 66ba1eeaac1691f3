"""Fixtures of the checkpoint tests: tiny checkpoints in the exact reference naming, written by torch itself.

The tensor lists here are written from QWENVL_SPEC §5.1 (Qwen-VL / Qwen-7B Hugging Face names) and from the
OpenCLIP state-dict layout, independently of `qwenvl_jax.checkpoint.mapping`, so a wrong table fails the tests.
"""
import json
import pathlib

import pytest
import torch
from safetensors.torch import save_file

from qwenvl_jax.model.config import QwenVLConfig


def qwen_llm_shapes(cfg: QwenVLConfig) -> dict[str, tuple[int, ...]]:
  """The Qwen-7B tensors (names and PyTorch shapes) in state-dict order."""
  c = cfg.llm
  d, f = c.width, c.mlp_dim
  out = {"transformer.wte.weight": (c.vocab_size, d)}
  for i in range(c.layers):
    p = f"transformer.h.{i}."
    out.update({p + "ln_1.weight": (d,), p + "attn.c_attn.weight": (3 * d, d), p + "attn.c_attn.bias": (3 * d,),
                p + "attn.c_proj.weight": (d, d), p + "ln_2.weight": (d,), p + "mlp.w1.weight": (f, d),
                p + "mlp.w2.weight": (f, d), p + "mlp.c_proj.weight": (d, f)})
  out["transformer.ln_f.weight"] = (d,)
  out["lm_head.weight"] = (c.vocab_size, d)
  return out


def qwenvl_visual_shapes(cfg: QwenVLConfig) -> dict[str, tuple[int, ...]]:
  """The `transformer.visual.*` tensors of Qwen-VL (SPEC §5.1)."""
  v, d, q = cfg.vision, cfg.llm.width, cfg.resampler.num_queries
  w, p = v.width, "transformer.visual."
  out = {p + "conv1.weight": (w, 3, v.patch_size, v.patch_size), p + "positional_embedding": (v.pos_grid ** 2, w),
         p + "ln_pre.weight": (w,), p + "ln_pre.bias": (w,)}
  for i in range(v.layers):
    b = f"{p}transformer.resblocks.{i}."
    out.update({b + "ln_1.weight": (w,), b + "ln_1.bias": (w,), b + "attn.in_proj.weight": (3 * w, w),
                b + "attn.in_proj.bias": (3 * w,), b + "attn.out_proj.weight": (w, w), b + "attn.out_proj.bias": (w,),
                b + "ln_2.weight": (w,), b + "ln_2.bias": (w,), b + "mlp.c_fc.weight": (v.mlp_dim, w),
                b + "mlp.c_fc.bias": (v.mlp_dim,), b + "mlp.c_proj.weight": (w, v.mlp_dim),
                b + "mlp.c_proj.bias": (w,)})
  a = p + "attn_pool."
  out.update({a + "query": (q, d), a + "pos_embed": (q, d), a + "kv_proj.weight": (d, w), a + "ln_q.weight": (d,),
              a + "ln_q.bias": (d,), a + "ln_kv.weight": (d,), a + "ln_kv.bias": (d,),
              a + "attn.in_proj_weight": (3 * d, d), a + "attn.in_proj_bias": (3 * d,),
              a + "attn.out_proj.weight": (d, d), a + "attn.out_proj.bias": (d,),
              p + "ln_post.weight": (d,), p + "ln_post.bias": (d,), p + "proj": (d, d)})
  return out


def openclip_shapes(cfg: QwenVLConfig, embed_dim: int = 24) -> dict[str, tuple[int, ...]]:
  """An OpenCLIP ViT state dict: the visual tower (with class token, ln_post, proj) plus a small text tower."""
  v = cfg.vision
  w = v.width
  out = {"visual.class_embedding": (w,), "visual.positional_embedding": (v.pos_grid ** 2 + 1, w),
         "visual.conv1.weight": (w, 3, v.patch_size, v.patch_size), "visual.ln_pre.weight": (w,),
         "visual.ln_pre.bias": (w,)}
  for i in range(v.layers):
    b = f"visual.transformer.resblocks.{i}."
    out.update({b + "ln_1.weight": (w,), b + "ln_1.bias": (w,), b + "attn.in_proj_weight": (3 * w, w),
                b + "attn.in_proj_bias": (3 * w,), b + "attn.out_proj.weight": (w, w), b + "attn.out_proj.bias": (w,),
                b + "ln_2.weight": (w,), b + "ln_2.bias": (w,), b + "mlp.c_fc.weight": (v.mlp_dim, w),
                b + "mlp.c_fc.bias": (v.mlp_dim,), b + "mlp.c_proj.weight": (w, v.mlp_dim),
                b + "mlp.c_proj.bias": (w,)})
  out.update({"visual.ln_post.weight": (w,), "visual.ln_post.bias": (w,), "visual.proj": (w, embed_dim),
              "positional_embedding": (7, 16), "token_embedding.weight": (50, 16), "ln_final.weight": (16,),
              "ln_final.bias": (16,), "text_projection": (16, embed_dim), "logit_scale": (),
              "transformer.resblocks.0.attn.in_proj_weight": (48, 16), "transformer.resblocks.0.ln_1.weight": (16,)})
  return out


def random_state_dict(shapes: dict[str, tuple[int, ...]], dtype=torch.bfloat16, seed: int = 0) -> dict:
  """Random tensors; norm weights near 1 so the parity forward pass is well conditioned."""
  g = torch.Generator().manual_seed(seed)
  out = {}
  for name, shape in shapes.items():
    x = torch.randn(shape, generator=g, dtype=torch.float32)
    is_norm = any(k in name for k in ("ln_", "ln_1", "ln_2", "ln_f", "ln_q", "ln_kv", "ln_pre", "ln_post"))
    if name.endswith(".weight") and is_norm:
      x = 1.0 + 0.1 * x
    elif len(shape) >= 2:
      x = x / (shape[-1] ** 0.5 if len(shape) == 2 else 10.0)
    else:
      x = 0.1 * x
    out[name] = x.to(dtype).contiguous()
  return out


def write_checkpoint(directory: pathlib.Path, state: dict, *, fmt: str, shards: int = 3, index: bool = True) -> None:
  """Writes `state` as the Hugging Face layout: shards + index (or one file without index)."""
  directory.mkdir(parents=True, exist_ok=True)
  names = list(state)
  if not index:
    shards = 1
  groups = [names[k::shards] for k in range(shards)]
  weight_map = {}
  for k, group in enumerate(groups, start=1):
    part = {n: state[n] for n in group}
    if fmt == "safetensors":
      filename = f"model-{k:05d}-of-{shards:05d}.safetensors" if index else "model.safetensors"
      save_file(part, str(directory / filename), metadata={"format": "pt"})
    else:
      filename = f"pytorch_model-{k:05d}-of-{shards:05d}.bin" if index else "pytorch_model.bin"
      torch.save(part, directory / filename)
    weight_map.update({n: filename for n in group})
  if index:
    index_name = "model.safetensors.index.json" if fmt == "safetensors" else "pytorch_model.bin.index.json"
    total = sum(t.numel() * t.element_size() for t in state.values())
    (directory / index_name).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))


@pytest.fixture
def qwenvl_checkpoint(tmp_path):
  """`qwenvl_checkpoint(cfg, fmt, dtype, index=True)` -> (directory, state dict) of a random Qwen-VL checkpoint."""
  def make(cfg, fmt="safetensors", dtype=torch.bfloat16, index=True, seed=0, name="hf"):
    state = random_state_dict({**qwenvl_visual_shapes(cfg), **qwen_llm_shapes(cfg)}, dtype, seed)
    write_checkpoint(tmp_path / name, state, fmt=fmt, index=index)
    return tmp_path / name, state
  return make
