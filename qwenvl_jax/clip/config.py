"""Configuration of a CLIP dual encoder (OpenAI CLIP or Chinese-CLIP) read from a Hugging Face `config.json`.

Letters: W tower width, L layers, N heads, F MLP width, P projection width, S image side, p patch side,
V vocabulary, T text positions.

Two families share the vision tower (pre-LN ViT with a class token, `pre_layrnorm`, `post_layernorm` on the class
token) and differ in the text tower:
  * "clip": transformers' `CLIPModel`. Causal pre-LN transformer; the text feature is the final-LayerNorm state at
    the end-of-text token. The tokenizer is CLIP's byte-level BPE with a 77-token context (BOS and EOS included).
  * "chinese_clip": transformers' `ChineseCLIPModel`. The text tower is a BERT encoder (post-LN, token-type
    embeddings, padding mask); the text feature is the [CLS] state, no pooler. The reference (OFA-Sys Chinese-CLIP)
    tokenizes with BERT WordPiece into a 52-token context ([CLS] and [SEP] included).

Missing `config.json` fields take transformers' defaults for the family, as `from_pretrained` does.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

from qwenvl_jax import errors

FAMILIES = ("clip", "chinese_clip")
ACTIVATIONS = ("quick_gelu", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu")
# The reference contexts: OpenAI CLIP's `context_length`, Chinese-CLIP's `cn_clip.clip.tokenize(context_length=52)`.
DEFAULT_TEXT_LEN = {"clip": 77, "chinese_clip": 52}

_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                        image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                        num_channels=3)
_TEXT_DEFAULTS = {
    "clip": dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                 num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                 eos_token_id=49407, pad_token_id=1, type_vocab_size=0),
    "chinese_clip": dict(vocab_size=30522, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                         num_attention_heads=12, max_position_embeddings=512, hidden_act="gelu",
                         layer_norm_eps=1e-12, eos_token_id=None, pad_token_id=0, type_vocab_size=2),
}
_MODEL_TYPES = {"clip": "clip", "chinese_clip": "chinese_clip"}


class CheckpointError(errors.UserError, ValueError):
  """A CLIP checkpoint that is missing, of another kind, or does not match its own configuration (a user mistake:
  the entry points print it as one `error:` line)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class TowerConfig:
  """One transformer tower: W = width, L = layers, N = heads, F = MLP width."""
  width: int
  layers: int
  heads: int
  mlp_dim: int
  act: str
  ln_eps: float

  def __post_init__(self):
    for name in ("width", "layers", "heads", "mlp_dim"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CheckpointError(f"{type(self).__name__}.{name} must be a positive integer, got {value!r}")
    if self.width % self.heads:
      raise CheckpointError(f"width {self.width} is not divisible by {self.heads} heads")
    if self.act not in ACTIVATIONS:
      raise CheckpointError(f"unsupported activation {self.act!r}; supported: {ACTIVATIONS}")

  @property
  def head_dim(self) -> int:
    return self.width // self.heads


@dataclasses.dataclass(frozen=True, kw_only=True)
class VisionConfig(TowerConfig):
  """The ViT: S = image_size, p = patch_size, G = S // p patches per side, G*G + 1 positions (class token first)."""
  image_size: int
  patch_size: int

  def __post_init__(self):
    super().__post_init__()
    if self.image_size % self.patch_size:
      raise CheckpointError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size

  @property
  def positions(self) -> int:
    return self.grid ** 2 + 1


@dataclasses.dataclass(frozen=True, kw_only=True)
class TextConfig(TowerConfig):
  """The text tower: V = vocab_size, T = max_positions; the CLIP tower pools at `eos_token_id`."""
  vocab_size: int
  max_positions: int
  eos_token_id: int | None = None
  type_vocab_size: int = 0


@dataclasses.dataclass(frozen=True, kw_only=True)
class ClipConfig:
  """A dual encoder: `family` picks the text tower; P = projection_dim; `text_len` is the tokenizer's context."""
  family: str
  vision: VisionConfig
  text: TextConfig
  projection_dim: int
  text_len: int

  def __post_init__(self):
    if self.family not in FAMILIES:
      raise CheckpointError(f"unknown CLIP family {self.family!r}; known: {FAMILIES}")
    if not 2 <= self.text_len <= self.text.max_positions:
      raise CheckpointError(f"text_len {self.text_len} must be in [2, max_positions={self.text.max_positions}]")


def _tower_fields(raw: Mapping[str, Any], defaults: Mapping[str, Any], where: str) -> dict[str, Any]:
  """The tower's fields: those `raw` sets (not null), else transformers' defaults for the family."""
  if not isinstance(raw, Mapping):
    raise CheckpointError(f"config.json field {where} is a {type(raw).__name__}, not an object")
  merged = {k: raw[k] if raw.get(k) is not None else v for k, v in defaults.items()}
  if not isinstance(merged["hidden_act"], str):
    raise CheckpointError(f"{where}.hidden_act must be a name, got {merged['hidden_act']!r}")
  return merged


def from_hf_dict(raw: Mapping[str, Any], family: str | None = None, text_len: int | None = None) -> ClipConfig:
  """The ClipConfig of a transformers `CLIPConfig` / `ChineseCLIPConfig` dict (the content of `config.json`).

  Args:
    raw: the parsed config.json.
    family: "clip" or "chinese_clip" when the caller requires one; None accepts the dict's own `model_type`.
    text_len: tokenizer context; None = the family's reference context, capped at the text tower's positions.

  Raises:
    CheckpointError: another model type, or a field of the wrong kind.
  """
  model_type = raw.get("model_type")
  found = {v: k for k, v in _MODEL_TYPES.items()}.get(model_type)
  if found is None:
    raise CheckpointError(f"config.json has model_type {model_type!r}; expected one of {sorted(_MODEL_TYPES.values())}")
  if family is not None and found != family:
    raise CheckpointError(f"config.json describes a {model_type!r} model, not {family!r}")
  vraw = _tower_fields(raw.get("vision_config") or {}, _VISION_DEFAULTS, "vision_config")
  traw = _tower_fields(raw.get("text_config") or {}, _TEXT_DEFAULTS[found], "text_config")
  if vraw["num_channels"] != 3:
    raise CheckpointError(f"vision_config.num_channels={vraw['num_channels']}; only RGB (3) is supported")
  try:
    vision = VisionConfig(width=vraw["hidden_size"], layers=vraw["num_hidden_layers"],
                          heads=vraw["num_attention_heads"], mlp_dim=vraw["intermediate_size"],
                          act=vraw["hidden_act"], ln_eps=float(vraw["layer_norm_eps"]),
                          image_size=vraw["image_size"], patch_size=vraw["patch_size"])
    text = TextConfig(width=traw["hidden_size"], layers=traw["num_hidden_layers"],
                      heads=traw["num_attention_heads"], mlp_dim=traw["intermediate_size"], act=traw["hidden_act"],
                      ln_eps=float(traw["layer_norm_eps"]), vocab_size=traw["vocab_size"],
                      max_positions=traw["max_position_embeddings"], eos_token_id=traw["eos_token_id"],
                      type_vocab_size=traw["type_vocab_size"])
  except (TypeError, KeyError) as e:
    raise CheckpointError(f"config.json has a malformed tower config: {e}") from e
  if text_len is None:
    text_len = min(DEFAULT_TEXT_LEN[found], text.max_positions)
  return ClipConfig(family=found, vision=vision, text=text, projection_dim=int(raw.get("projection_dim", 512)),
                    text_len=text_len)


def read_config(directory: str | os.PathLike, family: str | None = None) -> ClipConfig:
  """`from_hf_dict` of `<directory>/config.json`.

  Raises:
    CheckpointError: the folder or its config.json is missing or unreadable, or describes another model.
  """
  path = os.path.join(os.fspath(directory), "config.json")
  if not os.path.isdir(os.fspath(directory)):
    raise CheckpointError(f"CLIP checkpoint folder {os.fspath(directory)} does not exist")
  if not os.path.isfile(path):
    raise CheckpointError(f"{path} is missing: a CLIP checkpoint is a transformers save_pretrained folder")
  try:
    with open(path, encoding="utf-8") as f:
      raw = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{path} is not readable JSON: {e}") from e
  if not isinstance(raw, dict):
    raise CheckpointError(f"{path} holds a {type(raw).__name__}, not a JSON object")
  return from_hf_dict(raw, family)


def preset(name: str, family: str = "clip") -> ClipConfig:
  """Random-init sizes for tests and benchmarks: "tiny" (2 layers, width 32) or "vit_b32" (OpenAI ViT-B/32)."""
  if name == "tiny":
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    raw = {"projection_dim": 16}
  elif name == "vit_b32":
    vision, text, raw = {}, {}, {"projection_dim": 512}
    if family == "chinese_clip":
      text = dict(vocab_size=21128)
  else:
    raise ValueError(f"unknown preset {name!r}; known: tiny, vit_b32")
  return from_hf_dict({"model_type": family, "vision_config": vision, "text_config": text, **raw})
