"""Nested dicts <-> flat {path: leaf} dicts: the one rule for parameter paths ("visual.conv1" in checkpoints,
"visual/conv1" in optimizer labels) and config keys, on `flax.traverse_util`; and the regexes users write over
those paths (frozen parameters, LoRA and QLoRA targets), compiled by `compile_patterns`.

Only dict nodes are descended into; every other value is a leaf. Empty dicts vanish when flattened.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from flax import traverse_util


def flatten(tree: Mapping[str, Any], sep: str = ".") -> dict[str, Any]:
  """{"a": {"b": x}} -> {"a.b": x} (with `sep` between the keys)."""
  return traverse_util.flatten_dict(dict(tree), sep=sep)


def unflatten(flat: Mapping[str, Any], sep: str = ".") -> dict[str, Any]:
  """{"a.b": x} -> {"a": {"b": x}}; the inverse of `flatten` (with the same `sep`)."""
  return traverse_util.unflatten_dict(dict(flat), sep=sep)


def compile_patterns(patterns: Iterable[str], what: str) -> list[re.Pattern]:
  """Each of `patterns` compiled; one that is no regex is a ValueError naming it as `what` (e.g. "LoRA target")."""
  compiled = []
  for pattern in patterns:
    try:
      compiled.append(re.compile(pattern))
    except re.error as e:
      raise ValueError(f"{what} {pattern!r} is not a regular expression ({e})") from e
  return compiled
