"""The name and layout tables between PyTorch checkpoints and our NNX parameter tree (QWENVL_SPEC §5).

Letters: W ViT width, Nv/Hv ViT heads/head dim, D LLM width, N/H LLM (and resampler) heads/head dim, P patch
side, L layers.

One table per source, each a tuple of `Rule(torch name, our path(s), transform)`:
* `QWENVL` — a Hugging Face Qwen-VL / Qwen-VL-Chat checkpoint (853 tensors for the 7B model);
* `QWEN7B` — the Qwen-7B LLM alone (the same `transformer.h.*`, `wte`, `ln_f`, `lm_head` names), into `llm`;
* `OPENCLIP_VIT` — an OpenCLIP ViT-bigG/14 state dict, into the ViT trunk `visual`.
A torch name containing `{i}` is per layer; its targets are scanned `[L, ...]` parameters and layer i is slice i.
Transforms are invertible reshapes/transposes (the OpenCLIP-only ones import but do not export):
* `Same` (as stored), `Flat` (a 1-D bias viewed as the target shape, optionally permuted);
* `Linear(in_dims)` — an `nn.Linear` weight `[out, in]` -> kernel `[*in, *out]` (`.T` then a reshape, optionally
  permuted), e.g. the ViT's head-interleaved `in_proj` `[Nv*3*Hv, W]` -> `[W, Nv, 3, Hv]` is the plain reshape,
  the LLM's blocked `c_attn` `[3*N*H, D]` -> `[D, 3, N, H]` too, and OpenCLIP's blocked `[Wq; Wk; Wv]` needs the
  permutation `[W, 3, Nv, Hv] -> [W, Nv, 3, Hv]` (Gotcha 1);
* `Conv` — OIHW -> HWIO; `Chunk(k, inner)` — one tensor split into k equal row blocks (the resampler's
  `nn.MultiheadAttention` `in_proj_weight` -> q, k, v); `DropFirstRow` — OpenCLIP's class-token row.
`proj` of the adapter is used as `x @ proj` and is stored as is (Gotcha 3). Tensors a source holds but that are
intentionally unused are an explicit list of patterns per table (`IGNORED`), never a silent skip.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Sequence

import numpy as np

Shape = tuple[int, ...]


class Transform:
  """Maps one torch tensor to one or more target slices (per-layer shapes, without the `layers` axis)."""

  n_targets = 1

  def torch_shape(self, target_shapes: Sequence[Shape]) -> Shape:
    raise NotImplementedError

  def forward(self, x: np.ndarray, target_shapes: Sequence[Shape]) -> tuple[np.ndarray, ...]:
    raise NotImplementedError

  def inverse(self, ys: Sequence[np.ndarray], target_shapes: Sequence[Shape]) -> np.ndarray:
    raise NotImplementedError

  def row_block_axis(self, target_shape: Shape) -> int | None:
    """The target axis that torch rows [r0:r1] map to one-to-one (for block streaming), or None."""
    return None


_TILE = 64
_TILED_MIN_SIZE = 1 << 20


def transpose2d(x: np.ndarray) -> np.ndarray:
  """`x.T` as a new C-contiguous array, copied in 64x64 tiles.

  numpy's one-pass transposing copy strides through memory and is ~3x slower on a [11008, 4096] weight; tiles
  keep both sides in cache. Bits are moved as unsigned integers, so bfloat16 takes the fast integer path.
  """
  if x.ndim != 2 or x.size < _TILED_MIN_SIZE:
    return np.ascontiguousarray(x.T)
  bits = x.view(np.dtype(f"u{x.dtype.itemsize}")) if x.dtype.itemsize in (1, 2, 4, 8) else x
  m, n = bits.shape
  out = np.empty((n, m), bits.dtype)
  for i in range(0, m, _TILE):
    for j in range(0, n, _TILE):
      out[j:j + _TILE, i:i + _TILE] = bits[i:i + _TILE, j:j + _TILE].T
  return out.view(x.dtype)


def _inverse_perm(perm: Sequence[int]) -> tuple[int, ...]:
  return tuple(int(i) for i in np.argsort(perm))


def _unpermute(shape: Shape, perm: Sequence[int] | None) -> Shape:
  """The shape before `transpose(perm)` that gives `shape`."""
  if perm is None:
    return tuple(shape)
  inv = _inverse_perm(perm)
  return tuple(shape[i] for i in inv)


@dataclasses.dataclass(frozen=True)
class Same(Transform):
  """Stored with the same shape and layout (norm scales, biases, embeddings, `proj`)."""

  def torch_shape(self, target_shapes):
    return tuple(target_shapes[0])

  def forward(self, x, target_shapes):
    return (x,)

  def inverse(self, ys, target_shapes):
    return ys[0]

  def row_block_axis(self, target_shape):
    return 0 if target_shape else None


@dataclasses.dataclass(frozen=True)
class Flat(Transform):
  """A flat vector viewed as the target shape; `perm` reorders the axes of the natural reshape."""

  perm: tuple[int, ...] | None = None

  def torch_shape(self, target_shapes):
    return (math.prod(target_shapes[0]),)

  def forward(self, x, target_shapes):
    y = x.reshape(_unpermute(target_shapes[0], self.perm))
    return (y if self.perm is None else y.transpose(self.perm),)

  def inverse(self, ys, target_shapes):
    y = ys[0] if self.perm is None else ys[0].transpose(_inverse_perm(self.perm))
    return y.reshape(-1)


@dataclasses.dataclass(frozen=True)
class Linear(Transform):
  """`nn.Linear.weight [out, in]` <-> kernel `[*in_shape, *out_shape]` (x @ kernel == x @ weight.T)."""

  in_dims: int = 1
  perm: tuple[int, ...] | None = None

  def torch_shape(self, target_shapes):
    pre = _unpermute(target_shapes[0], self.perm)
    return (math.prod(pre[self.in_dims:]), math.prod(pre[:self.in_dims]))

  def forward(self, x, target_shapes):
    y = transpose2d(x).reshape(_unpermute(target_shapes[0], self.perm))
    return (y if self.perm is None else y.transpose(self.perm),)

  def inverse(self, ys, target_shapes):
    y = ys[0] if self.perm is None else ys[0].transpose(_inverse_perm(self.perm))
    n_in = math.prod(y.shape[:self.in_dims])
    return transpose2d(np.ascontiguousarray(y).reshape(n_in, -1))

  def row_block_axis(self, target_shape):
    # Rows are output features: they map to the last target axis when the output is a single axis.
    return len(target_shape) - 1 if self.perm is None and len(target_shape) == self.in_dims + 1 else None


@dataclasses.dataclass(frozen=True)
class Conv(Transform):
  """`nn.Conv2d.weight [O, I, H, W]` <-> kernel `[H, W, I, O]`."""

  def torch_shape(self, target_shapes):
    h, w, i, o = target_shapes[0]
    return (o, i, h, w)

  def forward(self, x, target_shapes):
    return (x.transpose(2, 3, 1, 0),)

  def inverse(self, ys, target_shapes):
    return ys[0].transpose(3, 2, 0, 1)


@dataclasses.dataclass(frozen=True)
class Chunk(Transform):
  """One tensor holding `k` equal row blocks (`tensor.chunk(k)`), each mapped by `inner` to its own target."""

  k: int
  inner: Transform

  @property
  def n_targets(self):  # type: ignore[override]
    return self.k

  def torch_shape(self, target_shapes):
    parts = [self.inner.torch_shape([s]) for s in target_shapes]
    if len(set(parts)) != 1:
      raise ValueError(f"chunked targets must have equal shapes, got {list(target_shapes)}")
    return (parts[0][0] * self.k,) + parts[0][1:]

  def forward(self, x, target_shapes):
    return tuple(self.inner.forward(part, [s])[0] for part, s in zip(np.split(x, self.k, axis=0), target_shapes))

  def inverse(self, ys, target_shapes):
    return np.concatenate([self.inner.inverse([y], [s]) for y, s in zip(ys, target_shapes)], axis=0)


@dataclasses.dataclass(frozen=True)
class DropFirstRow(Transform):
  """OpenCLIP's positional table `[1 + G*G, W]`: row 0 belongs to the class token, which Qwen-VL does not have."""

  def torch_shape(self, target_shapes):
    return (target_shapes[0][0] + 1,) + tuple(target_shapes[0][1:])

  def forward(self, x, target_shapes):
    return (x[1:],)

  def inverse(self, ys, target_shapes):
    raise NotImplementedError("the class-token row is not part of Qwen-VL; OpenCLIP export is not supported")


@dataclasses.dataclass(frozen=True)
class Rule:
  """One torch tensor (per layer when the name holds `{i}`) <-> one or more of our parameters."""

  torch_name: str
  targets: tuple[str, ...]
  transform: Transform

  def __post_init__(self):
    if len(self.targets) != self.transform.n_targets:
      raise ValueError(f"rule {self.torch_name}: {len(self.targets)} targets for a transform producing "
                       f"{self.transform.n_targets}")

  @property
  def per_layer(self) -> bool:
    return "{i}" in self.torch_name


@dataclasses.dataclass(frozen=True)
class Table:
  """The rules of one source, the tensors it may hold but we intentionally do not use, and what it fills."""

  name: str
  rules: tuple[Rule, ...]
  ignored: tuple[str, ...]  # full-match regexes, each with the reason in IGNORED_REASONS
  parts: tuple[str, ...]  # top-level submodules of our tree that this source fills completely

  def is_ignored(self, torch_name: str) -> bool:
    return any(re.fullmatch(p, torch_name) for p in self.ignored)


def _targets(base: str, o) -> tuple[str, ...]:
  return (f"{base}{o}",) if isinstance(o, str) else tuple(f"{base}{x}" for x in o)


_VIT_BLOCK = (  # Qwen-VL's VisualAttentionBlock: custom attention with a head-interleaved in_proj
    ("ln_1.weight", "ln_1.scale", Same()),
    ("ln_1.bias", "ln_1.bias", Same()),
    ("attn.in_proj.weight", "attn.qkv.kernel", Linear(1)),
    ("attn.in_proj.bias", "attn.qkv.bias", Flat()),
    ("attn.out_proj.weight", "attn.out.kernel", Linear(2)),
    ("attn.out_proj.bias", "attn.out.bias", Same()),
    ("ln_2.weight", "ln_2.scale", Same()),
    ("ln_2.bias", "ln_2.bias", Same()),
    ("mlp.c_fc.weight", "mlp.fc.kernel", Linear(1)),
    ("mlp.c_fc.bias", "mlp.fc.bias", Same()),
    ("mlp.c_proj.weight", "mlp.proj.kernel", Linear(1)),
    ("mlp.c_proj.bias", "mlp.proj.bias", Same()),
)

_OPENCLIP_BLOCK = (  # nn.MultiheadAttention: blocked [Wq; Wk; Wv] rows -> our [W, Nv, 3, Hv]
    ("ln_1.weight", "ln_1.scale", Same()),
    ("ln_1.bias", "ln_1.bias", Same()),
    ("attn.in_proj_weight", "attn.qkv.kernel", Linear(1, perm=(0, 2, 1, 3))),
    ("attn.in_proj_bias", "attn.qkv.bias", Flat(perm=(1, 0, 2))),
    ("attn.out_proj.weight", "attn.out.kernel", Linear(2)),
    ("attn.out_proj.bias", "attn.out.bias", Same()),
    ("ln_2.weight", "ln_2.scale", Same()),
    ("ln_2.bias", "ln_2.bias", Same()),
    ("mlp.c_fc.weight", "mlp.fc.kernel", Linear(1)),
    ("mlp.c_fc.bias", "mlp.fc.bias", Same()),
    ("mlp.c_proj.weight", "mlp.proj.kernel", Linear(1)),
    ("mlp.c_proj.bias", "mlp.proj.bias", Same()),
)

_ADAPTER = (  # `attn_pool` (nn.MultiheadAttention with separate q/k/v inputs: blocked chunk(3)), ln_post, proj
    ("attn_pool.query", "resampler.query", Same()),
    ("attn_pool.pos_embed", "resampler.pos_embed", Same()),
    ("attn_pool.kv_proj.weight", "resampler.kv_proj.kernel", Linear(1)),
    ("attn_pool.ln_q.weight", "resampler.ln_q.scale", Same()),
    ("attn_pool.ln_q.bias", "resampler.ln_q.bias", Same()),
    ("attn_pool.ln_kv.weight", "resampler.ln_kv.scale", Same()),
    ("attn_pool.ln_kv.bias", "resampler.ln_kv.bias", Same()),
    ("attn_pool.attn.in_proj_weight", ("resampler.attn.q.kernel", "resampler.attn.k.kernel",
                                       "resampler.attn.v.kernel"), Chunk(3, Linear(1))),
    ("attn_pool.attn.in_proj_bias", ("resampler.attn.q.bias", "resampler.attn.k.bias", "resampler.attn.v.bias"),
     Chunk(3, Flat())),
    ("attn_pool.attn.out_proj.weight", "resampler.attn.out.kernel", Linear(2)),
    ("attn_pool.attn.out_proj.bias", "resampler.attn.out.bias", Same()),
    ("ln_post.weight", "ln_post.scale", Same()),
    ("ln_post.bias", "ln_post.bias", Same()),
    ("proj", "proj", Same()),  # used as x @ proj: already [in, out]
)

_LLM_BLOCK = (
    ("ln_1.weight", "ln_1.scale", Same()),
    ("attn.c_attn.weight", "attn.qkv.kernel", Linear(1)),  # blocked q|k|v -> [D, 3, N, H]
    ("attn.c_attn.bias", "attn.qkv.bias", Flat()),
    ("attn.c_proj.weight", "attn.out.kernel", Linear(2)),
    ("ln_2.weight", "ln_2.scale", Same()),
    ("mlp.w1.weight", "mlp.w1.kernel", Linear(1)),  # linear ("up") branch
    ("mlp.w2.weight", "mlp.w2.kernel", Linear(1)),  # SiLU ("gate") branch
    ("mlp.c_proj.weight", "mlp.c_proj.kernel", Linear(1)),
)


def _rules(prefix: str, target: str, pairs) -> list[Rule]:
  return [Rule(prefix + t, _targets(target, o), tf) for t, o, tf in pairs]


_QWEN_LLM_RULES = tuple(
    _rules("transformer.", "llm.", [("wte.weight", "wte.embedding", Same())])
    + _rules("transformer.h.{i}.", "llm.blocks.", _LLM_BLOCK)
    + _rules("transformer.", "llm.", [("ln_f.weight", "ln_f.scale", Same())])
    + [Rule("lm_head.weight", ("llm.lm_head.kernel",), Linear(1))])

_QWENVL_VISUAL_RULES = tuple(
    _rules("transformer.visual.", "visual.", [
        ("conv1.weight", "conv1", Conv()),
        ("positional_embedding", "positional_embedding", Same()),
        ("ln_pre.weight", "ln_pre.scale", Same()),
        ("ln_pre.bias", "ln_pre.bias", Same()),
    ])
    + _rules("transformer.visual.transformer.resblocks.{i}.", "visual.blocks.", _VIT_BLOCK)
    + _rules("transformer.visual.", "adapter.", _ADAPTER))

# Buffers that older exports of the Qwen modeling code may contain; they are recomputed, never loaded.
_QWEN_BUFFERS = (r"transformer\.h\.\d+\.attn\.rotary_emb\.inv_freq", r"transformer\.rotary_emb\.inv_freq",
                 r"transformer\.h\.\d+\.attn\.(masked_bias|bias)")

# OpenCLIP ViT-bigG tensors that Qwen-VL drops (no class token, the adapter replaces ln_post/proj) and the text
# tower (names without the `visual.` prefix).
_OPENCLIP_UNUSED_VISUAL = (r"visual\.class_embedding", r"visual\.ln_post\.(weight|bias)", r"visual\.proj")
_OPENCLIP_TEXT_TOWER = (r"positional_embedding", r"text_projection", r"logit_scale", r"logit_bias",
                        r"token_embedding\.weight", r"ln_final\.(weight|bias)", r"attn_mask",
                        r"transformer\.resblocks\.\d+\..+")

IGNORED_REASONS = {
    **{p: "non-persistent buffer of the Qwen modeling code (recomputed)" for p in _QWEN_BUFFERS},
    **{p: "OpenCLIP visual head that Qwen-VL replaces (no class token; the adapter has its own ln_post/proj)"
       for p in _OPENCLIP_UNUSED_VISUAL},
    **{p: "OpenCLIP text tower" for p in _OPENCLIP_TEXT_TOWER},
}

QWENVL = Table("qwen-vl", _QWENVL_VISUAL_RULES + _QWEN_LLM_RULES, _QWEN_BUFFERS, ("visual", "adapter", "llm"))
QWEN7B = Table("qwen-7b", _QWEN_LLM_RULES, _QWEN_BUFFERS, ("llm",))
OPENCLIP_VIT = Table(
    "openclip-vit",
    tuple(_rules("visual.", "visual.", [
        ("conv1.weight", "conv1", Conv()),
        ("positional_embedding", "positional_embedding", DropFirstRow()),
        ("ln_pre.weight", "ln_pre.scale", Same()),
        ("ln_pre.bias", "ln_pre.bias", Same()),
    ]) + _rules("visual.transformer.resblocks.{i}.", "visual.blocks.", _OPENCLIP_BLOCK)),
    _OPENCLIP_UNUSED_VISUAL + _OPENCLIP_TEXT_TOWER, ("visual",))

TABLES = {t.name: t for t in (QWENVL, QWEN7B, OPENCLIP_VIT)}


@dataclasses.dataclass(frozen=True)
class Binding:
  """A rule applied to one concrete torch tensor (layer `layer` of per-layer rules, else None)."""

  torch_name: str
  rule: Rule
  layer: int | None
  target_shapes: tuple[Shape, ...]  # per-layer shapes of the targets

  @property
  def torch_shape(self) -> Shape:
    return tuple(self.rule.transform.torch_shape(self.target_shapes))


def bind(table: Table, shapes: dict[str, Shape]) -> list[Binding]:
  """Every torch tensor the table expects, in table order (per-layer rules expanded layer-major).

  `shapes` are the full shapes of our parameters (with the leading `layers` axis for scanned ones); the number of
  layers of a per-layer rule is its targets' leading dimension. Targets missing from `shapes` are an error.
  """
  missing = sorted({t for r in table.rules for t in r.targets if t not in shapes})
  if missing:
    raise ValueError(f"table {table.name} maps to parameters the model does not have: {missing}")
  groups: dict[str, list[Rule]] = {}
  for r in table.rules:
    if r.per_layer:
      groups.setdefault(r.torch_name.split("{i}")[0], []).append(r)
  out: list[Binding] = []
  emitted: set[str] = set()
  for r in table.rules:
    if not r.per_layer:
      out.append(Binding(r.torch_name, r, None, tuple(shapes[t] for t in r.targets)))
      continue
    group = r.torch_name.split("{i}")[0]
    if group in emitted:
      continue
    emitted.add(group)
    n = shapes[r.targets[0]][0]
    bad = [g.torch_name for g in groups[group] for t in g.targets if shapes[t][0] != n]
    if bad:
      raise ValueError(f"the per-layer tensors {bad} disagree with {r.torch_name} on the number of layers ({n})")
    for i in range(n):  # layer-major, the order of the reference's state dict
      for g in groups[group]:
        out.append(Binding(g.torch_name.format(i=i), g, i, tuple(shapes[t][1:] for t in g.targets)))
  return out


def covered_targets(table: Table) -> list[str]:
  """Our parameter paths a table fills (each exactly once per layer)."""
  return [t for r in table.rules for t in r.targets]
