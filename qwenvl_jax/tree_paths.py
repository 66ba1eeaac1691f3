"""Nested dicts <-> flat {path: leaf} dicts: the one rule for parameter paths ("visual.conv1" in checkpoints,
"visual/conv1" in optimizer labels) and config keys, on `flax.traverse_util`.

Only dict nodes are descended into; every other value is a leaf. Empty dicts vanish when flattened.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flax import traverse_util


def flatten(tree: Mapping[str, Any], sep: str = ".") -> dict[str, Any]:
  """{"a": {"b": x}} -> {"a.b": x} (with `sep` between the keys)."""
  return traverse_util.flatten_dict(dict(tree), sep=sep)


def unflatten(flat: Mapping[str, Any], sep: str = ".") -> dict[str, Any]:
  """{"a.b": x} -> {"a": {"b": x}}; the inverse of `flatten` (with the same `sep`)."""
  return traverse_util.unflatten_dict(dict(flat), sep=sep)
