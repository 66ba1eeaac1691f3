"""The communication model: collectives read from compiled HLO, checked against hand-computed FSDP traffic."""
import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from qwenvl_jax.hardware import chips
from qwenvl_jax.planning import aot, collectives, mesh as mesh_lib
from tests.planning.conftest import requires_libtpu, run_json

V5E = chips.CHIPS["v5e"]

# The shapes of a TPU program as libtpu prints it (trimmed from a compiled FSDP step): one asynchronous all-gather
# whose copies sit in a start, an overlapped and a done fusion under one channel id; a layer loop that XLA
# peeled (the induction variable starts at copy(constant(1)), the condition is i < 4, no known_trip_count), whose
# body all-gathers and reduce-scatters (an all-reduce + dynamic-slice fusion named all-reduce-scatter); the peeled
# copy of that reduce-scatter in the entry with the same channel id; a multi-slice (megascale) host send.
TPU_SNIPPET = """\
HloModule jit_step, is_scheduled=true, num_partitions=4

%start_fusion (p0: bf16[1,64,256]) -> (bf16[1,64,256], bf16[1,256,256], u32[]) {
  %p0 = bf16[1,64,256]{2,1,0:T(8,128)(2,1)S(1)} parameter(0)
  %all-gather.21 = bf16[1,256,256]{2,1,0:T(8,128)(2,1)} all-gather(%p0), channel_id=9, replica_groups=mesh['axis_0'=4,'axis_1'=1] {'axis_0'}, dimensions={1}, use_global_device_ids=true
  ROOT %custom-call.1 = (bf16[1,64,256]{2,1,0}, bf16[1,256,256]{2,1,0}, u32[]) custom-call(%all-gather.21), custom_call_target="AsyncCollectiveStart"
}

%async_collective_fusion.88 (p1: bf16[1,64,256]) -> bf16[1,256,256] {
  %p1 = bf16[1,64,256]{2,1,0:T(8,128)(2,1)S(1)} parameter(0)
  ROOT %all-gather.23 = bf16[1,256,256]{2,1,0:T(8,128)(2,1)S(1)} all-gather(%p1), channel_id=9, replica_groups=mesh['axis_0'=4,'axis_1'=1] {'axis_0'}, dimensions={1}, use_global_device_ids=true
}

%done_fusion (p2: bf16[1,64,256]) -> bf16[1,256,256] {
  %p2 = bf16[1,64,256]{2,1,0:T(8,128)(2,1)S(1)} parameter(0)
  %all-gather.25 = bf16[1,256,256]{2,1,0:T(8,128)(2,1)} all-gather(%p2), channel_id=9, replica_groups=mesh['axis_0'=4,'axis_1'=1] {'axis_0'}, dimensions={1}, use_global_device_ids=true
  ROOT %custom-call.3 = bf16[1,256,256]{2,1,0} custom-call(%all-gather.25), custom_call_target="AsyncCollectiveDone"
}

%add.1 (x: bf16[], y: bf16[]) -> bf16[] {
  %x = bf16[] parameter(0)
  %y = bf16[] parameter(1)
  ROOT %add = bf16[] add(%x, %y)
}

%all-reduce-scatter.2 (input_0: bf16[256,256]) -> bf16[64,256] {
  %input_0 = bf16[256,256]{1,0:T(8,128)(2,1)S(1)} parameter(0)
  %all-reduce.8 = bf16[256,256]{1,0:T(8,128)(2,1)} all-reduce(%input_0), channel_id=5, replica_groups={{0,1,2,3}}, use_global_device_ids=true, to_apply=%add.1
  %partition-id.9 = u32[] partition-id()
  ROOT %dynamic-slice.10 = bf16[64,256]{1,0} dynamic-slice(%all-reduce.8, %partition-id.9, %partition-id.9), dynamic_slice_sizes={64,256}

%all-reduce-scatter.clone.1 (input_1: bf16[256,256]) -> bf16[64,256] {
  %input_1 = bf16[256,256]{1,0:T(8,128)(2,1)S(1)} parameter(0)
  %all-reduce.9 = bf16[256,256]{1,0:T(8,128)(2,1)} all-reduce(%input_1), channel_id=5, replica_groups={{0,1,2,3}}, use_global_device_ids=true, to_apply=%add.1
  %partition-id.10 = u32[] partition-id()
  ROOT %dynamic-slice.11 = bf16[64,256]{1,0} dynamic-slice(%all-reduce.9, %partition-id.10, %partition-id.10), dynamic_slice_sizes={64,256}
}

%body (param: (s32[], bf16[64,256])) -> (s32[], bf16[64,256]) {
  %param = (s32[], bf16[64,256]) parameter(0)
  %i = s32[]{:T(128)} get-tuple-element(%param), index=0
  %w = bf16[64,256]{1,0} get-tuple-element(%param), index=1
  %all-gather.40 = bf16[256,256]{1,0} all-gather(%w), channel_id=11, replica_groups=[1,4]<=[4], dimensions={0}, use_global_device_ids=true
  %fusion.83 = bf16[64,256]{1,0} fusion(%all-gather.40), kind=kCustom, calls=%all-reduce-scatter.clone.1
  ROOT %tuple.1 = (s32[], bf16[64,256]) tuple(%i, %fusion.83)
}

%cond (cparam: (s32[], bf16[64,256])) -> pred[] {
  %constant.114 = s32[]{:T(128)} constant(4)
  %cparam = (s32[], bf16[64,256]) parameter(0)
  %ci = s32[]{:T(128)} get-tuple-element(%cparam), index=0
  ROOT %lt.13 = pred[]{:T(512)} compare(%ci, %constant.114), direction=LT
}

ENTRY %main.4_spmd (param.10: bf16[1,64,256], param.11: bf16[64,256], param.12: bf16[256,8,128]) -> bf16[64,256] {
  %param.10 = bf16[1,64,256]{2,1,0} parameter(0)
  %param.11 = bf16[64,256]{1,0} parameter(1)
  %param.12 = bf16[256,8,128]{2,1,0} parameter(2)
  %async-collective-start = (bf16[1,64,256]{2,1,0}, bf16[1,256,256]{2,1,0}, u32[]) fusion(%param.10), kind=kCustom, calls=%start_fusion
  %fusion.88 = bf16[1,256,256]{2,1,0} fusion(%param.10), kind=kOutput, calls=%async_collective_fusion.88
  %async-collective-done = bf16[1,256,256]{2,1,0} fusion(%param.10), kind=kCustom, calls=%done_fusion
  %fusion.1 = bf16[64,256]{1,0} fusion(%param.11), kind=kCustom, calls=%all-reduce-scatter.2
  %constant.130.clone = s32[]{:T(128)} constant(1)
  %copy.35 = s32[]{:T(128)} copy(%constant.130.clone)
  %tuple.65 = (s32[], bf16[64,256]) tuple(%copy.35, %fusion.1)
  %while.40 = (s32[], bf16[64,256]) while(%tuple.65), condition=%cond, body=%body
  %after-all.1 = token[] after-all()
  %send.1 = (bf16[256,8,128]{2,1,0}, u32[], token[]) send(%param.12, %after-all.1), channel_id=4, is_host_transfer=true, frontend_attributes={_xla_host_transfer_handler_name="xla_megascale_runtime",_xla_megascale_transfer_type="ALL_REDUCE"}
  ROOT %gte = bf16[64,256]{1,0} get-tuple-element(%while.40), index=1
}
"""


def by_kind(found):
  out = {}
  for c in found:
    out.setdefault(c.kind, []).append((c.bytes, c.count, c.group_size, c.dcn))
  return {k: sorted(v) for k, v in out.items()}


def test_tpu_snippet_counts_each_collective_once_with_its_loop_trips():
  found = by_kind(collectives.collectives_from_hlo(TPU_SNIPPET))
  gathered = 256 * 256 * 2  # bf16 [256, 256] after gathering 4 shards of [64, 256]
  # The async all-gather: three copies, one collective. The loop's all-gather: 3 trips (i = 1, 2, 3).
  assert found["all-gather"] == [(gathered, 1, 4, False), (gathered, 3, 4, False)]
  # all-reduce + dynamic-slice in an all-reduce-scatter fusion is a reduce-scatter of the unscattered input; the
  # peeled copy in the entry shares the loop's channel id and still counts.
  assert found["reduce-scatter"] == [(gathered, 1, 4, False), (gathered, 3, 4, False)]
  assert found["all-reduce"] == [(256 * 8 * 128 * 2, 1, 0, True)]


@pytest.mark.parametrize("attr,groups", [
    ("replica_groups={{0,1},{2,3}}, x=1", ((0, 1), (2, 3))),
    ("replica_groups=[2,2]<=[4], dims", ((0, 1), (2, 3))),
    ("replica_groups=[2,2]<=[2,2]T(1,0), dims", ((0, 2), (1, 3))),
    ("replica_groups=mesh['axis_0'=4,'axis_1'=2] {'axis_0'}, dims", ((0, 2, 4, 6), (1, 3, 5, 7))),
    ("replica_groups=mesh['axis_0'=4,'axis_1'=2] {'axis_1'}, dims", ((0, 1), (2, 3), (4, 5), (6, 7))),
    ("replica_groups=mesh['a'=2,'b'=2] {'a','b'}, dims", ((0, 1, 2, 3),)),
    ("replica_groups=mesh['a'=2,'b'=1,'c'=2], device_ids=([2,2]T(1,0)) {'a'}, x", ((0, 1), (2, 3))),
    ("replica_groups=mesh['a'=2,'b'=2] {'b','a'}, dims", ((0, 2, 1, 3),)),
    ("replica_groups={}, to_apply=%add", ()),
    ("source_target_pairs={{0,1},{1,0}}, x", ((0, 1), (1, 0))),
])
def test_replica_group_spellings(attr, groups):
  assert collectives.parse_replica_groups(attr) == groups


def test_unknown_replica_group_spelling_is_an_error():
  with pytest.raises(ValueError, match="unsupported"):
    collectives.parse_replica_groups("replica_groups=something_new")


def test_ring_model_arithmetic():
  s = 1 << 20
  groups = ((0, 1, 2, 3),)
  found = [collectives.Collective("all-gather", s, groups, count=2),
           collectives.Collective("all-reduce", s, groups),
           collectives.Collective("all-reduce", 4096, (), dcn=True)]
  # No device coordinates: 4 devices fill both dims of the 2x2 grid -> rings on 2 dims, 2 x 2 x 50 GB/s.
  est = collectives.estimate(found, V5E, devices=None, torus=(2, 2))
  link = 2 * 2 * V5E.ici_link_bytes_per_s
  step = collectives.ICI_STEP_SECONDS * 3 / (2 * 2)
  assert est.bytes["all-gather"] == pytest.approx(2 * 0.75 * s)
  assert est.seconds["all-gather"] == pytest.approx(2 * (0.75 * s / link + step))
  assert est.bytes["all-reduce"] == pytest.approx(1.5 * s)  # the DCN one is free on a single slice
  assert est.counts == {"all-gather": 2, "reduce-scatter": 0, "all-reduce": 2, "all-to-all": 0,
                        "collective-permute": 0}
  assert est.dcn_seconds == 0.0


def test_step_plan_prints_compute_communication_and_an_mfu_range():
  comm = collectives.CommEstimate(seconds={"all-gather": 0.3, "reduce-scatter": 0.1}, bytes={"all-gather": 1e9,
                                  "reduce-scatter": 5e8}, counts={"all-gather": 4, "reduce-scatter": 2})
  comm = collectives.CommEstimate(seconds=dict.fromkeys(collectives.KINDS, 0.0) | comm.seconds,
                                  bytes=dict.fromkeys(collectives.KINDS, 0.0) | comm.bytes,
                                  counts=dict.fromkeys(collectives.KINDS, 0) | comm.counts)
  plan = aot.StepPlan(chip=V5E, num_chips=4, argument_bytes=0, output_bytes=0, alias_bytes=0, temp_bytes=0,
                      code_bytes=0, flops=1e12, bytes_accessed=None, optimal_seconds=1.0,
                      model_flops=4 * 197e12 * 0.5, comm=comm)
  assert plan.step_seconds_range == (1.0, 1.4)
  low, high = plan.mfu_range
  assert high == pytest.approx(0.5) and low == pytest.approx(0.5 / 1.4)
  text = plan.format()
  assert "communication 400 ms" in text and "all-gather" in text and "compute-bound" in text
  assert "estimated MFU 35.7% (no overlap) ... 50.0% (full overlap)" in text


def _fsdp_step(width: int, depth: int, mesh):
  """An f32 FSDP step: weights [L, D, D] sharded over fsdp, batch over fsdp, grads of a scanned MLP."""
  w_spec = NamedSharding(mesh, P(None, "fsdp", None))

  def loss(w, x):
    return jnp.sum(jax.lax.scan(lambda h, wi: (jnp.tanh(h @ wi), None), x, w)[0] ** 2)

  def step(w, x):
    return w - 0.1 * jax.grad(loss)(w, x)

  args = (jax.ShapeDtypeStruct((depth, width, width), jnp.float32, sharding=w_spec),
          jax.ShapeDtypeStruct((64, width), jnp.float32, sharding=NamedSharding(mesh, P("fsdp", None))))
  return step, args, w_spec


def test_real_cpu_program_matches_hand_computed_fsdp_bytes():
  width, depth = 128, 3
  mesh = mesh_lib.build_mesh(jax.devices())  # 8 fake CPU devices, all on fsdp
  n = mesh.devices.size
  step, args, w_spec = _fsdp_step(width, depth, mesh)
  compiled, plan = aot.compile_step(step, args, chip=V5E, mesh=mesh, out_shardings=w_spec, donate_argnums=0,
                                    count_program_flops=False)
  found = collectives.collectives_from_hlo(compiled.as_text())
  layer = width * width * 4  # one f32 weight, gathered in full
  gathers = [c for c in found if c.kind == "all-gather"]
  # Forward gathers each layer's weight; the backward gathers it again (XLA does not keep L gathered copies).
  assert sum(c.bytes * c.count for c in gathers) == 2 * depth * layer
  assert all(c.group_size == n for c in gathers)
  # Each layer's weight gradient is summed over the fsdp devices: a reduce-scatter, which XLA:CPU spells as an
  # all-reduce of the whole gradient followed by a slice.
  reduced = [c for c in found if c.kind in ("reduce-scatter", "all-reduce") and c.bytes >= layer]
  assert sum(c.bytes * c.count for c in reduced) == depth * layer
  assert plan.comm is not None
  assert plan.comm.bytes["all-gather"] == pytest.approx(2 * depth * layer * (n - 1) / n)


@requires_libtpu
@pytest.mark.slow
def test_tpu_program_matches_hand_computed_fsdp_bytes():
  out = run_json("""
      import json
      from qwenvl_jax.hardware import chips
      from tests.planning import standin
      res = {}
      for key, slices in (("one", 1), ("two", 2)):
        plan = standin.plan_mlp(chips.parse_topology("v5e:2x2", slices), width=512, depth=4, batch=64,
                                exact_cost=False)
        res[key] = dict(bytes=plan.comm.bytes, counts=plan.comm.counts, seconds=plan.comm.seconds,
                        dcn=plan.comm.dcn_seconds, text=plan.format())
      print(json.dumps(res))
  """)
  layer = 512 * 512 * 2  # the standin casts weights to bf16 before using (and gathering) them
  one = out["one"]
  # FSDP over 4 chips: every layer gathered for the forward and again for the backward, every gradient
  # reduce-scattered once; the ring moves 3/4 of each buffer per chip.
  assert one["counts"]["all-gather"] == 8 and one["counts"]["reduce-scatter"] == 4
  assert one["bytes"]["all-gather"] == pytest.approx(8 * 0.75 * layer)
  assert one["bytes"]["reduce-scatter"] == pytest.approx(4 * 0.75 * layer)
  assert one["dcn"] == 0 and "estimated MFU" in one["text"] and "(no overlap)" in one["text"]
  # Two slices: the same in-slice traffic, plus the gradients' all-reduce between slices over DCN.
  two = out["two"]
  assert two["bytes"]["all-gather"] == pytest.approx(one["bytes"]["all-gather"])
  assert two["dcn"] > 0 and two["counts"]["all-reduce"] >= 4
