"""Positional encodings: PyTorch-bicubic grid interpolation, the MAE 2-D sin-cos table, and rotate-half RoPE.

Letters: G source grid side, O output grid side, C channels, B batch, T tokens, N heads, H head dim.

The ViT's positional table is stored on the 16x16 (224-px) grid and the reference upsamples it to 32x32 at 448 px
on every forward with `F.interpolate(mode="bicubic", align_corners=False)` in float32 (QWENVL_SPEC §1.3). That is
cubic convolution with A = -0.75, half-pixel source coordinates and clamped border taps; `jax.image.resize` uses
Keys' A = -0.5 and different borders, so the interpolation matrix is built here and applied as two matmuls (a
fixed linear map, hence differentiable and cheap).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

_TORCH_CUBIC_A = -0.75


def _cubic_weights(t: np.ndarray, a: float) -> np.ndarray:
  """float64[..., 4]: weights of taps floor-1 .. floor+2 at fractional offset t (PyTorch's cubic convolution)."""
  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1

  def far(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

  return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


@functools.lru_cache(maxsize=None)
def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
  """float32[out_size, in_size]: 1-D `F.interpolate(mode="bicubic", align_corners=False)` as a matrix.

  Equal sizes give the identity, exactly as the reference skips interpolation when the grids match.
  """
  if in_size <= 0 or out_size <= 0:
    raise ValueError(f"grid sizes must be positive, got {in_size} -> {out_size}")
  if in_size == out_size:
    return np.eye(in_size, dtype=np.float32)
  scale = in_size / out_size
  src = scale * (np.arange(out_size, dtype=np.float64) + 0.5) - 0.5  # half-pixel, not clamped for cubic
  base = np.floor(src)
  weights = _cubic_weights(src - base, _TORCH_CUBIC_A)
  mat = np.zeros((out_size, in_size), dtype=np.float64)
  for tap in range(4):
    idx = np.clip(base.astype(np.int64) - 1 + tap, 0, in_size - 1)  # clamped borders
    np.add.at(mat, (np.arange(out_size), idx), weights[:, tap])
  return mat.astype(np.float32)


def interpolate_grid(table: jax.Array, out_grid: int) -> jax.Array:
  """Bicubic resize of a row-major square grid table, PyTorch semantics.

  Args:
    table: [G*G, C] row-major (index = row * G + col), any float dtype.
    out_grid: O, the output side.

  Returns:
    [O*O, C] in `table.dtype`, computed in float32 like the reference's `get_abs_pos`.
  """
  size = table.shape[0]
  grid = int(round(size ** 0.5))
  if grid * grid != size:
    raise ValueError(f"positional table of {size} rows is not a square grid")
  if grid == out_grid:
    return table
  mat = jnp.asarray(bicubic_matrix(grid, out_grid))
  x = table.astype(jnp.float32).reshape(grid, grid, -1)
  hi = jax.lax.Precision.HIGHEST
  x = jnp.einsum("og,ghc->ohc", mat, x, precision=hi)  # rows
  x = jnp.einsum("pg,ogc->opc", mat, x, precision=hi)  # columns
  return x.reshape(out_grid * out_grid, -1).astype(table.dtype)


def sincos_2d(embed_dim: int, grid: int) -> np.ndarray:
  """float32[grid*grid, embed_dim]: the MAE 2-D sin-cos table used by the Qwen-VL resampler.

  The first half of the channels encodes the column (x) index and the second half the row (y) index (numpy's
  'xy' meshgrid), each half being sin(pos * omega) then cos(pos * omega) (QWENVL_SPEC §1.5, Gotcha 7).
  """
  if embed_dim % 4:
    raise ValueError(f"2-D sin-cos needs embed_dim divisible by 4, got {embed_dim}")
  cols, rows = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))

  def one_axis(pos):
    half = embed_dim // 4
    omega = 1.0 / 10000 ** (np.arange(half, dtype=np.float64) / half)
    out = pos.reshape(-1).astype(np.float64)[:, None] * omega[None, :]
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  return np.concatenate([one_axis(cols), one_axis(rows)], axis=1).astype(np.float32)


def rope_tables(positions: jax.Array, head_dim: int, base: float | jax.Array) -> tuple[jax.Array, jax.Array]:
  """cos, sin float32[B, T, 1, H] for rotate-half RoPE over all `head_dim` dims (QWENVL_SPEC §2.5).

  `base` may be a traced scalar so dynamic-NTK inference can change it without recompiling.
  """
  exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
  inv_freq = 1.0 / (jnp.asarray(base, jnp.float32) ** exponents)
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotate-half (GPT-NeoX) RoPE on x[B, T, N, H], computed in float32 and cast back like the reference."""
  xf = x.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
  return (xf * cos + rotated * sin).astype(x.dtype)


def ntk_rope_base(base: float, head_dim: int, kv_len: int, seq_length: int) -> float:
  """The dynamic-NTK RoPE base the reference picks at prefill for `kv_len` tokens (QWENVL_SPEC §2.5).

  alpha = max(2**ceil(log2(kv_len / seq_length) + 1) - 1, 1); no-op up to `seq_length` tokens.
  """
  context = np.log2(kv_len / seq_length) + 1
  alpha = max(2 ** int(np.ceil(context)) - 1, 1)
  return float(base * alpha ** (head_dim / (head_dim - 2)))


def logn_scale(positions: jax.Array, seq_length: int) -> jax.Array:
  """float32[B, T]: the reference's logn query scaling, ln(p + 1) / ln(seq_length) past `seq_length`, else 1."""
  p1 = positions.astype(jnp.float32) + 1.0
  return jnp.where(p1 > seq_length, jnp.log(p1) / np.log(seq_length), 1.0)
