"""Fused attention kernels behind `attention.dot_product_attention`: Pallas splash attention (TPU) and cuDNN (GPU).

Letters: B batch, T query length, S key length, N heads, H head dim.

Splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`) works on one row at a time ([N, T, H]),
takes no scale, needs sequence blocks that are multiples of 128 and segment ids that leave no query without a
key. `splash_attention` adapts our [B, T, N, H] layout to it:

* the scale is folded into q (in float32, then cast back to the compute dtype);
* T and S are zero-padded to a multiple of 128; padded keys get a segment id no real query has, padded queries
  one that sees at least one key (their outputs are sliced off, but an empty row would put NaN into dk, dv);
* H is zero-padded to a multiple of 128 by default (exact: zero dims add nothing to q.k, and the padded value
  dims are sliced off), so ViT-bigG's 104 runs in the lane-aligned layout the kernel is built around. Mosaic
  also compiles 104 unpadded (`pad_head_dim=False`; bench/bench_attention_aot.py --part=attn_vit: the same
  temporaries, 9% fewer HBM bytes); switch once that is checked on a real TPU;
* under `sharding.use_rules` it runs in `shard_map`, q, k, v split as the rules split `act_batch` and
  `act_heads` (batch over data x fsdp, heads over tensor): XLA cannot partition a custom call itself and would
  gather whole q, k, v onto every device.

Pallas kernels only compile for TPU; on CPU they run in the (slow) Pallas interpreter inside `interpret_mode()`,
which is what the tests use. Anything else is an error, never a silent fallback.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from qwenvl_jax import sharding

_LANES = 128  # TPU lane width: splash blocks and (padded) head dims are multiples of it
_MAX_BLOCK = 512  # larger blocks amortize the per-block overhead; 512 is what MaxText uses at 2k-8k tokens
# A segment id no real token carries (real ids are >= -1, see attention.py); padding rows and keys use it.
_PAD_ID = int(np.iinfo(np.int32).min)
# Logical axes of q, k, v [B, T, N, H]; the kernel needs whole sequences and head dims on each device.
_QKV_AXES = ("act_batch", None, "act_heads", None)

_INTERPRET: contextvars.ContextVar[bool] = contextvars.ContextVar("qwenvl_pallas_interpret", default=False)


@contextlib.contextmanager
def interpret_mode():
  """Within this context Pallas kernels run in the Pallas interpreter (any backend; slow: tests only)."""
  token = _INTERPRET.set(True)
  try:
    yield
  finally:
    _INTERPRET.reset(token)


def interpreting() -> bool:
  """Whether Pallas kernels run in the interpreter here (inside `interpret_mode()`)."""
  return _INTERPRET.get()


def target_platform() -> str:
  """The platform being compiled for: the enclosing mesh's devices (AOT topologies too), else the default."""
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty and mesh.abstract_device is not None:
    return mesh.abstract_device.platform
  return jax.default_backend()


def check_attention_impl(impl: str, platform: str, *, dtype=None, head_dims: Sequence[int] = ()) -> None:
  """Raises ValueError when kernel `impl` cannot run in a computation for `platform` (`jax.default_backend()`
  names) with compute `dtype` and attention `head_dims`: the checks the kernels make when traced, also callable
  before anything is traced, so an entry point refuses such a config before it writes a file
  (`training.validation`). 'xla' and 'xla_rows' run anywhere; the splash kernel's Pallas interpreter
  (`interpret_mode`, tests only) is the caller's exception."""
  if impl == "splash" and platform != "tpu":
    raise ValueError(f"attention_impl='splash' is a TPU kernel but this computation is for {platform!r}; use "
                     "attention_impl='xla' (or 'cudnn' on GPU), or the Pallas interpreter "
                     "(qwenvl_jax.model.kernels.interpret_mode(), tests only)")
  if impl != "cudnn":
    return
  if platform not in ("gpu", "cuda"):
    raise ValueError(f"attention_impl='cudnn' needs an NVIDIA GPU but this computation is for {platform!r}; use "
                     "attention_impl='xla' (any backend) or 'splash' (TPU)")
  if dtype is not None and jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
    raise ValueError(f"attention_impl='cudnn' needs a bfloat16 or float16 compute dtype, got {jnp.dtype(dtype)}; "
                     "set dtype='bfloat16' or use attention_impl='xla'")
  for h in head_dims:
    # 128 is the limit before Hopper (256 from sm90); the stricter bound keeps a config portable across GPUs.
    if h > 128 or h % 8:
      raise ValueError(f"attention_impl='cudnn' needs a head dim <= 128 and a multiple of 8, got {h}")


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def _block(length: int) -> int:
  """The largest block in (512, 256, 128) that divides `length` (a multiple of 128)."""
  for b in (_MAX_BLOCK, 256, _LANES):
    if length % b == 0:
      return b
  raise AssertionError(f"{length} is not a multiple of {_LANES}")


def _placement(shape: tuple[int, ...]):
  """(mesh, PartitionSpec of q/k/v) from the enclosing `sharding.use_rules`, or None outside of one or on a mesh of
  one device. A spec that splits nothing (one row on an fsdp mesh: batch 1 does not split over 8 devices) still
  runs in `shard_map`, replicated: XLA refuses to partition a Mosaic call itself on a mesh of several devices
  (a server's one-request prefill under `--rules=fsdp` failed to compile)."""
  placed = sharding.active_spec(shape, _QKV_AXES)  # the rules in force, as `sharding.constrain` reads them
  return placed if placed is not None and placed[0].size > 1 else None


def _splash_row_kernel(heads: int, t: int, s: int, causal: bool, interpret: bool):
  """A splash kernel for one row: ([N, T, H] q, [N, S, H] k, v, SegmentIds) -> [N, T, H]."""
  # Imported here: the TPU Pallas ops pull in Mosaic, which xla/cudnn users never need.
  from jax.experimental.pallas.ops.tpu.splash_attention import (  # pylint: disable=import-outside-toplevel
      splash_attention_kernel as sk, splash_attention_mask as sm)
  head_mask = sm.CausalMask((t, s)) if causal else sm.FullMask((t, s))
  bq, bkv = _block(t), _block(s)
  # The fused backward kernel computes dq inside the dk/dv pass: one kernel and no dq mask info.
  blocks = sk.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq, block_kv_dkv=bkv,
                         block_kv_dkv_compute=bkv, use_fused_bwd_kernel=True)
  return sk.make_splash_mha(sm.MultiHeadMask([head_mask] * heads), block_sizes=blocks, head_shards=1,
                            q_seq_shards=1, interpret=interpret), sk.SegmentIds


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float, causal: bool,
                     q_segment_ids: jax.Array | None = None, kv_segment_ids: jax.Array | None = None,
                     pad_head_dim: bool = True) -> jax.Array:
  """Softmax(q k^T * scale) v with the splash kernel.

  Args:
    q: [B, T, N, H]; k, v: [B, S, N, H], one dtype.
    scale: multiplies the scores (folded into q).
    causal: key s is visible to query t only if s <= t (needs T == S).
    q_segment_ids, kv_segment_ids: optional int32[B, T] / [B, S]: attend only within equal ids. Every query must
      see at least one key (with `causal`, equal ids for a token's own query and key ensure it).
    pad_head_dim: zero-pad H to a multiple of 128 (exact); False hands H to the kernel as it is.

  Returns:
    [B, T, N, H] in q.dtype.

  Raises:
    ValueError: inconsistent shapes or dtypes, or not compiling for TPU outside `interpret_mode()`.
  """
  interpret = interpreting()
  if not interpret:
    check_attention_impl("splash", target_platform())
  b, t, n, h = q.shape
  s = k.shape[1]
  if k.shape != (b, s, n, h) or v.shape != k.shape:
    raise ValueError(f"splash attention wants q [B, T, N, H] and k, v [B, S, N, H] alike; got {q.shape}, "
                     f"{k.shape}, {v.shape}")
  if not q.dtype == k.dtype == v.dtype:
    raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
  if causal and t != s:
    raise ValueError(f"causal splash attention needs as many queries as keys, got T={t}, S={s}")
  if (q_segment_ids is None) != (kv_segment_ids is None):
    raise ValueError("pass both q_segment_ids and kv_segment_ids, or neither")
  if q_segment_ids is not None and (q_segment_ids.shape != (b, t) or kv_segment_ids.shape != (b, s)):
    raise ValueError(f"segment ids must be [B, T]={b, t} and [B, S]={b, s}; got {q_segment_ids.shape}, "
                     f"{kv_segment_ids.shape}")

  if scale != 1.0:
    q = (q.astype(jnp.float32) * scale).astype(q.dtype)
  tp, sp = _round_up(t, _LANES), _round_up(s, _LANES)
  hp = _round_up(h, _LANES) if pad_head_dim else h
  if q_segment_ids is None and (tp, sp) != (t, s):
    q_segment_ids = jnp.zeros((b, t), jnp.int32)
    kv_segment_ids = jnp.zeros((b, s), jnp.int32)
  if q_segment_ids is not None:
    q_segment_ids = q_segment_ids.astype(jnp.int32)
    kv_segment_ids = kv_segment_ids.astype(jnp.int32)
    # Padded keys: _PAD_ID, which no real query has. Padded queries: _PAD_ID too when causal (each sees its own
    # padded key), else a real row's id (their row then has the real keys of that id; it is sliced off anyway).
    q_fill = _PAD_ID if causal else q_segment_ids[:, :1]
    q_segment_ids = jnp.concatenate(
        [q_segment_ids, jnp.broadcast_to(jnp.asarray(q_fill, jnp.int32), (b, tp - t))], axis=1)
    kv_segment_ids = jnp.pad(kv_segment_ids, ((0, 0), (0, sp - s)), constant_values=_PAD_ID)
  q = jnp.pad(q, ((0, 0), (0, tp - t), (0, 0), (0, hp - h)))
  k = jnp.pad(k, ((0, 0), (0, sp - s), (0, 0), (0, hp - h)))
  v = jnp.pad(v, ((0, 0), (0, sp - s), (0, 0), (0, hp - h)))

  def local(q, k, v, q_ids, kv_ids):
    # [b, T, n, H] shards -> the kernel's per-row [n, T, H], vmapped over the local rows.
    kernel, segment_ids_cls = _splash_row_kernel(q.shape[2], tp, sp, causal, interpret)
    q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))
    if q_ids is None:
      out = jax.vmap(kernel)(q, k, v)
    else:
      out = jax.vmap(lambda q, k, v, qi, ki: kernel(q, k, v, segment_ids=segment_ids_cls(qi, ki)))(
          q, k, v, q_ids, kv_ids)
    return jnp.swapaxes(out, 1, 2)

  placement = _placement(q.shape)
  if placement is None:
    out = local(q, k, v, q_segment_ids, kv_segment_ids)
  else:
    mesh, qkv_spec = placement
    ids_spec = None if q_segment_ids is None else PartitionSpec(qkv_spec[0], None)
    # check_vma=False: pallas_call does not annotate how its outputs vary over the mesh axes.
    out = jax.shard_map(local, mesh=mesh, in_specs=(qkv_spec, qkv_spec, qkv_spec, ids_spec, ids_spec),
                        out_specs=qkv_spec, check_vma=False)(q, k, v, q_segment_ids, kv_segment_ids)
  return out[:, :t, :, :h]


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: jax.Array | None,
                    scale: float) -> jax.Array:
  """Softmax(q k^T * scale) v with cuDNN's fused kernel (`jax.nn.dot_product_attention(implementation="cudnn")`).

  The boolean mask goes in as it is (cuDNN adds it as a large negative bias), so every mask the xla path takes
  means the same here, rows without any visible key included (they average v instead of dividing by zero).

  Args:
    q: [B, T, N, H]; k, v: [B, S, N, H] in bfloat16 or float16, H <= 128 and a multiple of 8.
    mask: bool broadcastable to [B, N, T, S] or None.
    scale: multiplies the scores.

  Raises:
    ValueError: not compiling for an NVIDIA GPU, or dtypes/head dims cuDNN cannot take (named in the message).
  """
  check_attention_impl("cudnn", target_platform(), dtype=q.dtype, head_dims=(q.shape[-1],))
  if mask is not None and (mask.dtype != jnp.bool_ or mask.ndim != 4):
    raise ValueError(f"cudnn attention wants a 4-d boolean mask, got {mask.dtype}{list(mask.shape)}")
  return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="cudnn")
