"""The name/layout tables: complete and exact against SPEC §5.1, invertible, and the three QKV layouts."""
import functools
import math

import numpy as np
import pytest
from flax import nnx

from qwenvl_jax import sharding
from qwenvl_jax.checkpoint import mapping, orbax_store
from qwenvl_jax.model import QwenVL, mid, qwen_vl_7b, tiny
from .conftest import openclip_shapes, qwen_llm_shapes, qwenvl_visual_shapes


@functools.lru_cache(maxsize=None)
def _preset_shapes(make_cfg):
  return _shapes(make_cfg())


def _shapes(cfg):
  abstract = sharding.abstract_model(lambda: QwenVL(cfg, rngs=nnx.Rngs(0)))[1]
  return {k: s for k, (s, _) in orbax_store.param_shapes(abstract).items()}


@pytest.mark.parametrize("make_cfg", [tiny, mid, qwen_vl_7b])
def test_qwenvl_table_expects_exactly_the_reference_tensors(make_cfg):
  cfg = make_cfg()
  bindings = mapping.bind(mapping.QWENVL, _preset_shapes(make_cfg))
  got = {b.torch_name: b.torch_shape for b in bindings}
  want = {**qwenvl_visual_shapes(cfg), **qwen_llm_shapes(cfg)}
  assert got == want
  assert len(bindings) == len(got)  # each torch tensor consumed once


def test_qwen_vl_7b_has_853_tensors_and_the_spec_parameter_count():
  bindings = mapping.bind(mapping.QWENVL, _preset_shapes(qwen_vl_7b))
  assert len(bindings) == 853
  assert sum(math.prod(b.torch_shape) for b in bindings) == 9_656_935_168  # SPEC §5.2


@pytest.mark.parametrize("table,parts", [(mapping.QWENVL, ("visual", "adapter", "llm")), (mapping.QWEN7B, ("llm",)),
                                         (mapping.OPENCLIP_VIT, ("visual",))])
def test_each_table_fills_its_parts_exactly_once(table, parts):
  shapes = _preset_shapes(tiny)
  targets = mapping.covered_targets(table)
  assert len(targets) == len(set(targets))
  assert sorted(targets) == sorted(k for k in shapes if k.split(".")[0] in parts)
  assert table.parts == parts


def test_openclip_table_consumes_or_explicitly_ignores_every_tensor():
  cfg = tiny()
  names = openclip_shapes(cfg)
  bindings = mapping.bind(mapping.OPENCLIP_VIT, _shapes(cfg))
  used = {b.torch_name: b.torch_shape for b in bindings}
  assert all(names[n] == s for n, s in used.items())
  ignored = sorted(n for n in names if n not in used)
  assert all(mapping.OPENCLIP_VIT.is_ignored(n) for n in ignored)
  assert {"visual.class_embedding", "visual.ln_post.weight", "visual.ln_post.bias", "visual.proj"} <= set(ignored)
  assert not mapping.OPENCLIP_VIT.is_ignored("visual.transformer.resblocks.0.attn.in_proj_weight")
  assert not mapping.QWENVL.is_ignored("transformer.visual.class_embedding")
  assert all(p in mapping.IGNORED_REASONS for t in mapping.TABLES.values() for p in t.ignored)


_TRANSFORMS = [
    (mapping.Same(), [(4, 3)]),
    (mapping.Flat(), [(2, 3, 4)]),
    (mapping.Flat(perm=(1, 0, 2)), [(2, 3, 4)]),
    (mapping.Linear(1), [(5, 2, 3, 4)]),
    (mapping.Linear(2), [(2, 3, 5)]),
    (mapping.Linear(1, perm=(0, 2, 1, 3)), [(5, 2, 3, 4)]),
    (mapping.Conv(), [(3, 3, 2, 4)]),
    (mapping.Chunk(3, mapping.Linear(1)), [(5, 2, 4)] * 3),
    (mapping.Chunk(3, mapping.Flat()), [(2, 4)] * 3),
]


@pytest.mark.parametrize("transform,target_shapes", _TRANSFORMS, ids=lambda x: repr(x)[:40])
def test_transforms_are_bit_exact_inverses(transform, target_shapes):
  x = np.random.default_rng(0).standard_normal(transform.torch_shape(target_shapes)).astype(np.float32)
  ys = transform.forward(x, target_shapes)
  assert [y.shape for y in ys] == [tuple(s) for s in target_shapes]
  np.testing.assert_array_equal(transform.inverse(ys, target_shapes), x)


def _rows(n_rows, n_in):
  """A weight whose row r is filled with r (so the output tells which torch row landed where)."""
  return np.repeat(np.arange(n_rows, dtype=np.float32)[:, None], n_in, axis=1)


def test_vit_in_proj_is_head_interleaved():
  w, n, h = 6, 2, 3  # row r = head * 3H + t * H + d (SPEC §1.4)
  kernel = mapping.Linear(1).forward(_rows(3 * w, w), [(w, n, 3, h)])[0]
  for head in range(n):
    for t in range(3):
      for d in range(h):
        assert (kernel[:, head, t, d] == head * 3 * h + t * h + d).all()


def test_openclip_in_proj_is_blocked_and_lands_interleaved():
  w, n, h = 6, 2, 3  # nn.MultiheadAttention: row r = t * W + head * H + d
  kernel = mapping.Linear(1, perm=(0, 2, 1, 3)).forward(_rows(3 * w, w), [(w, n, 3, h)])[0]
  bias = mapping.Flat(perm=(1, 0, 2)).forward(np.arange(3 * w, dtype=np.float32), [(n, 3, h)])[0]
  for head in range(n):
    for t in range(3):
      for d in range(h):
        assert (kernel[:, head, t, d] == t * w + head * h + d).all()
        assert bias[head, t, d] == t * w + head * h + d


def test_llm_c_attn_is_blocked():
  d_model, n, h = 6, 2, 3  # row r = t * D + head * H + d
  kernel = mapping.Linear(1).forward(_rows(3 * d_model, d_model), [(d_model, 3, n, h)])[0]
  for t in range(3):
    for head in range(n):
      for d in range(h):
        assert (kernel[:, t, head, d] == t * d_model + head * h + d).all()


def test_resampler_in_proj_chunks_into_q_k_v_and_out_proj_splits_heads():
  d_model, n, h = 6, 2, 3
  x = np.random.default_rng(1).standard_normal((3 * d_model, d_model)).astype(np.float32)
  q, k, v = mapping.Chunk(3, mapping.Linear(1)).forward(x, [(d_model, n, h)] * 3)
  for y, rows in zip((q, k, v), np.split(x, 3)):
    np.testing.assert_array_equal(y.reshape(d_model, d_model), rows.T)
  out = mapping.Linear(2).forward(x[:d_model], [(n, h, d_model)])[0]
  inp = np.random.default_rng(2).standard_normal((4, d_model)).astype(np.float32)
  np.testing.assert_allclose(np.einsum("bnh,nhd->bd", inp.reshape(4, n, h), out), inp @ x[:d_model].T, rtol=1e-5, atol=1e-6)


def test_openclip_positional_embedding_drops_the_class_token_row():
  x = np.arange(5 * 2, dtype=np.float32).reshape(5, 2)
  (y,) = mapping.DropFirstRow().forward(x, [(4, 2)])
  np.testing.assert_array_equal(y, x[1:])
  with pytest.raises(NotImplementedError):
    mapping.DropFirstRow().inverse([y], [(4, 2)])


def test_row_blocks_map_to_the_right_axis():
  assert mapping.Same().row_block_axis((10, 4)) == 0
  assert mapping.Linear(1).row_block_axis((4, 10)) == 1  # lm_head [V, D] rows -> kernel [D, V] columns
  assert mapping.Linear(1).row_block_axis((4, 2, 5)) is None
  assert mapping.Linear(2).row_block_axis((2, 3, 4)) == 2


@pytest.mark.parametrize("shape", [(3, 5), (1100, 1000), (1000, 1100)])
@pytest.mark.parametrize("dtype", [np.float32, "bfloat16", np.float16])
def test_transpose2d_equals_numpy_transpose(shape, dtype):
  dtype = mapping_dtype(dtype)
  x = np.random.default_rng(0).standard_normal(shape).astype(dtype)
  y = mapping.transpose2d(x)
  assert y.flags.c_contiguous and y.dtype == x.dtype
  np.testing.assert_array_equal(y.view(np.uint8), np.ascontiguousarray(x.T).view(np.uint8))


def mapping_dtype(name):
  import ml_dtypes
  return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)
