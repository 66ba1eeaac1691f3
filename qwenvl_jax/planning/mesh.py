"""Abstract TPU devices for a topology (libtpu, no TPU attached) and the (`data`, `fsdp`, `tensor`) mesh over them.

`topology_devices(topo)` asks libtpu for the devices of a slice it is not running on; they carry coordinates,
core and slice indices like real ones, so XLA can compile for them (jit(...).lower(...).compile()) but not run.

`build_mesh(devices, ici=..., dcn=...)` lays any device list (abstract TPU, real TPU/GPU, fake CPU) out as a
`jax.sharding.Mesh` with axes `MESH_AXES`: ICI degrees within a slice, DCN degrees across slices, one degree
per axis may be -1 (fill with what is left). It is written against devices only, so the trainer can use the same
function for real devices; when `qwenvl_jax/sharding.py` grows its own mesh builder this one should defer to it.
"""
import math
import os
from collections.abc import Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from qwenvl_jax.planning.chips import Topology

MESH_AXES = ("data", "fsdp", "tensor")

# libtpu probes the GCE metadata server for the slice it runs on unless told otherwise; on a CPU box the probe
# only costs time and prints alarming errors, and the values are never used for a compile-only topology. Its
# one-process-per-host lock guards real chips; compile-only processes (parallel tests, several planners) would
# otherwise fail with "Internal error when accessing libtpu multi-process lockfile".
_LIBTPU_QUIET_ENV = {"TPU_SKIP_MDS_QUERY": "1", "TPU_WORKER_HOSTNAMES": "localhost",
                     "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}


def libtpu_available() -> bool:
  """True when the libtpu wheel (requirements-tpu-aot.txt) is importable."""
  try:
    import libtpu  # noqa: F401, pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    return False
  return True


def topology_devices(topo: Topology) -> list[jax.Device]:
  """The abstract devices (one per chip) of `topo`, for AOT compilation on any host.

  Raises:
    RuntimeError: libtpu is not installed.
  """
  if not libtpu_available():
    raise RuntimeError("AOT compilation for TPU needs libtpu: pip install -r requirements-tpu-aot.txt")
  for key, value in _LIBTPU_QUIET_ENV.items():
    os.environ.setdefault(key, value)
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", topo.accelerator_type)
  # Imported here: the module touches the TPU plugin, which plain CPU/GPU users never need.
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  desc = topologies.get_topology_desc(
      platform="tpu", topology_name=topo.topology_name, chip_config_name=topo.chip_config_name,
      chips_per_host_bounds=topo.chips_per_host_bounds, num_slices=topo.num_slices)
  devices = list(desc.devices)
  if len(devices) != topo.num_chips:
    raise RuntimeError(f"libtpu gave {len(devices)} devices for {topo.describe()}; expected one per chip")
  return devices


def resolve_degrees(degrees: Sequence[int], total: int, what: str) -> tuple[int, ...]:
  """Replaces the single -1 in `degrees` so their product is `total`.

  Raises:
    ValueError: more than one -1, a degree < 1, or degrees that do not multiply to `total`.
  """
  degrees = tuple(int(d) for d in degrees)
  if len(degrees) != len(MESH_AXES):
    raise ValueError(f"{what} degrees {degrees} must give one value per mesh axis {MESH_AXES}")
  if degrees.count(-1) > 1 or any(d < 1 and d != -1 for d in degrees):
    raise ValueError(f"{what} degrees {degrees}: each must be >= 1, with at most one -1 (fill)")
  known = math.prod(d for d in degrees if d != -1)
  if -1 in degrees:
    if total % known:
      raise ValueError(f"{what} degrees {dict(zip(MESH_AXES, degrees))}: {total} devices are not divisible by "
                       f"{known}")
    degrees = tuple(total // known if d == -1 else d for d in degrees)
  if math.prod(degrees) != total:
    raise ValueError(f"{what} degrees {dict(zip(MESH_AXES, degrees))} multiply to {math.prod(degrees)}, "
                     f"but there are {total} devices")
  return degrees


def _num_slices(devices: Sequence[jax.Device]) -> int:
  return len({getattr(d, "slice_index", 0) for d in devices})


def build_mesh(devices: Sequence[jax.Device], ici: Sequence[int] = (1, -1, 1),
               dcn: Sequence[int] | None = None) -> Mesh:
  """A `Mesh` over `devices` with axes ('data', 'fsdp', 'tensor').

  Args:
    devices: all devices of the job (abstract or real), possibly of several slices (`slice_index`).
    ici: degrees of (data, fsdp, tensor) within one slice; one may be -1.
    dcn: degrees across slices; default puts all slices on `data` (FSDP traffic stays on the fast ICI links).

  Returns:
    A mesh of shape ici * dcn (elementwise) with `AxisType.Auto` axes, devices placed so that each ICI axis
    follows the physical torus where it can.
  """
  devices = list(devices)
  slices = _num_slices(devices)
  if dcn is None:
    dcn = (slices, 1, 1)
  dcn = resolve_degrees(dcn, slices, "DCN")
  ici = resolve_degrees(ici, len(devices) // slices, "ICI")
  if slices > 1:
    grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices=devices, allow_split_physical_axes=True)
  elif devices[0].platform == "tpu":
    try:
      grid = mesh_utils.create_device_mesh(ici, devices=devices)
    except (NotImplementedError, ValueError):
      # The logical axis does not match a product of physical axes (e.g. 64 x 4 on a 16x16 v5e): split them.
      grid = mesh_utils.create_device_mesh(ici, devices=devices, allow_split_physical_axes=True)
  else:
    grid = np.asarray(devices).reshape(ici)
  return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
