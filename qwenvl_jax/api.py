"""The few calls a user of the library needs, re-exported by `qwenvl_jax` itself (imported lazily there).

  import qwenvl_jax
  loaded = qwenvl_jax.load("runs/stage3")                         # a training run: preset, resolution, tokenizer
  loaded = qwenvl_jax.load("ckpt/params", tokenizer="qwen:qwen.tiktoken")   # a converted params checkpoint
  gen = qwenvl_jax.Generator(loaded.model)
  reply, history = qwenvl_jax.chat(gen, loaded.tokenizer, "Picture 1:<img>a.jpg</img>\\nWhat is this?",
                                   chat_format=loaded.chat_format)

A top-layer module (like the entry points): it puts the checkpoint resolution, the tokenizer spec and the
inference loader together, the same way `generate`, `evaluate` and `serve` do.
"""
from __future__ import annotations

import os
from typing import Any, NamedTuple

from qwenvl_jax import errors
from qwenvl_jax.inference import layout, loading, model_source


class Loaded(NamedTuple):
  """A model restored onto a mesh over all devices, with its tokenizer, the chat format its run trained on
  ('chatml' for stage 3, 'raw' before; a converted checkpoint's recorded one, else 'chatml'), and the mesh and
  rules it lives on."""

  model: Any         # qwenvl_jax.model.QwenVL
  tokenizer: Any     # qwenvl_jax.text.Tokenizer
  chat_format: str
  mesh: Any          # jax.sharding.Mesh
  rules: tuple       # the sharding rule table


def load(checkpoint: str | os.PathLike, *, tokenizer: str | None = None, model: str | None = None,
         dtype: str = "bfloat16", image_size: int | None = None, rules: str = layout.DEFAULT_RULES,
         tensor_parallel: int = 0, quantize: str | None = None, group_size: int | None = None,
         attention: str = "xla") -> Loaded:
  """Restores a model for inference from a training run or a params checkpoint.

  Args:
    checkpoint: a path (str or pathlib.Path): a training run directory (its latest step), one of its
      `checkpoints/<step>`, or a params checkpoint (e.g. from `python -m qwenvl_jax.convert`); see
      `inference.model_source`. A run's `config.json`, or what a converted checkpoint records, supplies the
      preset, the resolution, the chat format and the tokenizer unless given here.
    tokenizer: a tokenizer spec (`text.load_tokenizer`); required for a params checkpoint that keeps none.
    model: the architecture preset (default: the run's, else `qwen_vl_7b`); checked against the stored shapes.
    dtype: compute and weight dtype (`bfloat16` or `float32`).
    image_size: input resolution (default: the run's, else the preset's).
    rules: the sharding rule table (`qwenvl_jax/sharding_rules.py`): `inference_tp` (tensor parallel within a
      host, replicas across hosts) or `fsdp` (as training).
    tensor_parallel: chips per model replica (0 = one host's chips; `inference.layout`).
    quantize: "int8" or "int4" weights, quantized while restoring, one kernel at a time (the CLI's `--quantize`;
      None = as stored: a checkpoint from `convert --mode=quantize` loads quantized without it).
    group_size: int4's group size along each kernel's input (default `model.quantize.DEFAULT_GROUP_SIZE`).
    attention: "xla" (the reference's numerics) or "splash" (TPU only: the kernel for the image encoder and the
      prefill; `inference.loading.ATTENTION`).

  Raises:
    ValueError (errors.ConfigError): no tokenizer for a params checkpoint, a malformed spec, a preset whose shapes
    differ from the stored ones, a checkpoint that is no path, a group_size without int4, splash attention off a
    TPU. FileNotFoundError: a missing run, step, checkpoint or tokenizer file.
  """
  if isinstance(checkpoint, os.PathLike):  # a pathlib.Path: model_source splits RUN@STEP on the string
    checkpoint = os.fspath(checkpoint)
  if checkpoint is not None and not isinstance(checkpoint, str):
    raise errors.ConfigError(f"load() takes the checkpoint as a path (str or pathlib.Path), got "
                             f"{type(checkpoint).__name__} {checkpoint!r}")
  if not checkpoint:
    raise errors.ConfigError("load() needs a checkpoint: a training run, its checkpoints/<step>, or a params "
                             "directory")
  if group_size is not None and (quantize != "int4" or group_size < 1):  # as the CLI's --group_size
    raise errors.ConfigError(f"group_size={group_size}: the group size of int4 weights, >= 1 "
                             f"(quantize={quantize!r} has none)" if quantize != "int4" else
                             f"group_size={group_size} must be >= 1")
  loading.check_attention(attention, flag="attention")  # before the checkpoint is resolved or read
  source = model_source.resolve(checkpoint, model=model, tokenizer=tokenizer, image_size=image_size)
  if not source.tokenizer:
    raise errors.ConfigError(f"loading {checkpoint!r} needs tokenizer= (qwen:PATH, sentencepiece:PATH or a file)")
  tok, _, mesh, rule_table, model_ = loading.load_source(source, dtype=dtype, rules=rules,
                                                         tensor_parallel=tensor_parallel, quantize=quantize,
                                                         group_size=group_size, attention=attention)
  return Loaded(model_, tok, source.chat_format, mesh, rule_table)
