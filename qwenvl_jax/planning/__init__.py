"""Planning a run before renting the pod: chip specs, TPU topologies, and AOT compilation for them.

Public surface:
  parse_topology, Topology, ChipSpec, CHIPS, chip_spec   (chips.py)
  topology_devices, build_mesh, MESH_AXES               (mesh.py; libtpu needed for topology_devices)
  compile_step, plan_from_compiled, StepPlan, abstract_like   (aot.py)
"""
from qwenvl_jax.planning.aot import StepPlan, abstract_like, compile_step, plan_from_compiled
from qwenvl_jax.planning.chips import CHIPS, ChipSpec, Topology, chip_spec, parse_topology
from qwenvl_jax.planning.mesh import MESH_AXES, build_mesh, libtpu_available, topology_devices
