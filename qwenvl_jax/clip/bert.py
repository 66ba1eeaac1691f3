"""Chinese-CLIP's text tower: a BERT encoder whose [CLS] state is the text feature (no pooler, no final norm).

Letters: B batch, T tokens, W width, F MLP width, V vocabulary.

As transformers' `ChineseCLIPTextModel(add_pooling_layer=False)` (tested against it in float32):
  x = LayerNorm(word[ids] + token_type[0] + position[t])        (token types are all 0, as the reference's default)
  per layer (post-LN): x = LN(x + out(attn(x, padding mask)));  x = LN(x + fc2(act(fc1(x))))
  feature = x[:, 0]
Padding keys are masked; a padding query's output is never used.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from qwenvl_jax.clip.config import TextConfig
from qwenvl_jax.clip.encoder import INIT, TEXT_AXES, Attention, Mlp, make_stack, run_stack
from qwenvl_jax.model import layers


class PostLnBlock(nnx.Module):
  """The BERT layer: LN(x + attn(x)); LN(x + mlp(x))."""

  def __init__(self, cfg: TextConfig, *, dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, rngs=rngs)
    self.attn = Attention(cfg, TEXT_AXES, **kw)
    self.attn_ln = layers.LayerNorm(cfg.width, eps=cfg.ln_eps, param_dtype=jnp.float32, **kw)
    self.mlp = Mlp(cfg, TEXT_AXES, **kw)
    self.out_ln = layers.LayerNorm(cfg.width, eps=cfg.ln_eps, param_dtype=jnp.float32, **kw)

  def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
    x = self.attn_ln(x + self.attn(x, mask))
    return self.out_ln(x + self.mlp(x))


class BertTextTower(nnx.Module):
  """int32[B, T] ids + bool[B, T] mask -> float32[B, W]: the last layer's [CLS] state."""

  def __init__(self, cfg: TextConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
    if cfg.type_vocab_size < 1:
      raise ValueError("the BERT text tower needs type_vocab_size >= 1")
    self.cfg = cfg
    self.dtype = dtype
    w = cfg.width
    self.word_embedding = layers.param(rngs, INIT, (cfg.vocab_size, w), ("vocab", "embed"), jnp.float32)
    self.position = layers.param(rngs, INIT, (cfg.max_positions, w), ("clip_text_pos", "embed"), jnp.float32)
    self.token_type = layers.param(rngs, INIT, (cfg.type_vocab_size, w), ("clip_token_types", "embed"),
                                   jnp.float32)
    self.embed_ln = layers.LayerNorm(w, eps=cfg.ln_eps, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
    self.blocks = make_stack(lambda r: PostLnBlock(cfg, dtype=dtype, rngs=r), cfg.layers, rngs)

  def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
    t = ids.shape[1]
    if t > self.cfg.max_positions:
      raise ValueError(f"{t} tokens > max_positions={self.cfg.max_positions}")
    x = jnp.take(self.word_embedding[...], ids, axis=0) + self.token_type[0] + self.position[:t]
    x = self.embed_ln(x)
    x = run_stack(self.blocks, x, mask.astype(jnp.bool_)[:, None, None, :])
    return x[:, 0].astype(jnp.float32)
