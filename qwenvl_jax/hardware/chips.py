"""Accelerator specs and TPU topology names: what one chip can do, and how many chips a slice name means.

Two tables and one parser:

- `CHIPS`: per-chip peak dense bf16 FLOP/s, HBM bytes and HBM bandwidth (docs/ANCHORS.md §3, plus the H200 and
  A100 datasheets). These are the denominators of MFU and of the "does it fit" check.
- `parse_topology("v5p-128")`: a `Topology` (generation, chips, physical torus shape, slices).

How the number in a slice name counts (Cloud TPU's own convention, easy to get wrong):

  * v4-N and v5p-N count TensorCores. Those chips have two cores that run fused as one "megacore" JAX device,
    so v5p-128 is 64 chips = 64 JAX devices, topology 4x4x4.
  * v5e-N (gcloud: v5litepod-N) and v6e-N count chips, one core each: v5e-256 is 256 chips, topology 16x16.

Every JAX device of the topologies built here is therefore one chip, and per-device figures from the compiler
(memory, FLOPs) are per-chip figures. Topology strings can also be given explicitly (`v5p:4x4x8`, `v6e:8x16`) for
slice shapes the default table does not pick. Multi-slice (`num_slices` > 1) repeats the same slice over DCN.
"""
import dataclasses
import math
import re

from qwenvl_jax import errors

GIB = 1024**3


@dataclasses.dataclass(frozen=True, kw_only=True)
class ChipSpec:
  """One accelerator chip.

  Attributes:
    name: short name used on the command line (`v5p`, `h100`).
    peak_bf16_flops: dense bf16 FLOP/s of the whole chip (both TensorCores of a megacore chip; no 2:4 sparsity).
    hbm_bytes: HBM capacity of the chip in bytes, as the compiler budgets it.
    hbm_bytes_per_s: HBM bandwidth, bytes/s.
    platform: `tpu` or `gpu`.
    topology_prefix: the generation prefix libtpu's topology names use (`v5p`, `v5e`), empty for GPUs.
    torus_dims: 3 for v4/v5p (3-D torus), 2 for v5e/v6e (2-D), 0 for GPUs.
    name_counts_cores: True when the "-N" of a slice name counts TensorCores (2 per chip), False when chips.
    runtime_version: default TPU VM software version for `gcloud ... --version` (launch scripts).
    gcloud_prefix: accelerator-type prefix gcloud expects (`v5litepod` for v5e).
    ici_link_bytes_per_s: one-way bandwidth of one inter-chip link (ICI; NVLink for GPUs), bytes/s.
    ici_links: inter-chip links (ports) per chip: 6 on a 3-D torus, 4 on a 2-D one.
    dcn_bytes_per_s: data-center network bandwidth per chip (multi-slice traffic), bytes/s.
  """
  name: str
  peak_bf16_flops: float
  hbm_bytes: int
  hbm_bytes_per_s: float
  platform: str
  topology_prefix: str = ""
  torus_dims: int = 0
  name_counts_cores: bool = False
  runtime_version: str = ""
  gcloud_prefix: str = ""
  ici_link_bytes_per_s: float = 0.0
  ici_links: int = 0
  dcn_bytes_per_s: float = 0.0


# Interconnect, from the Cloud TPU pages (docs.cloud.google.com/tpu/docs/<gen>) unless said otherwise:
#   v5p: "bidirectional ICI bandwidth per chip 1200 GBps" over 6 links -> 100 GB/s one way per link (the page's
#        other figure, "4800 Gbps", is the same one-way total); "DCN bandwidth per chip 50 Gbps" -> 6.25 GB/s.
#   v5e: "ICI bandwidth 1600 Gbps", "ICI ports per chip 4" -> 50 GB/s per link; "2 x 100 Gbps NIC" per 8-chip
#        host -> 25 Gbps = 3.125 GB/s per chip.
#   v6e: "ICI bandwidth 3200 Gbps", 4 ports -> 100 GB/s per link; "4 x 200 Gbps NIC" per 8-chip host -> 12.5 GB/s.
#   v4:  the page gives "all-reduce bandwidth per Pod 1.1 PB/s" over 4096 chips = 269 GB/s per chip = 6 links of
#        ~45 GB/s one way (the figure of the JAX scaling book's TPU chapter); DCN: no figure published, taken as
#        v5p's 50 Gbps per chip (an assumption).
#   GPUs: NVLink (H100/H200 900 GB/s, A100 600 GB/s bidirectional per GPU, NVIDIA datasheets; counted as one
#        "link" of half that one way x 2) and one 400 Gb/s InfiniBand NIC per GPU as "DCN".
# TPU HBM sizes are the binary GiB the runtime reports (Google's pages write "GB"). GPU figures are the dense (not
# 2:4-sparse) bf16 tensor-core peaks of the SXM parts; HBM is the nominal capacity.
CHIPS: dict[str, ChipSpec] = {
    spec.name: spec for spec in (
        ChipSpec(name="v4", peak_bf16_flops=275e12, hbm_bytes=32 * GIB, hbm_bytes_per_s=1200e9, platform="tpu",
                 topology_prefix="v4", torus_dims=3, name_counts_cores=True,
                 runtime_version="tpu-ubuntu2204-base", gcloud_prefix="v4",
                 ici_link_bytes_per_s=45e9, ici_links=6, dcn_bytes_per_s=6.25e9),
        ChipSpec(name="v5e", peak_bf16_flops=197e12, hbm_bytes=16 * GIB, hbm_bytes_per_s=819e9, platform="tpu",
                 topology_prefix="v5e", torus_dims=2, name_counts_cores=False,
                 runtime_version="v2-alpha-tpuv5-lite", gcloud_prefix="v5litepod",
                 ici_link_bytes_per_s=50e9, ici_links=4, dcn_bytes_per_s=3.125e9),
        ChipSpec(name="v5p", peak_bf16_flops=459e12, hbm_bytes=95 * GIB, hbm_bytes_per_s=2765e9, platform="tpu",
                 topology_prefix="v5p", torus_dims=3, name_counts_cores=True,
                 runtime_version="v2-alpha-tpuv5", gcloud_prefix="v5p",
                 ici_link_bytes_per_s=100e9, ici_links=6, dcn_bytes_per_s=6.25e9),
        ChipSpec(name="v6e", peak_bf16_flops=918e12, hbm_bytes=32 * GIB, hbm_bytes_per_s=1640e9, platform="tpu",
                 topology_prefix="v6e", torus_dims=2, name_counts_cores=False,
                 runtime_version="v2-alpha-tpuv6e", gcloud_prefix="v6e",
                 ici_link_bytes_per_s=100e9, ici_links=4, dcn_bytes_per_s=12.5e9),
        ChipSpec(name="h100", peak_bf16_flops=989e12, hbm_bytes=80 * 10**9, hbm_bytes_per_s=3350e9, platform="gpu",
                 ici_link_bytes_per_s=225e9, ici_links=2, dcn_bytes_per_s=50e9),
        ChipSpec(name="h200", peak_bf16_flops=989e12, hbm_bytes=141 * 10**9, hbm_bytes_per_s=4800e9,
                 platform="gpu",
                 ici_link_bytes_per_s=225e9, ici_links=2, dcn_bytes_per_s=50e9),
        ChipSpec(name="a100", peak_bf16_flops=312e12, hbm_bytes=80 * 10**9, hbm_bytes_per_s=2039e9, platform="gpu",
                 ici_link_bytes_per_s=150e9, ici_links=2, dcn_bytes_per_s=50e9),
    )
}

# Names people (and gcloud) use for the same generation.
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "tpu v4": "v4", "tpu v5": "v5p", "tpu v5p": "v5p",
            "tpu v5 lite": "v5e", "tpu v5e": "v5e", "tpu v6 lite": "v6e", "tpu v6e": "v6e", "trillium": "v6e"}

# Slice sizes Cloud TPU sells for the 2-D generations (chips); the 3-D ones take any power of two >= 4 chips here.
_SIZES_2D = (1, 4, 8, 16, 32, 64, 128, 256)


def chip_spec(name: str) -> ChipSpec:
  """The spec of a chip by short name (`v5p`), gcloud prefix (`v5litepod`) or JAX `device_kind` (`TPU v5 lite`)."""
  key = name.strip().lower()
  key = _ALIASES.get(key, key)
  if key not in CHIPS:
    # JAX device kinds of GPUs are long ("NVIDIA H100 80GB HBM3"); match on the model number.
    for short in ("h100", "h200", "a100"):
      if short in key:
        return CHIPS[short]
    raise errors.ConfigError(f"unknown chip {name!r}; known: {sorted(CHIPS)} (aliases: {sorted(_ALIASES)})")
  return CHIPS[key]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Topology:
  """A TPU slice (or several identical slices joined over DCN).

  Attributes:
    chip: the chip spec.
    shape: physical chip grid of one slice, e.g. (4, 4, 4) for v5p-128, (16, 16) for v5e-256.
    num_slices: identical slices joined over the data-center network (multi-slice).
  """
  chip: ChipSpec
  shape: tuple[int, ...]
  num_slices: int = 1

  def __post_init__(self):
    if self.chip.platform != "tpu":
      raise errors.ConfigError(f"{self.chip.name} is not a TPU; topologies are TPU slices")
    if len(self.shape) != self.chip.torus_dims or any(d < 1 for d in self.shape):
      raise errors.ConfigError(f"{self.chip.name} slices are {self.chip.torus_dims}-D chip grids, got shape "
                               f"{self.shape}")
    if self.num_slices < 1:
      raise errors.ConfigError(f"num_slices must be >= 1, got {self.num_slices}")

  @property
  def chips_per_slice(self) -> int:
    return math.prod(self.shape)

  @property
  def num_chips(self) -> int:
    """All chips of all slices; also the number of JAX devices (megacore: one device per chip)."""
    return self.chips_per_slice * self.num_slices

  @property
  def cores_per_chip(self) -> int:
    return 2 if self.chip.name_counts_cores else 1

  @property
  def topology_name(self) -> str:
    """The libtpu topology string of one slice, e.g. `v5p:4x4x4`."""
    return f"{self.chip.topology_prefix}:{'x'.join(map(str, self.shape))}"

  @property
  def accelerator_type(self) -> str:
    """The gcloud `--accelerator-type` of one slice, e.g. `v5p-128` or `v5litepod-256`."""
    return f"{self.chip.gcloud_prefix}-{self.chips_per_slice * self.cores_per_chip}"

  @property
  def chip_config_name(self) -> str:
    # v4/v5p chips are driven as one megacore device; without this libtpu exposes each TensorCore separately.
    return "megacore" if self.chip.name_counts_cores else "default"

  @property
  def chips_per_host_bounds(self) -> tuple[int, int, int]:
    """Chips attached to one TPU VM host, as a 3-D box.

    Multi-host slices put 4 chips (2x2x1) on each host; the single-host 2-D slices of 8 chips put all 8 on one.
    """
    if self.chips_per_slice <= 4 or (len(self.shape) == 2 and self.chips_per_slice == 8):
      return (tuple(self.shape) + (1, 1))[:3]
    return (2, 2, 1)

  @property
  def peak_flops(self) -> float:
    """Dense bf16 FLOP/s of all chips together."""
    return self.num_chips * self.chip.peak_bf16_flops

  def describe(self) -> str:
    slices = f" x {self.num_slices} slices" if self.num_slices > 1 else ""
    count = f"{self.num_chips} chip{'s' if self.num_chips > 1 else ''}"
    return (f"{self.accelerator_type}{slices}: {count} ({self.topology_name}{slices}), "
            f"{self.chip.hbm_bytes / GIB:.0f} GiB HBM and {self.chip.peak_bf16_flops / 1e12:.0f} bf16 TFLOP/s "
            f"per chip")


def _grid(chips: int, dims: int) -> tuple[int, ...]:
  """The grid Cloud TPU uses for a power-of-two slice: grow the last of the smallest sides (2x2x4 -> 2x4x4)."""
  shape = [1] * dims
  if dims == 3:
    if chips == 4:
      return (2, 2, 1)
    shape = [2, 2, 2]
  n = math.prod(shape)
  while n < chips:
    smallest = min(shape)
    last = max(i for i, s in enumerate(shape) if s == smallest)
    shape[last] *= 2
    n *= 2
  return tuple(shape)


def parse_topology(name: str, num_slices: int = 1) -> Topology:
  """Parses a slice name.

  Args:
    name: `v5p-128` / `v4-128` / `v5e-256` / `v5litepod-16` / `v6e-64` (gcloud accelerator types), or an explicit
      libtpu topology `v5p:4x4x8` / `v6e:8x16`.
    num_slices: identical slices joined over DCN.

  Returns:
    The `Topology`.

  Raises:
    ValueError: unknown generation, a size that is not a whole number of chips, or a size whose grid is not
      standard (give the grid explicitly then).
  """
  text = name.strip().lower()
  explicit = re.fullmatch(r"([a-z0-9 ]+):(\d+(?:x\d+)*)", text)
  if explicit:
    chip = chip_spec(explicit.group(1))
    shape = tuple(int(d) for d in explicit.group(2).split("x"))
    return Topology(chip=chip, shape=shape, num_slices=num_slices)
  sized = re.fullmatch(r"([a-z0-9]+)-(\d+)", text)
  if not sized:
    raise errors.ConfigError(f"topology {name!r} is neither a slice name like 'v5p-128' nor a grid like 'v5p:4x4x4'")
  chip = chip_spec(sized.group(1))
  if chip.platform != "tpu":
    raise errors.ConfigError(f"topology {name!r}: {chip.name} is not a TPU")
  count = int(sized.group(2))
  cores = 2 if chip.name_counts_cores else 1
  if count % cores:
    raise errors.ConfigError(f"topology {name!r}: {chip.name}-N counts TensorCores, {cores} per chip, so N must be "
                             "even")
  chips = count // cores
  if chip.torus_dims == 3:
    standard = chips >= 4 and chips & (chips - 1) == 0
  else:
    standard = chips in _SIZES_2D
  if not standard:
    raise errors.ConfigError(f"topology {name!r} ({chips} chips) has no standard grid here; give it explicitly, e.g. "
                     f"'{chip.topology_prefix}:{'x'.join(['4'] * chip.torus_dims)}'")
  return Topology(chip=chip, shape=_grid(chips, chip.torus_dims), num_slices=num_slices)
