"""The real train step of a stage, AOT-compiled for a small TPU topology (tiny model, libtpu in a child)."""
import pytest

from tests.planning.conftest import requires_libtpu, run_json


@pytest.fixture(scope="module")
def stage1() -> dict:
  return run_json("""
      import json
      from configs import stage1
      from qwenvl_jax.hardware import chips
      from qwenvl_jax.planning import train_plan
      topo = chips.parse_topology("v5e:2x2")
      config = stage1.get_config("model=tiny")
      plan, facts = train_plan.plan_stage(config, topo)
      out = {"params": dict(facts=facts, fits=plan.fits, model=plan.model_flops, program=plan.program_flops,
                            loops=plan.loops, text=plan.format(), mfu=plan.mfu)}
      with config.unlocked():
        config.batch_size = 6
      try:
        train_plan.plan_stage(config, topo)
      except ValueError as e:
        out["error"] = str(e)
      print(json.dumps(out))
  """)


@requires_libtpu
@pytest.mark.slow
def test_tiny_stage1_fits_a_v5e_4_with_the_trainers_mesh(stage1):
  plan = stage1["params"]
  assert plan["fits"] and "verdict: FITS" in plan["text"]
  assert plan["facts"]["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
  assert plan["facts"]["frozen"] == ["llm/.*", "adapter/resampler/pos_embed"]  # the sin-cos table is fixed
  assert 0 < plan["facts"]["trainable"] < plan["facts"]["params"]
  assert 0 < plan["mfu"] <= 1


@requires_libtpu
@pytest.mark.slow
def test_traced_program_flops_agree_with_the_trainers_model_flops(stage1):
  # Two independent counts: training/flops.py's closed form and the matmuls of the traced step (tiny: no remat).
  plan = stage1["params"]
  assert plan["loops"] >= 1
  assert 0.9 <= plan["program"] / plan["model"] <= 1.3


@requires_libtpu
@pytest.mark.slow
def test_batch_that_does_not_split_over_the_mesh_is_an_error(stage1):
  assert "config.batch_size=6" in stage1["error"] and "data x fsdp" in stage1["error"]
