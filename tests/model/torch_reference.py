"""Independent PyTorch references for the parity tests, written from QWENVL_SPEC §1–2 (not from our JAX code).

* `TorchVisualBlock` / `TorchVisionTrunk`: the reference `VisualAttentionBlock` with its head-interleaved fused QKV
  (`in_proj` output viewed as [heads, 3 * head_dim]), exact GELU, LayerNorm eps 1e-6, bicubic `get_abs_pos`.
* `TorchAdapter`: `attn_pool` built on `torch.nn.MultiheadAttention`, then `ln_post` and `x @ proj`.
* `qwen2_from_qwen_weights`: transformers' `Qwen2ForCausalLM` loaded from weights in Qwen-VL (`c_attn`, `w1`, `w2`)
  naming — the decoder reference.
The helpers `*_to_jax` map PyTorch state dicts into our parameter tree (a test-local mapping; the production
converter lives in qwenvl_jax.checkpoint and is tested separately).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def get_abs_pos(abs_pos: torch.Tensor, tgt_len: int) -> torch.Tensor:
  """QWENVL_SPEC §1.3: bicubic (align_corners=False) resize of a [L, C] row-major grid table in float32."""
  src = int(math.sqrt(abs_pos.shape[0]))
  tgt = int(math.sqrt(tgt_len))
  if src == tgt:
    return abs_pos
  x = abs_pos.float().reshape(1, src, src, -1).permute(0, 3, 1, 2)
  x = F.interpolate(x, size=(tgt, tgt), mode="bicubic", align_corners=False)
  return x.permute(0, 2, 3, 1).reshape(tgt * tgt, -1).to(abs_pos.dtype)


class TorchVisualAttention(nn.Module):
  """Megatron-style attention: fused in_proj whose rows are [head, (q|k|v), head_dim] (head-interleaved)."""

  def __init__(self, width: int, heads: int):
    super().__init__()
    self.heads, self.head_dim = heads, width // heads
    self.in_proj = nn.Linear(width, 3 * width)
    self.out_proj = nn.Linear(width, width)

  def forward(self, x):  # [L, N, C] seq-first, as the reference
    l, n, _ = x.shape
    mixed = self.in_proj(x).view(l, n, self.heads, 3 * self.head_dim)
    q, k, v = mixed.split(self.head_dim, dim=-1)
    q = q.reshape(l, n * self.heads, self.head_dim).transpose(0, 1)
    k = k.reshape(l, n * self.heads, self.head_dim).transpose(0, 1)
    v = v.reshape(l, n * self.heads, self.head_dim).transpose(0, 1)
    q = q / math.sqrt(self.head_dim)
    probs = torch.softmax(torch.bmm(q, k.transpose(-2, -1)), dim=-1)
    out = torch.bmm(probs, v).view(n, self.heads, l, self.head_dim).permute(2, 0, 1, 3).reshape(l, n, -1)
    return self.out_proj(out)


class TorchVisualBlock(nn.Module):

  def __init__(self, width: int, heads: int, mlp_dim: int):
    super().__init__()
    self.ln_1 = nn.LayerNorm(width, eps=1e-6)
    self.ln_2 = nn.LayerNorm(width, eps=1e-6)
    self.attn = TorchVisualAttention(width, heads)
    self.mlp = nn.Sequential()
    self.mlp.add_module("c_fc", nn.Linear(width, mlp_dim))
    self.mlp.add_module("gelu", nn.GELU())  # exact erf GELU
    self.mlp.add_module("c_proj", nn.Linear(mlp_dim, width))

  def forward(self, x):
    x = x + self.attn(self.ln_1(x))
    return x + self.mlp(self.ln_2(x))


class TorchVisionTrunk(nn.Module):
  """conv1 (no bias) -> + get_abs_pos(pos) -> ln_pre -> blocks; no class token, no final norm."""

  def __init__(self, width, layers, heads, mlp_dim, patch, pos_grid):
    super().__init__()
    self.conv1 = nn.Conv2d(3, width, kernel_size=patch, stride=patch, bias=False)
    self.positional_embedding = nn.Parameter(torch.randn(pos_grid * pos_grid, width) * 0.1)
    self.ln_pre = nn.LayerNorm(width, eps=1e-6)
    self.resblocks = nn.ModuleList([TorchVisualBlock(width, heads, mlp_dim) for _ in range(layers)])

  def forward(self, pixels):  # [N, 3, S, S] normalized
    x = self.conv1(pixels)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    x = x + get_abs_pos(self.positional_embedding, x.size(1))
    x = self.ln_pre(x).permute(1, 0, 2)
    for block in self.resblocks:
      x = block(x)
    return x.permute(1, 0, 2)


class TorchAdapter(nn.Module):
  """`Resampler` (attn_pool) on torch.nn.MultiheadAttention + ln_post + x @ proj."""

  def __init__(self, grid: int, embed_dim: int, heads: int, kv_dim: int, pos_embed: np.ndarray):
    super().__init__()
    self.query = nn.Parameter(torch.randn(grid * grid, embed_dim) * 0.5)
    self.pos_embed = nn.Parameter(torch.from_numpy(pos_embed).float(), requires_grad=False)
    self.kv_proj = nn.Linear(kv_dim, embed_dim, bias=False)
    self.attn = nn.MultiheadAttention(embed_dim, heads)
    self.ln_q = nn.LayerNorm(embed_dim, eps=1e-6)
    self.ln_kv = nn.LayerNorm(embed_dim, eps=1e-6)
    self.ln_post = nn.LayerNorm(embed_dim, eps=1e-6)
    self.proj = nn.Parameter(torch.randn(embed_dim, embed_dim) / math.sqrt(embed_dim))

  def forward(self, x):  # [N, L, kv_dim]
    pos_k = get_abs_pos(self.pos_embed, x.size(1))
    kv = self.ln_kv(self.kv_proj(x)).permute(1, 0, 2)
    n = kv.shape[1]
    q = self.ln_q(self.query)
    out = self.attn(q.unsqueeze(1).repeat(1, n, 1) + self.pos_embed.unsqueeze(1), kv + pos_k.unsqueeze(1), kv)[0]
    return self.ln_post(out.permute(1, 0, 2)) @ self.proj


def mae_sincos_2d(embed_dim: int, grid_size: int) -> np.ndarray:
  """The MAE `get_2d_sincos_pos_embed` recipe as the reference ships it (numpy, 'xy' meshgrid)."""
  grid_h = np.arange(grid_size, dtype=np.float32)
  grid_w = np.arange(grid_size, dtype=np.float32)
  grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape(2, 1, grid_size, grid_size)

  def from_grid(dim, pos):
    omega = np.arange(dim // 2, dtype=np.float32) / (dim / 2.0)
    omega = 1.0 / 10000 ** omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  return np.concatenate([from_grid(embed_dim // 2, grid[0]), from_grid(embed_dim // 2, grid[1])], axis=1)


# ---- test-local weight mapping into our parameter tree -------------------------------------------------------


def _np(t: torch.Tensor) -> np.ndarray:
  return t.detach().float().numpy()


def vision_trunk_to_jax(trunk: TorchVisionTrunk, heads: int) -> dict:
  """Our `visual` subtree (nested dict of numpy) from the PyTorch trunk."""
  width = trunk.ln_pre.weight.shape[0]
  hd = width // heads
  blocks = []
  for b in trunk.resblocks:
    blocks.append({
        "ln_1": {"scale": _np(b.ln_1.weight), "bias": _np(b.ln_1.bias)},
        "ln_2": {"scale": _np(b.ln_2.weight), "bias": _np(b.ln_2.bias)},
        "attn": {
            "qkv": {"kernel": _np(b.attn.in_proj.weight).reshape(heads, 3, hd, width).transpose(3, 0, 1, 2),
                    "bias": _np(b.attn.in_proj.bias).reshape(heads, 3, hd)},
            "out": {"kernel": _np(b.attn.out_proj.weight).T.reshape(heads, hd, width),
                    "bias": _np(b.attn.out_proj.bias)},
        },
        "mlp": {"fc": {"kernel": _np(b.mlp.c_fc.weight).T, "bias": _np(b.mlp.c_fc.bias)},
                "proj": {"kernel": _np(b.mlp.c_proj.weight).T, "bias": _np(b.mlp.c_proj.bias)}},
    })
  stacked = _stack(blocks)
  return {
      "conv1": _np(trunk.conv1.weight).transpose(2, 3, 1, 0),
      "positional_embedding": _np(trunk.positional_embedding),
      "ln_pre": {"scale": _np(trunk.ln_pre.weight), "bias": _np(trunk.ln_pre.bias)},
      "blocks": stacked,
  }


def adapter_to_jax(adapter: TorchAdapter, heads: int) -> dict:
  d = adapter.query.shape[1]
  hd = d // heads
  wq, wk, wv = _np(adapter.attn.in_proj_weight).reshape(3, d, d)  # blocked chunk(3)
  bq, bk, bv = _np(adapter.attn.in_proj_bias).reshape(3, d)
  proj = lambda w, b: {"kernel": w.T.reshape(d, heads, hd), "bias": b.reshape(heads, hd)}
  return {
      "resampler": {
          "query": _np(adapter.query), "pos_embed": _np(adapter.pos_embed),
          "kv_proj": {"kernel": _np(adapter.kv_proj.weight).T},
          "ln_q": {"scale": _np(adapter.ln_q.weight), "bias": _np(adapter.ln_q.bias)},
          "ln_kv": {"scale": _np(adapter.ln_kv.weight), "bias": _np(adapter.ln_kv.bias)},
          "attn": {"q": proj(wq, bq), "k": proj(wk, bk), "v": proj(wv, bv),
                   "out": {"kernel": _np(adapter.attn.out_proj.weight).T.reshape(heads, hd, d),
                           "bias": _np(adapter.attn.out_proj.bias)}},
      },
      "ln_post": {"scale": _np(adapter.ln_post.weight), "bias": _np(adapter.ln_post.bias)},
      "proj": _np(adapter.proj),
  }


def random_qwen_state_dict(vocab, width, layers, heads, mlp_dim, seed=0) -> dict[str, torch.Tensor]:
  """Random weights in the Qwen-VL / Qwen-7B naming (QWENVL_SPEC §5.1), float32."""
  g = torch.Generator().manual_seed(seed)
  r = lambda *s, scale=0.05: torch.randn(*s, generator=g) * scale
  sd = {"transformer.wte.weight": r(vocab, width, scale=0.5), "transformer.ln_f.weight": 1 + r(width),
        "lm_head.weight": r(vocab, width, scale=0.2)}
  for i in range(layers):
    p = f"transformer.h.{i}."
    sd[p + "ln_1.weight"] = 1 + r(width, scale=0.1)
    sd[p + "ln_2.weight"] = 1 + r(width, scale=0.1)
    sd[p + "attn.c_attn.weight"] = r(3 * width, width, scale=0.2)
    sd[p + "attn.c_attn.bias"] = r(3 * width, scale=0.2)
    sd[p + "attn.c_proj.weight"] = r(width, width, scale=0.2)
    sd[p + "mlp.w1.weight"] = r(mlp_dim, width, scale=0.2)
    sd[p + "mlp.w2.weight"] = r(mlp_dim, width, scale=0.2)
    sd[p + "mlp.c_proj.weight"] = r(width, mlp_dim, scale=0.2)
  return sd


def qwen2_from_qwen_weights(sd: dict, vocab, width, layers, heads, mlp_dim):
  """transformers' Qwen2ForCausalLM (eager attention, float32) holding the Qwen-7B-format weights `sd`."""
  from transformers import Qwen2Config, Qwen2ForCausalLM
  cfg = Qwen2Config(vocab_size=vocab, hidden_size=width, intermediate_size=mlp_dim, num_hidden_layers=layers,
                    num_attention_heads=heads, num_key_value_heads=heads, rms_norm_eps=1e-6, rope_theta=10000.0,
                    tie_word_embeddings=False, max_position_embeddings=4096, use_sliding_window=False)
  cfg._attn_implementation = "eager"
  model = Qwen2ForCausalLM(cfg).eval()
  new = {"model.embed_tokens.weight": sd["transformer.wte.weight"], "model.norm.weight": sd["transformer.ln_f.weight"],
         "lm_head.weight": sd["lm_head.weight"]}
  for i in range(layers):
    p, q = f"transformer.h.{i}.", f"model.layers.{i}."
    wq, wk, wv = sd[p + "attn.c_attn.weight"].chunk(3)  # blocked q|k|v
    bq, bk, bv = sd[p + "attn.c_attn.bias"].chunk(3)
    new.update({
        q + "self_attn.q_proj.weight": wq, q + "self_attn.k_proj.weight": wk, q + "self_attn.v_proj.weight": wv,
        q + "self_attn.q_proj.bias": bq, q + "self_attn.k_proj.bias": bk, q + "self_attn.v_proj.bias": bv,
        q + "self_attn.o_proj.weight": sd[p + "attn.c_proj.weight"],
        q + "mlp.gate_proj.weight": sd[p + "mlp.w2.weight"],  # SiLU branch
        q + "mlp.up_proj.weight": sd[p + "mlp.w1.weight"],
        q + "mlp.down_proj.weight": sd[p + "mlp.c_proj.weight"],
        q + "input_layernorm.weight": sd[p + "ln_1.weight"],
        q + "post_attention_layernorm.weight": sd[p + "ln_2.weight"],
    })
  missing, unexpected = model.load_state_dict(new, strict=False)
  assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
  return model


def qwen_weights_to_jax(sd: dict, layers: int, heads: int) -> dict:
  """Our `llm` subtree from Qwen-format weights."""
  width = sd["transformer.wte.weight"].shape[1]
  hd = width // heads
  blocks = []
  for i in range(layers):
    p = f"transformer.h.{i}."
    blocks.append({
        "ln_1": {"scale": _np(sd[p + "ln_1.weight"])}, "ln_2": {"scale": _np(sd[p + "ln_2.weight"])},
        "attn": {"qkv": {"kernel": _np(sd[p + "attn.c_attn.weight"]).reshape(3, heads, hd, width).transpose(3, 0, 1, 2),
                         "bias": _np(sd[p + "attn.c_attn.bias"]).reshape(3, heads, hd)},
                 "out": {"kernel": _np(sd[p + "attn.c_proj.weight"]).T.reshape(heads, hd, width)}},
        "mlp": {"w1": {"kernel": _np(sd[p + "mlp.w1.weight"]).T}, "w2": {"kernel": _np(sd[p + "mlp.w2.weight"]).T},
                "c_proj": {"kernel": _np(sd[p + "mlp.c_proj.weight"]).T}},
    })
  return {"wte": {"embedding": _np(sd["transformer.wte.weight"])}, "blocks": _stack(blocks),
          "ln_f": {"scale": _np(sd["transformer.ln_f.weight"])}, "lm_head": {"kernel": _np(sd["lm_head.weight"]).T}}


def _stack(trees: list[dict]) -> dict:
  if isinstance(trees[0], dict):
    return {k: _stack([t[k] for t in trees]) for k in trees[0]}
  return np.stack(trees)


def load_into(module, tree: dict) -> None:
  """Writes a nested dict of numpy arrays into the nnx.Params of `module` (shapes must match exactly)."""
  from flax import nnx
  import jax.numpy as jnp
  state = nnx.state(module, nnx.Param)
  flat = dict(nnx.to_flat_state(state))
  seen = set()

  def walk(prefix, node):
    for k, v in node.items():
      path = prefix + (k,)
      if isinstance(v, dict):
        walk(path, v)
        continue
      if path not in flat:
        raise KeyError(f"no parameter {'/'.join(path)}")
      var = flat[path]
      if tuple(var.shape) != tuple(v.shape):
        raise ValueError(f"{'/'.join(path)}: {var.shape} vs {v.shape}")
      var[...] = jnp.asarray(v, var.dtype)
      seen.add(path)

  walk((), tree)
  missing = set(flat) - seen
  if missing:
    raise KeyError(f"parameters not set: {sorted('/'.join(p) for p in missing)}")
  nnx.update(module, nnx.from_flat_state(flat))
