"""Loads a Hugging Face CLIP / Chinese-CLIP checkpoint folder into `ClipModel`, checking it fully before reading.

A checkpoint is what transformers' `CLIPModel.save_pretrained` / `ChineseCLIPModel.save_pretrained` writes:
`config.json`, weights (`model.safetensors`, `pytorch_model.bin`, or sharded with an index), tokenizer files, and
optionally `preprocessor_config.json`. Weights are streamed with `qwenvl_jax.checkpoint.tensor_io` one tensor at a
time (safetensors by positioned reads, .bin through a memory map whose pages are dropped after each copy), so the
host holds the model once plus one tensor.

`check_checkpoint(dir, family)` opens only the headers and verifies, before any weight or input data is read, that
every tensor the config implies is there with its shape and that nothing unknown is; `load_clip` then reads it.
Layout changes (ours <- transformers'): Linear weights are transposed ([out, in] -> [in, out]); q, k, v of a layer
are stacked into one [W, 3, N, H] kernel; per-layer tensors are stacked on a leading layer axis; the patch conv
[W, 3, p, p] becomes [p, p, 3, W].
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwenvl_jax.checkpoint import tensor_io
from qwenvl_jax.clip import images as images_lib
from qwenvl_jax.clip import tokenizers as tokenizers_lib
from qwenvl_jax.clip.config import CheckpointError, ClipConfig, read_config
from qwenvl_jax.clip.model import ClipModel

# Tensors a checkpoint may hold that the model does not use: position-id buffers (saved by old transformers
# versions) and the BERT pooler (ChineseCLIPModel builds its text tower without it).
_UNUSED_SUFFIXES = ("position_ids", "token_type_ids")
_UNUSED_PREFIXES = ("text_model.pooler.",)


@dataclasses.dataclass(frozen=True)
class _Leaf:
  """One model parameter: the checkpoint tensors it is built from and how.

  `names[l]` are the tensors of layer l (one row of `names` for unstacked parameters); `convert` maps their arrays,
  in order, to this parameter's value for that layer; `shapes[i]` is the transformers shape of `names[l][i]`.
  """
  names: tuple[tuple[str, ...], ...]
  shapes: tuple[tuple[int, ...], ...]
  convert: Callable[..., np.ndarray]
  stacked: bool


def _one(name: str, shape: tuple[int, ...], convert=lambda x: x) -> _Leaf:
  return _Leaf(((name,),), (shape,), convert, stacked=False)


def _per_layer(fmt: Sequence[str], layers: int, shapes: Sequence[tuple[int, ...]], convert) -> _Leaf:
  return _Leaf(tuple(tuple(f.format(i=i) for f in fmt) for i in range(layers)), tuple(shapes), convert, stacked=True)


def _qkv_kernel(q, k, v, n, h):
  return np.stack([x.T.reshape(-1, n, h) for x in (q, k, v)], axis=1)


def _qkv_bias(q, k, v, n, h):
  return np.stack([x.reshape(n, h) for x in (q, k, v)], axis=0)


def _block_leaves(prefix: str, layer_fmt: str, names: dict[str, str], width: int, heads: int, mlp: int,
                  layers: int) -> dict[str, _Leaf]:
  """The leaves of one stack of transformer layers; `names` maps our sub-modules to the checkpoint's."""
  n, h = heads, width // heads
  base = f"{prefix}{layer_fmt}."
  fmt = {k: base + v for k, v in names.items()}
  out = {
      "attn.qkv.kernel": _per_layer([fmt["q"] + ".weight", fmt["k"] + ".weight", fmt["v"] + ".weight"], layers,
                                    [(width, width)] * 3, lambda q, k, v: _qkv_kernel(q, k, v, n, h)),
      "attn.qkv.bias": _per_layer([fmt["q"] + ".bias", fmt["k"] + ".bias", fmt["v"] + ".bias"], layers,
                                  [(width,)] * 3, lambda q, k, v: _qkv_bias(q, k, v, n, h)),
      "attn.out.kernel": _per_layer([fmt["o"] + ".weight"], layers, [(width, width)],
                                    lambda w: w.T.reshape(n, h, width)),
      "attn.out.bias": _per_layer([fmt["o"] + ".bias"], layers, [(width,)], lambda b: b),
      "mlp.fc1.kernel": _per_layer([fmt["fc1"] + ".weight"], layers, [(mlp, width)], lambda w: w.T),
      "mlp.fc1.bias": _per_layer([fmt["fc1"] + ".bias"], layers, [(mlp,)], lambda b: b),
      "mlp.fc2.kernel": _per_layer([fmt["fc2"] + ".weight"], layers, [(width, mlp)], lambda w: w.T),
      "mlp.fc2.bias": _per_layer([fmt["fc2"] + ".bias"], layers, [(width,)], lambda b: b),
  }
  for ours in ("ln1", "ln2"):
    out[f"{ours}.scale"] = _per_layer([fmt[ours] + ".weight"], layers, [(width,)], lambda x: x)
    out[f"{ours}.bias"] = _per_layer([fmt[ours] + ".bias"], layers, [(width,)], lambda x: x)
  return out


_CLIP_LAYER = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.out_proj",
               "fc1": "mlp.fc1", "fc2": "mlp.fc2", "ln1": "layer_norm1", "ln2": "layer_norm2"}
# The BERT layer's norms: attn_ln after attention, out_ln after the MLP (named ln1/ln2 in `_block_leaves`).
_BERT_LAYER = {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
               "o": "attention.output.dense", "fc1": "intermediate.dense", "fc2": "output.dense",
               "ln1": "attention.output.LayerNorm", "ln2": "output.LayerNorm"}


def _ln(ours: str, theirs: str, width: int) -> dict[str, _Leaf]:
  return {f"{ours}.scale": _one(f"{theirs}.weight", (width,)), f"{ours}.bias": _one(f"{theirs}.bias", (width,))}


def layout(cfg: ClipConfig) -> dict[str, _Leaf]:
  """Dotted parameter path of `ClipModel(cfg)` -> how it is built from transformers' state dict."""
  v, t = cfg.vision, cfg.text
  out: dict[str, _Leaf] = {
      "vision.patch": _one("vision_model.embeddings.patch_embedding.weight",
                           (v.width, 3, v.patch_size, v.patch_size), lambda w: w.transpose(2, 3, 1, 0)),
      "vision.class_embedding": _one("vision_model.embeddings.class_embedding", (v.width,)),
      "vision.position": _one("vision_model.embeddings.position_embedding.weight", (v.positions, v.width)),
      **_ln("vision.pre_ln", "vision_model.pre_layrnorm", v.width),
      **_ln("vision.post_ln", "vision_model.post_layernorm", v.width),
      "visual_projection": _one("visual_projection.weight", (cfg.projection_dim, v.width), lambda w: w.T),
      "text_projection": _one("text_projection.weight", (cfg.projection_dim, t.width), lambda w: w.T),
      "logit_scale": _one("logit_scale", ()),
  }
  for path, leaf in _block_leaves("vision_model.", "encoder.layers.{i}", _CLIP_LAYER, v.width, v.heads, v.mlp_dim,
                                  v.layers).items():
    out[f"vision.blocks.{path}"] = leaf
  if cfg.family == "clip":
    out["text.token_embedding"] = _one("text_model.embeddings.token_embedding.weight", (t.vocab_size, t.width))
    out["text.position"] = _one("text_model.embeddings.position_embedding.weight", (t.max_positions, t.width))
    out.update(_ln("text.final_ln", "text_model.final_layer_norm", t.width))
    blocks, names = _block_leaves("text_model.", "encoder.layers.{i}", _CLIP_LAYER, t.width, t.heads, t.mlp_dim,
                                  t.layers), {}
  else:
    out["text.word_embedding"] = _one("text_model.embeddings.word_embeddings.weight", (t.vocab_size, t.width))
    out["text.position"] = _one("text_model.embeddings.position_embeddings.weight", (t.max_positions, t.width))
    out["text.token_type"] = _one("text_model.embeddings.token_type_embeddings.weight",
                                  (t.type_vocab_size, t.width))
    out.update(_ln("text.embed_ln", "text_model.embeddings.LayerNorm", t.width))
    blocks = _block_leaves("text_model.", "encoder.layer.{i}", _BERT_LAYER, t.width, t.heads, t.mlp_dim, t.layers)
    names = {"ln1": "attn_ln", "ln2": "out_ln"}
  for path, leaf in blocks.items():
    head, _, rest = path.partition(".")
    out[f"text.blocks.{names.get(head, head)}.{rest}"] = leaf
  return out


def _aliases(name: str) -> tuple[str, ...]:
  """Names a tensor may have in older checkpoints (TF-converted BERT LayerNorms call weight/bias gamma/beta)."""
  if "LayerNorm." in name:
    return name, name.replace(".weight", ".gamma").replace(".bias", ".beta")
  return (name,)


def _resolve(source: tensor_io.TensorSource, name: str) -> str | None:
  return next((a for a in _aliases(name) if a in source), None)


def _check(cfg: ClipConfig, source: tensor_io.TensorSource) -> dict[str, str]:
  """Checks names and shapes against the config (headers only); returns our-name -> stored-name."""
  stored: dict[str, str] = {}
  problems = []
  for leaf in layout(cfg).values():
    for row in leaf.names:
      for name, shape in zip(row, leaf.shapes):
        found = _resolve(source, name)
        if found is None:
          problems.append(f"missing {name}")
          continue
        got = tuple(source.info(found).shape)
        if got != shape:
          problems.append(f"{found} has shape {list(got)}, config.json implies {list(shape)}")
        stored[name] = found
  used = set(stored.values())
  extra = [n for n in source.names() if n not in used and not n.endswith(_UNUSED_SUFFIXES)
           and not n.startswith(_UNUSED_PREFIXES)]
  problems += [f"unexpected {n}" for n in sorted(extra)]
  if problems:
    more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
    raise CheckpointError(f"{source.description} does not match its {cfg.family} config.json: "
                          + "; ".join(problems[:5]) + more)
  return stored


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
  """A checked checkpoint: its config, image preprocessing and tokenizer."""
  directory: str
  config: ClipConfig
  image_spec: images_lib.ImageSpec
  tokenizer: tokenizers_lib.TextTokenizer


def check_checkpoint(directory: str | os.PathLike, family: str) -> CheckpointInfo:
  """Verifies a checkpoint folder without reading weights: config, every tensor's name and shape, tokenizer files.

  Raises:
    CheckpointError: one line saying what is missing or wrong.
  """
  directory = os.fspath(directory)
  cfg = read_config(directory, family)
  spec = images_lib.read_spec(directory, cfg.vision.image_size)
  tokenizer = tokenizers_lib.load_tokenizer(directory, family, cfg.text_len)
  try:
    source = tensor_io.open_checkpoint(directory)
  except (FileNotFoundError, ValueError) as e:
    raise CheckpointError(f"{directory}: {e}") from e
  with source:
    _check(cfg, source)
  return CheckpointInfo(directory, cfg, spec, tokenizer)


def load_clip(directory: str | os.PathLike, family: str, *, dtype=jnp.float32) -> tuple[ClipModel, CheckpointInfo]:
  """Checks, then reads a checkpoint into a `ClipModel` (parameters float32; `dtype` is the compute dtype).

  Raises:
    CheckpointError: as `check_checkpoint`.
  """
  info = check_checkpoint(directory, family)
  cfg, spec = info.config, info.image_spec
  graphdef, state = nnx.split(nnx.eval_shape(
      lambda: ClipModel(cfg, mean=spec.mean, std=spec.std, dtype=dtype, rngs=nnx.Rngs(0))))
  flat = dict(nnx.to_flat_state(state))
  leaves = layout(cfg)
  if set(leaves) != {".".join(str(p) for p in path) for path in flat}:
    raise AssertionError("clip.loading.layout is out of step with ClipModel's parameters")
  with tensor_io.open_checkpoint(directory) as source:
    stored = _check(cfg, source)
    for path, variable in flat.items():
      leaf = leaves[".".join(str(p) for p in path)]
      value = np.empty(variable.shape, np.float32)
      for row_index, row in enumerate(leaf.names):
        arrays = [source.read(stored[n]).astype(np.float32) for n in row]
        converted = leaf.convert(*arrays)
        if leaf.stacked:
          value[row_index] = converted
        else:
          value[...] = converted
      variable.set_value(jnp.asarray(value))
  return nnx.merge(graphdef, nnx.from_flat_state(flat)), info

