"""How the planners print (`python -m qwenvl_jax.plan`, `python -m qwenvl_jax.planning.inference_plan`): the report
for a person on stdout, or with `--json` one JSON object on stdout for a script and the report on stderr, so that
stdout parses whole.
"""
from __future__ import annotations

import json
import sys


def say(*lines, as_json: bool) -> None:
  """A line of the report: on stdout, or on stderr with --json (stdout then holds the JSON object alone)."""
  print(*lines, file=sys.stderr if as_json else sys.stdout, flush=True)


def emit(report: dict, *, as_json: bool) -> None:
  """With --json, `report` as one line of JSON on stdout (numpy scalars as numbers); without, nothing."""
  if as_json:
    print(json.dumps(report, default=lambda x: x.item()), flush=True)


def topology_to_dict(topology) -> dict:
  """A `hardware.chips.Topology` as JSON values: its name, grid, slices, chips and the chip's HBM and peak."""
  return {"name": topology.accelerator_type, "grid": topology.topology_name, "num_slices": topology.num_slices,
          "num_chips": topology.num_chips, "chip": topology.chip.name, "hbm_bytes": topology.chip.hbm_bytes,
          "peak_bf16_flops": topology.chip.peak_bf16_flops}
