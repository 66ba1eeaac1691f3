"""Quantized inference on a trained tiny model: int8/int4 weights and the int8 KV cache give the float model's
greedy tokens; weights stay int8 in the jitted decode step; checkpoints quantize on load or load as stored."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qwenvl_jax import sharding
from qwenvl_jax.checkpoint import save_params
from qwenvl_jax.inference import GenerationConfig, Generator, decode, loading, make_prompt_batch, quantized
from qwenvl_jax.model import quantize as qlib
from tests.inference import trained_lm

GEN = GenerationConfig(max_new_tokens=12, eos_id=1, pad_id=1, logn=False, dynamic_ntk=False)
INT4 = qlib.QuantConfig(mode="int4", group_size=32)


@pytest.fixture(scope="module")
def trained():
  return trained_lm.train_tiny_lm(40, batch=8, length=24)


@pytest.fixture(scope="module")
def prompts(trained):
  ids = trained_lm.sample(32, 8, seed=99)
  return make_prompt_batch([list(p) for p in ids], pad_id=0, image_pad_id=trained.cfg.image_pad_id,
                           image_tokens=trained.cfg.image_tokens, buckets=(8,))


@pytest.fixture(scope="module")
def float_tokens(trained, prompts):
  return Generator(trained).generate(prompts, GEN)


def _copy(model):
  return nnx.merge(*nnx.split(model))


def _agreement(a: np.ndarray, b: np.ndarray) -> float:
  """Fraction of prompts whose whole greedy continuation is identical."""
  return float(np.mean(np.all(a == b, axis=1)))


@pytest.mark.slow
@pytest.mark.parametrize("qcfg,floor", [(qlib.QuantConfig(mode="int8"), 0.9), (INT4, 0.75)])
def test_quantized_greedy_tokens_match_the_float_model(trained, prompts, float_tokens, qcfg, floor):
  model = qlib.quantize_model(_copy(trained), qcfg)
  rate = _agreement(Generator(model).generate(prompts, GEN), float_tokens)
  ids = jnp.asarray(trained_lm.sample(16, 24, seed=7))
  err = np.abs(np.asarray(model(ids).logits) - np.asarray(trained(ids).logits))
  print(f"\n{qcfg.mode}: greedy agreement {rate:.3f} over {len(float_tokens)} prompts x {GEN.max_new_tokens} "
        f"tokens; logit error max {err.max():.4f} mean {err.mean():.5f}")
  # The trained model's greedy path must be non-trivial for the comparison to mean anything.
  assert len({tuple(r) for r in float_tokens}) > 16
  assert rate >= floor
  assert err.mean() < (0.02 if qcfg.mode == "int8" else 0.2)


def test_int8_kv_cache_matches_the_float_cache(trained, prompts, float_tokens):
  gen = Generator(trained, kv_cache_dtype="int8")
  rate = _agreement(gen.generate(prompts, GEN), float_tokens)
  print(f"\nint8 KV cache: greedy agreement {rate:.3f}")
  assert rate >= 0.9
  cache = trained.llm.init_cache(4, 64, dtype=jnp.int8)
  float_cache = trained.llm.init_cache(4, 64, dtype=jnp.bfloat16)
  assert cache.k.dtype == jnp.int8 and cache.quantized and not float_cache.quantized
  c = trained.cfg.llm
  per_token = lambda kv: sum(x.nbytes for x in jax.tree.leaves(kv) if x.ndim == 5) / (4 * 64)
  assert per_token(float_cache) == 2 * c.layers * c.heads * c.head_dim * 2
  # int8 values plus one float32 scale per head (this f32 model's compute dtype; bf16 at full size).
  assert per_token(cache) == 2 * c.layers * c.heads * (c.head_dim + 4)
  with pytest.raises(ValueError, match="kv_cache_dtype"):
    Generator(trained, kv_cache_dtype="fp8")


def test_the_jitted_decode_step_takes_int8_weights(trained):
  """The compiled step's argument bytes are the int8 weights (plus the float leftovers and the cache)."""
  def argument_bytes(model):
    graphdef, state = nnx.split(model)
    cache = model.llm.init_cache(2, 16)
    step = jax.jit(decode.decode_step, static_argnums=0)
    lowered = step.lower(graphdef, state, jnp.zeros(2, jnp.int32), jnp.zeros(2, jnp.int32), cache, 3,
                         rope_base=jnp.full(2, 1e4, jnp.float32))
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    # Decoding text uses only the LLM (jit drops the unused ViT/adapter arguments).
    weights = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model.llm, nnx.Param)))
    cache_bytes = sum(x.nbytes for x in jax.tree.leaves(cache))
    return lowered.compile().memory_analysis().argument_size_in_bytes, weights, cache_bytes, leaves

  q_model = qlib.quantize_model(_copy(trained), qlib.QuantConfig(mode="int8"))
  f_args, f_weights, f_cache, _ = argument_bytes(trained)
  q_args, q_weights, q_cache, q_leaves = argument_bytes(q_model)
  assert any(x.dtype == jnp.int8 for x in q_leaves)
  assert all(isinstance(x, jax.Array) for x in q_leaves)
  # No hidden float copy: the argument bytes shrink by exactly what the weights shrank.
  assert f_args - q_args == f_weights - q_weights
  assert q_weights + q_cache <= q_args <= q_weights + q_cache + 1024 and q_weights < 0.4 * f_weights


@pytest.fixture(scope="module")
def float_checkpoint(trained, tmp_path_factory):
  path = tmp_path_factory.mktemp("ckpt") / "params"
  save_params(path, nnx.to_pure_dict(nnx.state(trained, nnx.Param)))
  return str(path)


def _params(model):
  return jax.tree.leaves(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


@pytest.mark.slow
def test_quantize_on_load_and_a_saved_quantized_checkpoint_give_the_same_sharded_weights(
    trained, float_checkpoint, tmp_path):
  mesh, rules = loading.inference_mesh()  # every device on fsdp (8 fake CPU devices)
  loaded = loading.load_model(trained.cfg, float_checkpoint, mesh, rules, quantize="int4", group_size=32)
  expect = qlib.quantize_model(_copy(trained), INT4)
  for got, want in zip(_params(loaded), _params(expect), strict=True):
    assert got.dtype == want.dtype and np.array_equal(np.asarray(got), np.asarray(want))
  w1 = loaded.llm.blocks.mlp.w1.qvalue[...]
  assert w1.dtype == jnp.int4 and w1.sharding.spec == sharding.resolve_spec(
      w1.shape, ("layers", "embed", "mlp"), rules, dict(mesh.shape))
  assert len(w1.sharding.device_set) == 8

  out = tmp_path / "int4"
  quantized.save_quantized(loaded, out, INT4)
  assert quantized.checkpoint_quantization(out) == INT4
  again = loading.load_model(trained.cfg, str(out), mesh, rules)  # as stored, no --quantize needed
  for got, want in zip(_params(again), _params(loaded), strict=True):
    assert got.dtype == want.dtype and np.array_equal(np.asarray(got), np.asarray(want))
  with pytest.raises(ValueError, match="quantized as .*int4.* but .*int8"):
    loading.load_model(trained.cfg, str(out), mesh, rules, quantize="int8")
  with pytest.raises(ValueError, match="already quantized"):
    quantized.quantize_checkpoint_on_load(str(out), trained.cfg, INT4, mesh, rules)
  with pytest.raises(FileExistsError):
    quantized.save_quantized(loaded, out, INT4)
