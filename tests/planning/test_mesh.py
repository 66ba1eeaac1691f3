"""Mesh construction over fake CPU devices and over libtpu's abstract TPU devices."""
import jax
import pytest
from jax.sharding import AxisType

from qwenvl_jax.planning import mesh
from tests.planning.conftest import requires_libtpu, run_json


@pytest.mark.parametrize("ici,dcn,match", [
    ((3, -1, 1), None, "do not divide"),
    ((2, 2, 1), None, "needs 4 devices"),
    ((1, -1), None, "one value per mesh axis"),
    ((1, -1, 1), (3, 1, 1), "do not divide 8 devices"),
])
def test_bad_degrees_name_the_culprit(ici, dcn, match):
  with pytest.raises(ValueError, match=match):
    mesh.build_mesh(jax.devices(), ici=ici, dcn=dcn)


def test_build_mesh_on_cpu_devices():
  m = mesh.build_mesh(jax.devices(), ici=(2, -1, 1))
  assert m.axis_names == mesh.MESH_AXES
  assert dict(m.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
  assert all(t == AxisType.Auto for t in m.axis_types)
  assert sorted(d.id for d in m.devices.flat) == sorted(d.id for d in jax.devices())


@requires_libtpu
def test_topology_devices_and_meshes_for_tpu_slices():
  out = run_json("""
      import json
      from qwenvl_jax.hardware import chips
      from qwenvl_jax.planning import mesh
      res = {}
      for name, slices, ici, dcn in [("v5p-128", 1, (1, -1, 1), None), ("v5e-256", 1, (1, 64, 4), None),
                                     ("v4-16", 2, (1, -1, 2), None), ("v6e-4", 2, (1, -1, 1), (1, 2, 1))]:
        topo = chips.parse_topology(name, slices)
        devices = mesh.topology_devices(topo)
        m = mesh.build_mesh(devices, ici=ici, dcn=dcn)
        res[f"{name}x{slices}"] = dict(n=len(devices), kind=devices[0].device_kind, shape=dict(m.shape),
                                       slices=sorted({getattr(d, "slice_index", 0) for d in devices}))
      print(json.dumps(res))
  """)
  # One abstract device per chip (megacore for v4/v5p), whatever the slice name counts.
  assert out["v5p-128x1"] == dict(n=64, kind="TPU v5", shape={"data": 1, "fsdp": 64, "tensor": 1}, slices=[0])
  assert out["v5e-256x1"]["n"] == 256 and out["v5e-256x1"]["shape"] == {"data": 1, "fsdp": 64, "tensor": 4}
  assert out["v4-16x2"]["n"] == 16 and out["v4-16x2"]["slices"] == [0, 1]
  assert out["v4-16x2"]["shape"] == {"data": 2, "fsdp": 4, "tensor": 2}
  assert out["v6e-4x2"]["shape"] == {"data": 1, "fsdp": 8, "tensor": 1}
