"""gcloud command lines for a TPU VM slice (or a multi-slice queued resource), as argv lists.

Only the Python standard library is used: the launcher runs on a laptop that has gcloud but not JAX.

A `Slice` names what to talk to. Single slices are TPU VMs created directly (`tpu-vm create`) or through a
queued resource (`--queued`, which waits for capacity instead of failing). Multi-slice jobs (`num_slices > 1`) are
always a queued resource with `--node-count`; gcloud names its nodes `<name>-0 .. <name>-<n-1>` (the
`--node-prefix`), and every per-node command (ssh, scp, describe) is issued once per node.

How the number in an accelerator type counts (same as qwenvl_jax/hardware/chips.py, which has the full table):
v4-N / v5p-N count TensorCores (2 per chip), v5e (gcloud: v5litepod-N) and v6e-N count chips.
"""
import dataclasses
import re

# Default TPU VM software per generation (gcloud --version / --runtime-version).
RUNTIME_VERSIONS = {"v4": "tpu-ubuntu2204-base", "v5litepod": "v2-alpha-tpuv5-lite", "v5p": "v2-alpha-tpuv5",
                    "v6e": "v2-alpha-tpuv6e"}
_GCLOUD_PREFIX = {"v4": "v4", "v5e": "v5litepod", "v5litepod": "v5litepod", "v5p": "v5p", "v6e": "v6e"}
# Slice sizes (chips) of the 2-D generations, as qwenvl_jax/hardware/chips.py lists them.
_SIZES_2D = (1, 4, 8, 16, 32, 64, 128, 256)


def accelerator_type(name: str) -> str:
  """`v5e-16` -> `v5litepod-16` (the name gcloud wants); checks the form `<generation>-<N>`.

  Raises:
    ValueError: not `<generation>-<N>` or an unknown generation.
  """
  match = re.fullmatch(r"(v4|v5e|v5litepod|v5p|v6e)-(\d+)", name.strip().lower())
  if not match:
    raise ValueError(f"--topology {name!r}: expected <generation>-<N> with generation v4, v5e (v5litepod), v5p or "
                     f"v6e, e.g. v5p-128")
  generation, count = match.group(1), int(match.group(2))
  # A size no slice has (v5p-129, v5e-3) was sent to gcloud as is: `up` failed at create, `train` talked to nothing.
  if generation in ("v4", "v5p") and (count % 2 or count < 8):
    raise ValueError(f"--topology {name!r}: {generation}-N counts TensorCores (2 per chip), so N is even and at "
                     f"least 8 (e.g. {generation}-8, {generation}-128)")
  if generation not in ("v4", "v5p") and count not in _SIZES_2D:
    raise ValueError(f"--topology {name!r}: {generation}-N counts chips; the slices are "
                     f"{', '.join(f'{generation}-{n}' for n in _SIZES_2D)}")
  return f"{_GCLOUD_PREFIX[generation]}-{count}"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Slice:
  """A TPU VM slice, or `num_slices` identical slices of one queued resource.

  Attributes:
    name: TPU VM name (single slice) or queued-resource id and node prefix (queued / multi-slice).
    zone: GCE zone, e.g. us-east5-a.
    project: GCP project ('' = gcloud's configured default).
    topology: accelerator type, e.g. v5p-128 or v5e-256.
    num_slices: slices joined over DCN (> 1 needs a queued resource).
    queued: create through a queued resource even for one slice.
  """
  name: str
  zone: str
  project: str = ""
  topology: str
  num_slices: int = 1
  queued: bool = False

  def __post_init__(self):
    if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", self.name):
      raise ValueError(f"--name {self.name!r}: TPU names are lowercase letters, digits and '-', starting with a "
                       f"letter")
    if not self.zone:
      raise ValueError("--zone is required (e.g. us-east5-a)")
    if self.num_slices < 1:
      raise ValueError(f"--num_slices must be >= 1, got {self.num_slices}")
    accelerator_type(self.topology)

  @property
  def is_queued(self) -> bool:
    return self.queued or self.num_slices > 1

  @property
  def nodes(self) -> list[str]:
    """The TPU VM names: one per slice."""
    if self.num_slices == 1:
      return [self.name]
    return [f"{self.name}-{i}" for i in range(self.num_slices)]

  @property
  def accelerator_type(self) -> str:
    return accelerator_type(self.topology)

  def location_flags(self) -> list[str]:
    flags = [f"--zone={self.zone}"]
    if self.project:
      flags.append(f"--project={self.project}")
    return flags


def create(s: Slice, *, runtime_version: str = "", spot: bool = False, reserved: bool = False,
           extra: tuple[str, ...] = ()) -> list[list[str]]:
  """The commands that create the slice(s): `tpu-vm create`, or `queued-resources create` (+ `--node-count`)."""
  if spot and reserved:
    raise ValueError("--spot and --reserved exclude each other")
  version = runtime_version or RUNTIME_VERSIONS[s.accelerator_type.split("-")[0]]
  if not s.is_queued:
    cmd = ["gcloud", "compute", "tpus", "tpu-vm", "create", s.name, *s.location_flags(),
           f"--accelerator-type={s.accelerator_type}", f"--version={version}"]
    if spot:
      cmd.append("--spot")
    if reserved:
      cmd.append("--reserved")
    return [cmd + list(extra)]
  cmd = ["gcloud", "compute", "tpus", "queued-resources", "create", s.name, *s.location_flags(),
         f"--accelerator-type={s.accelerator_type}", f"--runtime-version={version}"]
  if s.num_slices > 1:
    cmd += [f"--node-count={s.num_slices}", f"--node-prefix={s.name}"]
  else:
    cmd.append(f"--node-id={s.name}")
  if spot:
    cmd.append("--spot")
  if reserved:
    cmd.append("--reserved")
  return [cmd + list(extra)]


def wait_ready(s: Slice) -> list[list[str]]:
  """A command that shows the queued resource's state (ACTIVE once every node is up); none for a plain TPU VM."""
  if not s.is_queued:
    return []
  return [["gcloud", "compute", "tpus", "queued-resources", "describe", s.name, *s.location_flags(),
           "--format=value(state.state)"]]


def ssh(s: Slice, node: str, command: str, *, worker: str = "all") -> list[str]:
  """Runs the shell `command` on `worker` (`all`, or an index) of TPU VM `node`."""
  return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", node, *s.location_flags(), f"--worker={worker}",
          f"--command={command}"]


def scp(s: Slice, node: str, local: str, remote: str, *, worker: str = "all") -> list[str]:
  """Copies the local file `local` to `remote` (a path on the VM) on `worker` of `node`."""
  return ["gcloud", "compute", "tpus", "tpu-vm", "scp", local, f"{node}:{remote}", *s.location_flags(),
          f"--worker={worker}"]


def worker0_ip(s: Slice) -> list[str]:
  """Prints the internal IP of worker 0 of the first node (the multi-slice coordinator)."""
  return ["gcloud", "compute", "tpus", "tpu-vm", "describe", s.nodes[0], *s.location_flags(),
          "--format=value(networkEndpoints[0].ipAddress)"]


def delete(s: Slice, *, yes: bool = False) -> list[list[str]]:
  """The commands that delete the slice(s); without `yes` gcloud asks before deleting."""
  quiet = ["--quiet"] if yes else []
  if s.is_queued:
    # --force also deletes the TPU VMs the queued resource created.
    return [["gcloud", "compute", "tpus", "queued-resources", "delete", s.name, *s.location_flags(), "--force",
             *quiet]]
  return [["gcloud", "compute", "tpus", "tpu-vm", "delete", s.name, *s.location_flags(), *quiet]]
