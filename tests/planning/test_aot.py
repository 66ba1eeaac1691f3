"""StepPlan arithmetic (memory total, fit verdict, advice, MFU) and reading a compiled program's analyses."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from qwenvl_jax.hardware import chips
from qwenvl_jax.planning import aot, collectives, mesh as mesh_lib

GIB = chips.GIB
V5E = chips.CHIPS["v5e"]


def make_plan(**kw) -> aot.StepPlan:
  fields = dict(chip=V5E, num_chips=4, argument_bytes=2 * GIB, output_bytes=2 * GIB, alias_bytes=2 * GIB,
                temp_bytes=4 * GIB, code_bytes=0, flops=1e12, bytes_accessed=1e9, optimal_seconds=None)
  fields.update(kw)
  return aot.StepPlan(**fields)


def test_total_counts_aliased_outputs_once():
  plan = make_plan(code_bytes=GIB // 2)
  assert plan.total_bytes == 2 * GIB + 4 * GIB + GIB // 2
  assert plan.fits and plan.advice() == []
  assert "verdict: FITS" in plan.format()


def test_chip_count_and_unreported_code_size_read_as_such():
  """A one-chip plan read '1 chips'; a backend that reports no code size (CPU) read 'code 0.00 GiB'."""
  text = make_plan(num_chips=1).format()
  assert "16 GiB HBM, 1 chip):" in text and "(not reported by this backend)" in text, text
  text = make_plan(code_bytes=GIB // 2).format()
  assert "16 GiB HBM, 4 chips):" in text and "  code               0.50 GiB\n" in text, text


def test_step_time_prefers_xla_optimal_seconds_then_roofline():
  assert make_plan(optimal_seconds=0.5).step_seconds == 0.5
  # Compute-bound: 1e12 / 197e12 s beats 1e9 B / 819e9 B/s.
  assert make_plan().step_seconds == pytest.approx(1e12 / 197e12)
  assert make_plan(bytes_accessed=1e12).step_seconds == pytest.approx(1e12 / 819e9)
  assert make_plan(flops=None).step_seconds is None


def test_mfu_is_model_flops_over_time_chips_and_peak():
  plan = make_plan(optimal_seconds=2.0, model_flops=4 * 197e12)
  assert plan.mfu == pytest.approx(0.5)
  assert plan.compiler_to_model_flops == pytest.approx(4e12 / (4 * 197e12))
  assert "estimated MFU 50.0%" in plan.format()
  assert make_plan().mfu is None


@pytest.mark.parametrize("seconds, text", [
    (4.08e-4, "408 us"), (2.5e-8, "25 ns"), (0.0123, "12.3 ms"), (0.9996, "1 s"), (1.5, "1.5 s"), (31.43, "31.4 s"),
    (1234.5, "1,234 s"), (0.0, "0 s"), (None, "n/a")])
def test_times_keep_three_digits_at_any_size(seconds, text):
  """A tiny step printed '0.00 s/step' (plan --search's best plan); seconds never become 'ks'."""
  assert aot.format_seconds(seconds) == text


def test_small_memory_figures_keep_their_digits():
  """Every figure of a tiny model's plan read '0.00 GiB' (arguments, temporaries, total, the KV cache)."""
  assert aot.format_bytes(15.68 * GIB) == "15.68 GiB" and aot.format_bytes(0.62 * GIB) == "0.62 GiB"
  assert aot.format_bytes(51.8 * 2**20) == "51.80 MiB" and aot.format_bytes(505.04 * 2**10) == "505.04 KiB"
  text = make_plan(argument_bytes=1_725_524, output_bytes=517_156, alias_bytes=516_172, temp_bytes=52_589_424).format()
  assert "  total             51.80 MiB   = 0.3% of HBM" in text, text
  assert "(aliased to donated inputs: 504.07 KiB)" in text
  assert "< 0.1% of HBM" in make_plan(argument_bytes=0, output_bytes=0, alias_bytes=0, temp_bytes=1024).format()


def test_step_time_comes_with_tokens_per_second_overall_and_per_chip():
  # 4 chips, 4096 tokens per step: at the compute-only 2 s, at most 2.05k tokens/s, 512 per chip.
  plan = make_plan(optimal_seconds=2.0, model_flops=4 * 197e12, tokens=4096)
  assert plan.tokens_per_second(2.0) == (2048.0, 512.0)
  assert ("estimated step time 2 s (lower bound), at most 2.05k tokens/s (512 per chip), estimated MFU 50.0%"
          in plan.format())
  # With communication: the step-time range and the tokens/s at each end.
  comm = collectives.CommEstimate(seconds={"all-gather": 2.0}, bytes={"all-gather": 1e9},
                                  counts={k: int(k == "all-gather") for k in collectives.KINDS})
  text = dataclasses.replace(plan, comm=comm).format()
  assert ("estimated step time 2 s (full overlap) ... 4 s (no overlap): 2.05k ... 1.02k tokens/s (512 ... 256 per "
          "chip)") in text
  assert "tokens/s" not in make_plan(optimal_seconds=2.0).format()  # no token count given: no rate
  # One chip exchanges nothing: one time, not a range of two equal ends ('326 us ... 326 us').
  alone = collectives.CommEstimate(seconds={}, bytes={}, counts={k: 0 for k in collectives.KINDS})
  text = dataclasses.replace(plan, comm=alone).format()
  assert "estimated step time 2 s (no communication): 2.05k tokens/s (512 per chip)" in text
  assert "estimated MFU 50.0%" in text and " ... " not in text


def test_the_report_as_json_holds_the_figures_the_text_prints():
  """`plan --json`: scripts read the figures instead of parsing the table."""
  comm = collectives.CommEstimate(seconds={"all-gather": 2.0}, bytes={"all-gather": 1e9},
                                  counts={k: int(k == "all-gather") for k in collectives.KINDS})
  plan = make_plan(optimal_seconds=2.0, model_flops=4 * 197e12, tokens=4096, comm=comm, temp_bytes=20 * GIB)
  out = json.loads(json.dumps(plan.to_dict()))
  assert out["memory_bytes"] == {"arguments": 2 * GIB, "outputs": 2 * GIB, "aliased": 2 * GIB,
                                 "temporaries": 20 * GIB, "code": 0, "total": 22 * GIB}
  assert out["hbm_bytes"] == 16 * GIB and out["fits"] is False and out["verdict"] == "DOES NOT FIT"
  assert out["advice"] == plan.advice() and out["advice"]
  assert out["step_seconds"] == {"compute": 2.0, "communication": 2.0, "full_overlap": 2.0, "no_overlap": 4.0,
                                 "estimate": 3.0}
  assert out["tokens_per_second"] == {"full_overlap": 2048.0, "no_overlap": 1024.0, "estimate": 4096 / 3}
  assert out["tokens_per_second_per_chip"]["no_overlap"] == 256.0
  assert out["mfu"] == {"no_overlap": pytest.approx(0.25), "full_overlap": pytest.approx(0.5),
                        "compute_only": pytest.approx(0.5)}
  assert out["collectives"] == {"all-gather": {"count": 1, "bytes": 1e9, "seconds": 2.0}}
  # Unknown figures are null, not missing keys.
  bare = make_plan().to_dict()
  assert bare["tokens_per_second"]["estimate"] is None and bare["mfu"]["no_overlap"] is None
  assert bare["collectives"] is None and bare["step_seconds"]["full_overlap"] is None


def test_activation_bound_step_is_told_to_cut_batch_or_remat():
  plan = make_plan(temp_bytes=20 * GIB, global_batch=64)
  assert not plan.fits
  text = plan.format()
  assert "DOES NOT FIT" in text
  # Room for temporaries: 0.92 x 16 GiB - 2 GiB of state = 12.72 GiB of the 20 now -> batch 64 x 0.636 = 40.
  assert "at most ~40" in text
  assert "remat more (--config.remat=full saves only each layer's input)" in text  # a value config.remat takes
  assert "nothing_saveable" not in text  # jax's name for it, which config.remat refuses
  assert "needs 6.0 GiB per chip more" in text


def test_state_bound_step_is_told_to_shard_more():
  plan = make_plan(argument_bytes=16 * GIB, output_bytes=16 * GIB, alias_bytes=16 * GIB, temp_bytes=GIB)
  tips = " ".join(plan.advice())
  assert not plan.fits
  assert "fsdp" in tips and "remat" not in tips


def test_unaliased_outputs_suggest_donation():
  plan = make_plan(output_bytes=8 * GIB, alias_bytes=0, temp_bytes=6 * GIB)
  assert any("donate" in tip for tip in plan.advice())


def test_tight_fit_warns():
  plan = make_plan(temp_bytes=int(13 * GIB))
  assert plan.fits and plan.hbm_fraction > aot.TIGHT_FRACTION
  assert "tight" in plan.format()


def test_extrapolate_cost_is_linear_per_stack():
  base = make_plan(flops=10.0, bytes_accessed=100.0, optimal_seconds=1.0)
  bumped = {"vit": make_plan(flops=13.0, bytes_accessed=110.0, optimal_seconds=1.5),
            "llm": make_plan(flops=15.0, bytes_accessed=120.0, optimal_seconds=2.0)}
  full = aot.extrapolate_cost(make_plan(loops=4, temp_bytes=7), base, bumped, {"vit": 4, "llm": 3})
  assert full.flops == 10 + 3 * 3 + 2 * 5
  assert full.bytes_accessed == 100 + 3 * 10 + 2 * 20
  assert full.optimal_seconds == 1 + 3 * 0.5 + 2 * 1.0
  assert full.temp_bytes == 7 and full.loops == 0
  with pytest.raises(ValueError, match="bumped plans"):
    aot.extrapolate_cost(base, base, bumped, {"vit": 4})


def test_abstract_like_attaches_shardings_without_allocating():
  mesh = mesh_lib.build_mesh(jax.devices())
  sharding = NamedSharding(mesh, P("fsdp"))
  tree = {"w": jax.ShapeDtypeStruct((16, 4), jnp.float32), "b": jnp.zeros((8,), jnp.bfloat16)}
  out = aot.abstract_like(tree, sharding)
  assert out["w"].shape == (16, 4) and out["b"].dtype == jnp.bfloat16
  assert out["w"].sharding == sharding
  per_leaf = aot.abstract_like(tree, {"w": sharding, "b": aot.replicated(mesh)})
  assert per_leaf["b"].sharding.spec == P()


def test_compile_step_on_cpu_mesh_reads_memory_cost_and_loops():
  mesh = mesh_lib.build_mesh(jax.devices())
  sharding = NamedSharding(mesh, P("fsdp", None))
  w = jax.ShapeDtypeStruct((4, 64, 64), jnp.float32, sharding=NamedSharding(mesh, P(None, "fsdp", None)))
  x = jax.ShapeDtypeStruct((32, 64), jnp.float32, sharding=sharding)

  def f(w, x):
    return jax.lax.scan(lambda h, wi: (jnp.tanh(h @ wi), None), x, w)[0]

  # Any chip spec will do: on CPU only the bookkeeping is under test, not the HBM of a real chip.
  _, plan = aot.compile_step(f, (w, x), chip=V5E, mesh=mesh, out_shardings=sharding, tokens=32)
  assert plan.num_chips == 8 and plan.tokens == 32 and "tokens/s" in plan.format()
  # Per device: a 1/8 shard of w (4 x 8 x 64 f32) and of x (4 x 64 f32) are the arguments.
  assert plan.argument_bytes == 4 * 8 * 64 * 4 + 4 * 64 * 4
  assert plan.loops >= 1
  assert dataclasses.replace(plan, loops=0).format().count("while loop") == 0
  assert "while loop" in plan.format()


# XLA's "total memory required for HLO temporaries (X)" counts the arguments too (see `oom_plan`): with them read
# as temporaries alone, plans counted the arguments twice.
@pytest.mark.parametrize("message,temp_gib", [
    ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries (20.30G) "
     "exceeds available HBM (15.75G).", 20.30 - 3),
    ("RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm. Used 21.5G of 15.75G hbm.", 21.5 - 3),
    ("RESOURCE_EXHAUSTED: something new", 16 - 3),
])
def test_oom_plan_reads_xla_out_of_memory_messages(message, temp_gib):
  plan = aot.oom_plan(message, V5E, 4, argument_bytes=3 * GIB, global_batch=8)
  assert plan.temp_bytes / GIB == pytest.approx(temp_gib, abs=1e-3)
  assert not plan.fits
  assert plan.flops is None and plan.mfu is None
  text = plan.format()
  assert "ran out of memory" in text and "DOES NOT FIT" in text


def test_shard_bytes_counts_one_device_share():
  mesh = mesh_lib.build_mesh(jax.devices(), ici=(2, -1, 1))
  tree = (jax.ShapeDtypeStruct((16, 8), jnp.float32, sharding=NamedSharding(mesh, P("fsdp", "data"))),
          jax.ShapeDtypeStruct((10,), jnp.bfloat16))
  assert aot.shard_bytes(tree) == (4 * 4) * 4 + 10 * 2


def test_missing_loop_flops_are_added_at_peak():
  # Compiler saw 1 TFLOP per chip (one layer), the program really runs 4 per chip.
  plan = make_plan(loops=2, optimal_seconds=0.01, program_flops=4 * 4e12, flops=1e12)
  assert plan.missing_flops == pytest.approx(3e12)
  assert plan.step_seconds == pytest.approx(max(0.01 + 3e12 / 197e12, 4e12 / 197e12))
  assert "miss 3 TFLOP" in plan.format()
  # Without loops, the program count does not change the estimate.
  assert make_plan(optimal_seconds=0.01, program_flops=4 * 4e12).step_seconds == 0.01
