"""Weight-only quantization: int8 per-channel and int4 / nf4 per-group kernels, held quantized on device.

Used for inference (`--quantize`) and as the frozen base of QLoRA training (`training.peft`: the LLM's
projections quantized, float32 LoRA adapters attached to the `QuantizedEinsum`s by `model.lora.apply_lora`).

Letters: L stacked layers (scanned blocks), D/F/N/H as in the model, V vocabulary, G the int4 group size.

What is quantized (`quantize_model`): every `layers.Einsum` kernel (the LLM's c_attn, c_proj, w1, w2 and
`lm_head`, the ViT's qkv/out/fc/proj, the resampler's projections) and the token embedding `wte` (by default).
Kept in the compute dtype: norms, biases, conv1, positional tables, the resampler's queries and `adapter.proj`
(together < 0.3 % of the 9.6B parameters).

Layout. An `Einsum(spec, kernel)` becomes a `QuantizedEinsum` holding
  qvalue  int8/int4, the kernel's shape            e.g. [L, D, 3, N, H] for c_attn
  scale   float32, the kernel's rank               e.g. [L, 1, 3, N, H] (int8) or [L, D/G, 3, N, H] (int4)
  bias    as before (the compute dtype)
Scales are per output channel (every non-contracted axis of the kernel, the stacked `layers` axis included, so
each layer has its own scales); int4 adds groups of G along the last contracted axis (the per-group scheme of GPTQ/AWQ
int4 checkpoints; any other contracted axis then gets a scale per index, so a group is G consecutive inputs of the
flattened input), or one group when G does not divide it. The embedding `[V, D]` gets one scale per row (int8) or per
row and group (int4). nf4 (QLoRA training's default) groups like int4 and stores uint4 codes of qwix's NormalFloat4
table (as int4, code - 8), absmax-scaled per group. Both arrays keep the kernel's logical axis names, so a rule table
shards `qvalue` exactly as it sharded the kernel, and a scale axis shards with it where the mesh divides it (a length-1
contracted axis stays replicated).

Compute. `QuantizedEinsum` calls qwix's einsum on `QArray(qvalue, scale)` (weight-only: the activation stays in
the compute dtype). qwix dequantizes inside the jitted program, one scanned layer at a time, and XLA fuses that
into the matmul: the int8/int4 arrays are what lives in device memory between calls.

The numerics (absmax calibration, rounding, int4 range) are qwix's (`qwix.quantize`): Google's JAX quantization
library, the same one the LoRA/QLoRA trainer uses; this module only decides which axes are channels/groups for
our fused kernel layouts and keeps the logical axis names that qwix's interception-based PTQ would drop.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp
import qwix
from flax import nnx

from qwenvl_jax import errors
from qwenvl_jax.model import layers

MODES = ("int8", "int4", "nf4")
DEFAULT_GROUP_SIZE = 128
# nf4 (QLoRA's NormalFloat4: 16 levels at normal quantiles, absmax-scaled per group) is a qwix "synthetic" qtype
# whose codes 0..15 qwix holds as uint4. TensorStore (Orbax) cannot store uint4, so our parameter holds code - 8 as
# int4 (same 4 bits in memory); `_qarray` shifts back before qwix's table lookup (fused into the dequantization).
_QTYPES = {"int8": jnp.int8, "int4": jnp.int4, "nf4": "nf4"}
_NF4_OFFSET = 8


def _qarray(qvalue: jax.Array, scale: jax.Array, mode: str) -> qwix.QArray:
  """qwix's QArray of stored codes (`quantize_array`'s layout) for `mode`."""
  if mode == "nf4":
    return qwix.QArray((qvalue.astype(jnp.int8) + _NF4_OFFSET).astype(jnp.uint4), scale, qtype="nf4")
  return qwix.QArray(qvalue, scale, qtype=qvalue.dtype)


@dataclasses.dataclass(frozen=True)
class QuantConfig:
  """How weights are quantized.

  mode: "int8" (per-channel), "int4" or "nf4" (per-channel and per-group of `group_size` along the contracted
    axis; nf4 is the QLoRA paper's 4-bit NormalFloat, used by QLoRA training, `training.peft`).
  group_size: G for int4 / nf4 (ignored for int8).
  embeddings: also quantize the token embedding `wte` (1.2 GB of the 9.6B model's 19.3 GB in bf16).
  """
  mode: str = "int8"
  group_size: int = DEFAULT_GROUP_SIZE
  embeddings: bool = True

  def __post_init__(self):
    if self.mode not in MODES:
      raise errors.ConfigError(f"unknown quantization mode {self.mode!r}; known: {MODES}")
    # A power of two divides every dimension of the real models (multiples of 128) that is at least as long; any
    # other G would leave most kernels unable to split into groups, which then fall back to one scale per channel
    # without a word.
    if self.group_size < 1 or self.group_size & (self.group_size - 1):
      raise errors.ConfigError(f"group_size must be a power of two (e.g. 64 or 128), got {self.group_size}")

  @property
  def qtype(self):
    return _QTYPES[self.mode]

  def to_json(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, data: dict) -> "QuantConfig":
    return cls(**data)


def _how(kernel_ndim: int, contracted: tuple[int, ...], cfg: QuantConfig, shape: tuple[int, ...]) -> dict:
  """qwix's channelwise/tiled axes for a kernel whose axes `contracted` are summed over by its einsum."""
  channels = tuple(a for a in range(kernel_ndim) if a not in contracted)
  tiled = {}
  if cfg.mode in ("int4", "nf4"):
    last = contracted[-1]
    if shape[last] > cfg.group_size and shape[last] % cfg.group_size == 0:
      tiled[last] = cfg.group_size
      # A group is G consecutive inputs of the flattened input (QLoRA/bitsandbytes blocks of a torch [out, in]
      # row): the other contracted axes (e.g. the head axis N of c_proj's [N, H, D]) get one scale per index.
      tiled.update({a: 1 for a in contracted[:-1]})
  return {"channelwise_axes": channels, "tiled_axes": tiled}


def quantize_array(w: jax.Array, contracted: tuple[int, ...], cfg: QuantConfig) -> tuple[jax.Array, jax.Array]:
  """(qvalue int8 / int4 (nf4: code - 8) of w's shape, scale float32 of w's rank) of a float kernel. Pure, jit-able.

  contracted: the axes of `w` its matmul sums over (they share a scale; int4 / nf4 group the last of them).
  """
  q = qwix.quantize(w.astype(jnp.float32), cfg.qtype, **_how(w.ndim, contracted, cfg, w.shape))
  qvalue = q.qvalue
  if cfg.mode == "nf4":
    qvalue = (qvalue.astype(jnp.int8) - _NF4_OFFSET).astype(jnp.int4)
  return qvalue, q.scale.astype(jnp.float32)


def dequantize(qvalue: jax.Array, scale: jax.Array, dtype=jnp.float32, mode: str | None = None) -> jax.Array:
  """The float array `qvalue * scale` (scale broadcast over its groups; nf4: table[code] * scale) in `dtype`.

  mode: the QuantConfig mode the codes were made with; None = int8 / int4 (read from the codes' dtype).
  """
  mode = mode or jnp.dtype(qvalue.dtype).name
  return qwix.dequantize(_qarray(qvalue, scale.astype(dtype), mode)).astype(dtype)


def contracted_axes(spec: str, kernel_ndim: int) -> tuple[int, ...]:
  """Axes of a kernel (with any leading stacked axes) that `spec` ("btd,dknh->btknh") contracts."""
  inputs, out = spec.split("->")
  rhs = inputs.split(",")[1]
  lead = kernel_ndim - len(rhs)
  if lead < 0:
    raise ValueError(f"kernel of rank {kernel_ndim} is smaller than the einsum operand {rhs!r}")
  return tuple(lead + i for i, c in enumerate(rhs) if c not in out)


def _param(value: jax.Array, axes: tuple) -> nnx.Param:
  return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False)


def _axes(variable: nnx.Variable) -> tuple:
  names = variable.get_metadata().get("out_sharding")
  return tuple(names) if names else (None,) * variable.ndim


class QuantizedEinsum(nnx.Module):
  """`layers.Einsum` with a quantized kernel: y = einsum(spec, x, qvalue * scale) (+ bias) (+ the LoRA term when
  `model.lora.apply_lora` attached adapters: QLoRA).

  x: float[..., in] in any dtype (cast to the compute dtype); returns float[..., out] in the compute dtype.
  """

  def __init__(self, spec: str, qvalue: nnx.Param, scale: nnx.Param, bias: nnx.Param | None, *, dtype,
               mode: str):
    self.spec = spec
    self.dtype = dtype
    self.mode = mode
    self.qvalue = qvalue
    self.scale = scale
    self.bias = nnx.data(bias)

  @classmethod
  def from_einsum(cls, module: layers.Einsum, cfg: QuantConfig) -> "QuantizedEinsum":
    kernel = module.kernel
    contracted = contracted_axes(module.spec, kernel.ndim)
    qvalue, scale = quantize_array(kernel[...], contracted, cfg)
    axes = _axes(kernel)
    return cls(module.spec, _param(qvalue, axes), _param(scale, axes), module.bias, dtype=module.dtype,
               mode=cfg.mode)

  def __call__(self, x: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
    """dropout_key: the LoRA dropout's key (QLoRA training); None = no dropout. Ignored without an adapter."""
    # A float activation makes qwix dequantize the weight and run a float einsum (its "slow" path, which XLA fuses
    # with the dequantization): differentiable w.r.t. x, which is what QLoRA's backward pass needs (checked by
    # tests/training/test_qlora.py: adapters below a quantized layer get gradients).
    w = _qarray(self.qvalue[...], self.scale[...].astype(self.dtype), self.mode)
    y = qwix.einsum(self.spec, x.astype(self.dtype), w).astype(self.dtype)
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    if getattr(self, "lora_a", None) is not None:  # attached by `model.lora.apply_lora` (QLoRA)
      y = y + layers.lora_delta(self, x, dropout_key)
    return y

  def to_einsum(self, kernel: jax.Array) -> layers.Einsum:
    """The float `layers.Einsum` with this module's spec, axes, bias and compute dtype and the given kernel (same
    shape as `qvalue`; e.g. the dequantized one, or merged with a LoRA delta). No adapters."""
    axes = _axes(self.qvalue)
    bias = self.bias
    out = layers.Einsum(self.spec, kernel.shape, axes, dtype=self.dtype, param_dtype=kernel.dtype,
                        bias_shape=None if bias is None else bias.shape,
                        bias_axes=None if bias is None else _axes(bias),
                        kernel_init=lambda *_: kernel, rngs=nnx.Rngs(0))
    if bias is not None:
      out.bias = bias
    return out


class QuantizedEmbed(nnx.Module):
  """`nnx.Embed` with a quantized table: int32[B, T] -> float[B, T, D] (rows dequantized after the gather)."""

  def __init__(self, qvalue: nnx.Param, scale: nnx.Param, *, dtype, mode: str):
    self.dtype = dtype
    self.mode = mode
    self.qvalue = qvalue
    self.scale = scale

  @classmethod
  def from_embed(cls, module: nnx.Embed, cfg: QuantConfig) -> "QuantizedEmbed":
    table = module.embedding
    # A row is looked up whole, so its D entries are the "contracted" axis: one scale per row (and group).
    qvalue, scale = quantize_array(table[...], (1,), cfg)
    axes = _axes(table)
    return cls(_param(qvalue, axes), _param(scale, axes), dtype=module.dtype or table.dtype, mode=cfg.mode)

  def __call__(self, input_ids: jax.Array) -> jax.Array:
    rows_q = jnp.take(self.qvalue[...], input_ids, axis=0)
    rows_s = jnp.take(self.scale[...], input_ids, axis=0)
    return dequantize(rows_q, rows_s, self.dtype, self.mode)


def _targets(model: nnx.Module, cfg: QuantConfig, only: tuple[str, ...] | None = None
             ) -> list[tuple[tuple, nnx.Module]]:
  found = []
  for path, node in nnx.iter_graph(model):
    if isinstance(node, layers.Einsum) or (cfg.embeddings and isinstance(node, nnx.Embed)):
      if only is None or any(re.fullmatch(p, "/".join(str(k) for k in path)) for p in only):
        found.append((tuple(path), node))
  return found


def _parent(model: nnx.Module, path: tuple) -> nnx.Module:
  node = model
  for key in path[:-1]:
    node = getattr(node, key) if isinstance(key, str) else node[key]
  return node


def quantize_model(model: nnx.Module, cfg: QuantConfig, only: tuple[str, ...] | None = None,
                   what: str = "quantize target") -> nnx.Module:
  """Replaces, in place, every Einsum (and the token embedding) of `model` by its quantized form; returns it.

  only: full-match regexes over module paths (e.g. `llm/blocks/.*`, QLoRA's LLM projections); None = all. One that
    matches nothing is a ValueError naming it as `what` (the setting it came from, e.g. a config key).
  Works on concrete models (quantizes their values) and inside `nnx.eval_shape` (the abstract quantized
  model, for shardings and AOT plans). The float kernels are dropped from the model.
  """
  targets = _targets(model, cfg, only)
  for pattern in only or ():
    if not any(re.fullmatch(pattern, "/".join(str(k) for k in path)) for path, _ in targets):
      raise ValueError(f"{what} {pattern!r} matches no projection; projections look like llm/blocks/attn/qkv, "
                       "visual/blocks/mlp/fc")
  for path, node in targets:
    new = (QuantizedEinsum.from_einsum(node, cfg) if isinstance(node, layers.Einsum)
           else QuantizedEmbed.from_embed(node, cfg))
    setattr(_parent(model, path), path[-1], new)
  return model


def source_map(model: nnx.Module, cfg: QuantConfig, only: tuple[str, ...] | None = None
               ) -> dict[str, tuple[str, tuple[int, ...]]]:
  """For a float model: quantized module path (slash-joined) -> (its float parameter's path, contracted axes).

  What a loader needs to quantize a float checkpoint leaf by leaf: `qvalue`/`scale` of the module at the key
  come from the float parameter at the value.
  """
  out = {}
  for path, node in _targets(model, cfg, only):
    key = "/".join(str(p) for p in path)
    if isinstance(node, layers.Einsum):
      out[key] = (key + "/kernel", contracted_axes(node.spec, node.kernel.ndim))
    else:
      out[key] = (key + "/embedding", (1,))
  return out


def is_quantized(model: nnx.Module) -> bool:
  """Whether `model` holds any quantized module."""
  return any(isinstance(n, (QuantizedEinsum, QuantizedEmbed)) for _, n in nnx.iter_graph(model))


def weight_bytes(state: Any) -> dict[str, int]:
  """Bytes of the parameters of a (possibly abstract) state by dtype name, int4 counted as half a byte."""
  out: dict[str, int] = {}
  for leaf in jax.tree.leaves(state):
    dtype = jnp.dtype(leaf.dtype)
    bits = 4 if dtype == jnp.int4 else dtype.itemsize * 8
    n = 1
    for d in leaf.shape:
      n *= d
    out[dtype.name] = out.get(dtype.name, 0) + n * bits // 8
  return out
