"""AOT compile of the stand-in AdamW train step for small TPU topologies (libtpu in a child process)."""
import pytest

from tests.planning.conftest import requires_libtpu, run_json

WIDTH, DEPTH, BATCH = 1024, 4, 64


@pytest.fixture(scope="module")
def plans() -> dict:
  """Plans of the stand-in on a few topologies, computed once in one child process."""
  return run_json(f"""
      import dataclasses, json
      from qwenvl_jax.hardware import chips
      from tests.planning import standin
      out = {{}}
      for key, name, slices, kw in [
          ("v5p4", "v5p:2x2x1", 1, {{}}),
          ("v5e4", "v5e:2x2", 1, dict(exact_cost=False)),
          ("v5p8", "v5p:2x2x2", 1, dict(exact_cost=False)),
          ("v5e4x2", "v5e:2x2", 2, dict(exact_cost=False)),
      ]:
        plan = standin.plan_mlp(chips.parse_topology(name, slices), width={WIDTH}, depth={DEPTH}, batch={BATCH},
                                **kw)
        row = {{f.name: getattr(plan, f.name) for f in dataclasses.fields(plan) if f.name not in ("chip", "comm")}}
        row.update(total=plan.total_bytes, fits=plan.fits, mfu=plan.mfu, text=plan.format(),
                   step=plan.step_seconds, roofline=plan.roofline_seconds)
        out[key] = row
      # Too big for 4 x 16 GiB: 16 layers of 16384^2 f32 with AdamW is 12 GiB of state per chip, plus gradients.
      big = standin.plan_mlp(chips.parse_topology("v5e-4"), width=16384, depth=16, batch=2048, exact_cost=False)
      out["big"] = dict(fits=big.fits, total=big.total_bytes, advice=big.advice(), text=big.format(),
                        argument_bytes=big.argument_bytes, error=big.compile_error)
      print(json.dumps(out))
  """)


@requires_libtpu
@pytest.mark.slow
def test_arguments_are_the_sharded_state_and_batch(plans):
  for key, chips_ in [("v5e4", 4), ("v5p4", 4), ("v5p8", 8)]:
    plan = plans[key]
    assert plan["num_chips"] == chips_
    # f32 weights + two f32 Adam moments, sharded over all chips, plus the bf16 (x, y) batch shard.
    state = 3 * DEPTH * WIDTH * WIDTH * 4 / chips_
    batch = 2 * BATCH * WIDTH * 2 / chips_
    assert plan["argument_bytes"] == pytest.approx(state + batch, rel=0.02)
    # The donated state comes back in the same buffers.
    assert plan["alias_bytes"] >= 0.99 * state
    assert plan["fits"] and "verdict: FITS" in plan["text"]
  assert plans["v5p8"]["argument_bytes"] == pytest.approx(plans["v5p4"]["argument_bytes"] / 2, rel=0.02)


@requires_libtpu
@pytest.mark.slow
def test_scanned_cost_is_corrected_to_the_model_flop_count(plans):
  model_flops = 6 * BATCH * DEPTH * WIDTH * WIDTH
  loops = plans["v5e4"]
  assert loops["loops"] >= 1 and "while loop" in loops["text"]
  # Uncorrected, XLA counts one layer of the scan: about a quarter of the matmul FLOPs; the traced program
  # counts them all (no remat: exactly the model FLOPs).
  assert loops["flops"] * 4 < 0.5 * model_flops
  assert loops["program_flops"] == model_flops
  exact = plans["v5p4"]
  assert exact["loops"] == 0
  assert exact["flops"] * 4 == pytest.approx(model_flops, rel=0.15)
  assert exact["step"] == exact["optimal_seconds"]
  assert 0 < exact["mfu"] <= 1


@requires_libtpu
@pytest.mark.slow
def test_step_time_falls_back_to_the_roofline_where_xla_gives_no_optimum(plans):
  # libtpu reports optimal_seconds < 0 (unknown) for v5e; the estimate then comes from FLOPs and bytes.
  v5e = plans["v5e4"]
  assert v5e["optimal_seconds"] is None
  peak = 197e12
  missing = v5e["program_flops"] / 4 - v5e["flops"]
  assert v5e["step"] == pytest.approx(max(v5e["roofline"] + missing / peak, v5e["program_flops"] / 4 / peak))


@requires_libtpu
@pytest.mark.slow
def test_multi_slice_doubles_chips_and_halves_the_state_per_chip(plans):
  one, two = plans["v5e4"], plans["v5e4x2"]
  assert two["num_chips"] == 8
  # Default DCN layout puts the second slice on `data`, the state stays sharded over one slice's fsdp axis.
  assert two["argument_bytes"] == pytest.approx(one["argument_bytes"] - 2 * BATCH * WIDTH * 2 / 8, rel=0.02)


@requires_libtpu
@pytest.mark.slow
def test_oversized_step_does_not_fit_and_says_what_to_change(plans):
  big = plans["big"]
  assert not big["fits"]
  assert big["total"] > 16 * 1024**3
  assert "DOES NOT FIT" in big["text"]
  # XLA refuses this one outright; the arguments are then counted from the input shardings.
  assert "RESOURCE_EXHAUSTED" in big["error"]
  # Weights + two Adam moments and the batch, each a quarter per chip, plus Adam's int32 step count.
  assert big["argument_bytes"] == 3 * 16 * 16384**2 * 4 / 4 + 2 * 2048 * 16384 * 2 / 4 + 4
  assert any("batch" in tip for tip in big["advice"])
