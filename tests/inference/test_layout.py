"""The inference layout (inference/layout.py, rule table `inference_tp`) on the 8 fake CPU devices of conftest:
which tensor-parallel degrees a model allows, the default mesh, tensor-parallel generation equal to one device's,
and a compiled decode step that all-gathers no weight (where the fsdp layout gathers them all)."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qwenvl_jax import errors, sharding
from qwenvl_jax.inference import decode, layout
from qwenvl_jax.model import QwenVL, qwen_vl_7b, tiny
from qwenvl_jax.serving import slots as slots_lib

TP = sharding.load_rules("inference_tp")


def _tp4_config():
  """tiny in float32 with 4 heads in the ViT and the adapter too (tiny has 2), so tensor 4 is valid."""
  cfg = tiny(dtype="float32", param_dtype="float32", remat_policy="none")
  return dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, heads=4),
                             resampler=dataclasses.replace(cfg.resampler, heads=4))


@pytest.fixture(scope="module")
def tp4_models():
  """(single-device model, tensor 4 x data 2 model, its mesh): the same weights (same init RNG stream)."""
  cfg = _tp4_config()
  make = lambda: QwenVL(cfg, rngs=nnx.Rngs(0))
  mesh, rules = layout.make_inference_mesh(cfg, tensor_parallel=4)
  return make(), sharding.init_sharded(make, mesh, rules), mesh


def test_full_size_model_allows_degrees_dividing_16():
  cfg = qwen_vl_7b()
  dims = layout.tensor_dims(cfg, TP)
  assert dims["q_heads"] == 32 and dims["vit_heads"] == 16 and dims["mlp"] == 11008 and dims["vocab"] == 151936
  assert layout.valid_tensor_degrees(cfg, TP) == [1, 2, 4, 8, 16]
  for degree in (1, 2, 4, 8, 16):
    layout.check_tensor_degree(cfg, TP, degree)
  with pytest.raises(errors.ConfigError, match=r"--tensor_parallel=32 does not divide the model's vit_heads 16") as e:
    layout.check_tensor_degree(cfg, TP, 32)
  assert "1, 2, 4, 8, 16" in e.value.hint
  with pytest.raises(errors.ConfigError, match=r"=3 does not divide .*mlp 11008"):
    layout.check_tensor_degree(cfg, TP, 3)


def test_default_mesh_is_tensor_within_a_host_and_replicas_over_the_rest():
  cfg = tiny(dtype="float32")
  mesh, rules = layout.make_inference_mesh(cfg)  # 8 devices, one host; tiny allows 1 and 2 (2-head ViT)
  assert dict(mesh.shape) == {"data": 4, "fsdp": 1, "tensor": 2} and rules == TP
  mesh, _ = layout.make_inference_mesh(_tp4_config())
  assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "tensor": 4}
  mesh, _ = layout.make_inference_mesh(cfg, "fsdp")  # a training table keeps the old all-on-fsdp layout
  assert dict(mesh.shape) == {"data": 1, "fsdp": 8, "tensor": 1}
  mesh, _ = layout.make_inference_mesh(cfg, mesh_axes={"data": 0, "fsdp": 0, "tensor": 0})  # eval's "not given"
  assert dict(mesh.shape) == {"data": 4, "fsdp": 1, "tensor": 2}
  with pytest.raises(errors.ConfigError, match=r"tensor_parallel=4 does not divide the model's .*vit_heads 2"):
    layout.make_inference_mesh(cfg, tensor_parallel=4)
  with pytest.raises(errors.ConfigError, match="unknown sharding rules"):
    layout.make_inference_mesh(cfg, "tp")


def test_tensor_parallel_weights_are_split_not_gathered(tp4_models):
  _, model, mesh = tp4_models
  spec = lambda v: v[...].sharding.spec
  assert spec(model.llm.blocks.attn.qkv.kernel) == jax.sharding.PartitionSpec(None, None, None, "tensor", None)
  assert spec(model.llm.blocks.mlp.w1.kernel) == jax.sharding.PartitionSpec(None, None, "tensor")
  assert spec(model.llm.lm_head.kernel) == jax.sharding.PartitionSpec(None, "tensor")
  # No weight is split over `data` (replicas) or `fsdp`.
  for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    assert not {"data", "fsdp"} & set(jax.tree.leaves(tuple(v[...].sharding.spec))), v[...].sharding.spec
  assert mesh.shape["tensor"] == 4


def _prompts(cfg, rows=4, seed=0):
  rng = np.random.default_rng(seed)
  prompts, images = [], []
  for i in range(rows):
    n = 5 + 3 * i
    ids = list(rng.integers(3, 900, n))
    if i % 2 == 0:  # every other row holds an image (the ViT and the adapter run tensor-parallel too)
      ids = ids[:2] + [cfg.image_pad_id] * cfg.image_tokens + ids[2:]
      images.append([rng.integers(0, 256, (cfg.vision.image_size,) * 2 + (3,), dtype=np.uint8)])
    else:
      images.append([])
    prompts.append(ids)
  return decode.make_prompt_batch(prompts, images, pad_id=0, image_pad_id=cfg.image_pad_id,
                                  image_tokens=cfg.image_tokens)


def test_tensor_parallel_greedy_generation_equals_one_device(tp4_models):
  single, model, mesh = tp4_models
  batch = _prompts(single.cfg)
  gen = decode.GenerationConfig(max_new_tokens=12, eos_id=1, pad_id=0)
  expected = decode.Generator(single).generate(batch, gen)
  with sharding.use_rules(mesh, TP):
    generator = decode.Generator(model)
    got = generator.generate(batch, gen)
    streamed = np.stack(list(generator.stream(batch, gen)), axis=1)
  np.testing.assert_array_equal(got, expected)
  np.testing.assert_array_equal(streamed, expected[:, :streamed.shape[1]])
  assert len(set(expected[:, 4:].ravel().tolist())) > 3, "a degenerate model would hide a wrong layout"


def test_serving_slots_decode_the_same_under_tensor_parallelism(tp4_models):
  """The server's programs (prefill into slot rows, copy a prompt to a row of another shard, decode the first R
  rows) on a cache split over data x tensor; the copy moves one row, never all-gathers the cache."""
  single, model, mesh = tp4_models
  cfg = single.cfg
  ids = np.random.default_rng(1).integers(3, 900, (2, 16)).astype(np.int32)

  greedy = slots_lib.Sampling.greedy(2)
  rope = np.full(4, cfg.llm.rope_base, np.float32)

  def run(m):
    slot_model = slots_lib.SlotModel(m, num_slots=4, context=48, feature_slots=1)
    first = slot_model.prefill(ids, np.array([16, 11], np.int32), np.zeros(2, np.int32), slot_model.no_features,
                               np.array([0, 1], np.int32), rope[:2], greedy).tokens
    slot_model.copy_prompt(0, 3, window=16)  # rows over data 2: row 0 on the first shard, row 3 on the second
    last = np.array([*np.asarray(first), 0, ids[0, -1]], np.int32)
    out, pos = [last], np.array([16, 11, 0, 15], np.int32)  # row 3 feeds the prompt's last token again
    for _ in range(6):
      last = np.asarray(slot_model.decode(last, pos, np.array([True, True, False, True]), rope,
                                          slots_lib.Sampling.greedy(4)).tokens)[0]  # [steps=1, R]
      out.append(last)
      pos = pos + 1
    return np.stack(out, 1), slot_model

  expected, _ = run(single)
  with sharding.use_rules(mesh, TP):
    got, slot_model = run(model)
    copy_text = slot_model._copy_fns[16].lower(  # pylint: disable=protected-access
        slot_model.cache, slot_model.history, np.int32(0), np.int32(3)).compile().as_text()
  np.testing.assert_array_equal(got[[0, 1, 3]], expected[[0, 1, 3]])
  np.testing.assert_array_equal(got[3, 1:], got[0, :-1])  # the copied row answers as its source
  # [L, B, N, S, H]: rows over data, heads over tensor.
  laid_out = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "data", "tensor", None, None))
  assert slot_model.cache.k.sharding.is_equivalent_to(laid_out, 5), slot_model.cache.k.sharding
  assert "all-gather" not in copy_text and "all-reduce" in copy_text


def _param_shapes(model) -> set[tuple[int, ...]]:
  """Every weight's shape, and its one-layer shape (the scanned blocks stack their weights over layers)."""
  shapes = set()
  for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    shape = tuple(v.shape)
    shapes.update(s for s in (shape, shape[1:]) if len(s) > 1)
  return shapes


def _all_gathers(model, mesh, rules) -> list[tuple[int, ...]]:
  """Result shapes of the all-gathers in the compiled decode step of `model` (8 rows, 64 cache slots).

  8 rows split over the 8 devices under fsdp, as a busy server's slots are: with fewer rows than devices the
  rows are replicated and XLA may instead all-reduce partial products of the fsdp-split contraction.
  """
  graphdef, state = nnx.split(model)
  b = 8
  with sharding.use_rules(mesh, rules):
    cache = jax.jit(lambda: model.llm.init_cache(b, 64))()
    step = jax.jit(lambda s, t, p, c, i, r: decode.decode_step(graphdef, s, t, p, c, i, rope_base=r),
                   donate_argnums=3)
    hlo = step.lower(state, jnp.zeros(b, jnp.int32), jnp.zeros(b, jnp.int32), cache, jnp.int32(3),
                     jnp.full(b, 1e4, jnp.float32)).compile().as_text()
  return [tuple(int(d) for d in dims.split(",") if d)
          for dims in re.findall(r"= \w+\[([\d,]*)\][^ ]* all-gather(?:-start)?\(", hlo)]


@pytest.mark.slow
def test_compiled_decode_step_gathers_no_weight_while_fsdp_gathers_them(tp4_models):
  single, model, mesh = tp4_models
  weights = _param_shapes(single)
  tp_gathers = _all_gathers(model, mesh, TP)
  assert not [s for s in tp_gathers if s in weights], tp_gathers

  fsdp_mesh, fsdp_rules = layout.make_inference_mesh(single.cfg, "fsdp")
  fsdp_model = sharding.init_sharded(lambda: QwenVL(single.cfg, rngs=nnx.Rngs(0)), fsdp_mesh, fsdp_rules)
  fsdp_gathers = [s for s in _all_gathers(fsdp_model, fsdp_mesh, fsdp_rules) if s in weights]
  # The decoder's qkv, out, w1, w2, c_proj and the lm_head: each gathered whole for a single token.
  assert len(fsdp_gathers) >= 5, fsdp_gathers
