"""Chip specs and slice-name parsing, checked against Cloud TPU's published slice shapes."""
import pytest

from qwenvl_jax.hardware import chips


# (slice name, chips, grid, gcloud accelerator type), from the Cloud TPU v4/v5e/v5p/v6e pages' slice tables.
PUBLISHED = [
    ("v4-8", 4, (2, 2, 1), "v4-8"),
    ("v4-128", 64, (4, 4, 4), "v4-128"),
    ("v4-256", 128, (4, 4, 8), "v4-256"),
    ("v4-4096", 2048, (8, 16, 16), "v4-4096"),
    ("v5p-8", 4, (2, 2, 1), "v5p-8"),
    ("v5p-32", 16, (2, 2, 4), "v5p-32"),
    ("v5p-128", 64, (4, 4, 4), "v5p-128"),
    ("v5p-512", 256, (4, 8, 8), "v5p-512"),
    ("v5e-1", 1, (1, 1), "v5litepod-1"),
    ("v5litepod-8", 8, (2, 4), "v5litepod-8"),
    ("v5e-32", 32, (4, 8), "v5litepod-32"),
    ("v5e-256", 256, (16, 16), "v5litepod-256"),
    ("v6e-4", 4, (2, 2), "v6e-4"),
    ("v6e-64", 64, (8, 8), "v6e-64"),
    ("v6e-256", 256, (16, 16), "v6e-256"),
]


@pytest.mark.parametrize("name,num_chips,shape,accelerator_type", PUBLISHED)
def test_slice_names_give_published_chip_counts_and_grids(name, num_chips, shape, accelerator_type):
  topo = chips.parse_topology(name)
  assert topo.num_chips == num_chips
  assert topo.shape == shape
  assert topo.accelerator_type == accelerator_type


def test_v4_and_v5p_count_cores_but_v5e_and_v6e_count_chips():
  assert chips.parse_topology("v5p-128").num_chips == 64
  assert chips.parse_topology("v4-128").num_chips == 64
  assert chips.parse_topology("v5e-128").num_chips == 128
  assert chips.parse_topology("v6e-128").num_chips == 128
  assert chips.parse_topology("v5p-128").chip_config_name == "megacore"
  assert chips.parse_topology("v6e-128").chip_config_name == "default"


def test_explicit_grid_and_libtpu_topology_name():
  topo = chips.parse_topology("v5p:4x4x12")
  assert topo.num_chips == 192
  assert topo.topology_name == "v5p:4x4x12"
  assert topo.accelerator_type == "v5p-384"
  assert chips.parse_topology("v5e-16").topology_name == "v5e:4x4"


def test_multi_slice_multiplies_chips_and_peak():
  one = chips.parse_topology("v5p-128")
  two = chips.parse_topology("v5p-128", num_slices=2)
  assert two.num_chips == 2 * one.num_chips == 128
  assert two.peak_flops == pytest.approx(128 * 459e12)
  assert "2 slices" in two.describe()


def test_one_chip_is_not_plural():
  assert chips.parse_topology("v5e-1").describe().startswith("v5litepod-1: 1 chip (v5e:1x1), 16 GiB HBM")
  assert chips.parse_topology("v5e-4").describe().startswith("v5litepod-4: 4 chips (v5e:2x2)")


@pytest.mark.parametrize("name,match", [
    ("v5p-129", "counts TensorCores"),
    ("v5p-384", "no standard grid"),
    ("v5e-12", "no standard grid"),
    ("h100-8", "not a TPU"),
    ("v7-8", "unknown chip"),
    ("v5p128", "neither a slice name"),
    ("v5p:4x4", "3-D chip grids"),
    ("h100:2x2", "not a TPU"),
])
def test_bad_topologies_name_the_culprit(name, match):
  with pytest.raises(ValueError, match=match):
    chips.parse_topology(name)


def test_num_slices_must_be_positive():
  with pytest.raises(ValueError, match="num_slices"):
    chips.parse_topology("v5e-4", num_slices=0)


def test_peaks_and_hbm_match_the_anchor_table():
  # docs/ANCHORS.md §3: dense bf16 peaks; NVIDIA's sparse datasheet figure must not leak in.
  expected = {"v4": (275e12, 32), "v5e": (197e12, 16), "v5p": (459e12, 95), "v6e": (918e12, 32),
              "h100": (989e12, 80 * 1e9 / chips.GIB)}
  for name, (peak, hbm_gib) in expected.items():
    spec = chips.CHIPS[name]
    assert spec.peak_bf16_flops == peak
    assert spec.hbm_bytes / chips.GIB == pytest.approx(hbm_gib)


@pytest.mark.parametrize("kind,name", [
    ("TPU v4", "v4"), ("TPU v5 lite", "v5e"), ("TPU v5", "v5p"), ("TPU v6 lite", "v6e"),
    ("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H200", "h200"), ("NVIDIA A100-SXM4-80GB", "a100"),
    ("v5litepod", "v5e"),
])
def test_chip_spec_accepts_jax_device_kinds(kind, name):
  assert chips.chip_spec(kind).name == name


def test_unknown_device_kind_is_an_error():
  with pytest.raises(ValueError, match="unknown chip 'cpu'"):
    chips.chip_spec("cpu")
