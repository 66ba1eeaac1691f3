"""qwenvl_jax: Qwen-VL in JAX/Flax NNX for TPU pods and GPU hosts.

The names a user needs, imported on first use (so `import qwenvl_jax` stays cheap and does not start JAX):

  load, Loaded                    a model + tokenizer from a training run or a params checkpoint (`api.py`)
  load_tokenizer                  the one tokenizer spec: qwen:PATH, sentencepiece:PATH, or a file (`text`)
  Generator, GenerationConfig     batched prefill + KV-cache decoding (`inference`)
  chat, chat_stream               Qwen-VL-Chat's ChatML chat with history (`inference.chat`)
  QwenVL, QwenVLConfig, get_preset    the model and its presets (`model`)
  torch_to_orbax, orbax_to_torch, init_from_pretrained    weight conversion (`checkpoint`)
  train                           run a training stage from an experiment config (`training`)

Sub-packages, lowest layer first (docs/DESIGN.md §0): sharding/hardware/distributed; model, text; data;
checkpoint, cleaning; training, inference; planning, evaluation; the entry points (plan, train, evaluate,
generate, convert, clean).
"""
import importlib

_EXPORTS = {
    "load": "qwenvl_jax.api", "Loaded": "qwenvl_jax.api",
    "load_tokenizer": "qwenvl_jax.text",
    "Generator": "qwenvl_jax.inference", "GenerationConfig": "qwenvl_jax.inference",
    "chat": "qwenvl_jax.inference.chat", "chat_stream": "qwenvl_jax.inference.chat",
    "QwenVL": "qwenvl_jax.model", "QwenVLConfig": "qwenvl_jax.model", "get_preset": "qwenvl_jax.model",
    "torch_to_orbax": "qwenvl_jax.checkpoint", "orbax_to_torch": "qwenvl_jax.checkpoint",
    "init_from_pretrained": "qwenvl_jax.checkpoint",
    "train": "qwenvl_jax.training",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
  if name not in _EXPORTS:
    raise AttributeError(f"module 'qwenvl_jax' has no attribute {name!r}")
  value = getattr(importlib.import_module(_EXPORTS[name]), name)
  globals()[name] = value  # later lookups skip __getattr__
  return value


def __dir__():
  # The exports and the module's dunders only: not the helpers (`importlib`, `_EXPORTS`) tab completion offered.
  return sorted({n for n in globals() if n.startswith("__")} | set(_EXPORTS))
