"""Weight-only quantization of the model's kernels: scales per channel / group against a numpy reference, the
quantized tree's dtypes and logical axes, and the quantized einsum against the dequantized float einsum."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qwenvl_jax import sharding
from qwenvl_jax.model import QwenVL, layers, tiny
from qwenvl_jax.model import quantize as qlib


def _reference(w: np.ndarray, contracted, group, qmax):
  """numpy absmax quantization: one scale per non-contracted index (and per group of the last contracted axis)."""
  w = w.astype(np.float64)
  if group is None:
    absmax = np.abs(w).max(axis=tuple(contracted), keepdims=True)
  else:
    last = contracted[-1]
    shape = w.shape[:last] + (w.shape[last] // group, group) + w.shape[last + 1:]
    axes = tuple(a if a < last else a + 1 for a in contracted if a != last) + (last + 1,)
    absmax = np.abs(w.reshape(shape)).max(axis=axes, keepdims=True).squeeze(last + 1)
  return absmax / qmax


@pytest.mark.parametrize("mode,group", [("int8", None), ("int4", 16)])
def test_stacked_kernel_scales_are_per_layer_channel_and_group(mode, group):
  # The LLM's c_attn kernel stacked over L=2 layers: [L, D, 3, N, H], contracted over D only.
  w = np.random.default_rng(0).normal(size=(2, 64, 3, 4, 8)).astype(np.float32)
  contracted = qlib.contracted_axes("btd,dknh->btknh", w.ndim)
  assert contracted == (1,)
  cfg = qlib.QuantConfig(mode=mode, group_size=group or 128)
  qvalue, scale = qlib.quantize_array(jnp.asarray(w), contracted, cfg)
  assert qvalue.dtype == (jnp.int8 if mode == "int8" else jnp.int4) and qvalue.shape == w.shape
  assert scale.shape == ((2, 1, 3, 4, 8) if mode == "int8" else (2, 64 // group, 3, 4, 8))
  # qwix maps absmax to qmax + 0.5 (127.5, 7.5: `numerics.get_symmetric_bound`) and clips after rounding, so
  # the top bucket is used in full.
  qmax = 127.5 if mode == "int8" else 7.5
  np.testing.assert_allclose(np.asarray(scale), _reference(w, contracted, group, qmax), rtol=1e-6)
  restored = np.asarray(qlib.dequantize(qvalue, scale))
  # Round-to-nearest: every entry within half a step of its scale.
  step = np.repeat(np.asarray(scale), w.shape[1] // scale.shape[1], axis=1)
  assert np.all(np.abs(restored - w) <= 0.5 * step + 1e-6)


def test_contracted_axes_of_every_kernel_layout():
  assert qlib.contracted_axes("btnh,nhd->btd", 4) == (1, 2)        # stacked c_proj [L, N, H, D]
  assert qlib.contracted_axes("btd,dv->btv", 2) == (0,)            # lm_head [D, V]
  assert qlib.contracted_axes("blw,wnkh->blnkh", 5) == (1,)        # stacked ViT qkv [L, W, N, 3, H]
  with pytest.raises(ValueError, match="smaller than the einsum operand"):
    qlib.contracted_axes("btd,dknh->btknh", 3)
  with pytest.raises(ValueError, match="unknown quantization mode"):
    qlib.QuantConfig(mode="int2")


def test_quantized_einsum_equals_the_float_einsum_of_the_dequantized_kernel():
  module = layers.Einsum("btd,dknh->btknh", (32, 3, 2, 8), ("embed", None, "q_heads", "head_dim"),
                         bias_shape=(3, 2, 8), bias_axes=(None, "q_heads", "head_dim"), dtype=jnp.float32,
                         rngs=nnx.Rngs(0))
  module.bias[...] = jnp.linspace(-1, 1, 48).reshape(3, 2, 8)
  quantized = qlib.QuantizedEinsum.from_einsum(module, qlib.QuantConfig(mode="int8"))
  x = jax.random.normal(jax.random.key(1), (2, 5, 32))
  dequantized = qlib.dequantize(quantized.qvalue[...], quantized.scale[...])
  expect = jnp.einsum("btd,dknh->btknh", x, dequantized) + module.bias[...]
  np.testing.assert_allclose(np.asarray(quantized(x)), np.asarray(expect), rtol=1e-5, atol=1e-5)
  # ... and is close to the float layer (int8 rounding only).
  np.testing.assert_allclose(np.asarray(quantized(x)), np.asarray(module(x)), atol=0.05)


@pytest.fixture(scope="module")
def abstract_pair():
  cfg = tiny(dtype="float32", remat_policy="none")
  float_model = nnx.eval_shape(lambda: QwenVL(cfg, rngs=nnx.Rngs(0)))
  quantized = nnx.eval_shape(lambda: qlib.quantize_model(QwenVL(cfg, rngs=nnx.Rngs(0)),
                                                         qlib.QuantConfig(mode="int8")))
  return float_model, quantized


def test_every_kernel_and_the_embedding_become_int8_with_the_kernels_logical_axes(abstract_pair):
  float_model, quantized = abstract_pair
  sources = qlib.source_map(float_model, qlib.QuantConfig())
  assert "llm/wte" in sources and "llm/lm_head" in sources and "visual/blocks/mlp/fc" in sources
  assert sum(isinstance(n, layers.Einsum) for _, n in nnx.iter_graph(quantized)) == 0
  assert not any(isinstance(n, nnx.Embed) for _, n in nnx.iter_graph(quantized))
  qstate = nnx.state(quantized, nnx.Param)
  fstate = nnx.state(float_model, nnx.Param)
  for module, (src, _) in sources.items():
    node = qstate
    for key in module.split("/"):
      node = node[key]
    kernel = fstate
    for key in src.split("/"):
      kernel = kernel[key]
    assert node["qvalue"].dtype == jnp.int8 and node["qvalue"].shape == kernel.shape
    assert node["scale"].dtype == jnp.float32
    assert sharding.logical_axes_of(node["qvalue"]) == sharding.logical_axes_of(kernel)
    assert sharding.logical_axes_of(node["scale"]) == sharding.logical_axes_of(kernel)
  quantized_elements = 0
  for module, (src, _) in sources.items():
    kernel = fstate
    for key in src.split("/"):
      kernel = kernel[key]
    quantized_elements += int(np.prod(kernel.shape))
  assert qlib.weight_bytes(qstate)["int8"] == quantized_elements


def test_quantized_weights_shard_like_the_float_kernels(abstract_pair):
  float_model, quantized = abstract_pair
  mesh = sharding.make_mesh({"fsdp": 8})
  rules = sharding.load_rules("fsdp")
  fspecs = sharding.state_specs(nnx.state(float_model, nnx.Param), rules, dict(mesh.shape))
  qspecs = sharding.state_specs(nnx.state(quantized, nnx.Param), rules, dict(mesh.shape))
  assert qspecs["llm"]["blocks"]["mlp"]["w1"]["qvalue"] == fspecs["llm"]["blocks"]["mlp"]["w1"]["kernel"]
  assert qspecs["llm"]["wte"]["qvalue"] == fspecs["llm"]["wte"]["embedding"]
  assert "fsdp" in tuple(qspecs["llm"]["blocks"]["mlp"]["w1"]["qvalue"])
  # A per-channel scale's contracted axis has length 1: it stays replicated, the channel axis shards.
  assert qspecs["llm"]["blocks"]["mlp"]["c_proj"]["scale"] == jax.sharding.PartitionSpec(None, None, "fsdp")


@pytest.mark.parametrize("group", [0, 7, 96])
def test_a_group_size_that_is_not_a_power_of_two_is_refused(group):
  """Such a G divides few kernel axes, and a kernel whose axis it does not divide falls back to one scale per
  channel: `--group_size=7` quantized everything per channel without a word."""
  with pytest.raises(ValueError, match="group_size must be a power of two"):
    qlib.QuantConfig(mode="int4", group_size=group)
