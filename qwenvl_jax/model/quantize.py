"""Weight-only quantization for inference: int8 per-channel and int4 per-group kernels, held quantized on device.

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
each layer has its own scales); int4 adds groups of G along the last contracted axis (the per-group scheme of
GPTQ/AWQ int4 checkpoints), or one group when G does not divide it. The embedding `[V, D]` gets one scale per
row (int8) or per row and group (int4). Both arrays keep the kernel's logical axis names, so a rule table shards
`qvalue` exactly as it sharded the kernel, and a scale axis shards with it where the mesh divides it (a length-1
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
from typing import Any

import jax
import jax.numpy as jnp
import qwix
from flax import nnx

from qwenvl_jax.model import layers

MODES = ("int8", "int4")
DEFAULT_GROUP_SIZE = 128
_QTYPES = {"int8": jnp.int8, "int4": jnp.int4}


@dataclasses.dataclass(frozen=True)
class QuantConfig:
  """How weights are quantized.

  mode: "int8" (per-channel) or "int4" (per-channel and per-group of `group_size` along the contracted axis).
  group_size: G for int4 (ignored for int8).
  embeddings: also quantize the token embedding `wte` (1.2 GB of the 9.6B model's 19.3 GB in bf16).
  """
  mode: str = "int8"
  group_size: int = DEFAULT_GROUP_SIZE
  embeddings: bool = True

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"unknown quantization mode {self.mode!r}; known: {MODES}")
    if self.group_size < 1:
      raise ValueError(f"group_size must be >= 1, got {self.group_size}")

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
  if cfg.mode == "int4":
    last = contracted[-1]
    if shape[last] > cfg.group_size and shape[last] % cfg.group_size == 0:
      tiled[last] = cfg.group_size
  return {"channelwise_axes": channels, "tiled_axes": tiled}


def quantize_array(w: jax.Array, contracted: tuple[int, ...], cfg: QuantConfig) -> tuple[jax.Array, jax.Array]:
  """(qvalue int8/int4 of w's shape, scale float32 of w's rank) of a float kernel. Pure, jit-able.

  contracted: the axes of `w` its matmul sums over (they share a scale; int4 groups the last of them).
  """
  q = qwix.quantize(w.astype(jnp.float32), cfg.qtype, **_how(w.ndim, contracted, cfg, w.shape))
  return q.qvalue, q.scale.astype(jnp.float32)


def dequantize(qvalue: jax.Array, scale: jax.Array, dtype=jnp.float32) -> jax.Array:
  """The float array `qvalue * scale` (scale broadcast over its groups) in `dtype`."""
  return qwix.dequantize(qwix.QArray(qvalue, scale.astype(dtype), qtype=qvalue.dtype))


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
  """`layers.Einsum` with a quantized kernel: y = einsum(spec, x, qvalue * scale) (+ bias).

  x: float[..., in] in any dtype (cast to the compute dtype); returns float[..., out] in the compute dtype.
  """

  def __init__(self, spec: str, qvalue: nnx.Param, scale: nnx.Param, bias: nnx.Param | None, *, dtype):
    self.spec = spec
    self.dtype = dtype
    self.qvalue = qvalue
    self.scale = scale
    self.bias = nnx.data(bias)

  @classmethod
  def from_einsum(cls, module: layers.Einsum, cfg: QuantConfig) -> "QuantizedEinsum":
    kernel = module.kernel
    contracted = contracted_axes(module.spec, kernel.ndim)
    qvalue, scale = quantize_array(kernel[...], contracted, cfg)
    axes = _axes(kernel)
    return cls(module.spec, _param(qvalue, axes), _param(scale, axes), module.bias, dtype=module.dtype)

  def __call__(self, x: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
    """dropout_key: accepted for `layers.Einsum`'s signature (LoRA dropout); a quantized layer has no adapter."""
    del dropout_key
    w = qwix.QArray(self.qvalue[...], self.scale[...].astype(self.dtype), qtype=self.qvalue.dtype)
    y = qwix.einsum(self.spec, x.astype(self.dtype), w)
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y.astype(self.dtype)


class QuantizedEmbed(nnx.Module):
  """`nnx.Embed` with a quantized table: int32[B, T] -> float[B, T, D] (rows dequantized after the gather)."""

  def __init__(self, qvalue: nnx.Param, scale: nnx.Param, *, dtype):
    self.dtype = dtype
    self.qvalue = qvalue
    self.scale = scale

  @classmethod
  def from_embed(cls, module: nnx.Embed, cfg: QuantConfig) -> "QuantizedEmbed":
    table = module.embedding
    # A row is looked up whole, so its D entries are the "contracted" axis: one scale per row (and group).
    qvalue, scale = quantize_array(table[...], (1,), cfg)
    axes = _axes(table)
    return cls(_param(qvalue, axes), _param(scale, axes), dtype=module.dtype or table.dtype)

  def __call__(self, input_ids: jax.Array) -> jax.Array:
    rows_q = jnp.take(self.qvalue[...], input_ids, axis=0)
    rows_s = jnp.take(self.scale[...], input_ids, axis=0)
    return dequantize(rows_q, rows_s, self.dtype)


def _targets(model: nnx.Module, cfg: QuantConfig) -> list[tuple[tuple, nnx.Module]]:
  found = []
  for path, node in nnx.iter_graph(model):
    if isinstance(node, layers.Einsum) or (cfg.embeddings and isinstance(node, nnx.Embed)):
      found.append((tuple(path), node))
  return found


def _parent(model: nnx.Module, path: tuple) -> nnx.Module:
  node = model
  for key in path[:-1]:
    node = getattr(node, key) if isinstance(key, str) else node[key]
  return node


def quantize_model(model: nnx.Module, cfg: QuantConfig) -> nnx.Module:
  """Replaces, in place, every Einsum (and the token embedding) of `model` by its quantized form; returns it.

  Works on concrete models (quantizes their values) and inside `nnx.eval_shape` (the abstract quantized
  model, for shardings and AOT plans). The float kernels are dropped from the model.
  """
  for path, node in _targets(model, cfg):
    new = (QuantizedEinsum.from_einsum(node, cfg) if isinstance(node, layers.Einsum)
           else QuantizedEmbed.from_embed(node, cfg))
    setattr(_parent(model, path), path[-1], new)
  return model


def source_map(model: nnx.Module, cfg: QuantConfig) -> dict[str, tuple[str, tuple[int, ...]]]:
  """For a float model: quantized module path (slash-joined) -> (its float parameter's path, contracted axes).

  What a loader needs to quantize a float checkpoint leaf by leaf: `qvalue`/`scale` of the module at the key
  come from the float parameter at the value.
  """
  out = {}
  for path, node in _targets(model, cfg):
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
