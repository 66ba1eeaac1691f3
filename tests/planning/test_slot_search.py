"""`inference_plan.max_slots`: the slot search against memory curves whose answer is known (no compiler: each
probe is a stand-in plan whose bytes follow the curve), and the number of probes it spends."""
from types import SimpleNamespace

import pytest

from qwenvl_jax.planning import inference_plan

GIB = 2 ** 30
HBM = 16 * GIB


def _search(decode_bytes, prefill_bytes=None, *, granularity=1, start=32):
  calls = []

  def plan_at(b, with_prefill):
    calls.append((b, with_prefill))
    progs = [int(decode_bytes(b))] + ([int(prefill_bytes(b))] if with_prefill and prefill_bytes else [])
    # What `max_slots` reads of an `InferencePlan`: the peak over its programs and whether every one fits.
    return SimpleNamespace(peak_bytes=lambda: max(progs), fits=lambda: all(p <= HBM for p in progs))

  result = inference_plan.max_slots(plan_at, granularity=granularity, start=start, hbm_bytes=HBM, log=lambda _: None)
  return result, calls


def _truth(curve, granularity=1):
  return max(b for b in range(granularity, 10_000, granularity) if curve(b) <= HBM)


@pytest.mark.parametrize("fixed_gib,per_slot_mib", [(2.4, 128), (1.3, 64), (9.0, 300), (15.5, 100)])
def test_linear_memory_finds_the_exact_answer_in_few_probes(fixed_gib, per_slot_mib):
  curve = lambda b: fixed_gib * GIB + b * per_slot_mib * 2 ** 20
  result, calls = _search(curve, lambda b: curve(b) - GIB)
  truth = _truth(curve)
  # Exact to 2 % (a handful of slots at full size), never above the truth, and few compiles.
  assert truth * 0.98 <= result.slots <= truth and result.does_not_fit > truth
  assert len(calls) <= 8, calls


def test_a_prefill_that_is_the_larger_program_decides():
  decode = lambda b: 2.4 * GIB + b * 128 * 2 ** 20
  prefill = lambda b: decode(b) + 3 * GIB  # a long prompt's activations on top of the slots' cache
  result, _ = _search(decode, prefill)
  assert _truth(prefill) * 0.98 <= result.slots <= _truth(prefill)


def test_granularity_and_nothing_fits():
  curve = lambda b: 3 * GIB + b * 50 * 2 ** 20 + (4 * GIB if b > 150 else 0)  # a jump, as XLA's layouts make
  result, _ = _search(curve, granularity=8)
  assert result.slots % 8 == 0 and result.slots == _truth(curve, 8)
  result, _ = _search(lambda b: 17 * GIB + b, granularity=4)
  assert result.slots == 0 and result.plan is None
