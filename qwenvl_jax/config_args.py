"""The one parser of the `:key=value,...` argument of a config file (`--config=configs/stage2.py:model=tiny`),
shared by the training stage configs and the evaluation configs.

Each value is converted to the type of the field's default, and a value that does not convert is an error naming
the key (so `fix_vit=maybe` is refused everywhere, never read as False).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

_TRUE, _FALSE = ("1", "true", "yes"), ("0", "false", "no")


def parse_bool(value: str, key: str) -> bool:
  """'1' / 'true' / 'yes' -> True, '0' / 'false' / 'no' -> False (any case); anything else is a ValueError."""
  if value.lower() in _TRUE:
    return True
  if value.lower() in _FALSE:
    return False
  raise ValueError(f"config arg {key}={value!r} is not a boolean (true/false, yes/no, 1/0)")


def split_arg(arg: str | None) -> dict[str, str]:
  """'model=tiny,res=224' -> {'model': 'tiny', 'res': '224'}; a malformed item is an error naming it."""
  out = {}
  for item in (arg or "").split(","):
    if not item.strip():
      continue
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
      raise ValueError(f"config arg item {item!r} is not key=value (arg: {arg!r})")
    out[key.strip()] = value.strip()
  return out


def convert(value: str, default: Any, key: str) -> Any:
  """`value` as the type of `default` (bool, int, float or str; None means an optional int)."""
  if isinstance(default, bool):
    return parse_bool(value, key)
  try:
    if default is None or isinstance(default, int):
      return int(value)
    if isinstance(default, float):
      return float(value)
  except ValueError as e:
    what = "a float" if isinstance(default, float) else "an integer"
    raise ValueError(f"config arg {key}={value!r} is not {what}") from e
  if isinstance(default, str):
    return value
  raise ValueError(f"config arg {key!r} cannot be set in the arg string; use --config.{key}=... instead")


def parse_arg(arg: str | None, defaults: Mapping[str, Any]) -> dict[str, Any]:
  """The typed values of the keys `arg` sets; `defaults` gives the known keys and their types.

  Raises:
    ValueError: a malformed item, an unknown key (naming the known ones) or a value of the wrong type.
  """
  raw = split_arg(arg)
  unknown = set(raw) - set(defaults)
  if unknown:
    raise ValueError(f"unknown config arg keys {sorted(unknown)}; known: {', '.join(sorted(defaults))}")
  return {k: convert(v, defaults[k], k) for k, v in raw.items()}
