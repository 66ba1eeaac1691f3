"""Basic layers with logical axis names: parameters, einsum projections, LayerNorm, RMSNorm, the two MLPs.

Letters: B batch, T tokens, D model width, F MLP width.

Every parameter is created through `param`, which records its logical axis names (`embed`, `mlp`, `vit_embed`,
...) as NNX metadata. Model code never names a mesh axis; `qwenvl_jax.sharding` maps the names onto the mesh.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Initializer = Callable[..., jax.Array]
Axes = tuple[str | None, ...]

# Random initialization only matters for what is trained from scratch: the adapter (stage 1 of the paper) and any
# model built without converted weights (the tiny demo). Each module initializes as its reference PyTorch module
# does: Qwen's decoder and the adapter's Linears N(0, 0.02) (`initializer_range`, `Resampler._init_weights`), the
# ViT's `nn.Linear`/`nn.Conv2d` with PyTorch's default, the adapter's `nn.MultiheadAttention` in-projection with
# Xavier-uniform (`xavier_uniform_in_proj`).
default_kernel_init = nnx.initializers.normal(0.02)


def torch_default_init(in_axis: int | Sequence[int] = 0, out_axis: int | Sequence[int] = -1) -> Initializer:
  """PyTorch's default `nn.Linear`/`nn.Conv2d` weight init, U(+-1/sqrt(fan_in)) (kaiming-uniform with a=sqrt(5)).

  `in_axis` are the kernel axes summed over (fan_in = their product), `out_axis` the output axes.
  """
  return nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform", in_axis=in_axis, out_axis=out_axis)


def xavier_uniform_in_proj(in_axis: int = 0, out_axis: Sequence[int] = (1, 2), packed: int = 3) -> Initializer:
  """One of the `packed` blocks of `nn.MultiheadAttention.in_proj_weight` [packed*D, D], which PyTorch fills with
  Xavier-uniform over the whole packed matrix: U(+-sqrt(6 / (D + packed*D)))."""
  # variance_scaling's fan_avg sees one block (fan_in = fan_out = D); scale 2/(1+packed) gives the packed bound.
  return nnx.initializers.variance_scaling(2.0 / (1 + packed), "fan_avg", "uniform", in_axis=in_axis,
                                           out_axis=out_axis)


def param(rngs: nnx.Rngs, init: Initializer, shape: Sequence[int], axes: Axes, dtype) -> nnx.Param:
  """An `nnx.Param` holding `init(key, shape, dtype)` with logical axis names `axes` (one per dim)."""
  if len(axes) != len(shape):
    raise ValueError(f"{len(axes)} axis names {axes} for a parameter of shape {tuple(shape)}")
  # Shardings are applied by the caller (jit out_shardings from the rule tables), never eagerly here.
  return nnx.Param(init(rngs.params(), tuple(shape), dtype), out_sharding=tuple(axes), eager_sharding=False)


def flat_matmul(spec: str, x: jax.Array, kernel: jax.Array) -> jax.Array:
  """einsum(spec, x, kernel) as one 2-D matmul [rows, K] x [K, F] when the spec allows it, else the einsum.

  It allows it when x's letters are its leading (row) letters then the contracted ones, the kernel's are the
  contracted ones in the same order then its free ones, and the output is the row letters then the free ones
  ("btd,dknh->btknh", "btnh,nhd->btd", ...): then both reshapes are free and the result is the same dot products.
  Why: XLA:CPU differentiates a 3-D einsum like "btd,dv->btv" into a weight-gradient dot whose operands it first
  transposes, and runs that dot at a fraction of its matmul rate (the tiny preset's `lm_head` gradient at batch
  16: 17 ms as einsum, 5 ms as a 2-D matmul, tests in tests/model/test_layers.py); with 2-D operands the gradient
  is the plain x^T dy. Accelerators keep the einsum (`QwenVLConfig.cpu_layouts`), whose row letters shard
  independently.
  """
  lhs, rest = spec.split(",")
  rhs, out = rest.split("->")
  contracted = "".join(c for c in lhs if c in rhs)
  rows = lhs[:len(lhs) - len(contracted)]
  free = rhs[len(contracted):]
  if lhs != rows + contracted or rhs != contracted + free or out != rows + free or set(rows) & set(rhs):
    return jnp.einsum(spec, x, kernel)
  n_rows = x.shape[:len(rows)]
  k = int(np.prod(x.shape[len(rows):], dtype=np.int64))
  f_shape = kernel.shape[len(contracted):]
  y = _matmul_2d(x.reshape(-1, k), kernel.reshape(k, -1))
  return y.reshape(n_rows + f_shape)


@jax.custom_vjp
def _matmul_2d(x, w):
  """x[M, K] @ w[K, N], differentiated as dx = g w^T, dw = x^T g written out: JAX's own transpose rule ends in a
  transpose that XLA:CPU folds into a transposed copy of g before the weight-gradient dot (the patch matmul's
  gradient: a copy of the [B*L, W] output gradient, then a dot with both operands transposed)."""
  return x @ w


def _matmul_2d_fwd(x, w):
  return x @ w, (x, w)


def contract_rows(a: jax.Array, b: jax.Array, *, flip: bool, preferred_element_type=None) -> jax.Array:
  """einsum("...ma,...mb->...ab", a, b): a product contracting the rows of both operands (a weight gradient).

  XLA:CPU runs such a dot several times faster when the output's last dimension is the longer free one. flip
  computes "...mb,...ma->...ba" and swaps the last two axes back behind an optimization barrier: without it XLA
  folds the swap into the dot, the slow layout again. The caller decides when that pays, from measurements
  (`_matmul_2d_bwd`, the row attention's dk and dv in `attention._row_dot`)."""
  if flip:
    flipped = jnp.einsum("...mb,...ma->...ba", b, a, preferred_element_type=preferred_element_type)
    return jax.lax.optimization_barrier(flipped).swapaxes(-1, -2)
  return jnp.einsum("...ma,...mb->...ab", a, b, preferred_element_type=preferred_element_type)


# A kernel with K >= 4 N gets its weight gradient flipped, (g^T x)^T (1 thread, rows x K x N: 8192x588x32 3.4 ->
# 2.0 ms, 8192x128x32 1.6 -> 0.6, 3072x3072x768 91 -> 81); below that ratio flipping loses (768x2048x768 26 -> 31,
# 8192x32x128 0.6 -> 1.6).
_WIDE_KERNEL_RATIO = 4


def _matmul_2d_bwd(res, g):
  x, w = res
  dx = jnp.einsum("mn,kn->mk", g, w)
  return dx, contract_rows(x, g, flip=x.shape[1] >= _WIDE_KERNEL_RATIO * g.shape[1])


_matmul_2d.defvjp(_matmul_2d_fwd, _matmul_2d_bwd)


class Einsum(nnx.Module):
  """y = einsum(spec, x, kernel) (+ bias): a linear map whose kernel keeps the reference's structure.

  The kernel shape mirrors the fused layouts of the PyTorch weights (e.g. `[D, 3, N, H]` for a blocked QKV) so
  conversion is a reshape + transpose and tensor parallelism can shard the head axis directly. `flat` (set by
  `QwenVL` under `QwenVLConfig.cpu_layouts`) computes it as one 2-D matmul (`flat_matmul`).
  """

  flat = False

  def __init__(self, spec: str, kernel_shape: Sequence[int], kernel_axes: Axes, *,
               bias_shape: Sequence[int] | None = None, bias_axes: Axes | None = None,
               dtype=jnp.bfloat16, param_dtype=jnp.float32, kernel_init: Initializer = default_kernel_init,
               rngs: nnx.Rngs):
    self.spec = spec
    self.dtype = dtype
    self.kernel = param(rngs, kernel_init, kernel_shape, kernel_axes, param_dtype)
    self.bias = nnx.data(None if bias_shape is None else
                         param(rngs, nnx.initializers.zeros_init(), bias_shape, bias_axes, param_dtype))

  def __call__(self, x: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
    """dropout_key: the LoRA dropout's key (training); None = no dropout. Ignored without an adapter."""
    matmul = flat_matmul if self.flat else jnp.einsum
    y = matmul(self.spec, x.astype(self.dtype), self.kernel[...].astype(self.dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    if getattr(self, "lora_a", None) is not None:  # attached by `model.lora.apply_lora`
      y = y + self.lora_delta(x, dropout_key)
    return y

  def lora_delta(self, x: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
    """scale * (dropout(x) @ A) @ B in the compute dtype (`lora_delta`)."""
    return lora_delta(self, x, dropout_key)


def lora_delta(module: nnx.Module, x: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
  """The LoRA term of a projection carrying adapters (an `Einsum`, or a `model.quantize.QuantizedEinsum` under
  QLoRA): scale * (dropout(x) @ A) @ B in the module's compute dtype, PEFT's
  `lora_B(lora_A(lora_dropout(x))) * alpha / r`. x: float[..., in]; returns float[..., out]."""
  rate = module.lora_dropout
  if dropout_key is not None and rate > 0:
    keep = jax.random.bernoulli(dropout_key, 1.0 - rate, x.shape)
    x = jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)
  a = module.lora_a[...].astype(module.dtype)
  b = module.lora_b[...].astype(module.dtype)
  h = jnp.einsum(module.lora_specs[0], x.astype(module.dtype), a)
  return jnp.einsum(module.lora_specs[1], h, b) * jnp.asarray(module.lora_scale, module.dtype)


class LayerNorm(nnx.Module):
  """LayerNorm with scale and bias; statistics in float32, output in the compute dtype (as the CUDA kernel)."""

  def __init__(self, dim: int, *, eps: float, dtype=jnp.bfloat16, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.eps = eps
    self.dtype = dtype
    self.scale = param(rngs, nnx.initializers.ones_init(), (dim,), ("norm",), param_dtype)
    self.bias = param(rngs, nnx.initializers.zeros_init(), (dim,), ("norm",), param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
    y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return y.astype(self.dtype)


class RMSNorm(nnx.Module):
  """Qwen's RMSNorm: normalize in float32, cast to the compute dtype, *then* multiply by the weight.

  The cast before the multiply is the reference's double rounding (QWENVL_SPEC §2.2, Gotcha 15).
  """

  def __init__(self, dim: int, *, eps: float, dtype=jnp.bfloat16, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.eps = eps
    self.dtype = dtype
    self.scale = param(rngs, nnx.initializers.ones_init(), (dim,), ("norm",), param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)
    return y.astype(self.dtype) * self.scale[...].astype(self.dtype)


class GeluMLP(nnx.Module):
  """The ViT MLP: fc -> exact (erf) GELU -> proj, both with bias (Gotcha 9: not tanh, not QuickGELU)."""

  def __init__(self, dim: int, hidden: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    init = torch_default_init()  # the reference's `nn.Linear` c_fc / c_proj
    self.fc = Einsum("btd,df->btf", (dim, hidden), ("vit_embed", "vit_mlp"),
                     bias_shape=(hidden,), bias_axes=("vit_mlp",), kernel_init=init, **kw)
    self.proj = Einsum("btf,fd->btd", (hidden, dim), ("vit_mlp", "vit_embed"),
                       bias_shape=(dim,), bias_axes=("vit_embed",), kernel_init=init, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.proj(jax.nn.gelu(self.fc(x), approximate=False))


class SwiGLU(nnx.Module):
  """Qwen's MLP: c_proj(w1(x) * silu(w2(x))) — SiLU on `w2`, `w1` is the linear branch (Gotcha 2); no biases."""

  def __init__(self, dim: int, hidden: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.w1 = Einsum("btd,df->btf", (dim, hidden), ("embed", "mlp"), **kw)
    self.w2 = Einsum("btd,df->btf", (dim, hidden), ("embed", "mlp"), **kw)
    self.c_proj = Einsum("btf,fd->btd", (hidden, dim), ("mlp", "embed"), **kw)

  def __call__(self, x: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
    """dropout_key: LoRA dropout (training), one independent key per projection."""
    k = [None] * 3 if dropout_key is None else list(jax.random.split(dropout_key, 3))
    return self.c_proj(self.w1(x, k[0]) * jax.nn.silu(self.w2(x, k[1])), k[2])


def remat_policy(name: str):
  """The `jax.checkpoint` policy for a config name; None means no rematerialization."""
  policies = {
      "none": None,
      "full": jax.checkpoint_policies.nothing_saveable,
      "dots": jax.checkpoint_policies.checkpoint_dots,
      "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
  }
  if name not in policies:
    raise ValueError(f"unknown remat policy {name!r}; known: {sorted(policies)}")
  return policies[name]
