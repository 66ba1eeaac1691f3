"""QLoRA runs: the LLM's block projections are 4-bit (nf4 / int4) or int8 codes on device under float32 adapters;
only the adapters train and hold AdamW state, the quantized base never moves, the loss falls; at init the model is
exactly the quantized base; merging dequantizes; a fresh run quantizes a float checkpoint while restoring.

Tolerances: float32 compute. A fresh adapter (B = 0) adds exact zeros, so QLoRA logits at init are bitwise the
quantized base model's. Merged vs unmerged differ only by the rounding of deq(W) + s*A@B vs x@deq(W) + s*(x@A)@B:
atol 1e-5, as for LoRA (tests/model/test_lora.py). NF4 codes are checked against an independent numpy NF4 (the
QLoRA paper's 16 levels, nearest level of w / absmax per group).
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qwenvl_jax import checkpoint, sharding
from qwenvl_jax.model import QwenVL, lora, tiny
from qwenvl_jax.model import quantize as qlib
from qwenvl_jax.training import optimizer, peft, step as step_lib
from qwenvl_jax.training.stage_config import stage_config
from tests.training.test_step import _batch, _opt

RES = 56
GROUP = 16  # the tiny LLM's width is 64: groups of 16 make 4 scales per output channel (64 would be one)
# The QLoRA paper's NF4 levels (Dettmers et al. 2023, Appendix E), written out independently of qwix's table.
NF4_LEVELS = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                       0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                       0.7229568362236023, 1.0])
PROJECTIONS = ("attn/qkv", "attn/out", "mlp/w1", "mlp/w2", "mlp/c_proj")


def _config(mode="nf4", rank=8):
  config = stage_config(3, f"qlora={rank}")
  config.lora.base_quantize = mode
  if mode != "int8":  # per channel: int8 refuses a group size it would ignore
    config.lora.quantize_group = GROUP
  return config


def _cfg():
  return tiny(dtype="float32", remat_policy="none").with_image_size(RES)


def _flat(tree):
  return {optimizer.path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


@nnx.jit
def _logits(model, ids):
  return model(ids).logits


def _ids():
  return jnp.asarray(np.random.default_rng(0).integers(0, 500, (2, 12)), jnp.int32)


@pytest.fixture(scope="module")
def qlora_model():
  """(graphdef, state) of a fresh nf4 QLoRA tiny model, built once: building it and compiling the step take
  30-60 s on 2 cores, so the tests that use it are marked slow."""
  return nnx.split(peft.model_fn(_cfg(), _config())())


@pytest.fixture(scope="module")
def qlora_run(qlora_model):
  """Six nf4 QLoRA steps on one repeated batch: (initial params, final state, losses)."""
  config = _config()
  graphdef, state = qlora_model
  params = jax.tree.map(jnp.copy, nnx.to_pure_dict(state))
  opt = _opt()
  opt.lr = 1e-2
  tx, sched, labels = optimizer.make_optimizer(opt, params, frozen=peft.frozen_patterns(config), total_steps=100,
                                               vit_layers=2)
  fn = jax.jit(step_lib.make_train_step(graphdef, tx, labels, sched, stop_vision_grad=True, loss_chunk=16,
                                        dropout_seed=peft.dropout_seed(config, 0)))
  state = step_lib.TrainState(jnp.int32(0), params, tx.init(params))
  losses = []
  for _ in range(6):
    state, m = fn(state, _batch(0))
    losses.append(float(m["loss"]))
  return params, state, losses


@pytest.mark.slow
def test_base_projections_are_4bit_codes_on_device(qlora_run):
  _, state, _ = qlora_run
  flat = _flat(state.params)
  for proj in PROJECTIONS:
    codes, scale = flat[f"llm/blocks/{proj}/qvalue"], flat[f"llm/blocks/{proj}/scale"]
    assert isinstance(codes, jax.Array) and codes.dtype == jnp.int4, proj  # not a dequantized copy
    assert scale.dtype == jnp.float32 and scale.ndim == codes.ndim, proj
  for proj in ("attn/qkv", "mlp/w1", "mlp/w2"):  # contract D = 64: 4 groups of 16 per output channel
    assert flat[f"llm/blocks/{proj}/scale"].shape[1] == 64 // GROUP, proj
  assert not [k for k in flat if k.startswith("llm/blocks/") and k.endswith("/kernel")]
  # The rest of the base (ViT, resampler, embeddings, lm_head) stays in base_dtype, bf16.
  assert flat["llm/lm_head/kernel"].dtype == flat["visual/blocks/attn/qkv/kernel"].dtype == jnp.bfloat16


@pytest.mark.parametrize("mode,dtype", [("int4", jnp.int4), ("int8", jnp.int8)])
def test_int4_and_int8_bases(mode, dtype):
  abstract = nnx.state(nnx.eval_shape(peft.model_fn(_cfg(), _config(mode))))
  flat = _flat(nnx.to_pure_dict(abstract))
  assert {flat[f"llm/blocks/{p}/qvalue"].dtype for p in PROJECTIONS} == {jnp.dtype(dtype)}
  assert flat["llm/blocks/attn/qkv/lora_a"].dtype == jnp.float32


@pytest.mark.slow
def test_quantized_base_is_bitwise_unchanged_and_every_adapter_b_moved(qlora_run):
  before, state, _ = qlora_run
  before, after = _flat(before), _flat(state.params)
  adapters = [k for k in before if k.endswith(("/lora_a", "/lora_b"))]
  assert len(adapters) == 8  # qkv, out, w1, w2 of the LLM
  for k, v in before.items():
    if k not in adapters:
      assert after[k].dtype == v.dtype, k
      np.testing.assert_array_equal(np.asarray(after[k]).astype(np.float32), np.asarray(v).astype(np.float32),
                                    err_msg=k)
  for k in adapters:
    assert after[k].dtype == jnp.float32
    if k.endswith("/lora_b"):
      # Every layer's B moved: gradients reach layer 0's adapters through the three quantized layers above it.
      for layer in range(after[k].shape[0]):
        assert not np.array_equal(np.asarray(after[k][layer]), np.asarray(before[k][layer])), (k, layer)


@pytest.mark.slow
def test_only_adapters_hold_optimizer_state(qlora_run):
  before, state, _ = qlora_run
  adapter_size = sum(int(v.size) for k, v in _flat(before).items() if k.endswith(("/lora_a", "/lora_b")))
  held = jax.tree.leaves(state.opt_state)
  assert 2 * adapter_size <= sum(int(x.size) for x in held) <= 2 * adapter_size + 16
  assert {x.dtype for x in held if x.ndim} == {jnp.dtype(jnp.float32)}


@pytest.mark.slow
def test_qlora_loss_falls(qlora_run):
  _, _, losses = qlora_run
  # Rank-8 adapters on a random-init nf4 base move the loss by ~0.14 nats in 6 steps, as LoRA does.
  assert losses[-1] < losses[0] - 0.1, losses


@pytest.mark.slow
def test_fresh_qlora_gives_exactly_the_quantized_base_logits(qlora_model):
  graphdef, state = qlora_model
  qcfg, targets = peft.base_quantization(_config())
  # The quantized base model: QwenVL with the same projections quantized, without adapters, holding the same base
  # values (that the codes equal quantize_model's of the float model is test_fresh_run_quantizes_...).
  bf16 = dataclasses.replace(_cfg(), param_dtype="bfloat16")
  base_graph, _ = nnx.split(nnx.eval_shape(lambda: qlib.quantize_model(QwenVL(bf16, rngs=nnx.Rngs(0)), qcfg,
                                                                      only=targets)))
  base = nnx.merge(base_graph, state.filter(nnx.Not(nnx.LoRAParam)))
  ids = _ids()
  np.testing.assert_array_equal(np.asarray(_logits(nnx.merge(graphdef, state), ids)), np.asarray(_logits(base, ids)))


@pytest.mark.slow
def test_merged_equals_unmerged_qlora(qlora_model):
  model = nnx.merge(*qlora_model)
  for i, m in enumerate(lora.lora_modules(model).values()):
    m.lora_b.set_value(0.05 * jax.random.normal(jax.random.key(i), m.lora_b.shape))
  ids = _ids()
  unmerged = _logits(model, ids)
  lora.merge_lora(model)
  plain = nnx.state(nnx.eval_shape(lambda: QwenVL(_cfg(), rngs=nnx.Rngs(0))))
  merged_state = nnx.state(model)
  assert {p for p, _ in nnx.to_flat_state(merged_state)} == {p for p, _ in nnx.to_flat_state(plain)}
  assert model.llm.blocks.mlp.w1.kernel.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(_logits(model, ids)), np.asarray(unmerged), atol=1e-5, rtol=0)


def test_nf4_codes_are_the_nearest_normalfloat_levels():
  w = np.asarray(jax.random.normal(jax.random.key(0), (2, 64, 8)), np.float32)
  codes, scale = qlib.quantize_array(jnp.asarray(w), (1,), qlib.QuantConfig(mode="nf4", group_size=GROUP))
  assert codes.dtype == jnp.int4 and scale.shape == (2, 64 // GROUP, 8)
  groups = w.reshape(2, 64 // GROUP, GROUP, 8)
  absmax = np.abs(groups).max(axis=2, keepdims=True)
  expected = np.abs(groups / absmax - NF4_LEVELS[:, None, None, None, None]).argmin(axis=0)
  np.testing.assert_array_equal(np.asarray(codes, np.int8).reshape(expected.shape) + 8, expected)
  np.testing.assert_allclose(np.asarray(scale)[:, :, None], absmax, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(qlib.dequantize(codes, scale, mode="nf4")),
                             (NF4_LEVELS[expected] * absmax).reshape(w.shape), rtol=1e-6)


def test_groups_are_consecutive_inputs_of_a_multi_axis_contraction():
  """c_proj-like kernel [L, N, H, D] contracting N and H: a group is 16 consecutive inputs of the flattened N*H
  input (one scale per head and 16 of H), as bitsandbytes blocks a torch [out, in] row."""
  w = np.asarray(jax.random.normal(jax.random.key(1), (2, 4, 32, 8)), np.float32)
  codes, scale = qlib.quantize_array(jnp.asarray(w), (1, 2), qlib.QuantConfig(mode="nf4", group_size=GROUP))
  assert scale.shape == (2, 4, 32 // GROUP, 8)
  absmax = np.abs(w.reshape(2, 4 * 32 // GROUP, GROUP, 8)).max(axis=2)
  np.testing.assert_allclose(np.asarray(scale).reshape(absmax.shape), absmax, rtol=1e-6)


def test_fresh_run_quantizes_a_float_checkpoint_while_restoring(tmp_path):
  config = _config("int4")
  cfg = _cfg()
  float_model = QwenVL(dataclasses.replace(cfg, param_dtype="bfloat16"), rngs=nnx.Rngs(7))
  checkpoint.save_params(tmp_path / "base", nnx.to_pure_dict(nnx.state(float_model)))
  mesh = sharding.make_mesh({"fsdp": -1})
  rules = sharding.load_rules("fsdp")
  qcfg, targets = peft.base_quantization(config)
  params = _flat(peft.init_from_base(str(tmp_path / "base"), peft.model_fn(cfg, config), mesh, rules, quant=qcfg))
  expected = _flat(nnx.to_pure_dict(nnx.state(qlib.quantize_model(float_model, qcfg, only=targets))))
  assert set(params) - set(expected) == {k for k in params if k.endswith(("/lora_a", "/lora_b"))}
  for k, v in expected.items():
    assert params[k].dtype == v.dtype, k
    np.testing.assert_array_equal(np.asarray(params[k]).astype(np.float32), np.asarray(v).astype(np.float32),
                                  err_msg=k)
  assert not np.asarray(params["llm/blocks/mlp/w1/lora_b"]).any()


def test_bad_qlora_configs_are_refused():
  config = _config()
  config.lora.base_quantize = "fp4"
  with pytest.raises(ValueError, match="base_quantize='fp4'.*nf4, int4, int8"):
    peft.base_quantization(config)
  config = _config()
  config.lora.rank = 0
  with pytest.raises(ValueError, match="needs LoRA adapters"):
    peft.base_quantization(config)
  config = _config()
  config.lora.quantize_targets = "llm/.*"
  with pytest.raises(ValueError, match="matches llm/lm_head"):
    peft.base_quantization(config)
  with pytest.raises(ValueError, match="give one"):
    stage_config(3, "lora=8,qlora=8")
