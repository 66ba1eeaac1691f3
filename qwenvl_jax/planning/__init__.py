"""Planning a run before renting the pod: AOT compilation of the train step for TPU topologies (the chips and
slice names themselves are `qwenvl_jax.hardware`).

Public surface:
  topology_devices, build_mesh, libtpu_available, MESH_AXES         (mesh.py; libtpu for topology_devices)
  compile_step, plan_from_compiled, extrapolate_cost, StepPlan, abstract_like   (aot.py)
  program_flops                                                     (jaxpr_flops.py)
  collectives_from_hlo, estimate, CommEstimate, Collective          (collectives.py)
  train_plan.plan_stage(config, topology)                           (imported on use: it pulls in the trainer)
  search.search(config, topology)                                   (plan --search; imported on use)
  output.say, output.emit                                           (the report, or --json's object on stdout)
The one entry point: `python -m qwenvl_jax.plan --config=configs/stageN.py:... [--topology=v5p-128] [--search]`.
"""
from qwenvl_jax.planning.aot import StepPlan, abstract_like, compile_step, extrapolate_cost, plan_from_compiled
from qwenvl_jax.planning.collectives import Collective, CommEstimate, collectives_from_hlo, estimate
from qwenvl_jax.planning.jaxpr_flops import program_flops
from qwenvl_jax.planning.mesh import MESH_AXES, build_mesh, libtpu_available, topology_devices

__all__ = [
    "Collective", "CommEstimate", "MESH_AXES", "StepPlan", "abstract_like", "build_mesh", "collectives_from_hlo",
    "compile_step", "estimate", "extrapolate_cost", "libtpu_available", "plan_from_compiled", "program_flops",
    "topology_devices",
]
