"""What a params checkpoint records about its model, so loaders need no flags for it: the preset and image size it
was converted (or trained) for, the chat format ('chatml' for a chat model, 'raw' for a base one) and a copy of its
tokenizer kept in the checkpoint directory. Stored as `custom_metadata["model"]` of the Orbax checkpoint:

  {"image_size": 448, "preset": "qwen_vl_7b", "chat_format": "chatml", "tokenizer": "qwen:qwen.tiktoken"}

Write side: `model_metadata` (the dict), `bundled_tokenizer` / `copy_tokenizer` (the kept copy), `hf_model_card`
(what a Hugging Face Qwen directory says), `hf_generation_config` (what an export to that format says). Read side:
`recorded_model`, `recorded_chat_format`, `recorded_tokenizer` (`inference.model_source` for generate / serve /
evaluate, the trainer for `config.init=params:...`). Older checkpoints record only some keys, or none.
"""

from __future__ import annotations

import json
import os
import pathlib

from etils import epath

from qwenvl_jax import errors
from qwenvl_jax import text as qtext
from qwenvl_jax.text import chat as qchat
from qwenvl_jax.text import tokenizer as qtok
from qwenvl_jax.checkpoint import orbax_store
from qwenvl_jax.model.config import QwenVLConfig


def model_metadata(cfg: QwenVLConfig, preset: str | None, *, chat_format: str | None = None,
                   tokenizer: str | None = None) -> dict:
  """What a params checkpoint records about its model (`custom_metadata["model"]`): the image size it was
  converted for and, when known, the preset, the chat format ('chatml' for a chat model, 'raw' for a base one)
  and its tokenizer (a spec `KIND:FILE` whose FILE lies in the checkpoint directory: `bundled_tokenizer`).
  `inference.model_source` reads it for a checkpoint without a run config: the same weights run at any image
  size and in either chat format, so a forgotten `--image_size` or `--chat_format` would be a silent wrong answer."""
  if chat_format not in (None, "chatml", "raw"):
    raise ValueError(f"unknown chat format {chat_format!r}; known: 'chatml', 'raw'")
  return {"image_size": cfg.vision.image_size, **({"preset": preset} if preset else {}),
          **({"chat_format": chat_format} if chat_format else {}), **({"tokenizer": tokenizer} if tokenizer else {})}


# The kept copy's name per tokenizer kind: fixed, so a source file named like one of Orbax's own (`_METADATA`,
# `manifest.ocdbt`, `d`, ...) cannot overwrite it once the checkpoint is written.
_KEPT_NAMES = {"qwen": "qwen.tiktoken", "sentencepiece": "tokenizer.model"}


def bundled_tokenizer(spec: str | None) -> str | None:
  """The spec a params checkpoint records for its own copy of the tokenizer `spec` (None: no tokenizer):
  `KIND:FILE`, FILE the copy's name inside the checkpoint directory (`copy_tokenizer` makes it). Called before
  anything is written, so a missing file stops the conversion before it leaves a checkpoint without its tokenizer.

  Raises:
    FileNotFoundError: the tokenizer file does not exist.
  """
  if not spec:
    return None
  kind, path = qtext.parse_tokenizer_spec(spec)
  if not epath.Path(path).is_file():
    raise FileNotFoundError(f"tokenizer file {path!r} does not exist (it is copied into the checkpoint)")
  return f"{kind}:{_KEPT_NAMES[kind]}"


def copy_tokenizer(spec: str | None, dst: str | os.PathLike) -> None:
  """Copies the file of tokenizer `spec` into the params checkpoint `dst` that the caller has just written (local
  or a gs:// URL, as Orbax writes it) under the name `bundled_tokenizer` recorded, so the checkpoint loads without
  `--tokenizer` wherever it is moved.

  A copy that fails (the disk the weights just filled, Ctrl-C, a tokenizer file gone since the start) removes
  `dst`: it is the caller's own (`save_params` refuses an existing folder), and a checkpoint whose metadata names a
  tokenizer file it lacks, or holds half of, looked finished while a retry was refused ("exists")."""
  if not spec:
    return
  kind, path = qtext.parse_tokenizer_spec(spec)
  try:
    (epath.Path(dst) / _KEPT_NAMES[kind]).write_bytes(epath.Path(path).read_bytes())
  except BaseException:
    epath.Path(dst).rmtree(missing_ok=True)
    raise


def hf_model_card(src: str | os.PathLike) -> tuple[str | None, str | None]:
  """(chat format, tokenizer spec) of a Hugging Face Qwen / Qwen-VL directory (or the directory of a single
  checkpoint file), each None when the directory does not say: `generation_config.json`'s `chat_format`
  ('chatml' in Qwen-VL-Chat's, 'raw' in the base models') and its `qwen.tiktoken`."""
  folder = pathlib.Path(src) if pathlib.Path(src).is_dir() else pathlib.Path(src).parent
  chat_format = None
  try:
    chat_format = json.loads((folder / "generation_config.json").read_text(encoding="utf-8")).get("chat_format")
  except (OSError, ValueError, AttributeError):  # absent or not a JSON object: the flags decide
    pass
  vocab = folder / "qwen.tiktoken"
  return (chat_format if chat_format in ("chatml", "raw") else None,
          f"qwen:{vocab.absolute()}" if vocab.is_file() else None)


def hf_generation_config(chat_format: str) -> dict:
  """The `generation_config.json` of the released Qwen-VL model in `chat_format` (QWENVL_SPEC §4.5), which the
  reference's `model.chat` reads: its chat format ('chatml': Qwen-VL-Chat; 'raw': the base Qwen-VL), the window
  of history it keeps, eos / pad ids (Qwen's `<|endoftext|>` 151643, as the reference's tokenizer code has it) and
  the sampling defaults (top_p 0.3, top_k 0 = no top-k filter).

  The base model's file is not verified (SPEC §4.5); it takes the chat model's keys and values with `raw`, which
  gives its released size, 218 bytes, in transformers' layout (`json.dumps(indent=2, sort_keys=True)` + newline).
  """
  if chat_format not in qchat.CHAT_FORMATS:
    raise ValueError(f"unknown chat format {chat_format!r}; known: {', '.join(map(repr, qchat.CHAT_FORMATS))}")
  return {"chat_format": chat_format, "do_sample": True, "eos_token_id": qtok.EOD_ID, "max_new_tokens": 512,
          "max_window_size": qchat.DEFAULT_MAX_WINDOW_SIZE, "pad_token_id": qtok.EOD_ID, "top_k": qchat.CHAT_TOP_K,
          "top_p": qchat.CHAT_TOP_P,
          "transformers_version": "4.31.0"}  # the version the reference's code was written for


def recorded_model(params: str) -> dict:
  """What a params checkpoint records about its model (`custom_metadata["model"]`, `checkpoint.model_metadata`:
  preset, image size, chat format, tokenizer) as stored, or {} (older ones); `recorded_chat_format` and
  `recorded_tokenizer` check and resolve the last two."""
  try:
    info = orbax_store.ParamReader(params).custom_metadata.get("model") or {}
  except (OSError, ValueError, KeyError, TypeError):  # unreadable metadata: the restore reports it properly
    return {}
  return info if isinstance(info, dict) else {}


def recorded_chat_format(params: str, info: dict) -> str | None:
  """The chat format `info` (`recorded_model(params)`) records, or None."""
  if info.get("chat_format") not in (None, "chatml", "raw"):
    raise errors.ConfigError(f"checkpoint {params} records an unknown chat format {info['chat_format']!r}",
                             hint="pass --chat_format=chatml or --chat_format=raw")
  return info.get("chat_format")


def recorded_tokenizer(params: str, info: dict) -> str | None:
  """The spec of the tokenizer copy `info` (`recorded_model(params)`) records, its file in `params`; or None."""
  if not info.get("tokenizer"):
    return None
  try:
    kind, name = qtext.parse_tokenizer_spec(info["tokenizer"])
  except ValueError as e:
    raise errors.ConfigError(f"checkpoint {params} records a bad tokenizer: {e}", hint="pass --tokenizer") from e
  return f"{kind}:{os.path.join(params, os.path.basename(name))}"
