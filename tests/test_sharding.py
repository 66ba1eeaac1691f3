"""Logical-axis sharding: resolved PartitionSpecs (golden files), sharded == unsharded on 8 CPU devices, meshes."""

import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from qwenvl_jax import sharding
from qwenvl_jax.model import QwenVL, qwen_vl_7b, tiny

GOLDEN = pathlib.Path(__file__).parent / "golden"
# The reference mesh of the golden files: one v5p-128 slice as (data, fsdp, tensor) = (1, 16, 4).
GOLDEN_MESH = {"data": 1, "fsdp": 16, "tensor": 4}


def _resolved_specs(rules_name: str) -> dict[str, list]:
  _, state = sharding.abstract_model(lambda: QwenVL(qwen_vl_7b(), rngs=nnx.Rngs(0)))
  specs = sharding.state_specs(state, sharding.load_rules(rules_name), GOLDEN_MESH)
  return {"/".join(map(str, path)): [list(a) if isinstance(a, tuple) else a for a in spec]
          for path, spec in nnx.to_flat_state(specs)}


@pytest.mark.parametrize("rules_name", ["fsdp", "fsdp_tp"])
def test_partition_specs_match_golden_file(rules_name):
  got = _resolved_specs(rules_name)
  path = GOLDEN / f"partition_specs_{rules_name}.json"
  if os.environ.get("UPDATE_GOLDEN"):
    path.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
  assert got == json.loads(path.read_text()), f"resolved specs changed; rerun with UPDATE_GOLDEN=1 if intended"


def test_every_large_parameter_is_sharded_at_full_size():
  for rules_name in ("fsdp", "fsdp_tp"):
    _, state = sharding.abstract_model(lambda: QwenVL(qwen_vl_7b(), rngs=nnx.Rngs(0)))
    specs = dict(nnx.to_flat_state(sharding.state_specs(state, sharding.load_rules(rules_name), GOLDEN_MESH)))
    for path, var in nnx.to_flat_state(state):
      if np.prod(var.shape) >= 1 << 20:
        assert any(a is not None for a in specs[path]), f"{rules_name}: {path} {var.shape} is replicated"


def test_resolution_is_shape_aware():
  rules = (("heads", "tensor"), ("embed", ("fsdp", "tensor")))
  mesh = {"data": 1, "fsdp": 4, "tensor": 8}
  assert sharding.resolve_spec((16, 64), ("heads", "embed"), rules, mesh) == P("tensor", "fsdp")
  assert sharding.resolve_spec((12, 64), ("heads", "embed"), rules, mesh) == P(None, ("fsdp", "tensor"))
  assert sharding.resolve_spec((6, 6), ("heads", "embed"), rules, mesh) == P(None, None)
  with pytest.raises(KeyError, match="no rule"):
    sharding.resolve_spec((4,), ("vocabb",), rules, mesh)


def test_make_mesh_validates_degrees():
  mesh = sharding.make_mesh({"fsdp": -1, "tensor": 2})
  assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 2}
  with pytest.raises(ValueError, match="needs 24 devices, but there are 8"):
    sharding.make_mesh({"fsdp": 12, "tensor": 2})
  with pytest.raises(ValueError, match="do not divide"):
    sharding.make_mesh({"fsdp": -1, "tensor": 3})
  with pytest.raises(ValueError, match="unknown mesh axes"):
    sharding.make_mesh({"model": 8})


def test_the_sharded_init_compiles_at_the_run_once_level_and_gives_the_same_weights():
  """On the CPU the init compiles at -O0 (`run_once_compiler_options`: 15 s -> 2.3 s for tiny on 2 cores); its
  weights are the default level's up to float32 round-off, drawn from the same RNG stream."""
  mesh = sharding.make_mesh({"fsdp": 8})
  rules = sharding.load_rules("fsdp")
  options = sharding.run_once_compiler_options(mesh)
  assert options["xla_backend_optimization_level"] == 0
  cfg = tiny(dtype="float32")
  make = lambda: QwenVL(cfg, rngs=nnx.Rngs(3))
  got = nnx.to_flat_state(nnx.state(sharding.init_sharded(make, mesh, rules)))
  # XLA's default options, as the suite's own flags leave them (tests/conftest.py sets -O0 for the whole process).
  defaults = {"xla_backend_optimization_level": 2, "xla_cpu_use_fusion_emitters": True} if len(options) == 2 else {
      "xla_backend_optimization_level": 2}
  shardings = sharding.state_shardings(sharding.abstract_model(make)[1], rules, mesh)
  with sharding.use_rules(mesh, rules):
    lowered = jax.jit(lambda: nnx.state(make()), out_shardings=shardings).lower()
    expected = nnx.to_flat_state(lowered.compile(compiler_options=defaults)())
  assert [k for k, _ in got] == [k for k, _ in expected]
  for (path, a), (_, b) in zip(got, expected):
    assert a[...].sharding == b[...].sharding, path
    np.testing.assert_allclose(np.asarray(a[...]), np.asarray(b[...]), rtol=1e-6, atol=1e-6, err_msg=str(path))
  assert any(np.std(np.asarray(a[...])) > 0.01 for _, a in got)  # random weights, not zeros


def _batch(cfg, b=4, t=48):
  rng = np.random.default_rng(0)
  ids = rng.integers(0, 200, size=(b, t)).astype(np.int32)
  ids[:, 3:3 + cfg.image_tokens] = cfg.image_pad_id
  images = rng.integers(0, 256, size=(b, 1, 224, 224, 3), dtype=np.uint8)
  return jnp.asarray(ids), jnp.asarray(images)


@pytest.mark.slow
@pytest.mark.parametrize("rules_name,ici", [("fsdp", {"fsdp": 8}), ("fsdp_tp", {"data": 2, "fsdp": 2, "tensor": 2})])
def test_sharded_forward_equals_single_device(rules_name, ici):
  assert jax.device_count() == 8, "tests/conftest.py must provide 8 fake CPU devices"
  cfg = tiny(dtype="float32", remat_policy="full")
  ids, images = _batch(cfg)

  def make():
    return QwenVL(cfg, rngs=nnx.Rngs(0))

  single = make()
  expected = nnx.jit(lambda m, i, x: m(i, images=x).logits)(single, ids, images)

  mesh = sharding.make_mesh(ici)
  rules = sharding.load_rules(rules_name)
  model = sharding.init_sharded(make, mesh, rules)
  # Parameters really are distributed: some are split over several devices.
  assert any(len(v[...].sharding.device_set) == 8 and not v[...].sharding.is_fully_replicated
             for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
  with sharding.use_rules(mesh, rules):
    got = nnx.jit(lambda m, i, x: m(i, images=x).logits)(model, ids, images)
  # Same initialization (same RNG stream) and same math; float32 reductions may be reordered across shards.
  np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=2e-5, atol=2e-5)


def test_active_rules_is_set_only_inside_use_rules():
  mesh, rules = sharding.make_mesh({"fsdp": -1}), sharding.load_rules("fsdp")
  assert sharding.active_rules() is None
  with sharding.use_rules(mesh, rules):
    assert sharding.active_rules() == (mesh, rules)
  assert sharding.active_rules() is None


def test_batch_axes_resolve_act_batch_through_the_rules():
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  fsdp = sharding.load_rules("fsdp")
  assert sharding.rule_axes(fsdp, "act_batch") == ("data", "fsdp")
  assert sharding.batch_sharding(mesh, fsdp, 3).spec == P(("data", "fsdp"), None, None)
  assert sharding.batch_shards(mesh, fsdp) == 4
  data_only = (("act_batch", "data"),) + fsdp  # the first rule for a name wins, as in resolve_spec
  assert sharding.batch_axes(mesh, data_only) == ("data",) and sharding.batch_shards(mesh, data_only) == 2
  with pytest.raises(KeyError, match="no_such_axis"):
    sharding.rule_axes(fsdp, "no_such_axis")
