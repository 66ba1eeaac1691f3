"""Matmul FLOPs of a traced program, counting every trip of every scan: what XLA's cost analysis misses.

XLA's `cost_analysis()` counts the body of a while loop once, so a train step whose layers are scanned looks
like a one-layer model to it. This walks the step's jaxpr instead: `dot_general` and `conv_general_dilated`
FLOPs (2 per multiply-add), times the `length` of each enclosing `scan`. Everything the program really executes
is in the jaxpr of `value_and_grad`: the forward, the backward and the forward recomputed by remat; elementwise
work (norms, softmax, the optimizer) is not counted, as in MFU accounting.

The count is global (the whole batch on all devices), before partitioning; divided by the number of chips it is
the per-chip FLOPs of a perfectly sharded program. `while_loop`s with data-dependent trip counts are counted once
and reported.
"""
import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
from jax.extend import core as jex_core


@dataclasses.dataclass(frozen=True)
class ProgramFlops:
  """Matmul FLOPs of a program.

  Attributes:
    flops: 2 x multiply-adds of every dot and convolution, with scan trip counts applied.
    while_loops: `while_loop`s found (counted once each: their trip counts are not static).
  """
  flops: float
  while_loops: int = 0


def _dot_flops(eqn) -> float:
  (lhs_contract, _), _ = eqn.params["dimension_numbers"]
  lhs = eqn.invars[0].aval.shape
  out = eqn.outvars[0].aval.shape
  return 2.0 * math.prod(out) * math.prod(lhs[d] for d in lhs_contract)


def _conv_flops(eqn) -> float:
  rhs = eqn.invars[1].aval.shape
  out = eqn.outvars[0].aval.shape
  spec = eqn.params["dimension_numbers"]
  # rhs_spec = (out feature dim, in feature dim, spatial dims...); each output element is a dot over
  # in-features x kernel window (in-features are already divided by the feature groups in the kernel shape).
  rhs_spec = spec.rhs_spec
  window = math.prod(rhs[d] for d in rhs_spec[2:]) * rhs[rhs_spec[1]]
  return 2.0 * math.prod(out) * window


def _sub_jaxprs(value: Any) -> list:
  if isinstance(value, jex_core.ClosedJaxpr):
    return [value.jaxpr]
  if isinstance(value, jex_core.Jaxpr):
    return [value]
  if isinstance(value, (tuple, list)):
    return [j for v in value for j in _sub_jaxprs(v)]
  return []


def _count(jaxpr) -> ProgramFlops:
  flops, loops = 0.0, 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      flops += _dot_flops(eqn)
      continue
    if name == "conv_general_dilated":
      flops += _conv_flops(eqn)
      continue
    if name == "cond":
      # One branch runs: count the most expensive.
      branches = [_count(b) for b in _sub_jaxprs(eqn.params["branches"])]
      flops += max((b.flops for b in branches), default=0.0)
      loops += sum(b.while_loops for b in branches)
      continue
    inner = [_count(j) for value in eqn.params.values() for j in _sub_jaxprs(value)]
    times = eqn.params.get("length", 1) if name == "scan" else 1
    if name == "while":
      loops += 1
    flops += times * sum(c.flops for c in inner)
    loops += sum(c.while_loops for c in inner)
  return ProgramFlops(flops=flops, while_loops=loops)


def program_flops(fn: Callable[..., Any], *args: Any) -> ProgramFlops:
  """Traces `fn(*args)` (arrays or `ShapeDtypeStruct`s; nothing is computed) and counts its matmul FLOPs."""
  return _count(jax.make_jaxpr(fn)(*args).jaxpr)
