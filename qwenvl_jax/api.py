"""The few calls a user of the library needs, re-exported by `qwenvl_jax` itself (imported lazily there).

  import qwenvl_jax
  loaded = qwenvl_jax.load("trainer:runs/stage3")              # a training run: preset, resolution, tokenizer
  loaded = qwenvl_jax.load("ckpt/params", tokenizer="qwen:qwen.tiktoken")   # a converted checkpoint
  gen = qwenvl_jax.Generator(loaded.model)
  reply, history = qwenvl_jax.chat(gen, loaded.tokenizer, "Picture 1:<img>a.jpg</img>\\nWhat is this?")

A top-layer module (like the entry points): it ties the training run layout, the checkpoint reader, the tokenizer
spec and the inference loader together, which no layer below may do.
"""
from __future__ import annotations

import json
import os
from typing import Any, NamedTuple

from etils import epath

from qwenvl_jax import text
from qwenvl_jax.inference import loading
from qwenvl_jax.training.checkpointing import resolve_params_checkpoint


class Loaded(NamedTuple):
  """A model restored onto a mesh over all devices, with its tokenizer and the mesh and rules it lives on."""

  model: Any         # qwenvl_jax.model.QwenVL
  tokenizer: Any     # qwenvl_jax.text.Tokenizer
  mesh: Any          # jax.sharding.Mesh
  rules: tuple       # the sharding rule table


def load(source: str, *, tokenizer: str | None = None, model: str | None = None, dtype: str = "bfloat16",
         image_size: int | None = None, rules: str = "fsdp") -> Loaded:
  """Restores a model for inference from a training run or a params checkpoint.

  Args:
    source: `trainer:WORKDIR[@STEP]` (a run of `python -m qwenvl_jax.train`: the latest or the given step; its
      `config.json` supplies the preset, the resolution and the tokenizer unless given here), or `params:PATH` /
      `PATH` (a params checkpoint, e.g. from `python -m qwenvl_jax.convert`).
    tokenizer: a tokenizer spec (`text.load_tokenizer`); required for a params checkpoint.
    model: the architecture preset (default: the run's, else `qwen_vl_7b`).
    dtype: compute and weight dtype (`bfloat16` or `float32`).
    image_size: input resolution (default: the run's, else the preset's).
    rules: the sharding rule table (`qwenvl_jax/sharding_rules.py`).

  Raises:
    ValueError: no tokenizer for a params checkpoint, or a malformed spec. FileNotFoundError: a missing run,
    step, checkpoint or tokenizer file.
  """
  if source.startswith("trainer:"):
    workdir = source[len("trainer:"):].partition("@")[0]
    config_file = epath.Path(workdir) / "config.json"
    if not config_file.exists():
      raise FileNotFoundError(f"{source!r}: {config_file} does not exist (not a training run's workdir)")
    run = json.loads(config_file.read_text())
    model = model or run["model"]
    image_size = image_size or run["res"]
    # '' in a run's config is the synthetic SentencePiece model the trainer saved in the workdir.
    tokenizer = tokenizer or run["tokenizer"] or os.path.join(workdir, "tokenizer.model")
    path = resolve_params_checkpoint(source)
  else:
    path = resolve_params_checkpoint(source if source.startswith("params:") else f"params:{source}")
    model = model or "qwen_vl_7b"
    if not tokenizer:
      raise ValueError(f"loading {source!r} needs tokenizer= (qwen:PATH, sentencepiece:PATH or a file)")
  tok = text.load_tokenizer(tokenizer)
  cfg = loading.model_config(model, tok, dtype=dtype, image_size=image_size)
  mesh, rule_table = loading.inference_mesh(rules)
  return Loaded(loading.load_model(cfg, path, mesh, rule_table), tok, mesh, rule_table)
