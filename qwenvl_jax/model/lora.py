"""LoRA adapters on the model's `Einsum` projections: attach, count, merge, and the PEFT names of the official ones.

Letters: L stacked layers (absent outside the scanned blocks), I the kernel's input (contracted) dims, O its output
dims, r the rank. A kernel `[L, *I, *O]` gets `lora_a float32[L, *I, r]` and `lora_b float32[L, r, *O]`; the
projection becomes `x @ W + (alpha / r) * (x @ A) @ B`, with A initialized as PEFT does (`nn.Linear`'s
kaiming-uniform, U(+-1/sqrt(prod I)) per layer) and B zero, so a fresh adapter changes nothing. Per layer, A and B
are PEFT's `lora_A.weight [r, prod I] = A.reshape(prod I, r).T` and `lora_B.weight [prod O, r] =
B.reshape(r, prod O).T` (our kernels keep torch's `[in, out]` order, `checkpoint.mapping.Linear`).

Adapters are `nnx.LoRAParam`s (a subclass of `nnx.Param`, so they shard, checkpoint and count like any
parameter) carrying logical axis names: `[layers, *kernel input axes, None]` and `[layers, None, *kernel output
axes]`, i.e. they shard like their base weight. They stay float32 whatever the base dtype, as PEFT trains them.

Why not qwix's `LoraProvider`: it creates the adapter variables lazily, inside the first intercepted `einsum`
call; our decoder and ViT blocks run under `nnx.scan`, where creating variables fails (qwix 0.1.8 with flax
0.12.8: `IndexError` in `nnx.scan`'s `scan_wrapper`, reproduced by hand, not in a test). Attaching
the adapters before the first call, with the stacked `[L, ...]` shapes `nnx.vmap` gave the kernels, is what
scanned layers need; `flax.nnx.LoRAParam` is the variable type made for it.

QLoRA: the same adapters attach to a `model.quantize.QuantizedEinsum` (the base kernel held as int4 / nf4 / int8
codes + float32 scales, qwix's numerics and einsum); its `qvalue` has the kernel's shape and axis names, so
shapes, axes, the forward term and the PEFT names are the same. Merging dequantizes (float32), adds the delta and
puts a plain float `layers.Einsum` back in the module's place.
"""

from __future__ import annotations

import dataclasses
import math
import re
import string
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from qwenvl_jax import errors, sharding, tree_paths
from qwenvl_jax.model import layers, quantize

# The module types adapters attach to: float projections and (QLoRA) quantized ones.
PROJECTIONS = (layers.Einsum, quantize.QuantizedEinsum)

# The official finetune.py targets ("c_attn", "attn.c_proj", "w1", "w2") as our module paths.
OFFICIAL_TARGETS = ("llm/blocks/attn/qkv", "llm/blocks/attn/out", "llm/blocks/mlp/w1", "llm/blocks/mlp/w2")
# modules_to_save names of the reference -> our module paths (trained in full, float32).
SAVED_MODULES = {"wte": "llm/wte", "lm_head": "llm/lm_head"}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """rank r (> 0), alpha (scale alpha / r), dropout on the adapter input (training only), targets: full-match
  regexes over `Einsum` module paths (e.g. `llm/blocks/attn/qkv`, `visual/blocks/.*`, `adapter/.*`),
  modules_to_save: reference names (`wte`, `lm_head`) of modules trained in full."""

  rank: int
  alpha: float = 16.0
  dropout: float = 0.0
  targets: tuple[str, ...] = OFFICIAL_TARGETS
  modules_to_save: tuple[str, ...] = ()

  def __post_init__(self):
    # The messages name the fields as the trainer's config spells them (`config.lora.<field>`, training.peft).
    if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
      raise ValueError(f"lora.rank={self.rank!r} must be an integer >= 1")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"lora.dropout={self.dropout!r} must be in [0, 1) (the probability of dropping an "
                       "adapter input)")
    if not math.isfinite(self.alpha) or self.alpha <= 0:  # 0: with B = 0 at the start, A and B never get a gradient
      raise ValueError(f"lora.alpha={self.alpha!r} must be a number > 0 (the adapters' scale is alpha / r; the "
                       "official alpha is 16)")
    if not self.targets:  # no adapter anywhere: a run whose gradient norm is 0 at every step
      raise ValueError("lora.targets is empty: the adapters would attach to no projection and the run would train "
                       f"nothing (the official targets: {','.join(OFFICIAL_TARGETS)})")
    tree_paths.compile_patterns(self.targets, "lora.targets:")
    unknown = set(self.modules_to_save) - set(SAVED_MODULES)
    if unknown:
      raise ValueError(f"lora.modules_to_save names {', '.join(sorted(unknown))}, which it does not know; "
                       f"known: {', '.join(sorted(SAVED_MODULES))}")

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


def _path(path: Sequence) -> str:
  return "/".join(str(p) for p in path)


def _split_spec(spec: str) -> tuple[str, str, str]:
  inputs, out = spec.replace(" ", "").split("->")
  lhs, rhs = inputs.split(",")
  return lhs, rhs, out


def _base_weight(module: nnx.Module) -> nnx.Param:
  """The kernel, or a quantized projection's codes (same shape and logical axes)."""
  return module.qvalue if isinstance(module, quantize.QuantizedEinsum) else module.kernel


def _attach(module: nnx.Module, path: str, cfg: LoraConfig, rngs: nnx.Rngs) -> None:
  lhs, rhs, out = _split_spec(module.spec)
  kernel = _base_weight(module)
  stack = kernel.ndim - len(rhs)
  axes = sharding.logical_axes_of(kernel)
  in_letters = [c for c in rhs if c in lhs]
  out_letters = [c for c in rhs if c not in lhs]
  if any(c in out for c in in_letters):
    raise ValueError(f"LoRA needs a plain projection; {module.spec!r} has a batch dimension in its kernel")
  r = sorted(set(string.ascii_letters) - set(lhs + rhs + out))[0]
  shape = tuple(kernel.shape)
  dims = {c: shape[stack + i] for i, c in enumerate(rhs)}
  kaxes = {c: axes[stack + i] for i, c in enumerate(rhs)}
  n_in, n_out = math.prod(dims[c] for c in in_letters), math.prod(dims[c] for c in out_letters)
  if cfg.rank > min(n_in, n_out):
    # A @ B has rank <= min(in, out): the extra rank adds parameters, not capacity, and alpha / r shrinks the update.
    raise ValueError(f"lora.rank={cfg.rank} is more than {path} can use ({n_in} inputs, {n_out} outputs: A @ B has "
                     f"rank at most {min(n_in, n_out)}); use a rank <= {min(n_in, n_out)} or leave {path} out of "
                     "the targets")
  lead, lead_axes = shape[:stack], tuple(axes[:stack])
  a_shape = lead + tuple(dims[c] for c in in_letters) + (cfg.rank,)
  b_shape = lead + (cfg.rank,) + tuple(dims[c] for c in out_letters)
  # PEFT: kaiming_uniform_(a=sqrt(5)) on lora_A.weight [r, in], i.e. U(+-1/sqrt(in)); B zero.
  init_a = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform",
                                             in_axis=tuple(range(stack, stack + len(in_letters))), out_axis=-1,
                                             batch_axis=tuple(range(stack)))
  module.lora_a = nnx.LoRAParam(init_a(rngs.params(), a_shape, jnp.float32),
                                out_sharding=lead_axes + tuple(kaxes[c] for c in in_letters) + (None,),
                                eager_sharding=False)
  module.lora_b = nnx.LoRAParam(jnp.zeros(b_shape, jnp.float32),
                                out_sharding=lead_axes + (None,) + tuple(kaxes[c] for c in out_letters),
                                eager_sharding=False)
  rest = "".join(c for c in lhs if c not in in_letters)
  module.lora_specs = (f"{lhs},{''.join(in_letters)}{r}->{rest}{r}", f"{rest}{r},{r}{''.join(out_letters)}->{out}")
  module.lora_scale = cfg.scale
  module.lora_dropout = cfg.dropout
  # For merging: kernel letters with the rank letter, stacked axes as leading letters of their own.
  lead_letters = "".join(sorted(set(string.ascii_letters) - set(lhs + rhs + out + r))[:stack])
  module.lora_merge_spec = (f"{lead_letters}{''.join(in_letters)}{r},{lead_letters}{r}{''.join(out_letters)}"
                            f"->{lead_letters}{rhs}")


def lora_modules(model: nnx.Module) -> dict[str, nnx.Module]:
  """{module path: Einsum or QuantizedEinsum} of the projections that carry adapters."""
  return {_path(p): m for p, m in nnx.iter_modules(model)
          if isinstance(m, PROJECTIONS) and getattr(m, "lora_a", None) is not None}


def apply_lora(model: nnx.Module, cfg: LoraConfig, *, rngs: nnx.Rngs) -> nnx.Module:
  """Attaches adapters to every `Einsum` whose path matches a target and casts `modules_to_save` to float32.

  Mutates and returns `model`. A target that matches no projection is an error (a typo would otherwise train
  nothing there).
  """
  einsums = {_path(p): m for p, m in nnx.iter_modules(model) if isinstance(m, PROJECTIONS)}
  for target in cfg.targets:
    hits = [p for p in einsums if re.fullmatch(target, p)]
    if not hits:
      close = errors.closest(target, sorted(einsums))
      # All 15 are listed: the first four in sorted order were the adapter's, not the llm/ ones users aim at.
      raise ValueError(f"lora.targets: {target!r} matches no projection"
                       + (f"; did you mean {' or '.join(close)}?" if close else "")
                       + f" (the projections: {', '.join(sorted(einsums))})")
    for p in hits:
      if getattr(einsums[p], "lora_a", None) is None:
        _attach(einsums[p], p, cfg, rngs)
  for name in cfg.modules_to_save:
    module = model
    for part in SAVED_MODULES[name].split("/"):
      module = getattr(module, part)
    for _, var in nnx.iter_graph(module):
      if isinstance(var, nnx.Param):
        var.set_value(var.get_value().astype(jnp.float32))
  return model


def lora_delta_weight(module: nnx.Module) -> jax.Array:
  """float32 kernel-shaped scale * A @ B of one adapted projection."""
  return jnp.einsum(module.lora_merge_spec, module.lora_a[...].astype(jnp.float32),
                    module.lora_b[...].astype(jnp.float32)) * module.lora_scale


def merge_lora(model: nnx.Module, quantized_dtype=jnp.float32) -> nnx.Module:
  """Folds every adapter into its kernel (W + scale * A @ B, in float32, cast back to W's dtype) and removes the
  adapters, leaving the plain model's parameter tree. Mutates and returns `model`.

  Every quantized projection (`QuantizedEinsum`: a QLoRA base, with or without an adapter) is dequantized in
  float32, merged, and replaced by a float `layers.Einsum` whose kernel has `quantized_dtype`, so the merged model
  is the plain float model's tree.
  """
  quantized = {_path(p): m for p, m in nnx.iter_modules(model) if isinstance(m, quantize.QuantizedEinsum)}
  for path, module in quantized.items():
    w = quantize.dequantize(module.qvalue[...], module.scale[...], jnp.float32, module.mode)
    if getattr(module, "lora_a", None) is not None:
      w = w + lora_delta_weight(module)
    parent = model
    for part in path.split("/")[:-1]:
      parent = getattr(parent, part)
    setattr(parent, path.split("/")[-1], module.to_einsum(w.astype(quantized_dtype)))
  for module in lora_modules(model).values():
    kernel = module.kernel
    merged = kernel[...].astype(jnp.float32) + lora_delta_weight(module)
    kernel.set_value(merged.astype(kernel.dtype))
    for name in ("lora_a", "lora_b", "lora_specs", "lora_scale", "lora_dropout", "lora_merge_spec"):
      delattr(module, name)
  return model


def frozen_pattern(cfg: LoraConfig) -> str:
  """The one frozen-path regex of a LoRA run: everything but the adapters and the modules_to_save."""
  saved = "".join(f"(?!{re.escape(SAVED_MODULES[n])}/)" for n in cfg.modules_to_save)
  return rf"(?!.*/lora_[ab]$){saved}.*"


def trained_count(state: nnx.State, cfg: LoraConfig) -> int:
  """Parameters a LoRA run trains (adapters + modules_to_save) in a (possibly abstract) state."""
  pattern = re.compile(frozen_pattern(cfg))
  return sum(int(v.size) for p, v in nnx.to_flat_state(state)
             if isinstance(v, nnx.Param) and not pattern.fullmatch(_path(p)))
