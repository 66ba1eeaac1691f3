"""What the accelerators are: chip specs (peak FLOP/s, HBM) and TPU slice names. Plain Python, no JAX.

The bottom layer that both the trainer (MFU denominators) and the planner (topologies, "does it fit") read.

Public surface (`chips.py`):
  ChipSpec, CHIPS, chip_spec(name_or_device_kind)      one chip's figures
  Topology, parse_topology("v5p-128")                  a slice: generation, chips, torus shape, slices
"""
from qwenvl_jax.hardware.chips import CHIPS, GIB, ChipSpec, Topology, chip_spec, parse_topology

__all__ = ["CHIPS", "GIB", "ChipSpec", "Topology", "chip_spec", "parse_topology"]
