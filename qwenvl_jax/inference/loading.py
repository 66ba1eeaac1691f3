"""Loading what inference and evaluation jobs need: the model config matched to the tokenizer (which
`text.load_tokenizer` loads from its spec), the mesh, and the weights (a params checkpoint, or random weights for
smoke tests).

The tokenizer decides the `<imgpad>` id the model looks for (`cfg.image_pad_id`): Qwen's 151859, or the small id of
a SentencePiece model trained for a from-scratch run. With random weights the vocabulary is also grown to cover
the tokenizer (so `--model=tiny` runs with the real Qwen vocabulary); with a checkpoint the stored shapes decide,
and a mismatch is reported before the restore with the preset that fits (`model_source`, which also resolves a
training run directory into its params, preset, image size, tokenizer and chat format).
"""

from __future__ import annotations

import dataclasses
import os

import jax
from flax import nnx

from qwenvl_jax import errors, sharding
from qwenvl_jax import text as qtext
from qwenvl_jax.inference import layout, model_source
from qwenvl_jax.model import QwenVL, kernels
from qwenvl_jax.model.config import QwenVLConfig, get_preset


# The attention of inference (`--attention`; `QwenVLConfig.attention_impl`): "xla" (the reference's numerics, any
# backend) or "splash", the TPU kernel for the image encoder and the prompt prefill (the square masks it tiles;
# decode steps, a few queries against the cache, keep xla): it never writes the [rows, heads, P, P] float32 scores
# of each layer. Its rounding differs from the reference's (it does not round the probabilities to bf16 before
# the value matmul), so it is a choice, not the default. cudnn is not offered: nothing has run it on a GPU here.
ATTENTION = ("xla", "splash")


def check_attention(impl: str, platform: str | None = None, *, flag: str = "--attention") -> None:
  """Refuses an inference attention this process cannot run before anything loads: one not in `ATTENTION`, or
  "splash" on a backend other than a TPU (`platform`, default `jax.default_backend()`) outside the Pallas
  interpreter (`model.kernels.interpret_mode`, tests only). `flag` names the setting in the message.

  Raises:
    errors.ConfigError.
  """
  if impl not in ATTENTION:
    raise errors.ConfigError(f"{flag}={impl!r}: inference attention is one of {', '.join(ATTENTION)}")
  platform = platform or jax.default_backend()
  if impl == "splash" and platform != "tpu" and not kernels.interpreting():
    raise errors.ConfigError(f"{flag}=splash is a TPU kernel, but JAX runs on {platform!r} here",
                             hint=f"omit {flag} (xla attention runs on any backend)")


def model_config(preset: str, tok: qtext.Tokenizer, *, dtype: str = "bfloat16", random_weights: bool = False,
                 image_size: int | None = None, attention: str = "xla") -> QwenVLConfig:
  """The preset's config with the tokenizer's `<imgpad>` id, no remat (inference), and the weights kept in the
  compute dtype (bf16 weights halve the memory of a 9.6B model; the reference runs all in bf16).

  random_weights: also grow the vocabulary to a multiple of 128 covering the tokenizer.
  attention: `attention_impl`, one of `ATTENTION` (checked against the backend by `check_attention`).
  """
  param_dtype = dtype if dtype in ("bfloat16", "float32") else "float32"
  cfg = get_preset(preset, dtype=dtype, param_dtype=param_dtype, remat_policy="none", attention_impl=attention)
  llm = cfg.llm
  if random_weights and tok.vocab_size > llm.vocab_size:
    llm = dataclasses.replace(llm, vocab_size=-(-tok.vocab_size // 128) * 128)
  elif tok.vocab_size > llm.vocab_size:
    raise errors.ConfigError(
        f"the tokenizer has {tok.vocab_size} tokens but the {preset} model's vocabulary has {llm.vocab_size}: it is "
        "not the tokenizer these weights were trained with",
        hint="pass the checkpoint's own tokenizer (a training run and a converted checkpoint record theirs: omit "
        "--tokenizer), or the preset that matches the weights")
  cfg = dataclasses.replace(cfg, llm=llm, image_pad_id=tok.img_pad_id)
  if image_size is not None:
    cfg = cfg.with_image_size(image_size)
  return cfg


def inference_mesh(rules_name: str = "fsdp", **ici) -> tuple[jax.sharding.Mesh, sharding.Rules]:
  """A mesh over all devices with explicit ICI degrees (default: everything on `fsdp`, which shards weights and
  batches alike: what conversion uses to hold a model it only reads once). Decoding uses `layout`'s mesh."""
  ici = ici or {"fsdp": -1}
  return sharding.make_mesh(ici), sharding.load_rules(rules_name)


def load_model(cfg: QwenVLConfig, checkpoint: str | None, mesh: jax.sharding.Mesh, rules: sharding.Rules, *,
               seed: int = 0, preset: str | None = None, quantize: str | None = None,
               group_size: int | None = None) -> QwenVL:
  """Restores `checkpoint` (a params directory) onto `mesh`, or initializes random weights when it is None.

  preset: the name `cfg` came from; when given, the stored shapes of a float checkpoint are checked first and a
    mismatch names the differing parameters and the preset that fits (`model_source.check_preset`).
  quantize: None/"none" keeps the stored weights; "int8" / "int4" quantizes them weight-only
    (`qwenvl_jax.inference.quantized`), leaf by leaf while restoring. A checkpoint written quantized
    (`convert --mode=quantize`) is always loaded quantized as stored; `quantize` must then match it or be None.
  group_size: int4 group size (default `model.quantize.DEFAULT_GROUP_SIZE`).
  """
  qcfg = quantization_config(quantize, group_size)
  if checkpoint:
    from qwenvl_jax import checkpoint as ckpt  # pylint: disable=import-outside-toplevel
    from qwenvl_jax.inference import quantized  # pylint: disable=import-outside-toplevel
    if not os.path.isdir(checkpoint):
      raise FileNotFoundError(f"checkpoint directory {checkpoint!r} does not exist")
    if quantized.checkpoint_quantization(checkpoint) is not None:
      return quantized.load_quantized_model(checkpoint, cfg, mesh, rules, expected=qcfg)
    if preset is not None:
      model_source.check_preset(checkpoint, cfg, preset)
    if qcfg is not None:
      return quantized.quantize_checkpoint_on_load(checkpoint, cfg, qcfg, mesh, rules)
    return ckpt.load_model(checkpoint, cfg, mesh, rules)
  model = sharding.init_sharded(lambda: QwenVL(cfg, rngs=nnx.Rngs(seed)), mesh, rules)
  if qcfg is not None:
    from qwenvl_jax.inference import quantized  # pylint: disable=import-outside-toplevel
    model = quantized.quantize_sharded(model, qcfg, mesh, rules)
  return model


def source_config(source: model_source.ModelSource, *, dtype: str = "bfloat16", attention: str = "xla"):
  """(tokenizer, QwenVLConfig) of a resolved `source`: what `load_source` reads before it builds a mesh and loads
  weights (also what `generate` needs, before the weights load, to know which history turns the prompt keeps)."""
  tok = qtext.load_tokenizer(source.tokenizer)
  return tok, model_config(source.preset, tok, dtype=dtype, random_weights=not source.params,
                           image_size=source.image_size, attention=attention)


def load_source(source: model_source.ModelSource, *, dtype: str = "bfloat16", rules: str = layout.DEFAULT_RULES,
                mesh_axes: dict | None = None, tensor_parallel: int = 0, seed: int = 0, quantize: str | None = None,
                group_size: int | None = None, attention: str = "xla"):
  """The model a resolved `source` (with its tokenizer spec) names, ready for inference.

  The one path of `generate`, `serve`, the eval job and `qwenvl_jax.load`: tokenizer -> config (random weights when
  the source has no params) -> inference mesh (`layout.make_inference_mesh`: tensor parallelism over
  `tensor_parallel` chips, 0 = one host's, replicas over the rest; or the ICI degrees `mesh_axes`) -> restored (or
  quantized) model. `attention`: one of `ATTENTION`, checked first (`check_attention`).

  Returns:
    (tokenizer, QwenVLConfig, mesh, rules, QwenVL).
  """
  check_attention(attention, flag="attention")
  tok, cfg = source_config(source, dtype=dtype, attention=attention)
  mesh, rule_table = layout.make_inference_mesh(cfg, rules, tensor_parallel=tensor_parallel, mesh_axes=mesh_axes)
  model = load_model(cfg, source.params, mesh, rule_table, seed=seed, preset=source.preset, quantize=quantize,
                     group_size=group_size)
  return tok, cfg, mesh, rule_table, model


def quantization_config(quantize: str | None, group_size: int | None = None):
  """The `model.quantize.QuantConfig` of a `--quantize` value ("none"/None/"" = no quantization -> None)."""
  if quantize in (None, "", "none"):
    return None
  from qwenvl_jax.model import quantize as qlib  # pylint: disable=import-outside-toplevel
  return qlib.QuantConfig(mode=quantize, group_size=group_size or qlib.DEFAULT_GROUP_SIZE)
