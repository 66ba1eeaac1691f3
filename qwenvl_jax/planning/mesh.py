"""Abstract TPU devices for a topology (libtpu, no TPU attached) and the (`data`, `fsdp`, `tensor`) mesh over them.

`topology_devices(topo)` asks libtpu for the devices of a slice it is not running on; they carry coordinates,
core and slice indices like real ones, so XLA can compile for them (jit(...).lower(...).compile()) but not run.

`build_mesh(devices, ici=..., dcn=...)` lays any device list (abstract TPU, real TPU/GPU, fake CPU) out as a
`jax.sharding.Mesh` with axes `MESH_AXES`: ICI degrees within a slice, DCN degrees across slices, one ICI degree
may be -1 (fill with what is left). It defers to the trainer's `qwenvl_jax.sharding.make_mesh`, so the planner
compiles for exactly the device layout the trainer will use; it only adds the multi-slice default (slices on
`data`) read from the devices' `slice_index`.
"""
import os
from collections.abc import Sequence

import jax
from jax.sharding import Mesh

from qwenvl_jax import errors
from qwenvl_jax import sharding
from qwenvl_jax.hardware.chips import Topology

MESH_AXES = sharding.MESH_AXES

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


class MissingLibtpuError(errors.UserError, RuntimeError):
  """libtpu, which TPU AOT compilation needs, is not installed."""


def topology_devices(topo: Topology) -> list[jax.Device]:
  """The abstract devices (one per chip) of `topo`, for AOT compilation on any host.

  Raises:
    RuntimeError: libtpu is not installed.
  """
  if not libtpu_available():
    raise MissingLibtpuError("AOT compilation for TPU needs libtpu", hint="pip install -r requirements-tpu-aot.txt")
  for key, value in _LIBTPU_QUIET_ENV.items():
    os.environ.setdefault(key, value)
  # An executable compiled for abstract devices cannot be loaded back ("PjRtCompiler must be constructed with a
  # Client"): JAX's persistent cache, which `cli.run` turns on, stored every plan and warned on every rerun. JAX
  # decides at a process's first compile whether the cache is used: `plan` and `inference_plan` compile nothing
  # before they ask for these devices, so this holds for them (a process that compiled before keeps its choice).
  jax.config.update("jax_enable_compilation_cache", False)
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


def _num_slices(devices: Sequence[jax.Device]) -> int:
  return len({getattr(d, "slice_index", 0) for d in devices})


def build_mesh(devices: Sequence[jax.Device], ici: Sequence[int] = (1, -1, 1),
               dcn: Sequence[int] | None = None) -> Mesh:
  """A `Mesh` over `devices` with axes ('data', 'fsdp', 'tensor'), built by `qwenvl_jax.sharding.make_mesh`.

  Args:
    devices: all devices of the job (abstract or real), possibly of several slices (`slice_index`).
    ici: degrees of (data, fsdp, tensor) within one slice; one may be -1 (fill).
    dcn: degrees across slices; default puts all slices on `data` (FSDP traffic stays on the fast ICI links).

  Returns:
    The trainer's mesh for these devices, so what is compiled here is what the trainer will run.

  Raises:
    ValueError: degrees that do not match the devices (the message names them).
  """
  devices = list(devices)
  if len(ici) != len(MESH_AXES) or (dcn is not None and len(dcn) != len(MESH_AXES)):
    raise ValueError(f"ICI {tuple(ici)} / DCN {dcn} degrees must give one value per mesh axis {MESH_AXES}")
  if dcn is None:
    dcn = (_num_slices(devices), 1, 1)
  return sharding.make_mesh(dict(zip(MESH_AXES, ici)), dict(zip(MESH_AXES, dcn)), devices=devices)
