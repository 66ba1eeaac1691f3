"""Nested dicts <-> flat {path: leaf} dicts: the one rule for parameter paths ("visual.conv1" in checkpoints,
"visual/conv1" in optimizer labels) and config keys.

Only `Mapping` nodes are descended into; every other value is a leaf. Empty mappings vanish when flattened.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def flatten(tree: Mapping[str, Any], sep: str = ".") -> dict[str, Any]:
  """{"a": {"b": x}} -> {"a.b": x} (with `sep` between the keys)."""
  out: dict[str, Any] = {}

  def walk(node: Mapping[str, Any], prefix: str) -> None:
    for key, value in node.items():
      name = f"{prefix}{key}"
      if isinstance(value, Mapping):
        walk(value, name + sep)
      else:
        out[name] = value

  walk(tree, "")
  return out


def unflatten(flat: Mapping[str, Any], sep: str = ".") -> dict[str, Any]:
  """{"a.b": x} -> {"a": {"b": x}}; the inverse of `flatten` (with the same `sep`)."""
  out: dict[str, Any] = {}
  for name, value in flat.items():
    node = out
    *parents, leaf = name.split(sep)
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = value
  return out
