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


def _plan(chip, total_gib, temp_gib):
  from qwenvl_jax.hardware.chips import GIB  # pylint: disable=import-outside-toplevel
  from qwenvl_jax.planning import aot  # pylint: disable=import-outside-toplevel
  args = int((total_gib - temp_gib) * GIB)
  return aot.StepPlan(chip=chip, num_chips=8, argument_bytes=args, output_bytes=args, alias_bytes=args,
                      temp_bytes=int(temp_gib * GIB), code_bytes=0, flops=None, bytes_accessed=None,
                      optimal_seconds=None)


def test_what_would_fit_names_flags_with_their_savings_and_a_wider_slice():
  # No compile: the figures of the full stage-3 v5e-8 plan (README), the advice from the config and the facts.
  from qwenvl_jax.hardware import chips  # pylint: disable=import-outside-toplevel
  from qwenvl_jax.hardware.chips import GIB  # pylint: disable=import-outside-toplevel
  from qwenvl_jax.planning import train_plan  # pylint: disable=import-outside-toplevel
  from qwenvl_jax.training.stage_config import stage_config  # pylint: disable=import-outside-toplevel
  topology = chips.parse_topology("v5e-8")
  config = stage_config(3, "model=qwen_vl_7b")
  config.batch_size, config.accum_steps = 8, 1
  facts = {"mesh": {"data": 1, "fsdp": 8, "tensor": 1}, "rows_per_chip": 1, "lora": False,
           "moment_f32_bytes": int(7.26 * GIB), "frozen_f32_bytes": int(0.86 * GIB), "trained_f32_bytes": 0}
  tips = train_plan.what_would_fit(config, _plan(topology.chip, 21.0, 12.7), facts, topology)
  assert tips[0].startswith("--config.optimizer.mu_dtype=bfloat16") and "-3.63 GiB" in tips[0]
  assert tips[1].startswith("--config.frozen_dtype=bfloat16") and "-0.43 GiB" in tips[1]
  assert "--config.mesh.ici.fsdp=4 --config.mesh.ici.tensor=2 --config.batch_size=4" in tips[2]
  assert tips[3] == "all of the savings above: est. 16.94 GiB per chip of 16 GiB -> still over"
  assert tips[4].startswith("or a 8x wider slice (v5litepod-64, 64 chips): est. <= 13.74 GiB")  # 8.3 / 8 + 12.7
  # Already bf16 moments, a bf16 frozen part and gradient accumulation: the accumulator is the lever named.
  config.batch_size, config.accum_steps = 16, 2
  facts.update(moment_f32_bytes=0, frozen_f32_bytes=0, trained_f32_bytes=int(3.63 * GIB))
  tips = train_plan.what_would_fit(config, _plan(topology.chip, 17.0, 12.7), facts, topology)
  assert tips[0].startswith("--config.accum_steps=1 --config.batch_size=8") and "-3.63 GiB" in tips[0]
  assert "would fit" in tips[-2]
  # A plan with room gets no advice; a LoRA plan is never told to shrink moments it barely has.
  assert train_plan.what_would_fit(config, _plan(topology.chip, 10.0, 5.0), facts, topology) == []
  facts.update(lora=True, moment_f32_bytes=int(GIB))
  assert not any("mu_dtype" in t for t in train_plan.what_would_fit(config, _plan(topology.chip, 17.0, 12.7),
                                                                     facts, topology))


@pytest.mark.parametrize("overrides, message", [
    ({"fsdp": 3}, r"^config\.mesh: mesh ICI \{'data': 1, 'fsdp': 3, 'tensor': 1\} .* needs 3 devices, but there are 4"),
    ({"fsdp": -1, "tensor": -1}, r"^config\.mesh: at most one ICI degree may be -1"),
    ({"rules": "fsdp_pt"}, r"^config\.mesh\.rules: unknown sharding rules 'fsdp_pt'"),
])
def test_a_mesh_the_devices_cannot_hold_is_a_config_error(overrides, message):
  """`plan --topology=v5e-4 --config.mesh.ici.fsdp=3` was make_mesh's ValueError traceback. On 4 of the test's fake
  CPU devices: the error comes before anything is traced."""
  import jax  # pylint: disable=import-outside-toplevel
  from qwenvl_jax import errors  # pylint: disable=import-outside-toplevel
  from qwenvl_jax.hardware import chips  # pylint: disable=import-outside-toplevel
  from qwenvl_jax.planning import train_plan  # pylint: disable=import-outside-toplevel
  from qwenvl_jax.training.stage_config import stage_config  # pylint: disable=import-outside-toplevel
  config = stage_config(1, "model=tiny")
  for key, value in overrides.items():
    if key == "rules":
      config.mesh.rules = value
    else:
      config.mesh.ici[key] = value
  with pytest.raises(errors.ConfigError, match=message):
    train_plan.plan_on_devices(config, jax.devices()[:4], chips.CHIPS["v5e"])
