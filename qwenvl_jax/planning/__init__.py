"""Planning a run before renting the pod: AOT compilation for TPU topologies (the chips and slice names
themselves are `qwenvl_jax.hardware`).

Public surface:
  topology_devices, build_mesh, libtpu_available, MESH_AXES         (mesh.py; libtpu for topology_devices)
  compile_step, plan_from_compiled, extrapolate_cost, StepPlan, abstract_like   (aot.py)
  program_flops                                                     (jaxpr_flops.py)
Entry points (imported on use, they pull in the model and trainer):
  python -m qwenvl_jax.planning.train_plan --config=configs/stageN.py:... --topology=v5p-128
  python -m qwenvl_jax.planning.standin --topology=v5p-8
"""
from qwenvl_jax.planning.aot import StepPlan, abstract_like, compile_step, extrapolate_cost, plan_from_compiled
from qwenvl_jax.planning.jaxpr_flops import program_flops
from qwenvl_jax.planning.mesh import MESH_AXES, build_mesh, libtpu_available, topology_devices
