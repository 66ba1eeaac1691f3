"""The collectives of a compiled SPMD program and how long they take on the chips' interconnect.

`collectives_from_hlo(text)` reads the optimized HLO text of a compiled program (`compiled.as_text()`) and lists
every collective that runs in one step: all-gather, reduce-scatter, all-reduce, all-to-all and collective-permute,
with the bytes one device holds of it, its replica groups (partition ids), and how many times it runs (the trip
counts of enclosing while loops, which XLA records as `known_trip_count`, so scanned layers count L times).

Compiled TPU programs need care, which is why this is a parser and not a grep:
  * asynchronous collectives are split over several fusions (`AsyncCollectiveStart`, the overlapped compute,
    `AsyncCollectiveDone`) that each hold a copy of the same instruction; copies share a `channel_id`, so one
    collective is counted once per channel;
  * a reduce-scatter can be an `all-reduce` followed by a `dynamic-slice` inside a fusion whose computation is
    named `all-reduce-scatter*`: it is counted as the reduce-scatter it is;
  * replica groups come in three spellings: explicit `{{0,1},{2,3}}`, iota `[2,2]<=[4]` (optionally transposed
    `[2,2]<=[2,2]T(1,0)`) and mesh `mesh['axis_0'=4,'axis_1'=2] {'axis_0'}`.

`estimate(collectives, chip, devices)` turns them into seconds with a ring model (below); `CommEstimate` holds the
totals per kind. Letters: n devices in a group, S bytes of the collective's full per-device buffer, k torus
dimensions the group spans, s slices it spans.

Ring model (per device, bandwidth term + a latency term per ring step):
  all-gather       (n-1)/n x S_out      reduce-scatter  (n-1)/n x S_in      all-reduce   2(n-1)/n x S
  all-to-all       (n-1)/n x S          collective-permute  S (one neighbour, one link)
sent over bidirectional rings on each of the k torus dimensions the group spans at once: ICI bandwidth 2 x k x (one-way
link bandwidth), at most the chip's links. A group spanning s > 1 slices is hierarchical: the ICI part over n/s devices
as above, and the same ring factor over s slices for S/(n/s) bytes at the chip's DCN bandwidth. Multi-slice TPU programs
show their cross-slice collectives as megascale host sends (`_xla_megascale_transfer_type`), priced with the ring factor
over the slices at DCN bandwidth. Latency: 1 us per ICI ring step, 10 us per DCN step. This is an estimate of the
traffic's wire time, not a simulation: contention between concurrent collectives, torus wraparound on small slices and
congestion are ignored.
"""
from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from qwenvl_jax.hardware.chips import ChipSpec

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
ICI_STEP_SECONDS = 1e-6
DCN_STEP_SECONDS = 10e-6

_DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
                "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_SHAPE = re.compile(r"\b(pred|[subfc]\d+|bf16|f8e\w+)\[([\d,]*)\]")
_COMPUTATION = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_OPCODES = ("all-gather-start", "all-gather", "reduce-scatter", "all-reduce-start", "all-reduce", "all-to-all",
            "collective-permute-start", "collective-permute", "fusion", "while", "call", "conditional",
            "async-start", "send")
_OPCODE = re.compile(r"\s(" + "|".join(re.escape(o) for o in _OPCODES) + r")\(")


@dataclasses.dataclass(frozen=True)
class Collective:
  """One collective of the program.

  Attributes:
    kind: one of `KINDS`.
    bytes: S, the bytes of the full per-device buffer the ring model moves a share of: the gathered output of
      an all-gather, the unscattered input of a reduce-scatter, the buffer of an all-reduce / all-to-all, the
      operand of a collective-permute.
    groups: replica groups as tuples of partition ids (for a collective-permute: its source-target pairs);
      empty when the program did not say (then one group of every device is assumed).
    count: times it runs per step (product of the trip counts of the loops around it).
    name: the HLO instruction's name (for reports).
    dcn: a multi-slice transfer over the data-center network between slices (its group is the slices).
  """
  kind: str
  bytes: float
  groups: tuple[tuple[int, ...], ...]
  count: int = 1
  name: str = ""
  dcn: bool = False

  @property
  def group_size(self) -> int:
    return max((len(g) for g in self.groups), default=0)


def _shape_bytes(text: str) -> list[float]:
  out = []
  for dtype, dims in _SHAPE.findall(text):
    size = _DTYPE_BYTES.get(dtype, 1)
    out.append(size * math.prod(int(d) for d in dims.split(",") if d))
  return out


def parse_replica_groups(text: str, num_devices: int | None = None) -> tuple[tuple[int, ...], ...]:
  """Replica groups of one instruction's attribute text; () when absent or empty (= all devices).

  Understands `replica_groups={{0,1},{2,3}}`, `replica_groups=[2,2]<=[4]`, `replica_groups=[2,2]<=[2,2]T(1,0)`,
  `replica_groups=mesh['a'=4,'b'=2] {'a'}` and `source_target_pairs={{0,1},{1,0}}`.

  Raises:
    ValueError: a spelling that none of these match.
  """
  pairs = re.search(r"source_target_pairs=\{(.*?)\}\}", text)
  if pairs:
    return tuple(tuple(int(x) for x in grp.split(",")) for grp in re.findall(r"\{([\d,]+)", pairs.group(1) + "}"))
  mesh = re.search(r"replica_groups=mesh\[([^\]]*)\](?:,\s*device_ids=\(([^)]*\)?)\))?\s*\{([^}]*)\}", text)
  if mesh:
    axes = [(name, int(size)) for name, size in re.findall(r"'([^']+)'=(\d+)", mesh.group(1))]
    named = re.findall(r"'([^']+)'", mesh.group(3))
    if not axes or any(":" in n for n in named) or not set(named) <= {a for a, _ in axes}:
      raise ValueError(f"unsupported mesh replica groups: {mesh.group(0)!r}")
    ids = np.arange(math.prod(s for _, s in axes))
    if mesh.group(2):  # the mesh's devices in a permuted order: [dims]<=[reshape]T(perm) or [dims]T(perm)
      spec = re.fullmatch(r"\[([\d,]+)\](?:<=\[([\d,]+)\])?(?:T\(([\d,]+)\))?", mesh.group(2).strip())
      if not spec:
        raise ValueError(f"unsupported mesh device ids: {mesh.group(0)!r}")
      ids = ids.reshape([int(x) for x in (spec.group(2) or spec.group(1)).split(",")])
      if spec.group(3):
        ids = np.transpose(ids, [int(x) for x in spec.group(3).split(",")])
    ids = ids.reshape([s for _, s in axes])
    order = ([i for i, (a, _) in enumerate(axes) if a not in named]
             + [next(i for i, (a, _) in enumerate(axes) if a == n) for n in named])
    size = math.prod(s for a, s in axes if a in named)
    return tuple(tuple(int(x) for x in row) for row in np.transpose(ids, order).reshape(-1, size))
  iota = re.search(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", text)
  if iota:
    shape = [int(x) for x in iota.group(1).split(",")]
    reshape = [int(x) for x in iota.group(2).split(",")]
    ids = np.arange(math.prod(reshape)).reshape(reshape)
    if iota.group(3):
      ids = np.transpose(ids, [int(x) for x in iota.group(3).split(",")])
    ids = ids.reshape(shape[0], -1) if len(shape) > 1 else ids.reshape(1, -1)
    return tuple(tuple(int(x) for x in row) for row in ids)
  explicit = re.search(r"replica_groups=\{((?:\{[\d,]*\},?)*)\}", text)
  if explicit:
    body = explicit.group(1).strip()
    if not body:
      return ()
    return tuple(tuple(int(x) for x in grp.split(",")) for grp in re.findall(r"\{([\d,]+)\}", "{" + body + "}"))
  if "replica_groups" in text:
    raise ValueError(f"unsupported replica groups in {text[:200]!r}")
  return ()


def _split_computations(text: str) -> dict[str, list[str]]:
  comps, current = {}, None
  for line in text.splitlines():
    head = _COMPUTATION.match(line)
    if head:
      current = ("ENTRY" if head.group(1) else head.group(2))
      comps[current] = []
      continue
    if current is not None:
      if line.strip() == "}":
        current = None
      else:
        comps[current].append(line)
  return comps


def _callees(line: str) -> list[str]:
  names = re.findall(r"\b(?:calls|body|to_apply)=%?([\w.\-]+)", line)
  branches = re.search(r"branch_computations=\{([^}]*)\}", line)
  if branches:
    names += [n.strip().lstrip("%") for n in branches.group(1).split(",")]
  for key in ("true_computation", "false_computation"):
    names += re.findall(key + r"=%?([\w.\-]+)", line)
  return names


def _definition(name: str, lines: list[str]) -> str:
  pattern = re.compile(r"^\s*(?:ROOT\s+)?%?" + re.escape(name) + r"\s*=")
  return next((l for l in lines if pattern.match(l)), "")


def _trip_count(line: str, comps: dict[str, list[str]], caller: list[str]) -> int:
  """Trips of the while loop on `line`: XLA's `known_trip_count` when recorded (CPU/GPU), else read from the
  condition `i < N` (or `i <= N`) and the initial `i` of the loop's init tuple (TPU programs drop the record)."""
  found = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', line)
  if found:
    return int(found.group(1))
  cond = re.search(r"\bcondition=%?([\w.\-]+)", line)
  limit, inclusive = None, False
  for cline in comps.get(cond.group(1) if cond else "", []):
    const = re.search(r"\sconstant\((-?\d+)\)", cline)
    if const and re.search(r"\ss32\[\]|\ss64\[\]|\su32\[\]", cline):
      limit = int(const.group(1))
    direction = re.search(r"direction=(LT|LE|GT|GE)", cline)
    if direction:
      inclusive = direction.group(1) == "LE"
  if limit is None:
    return 1
  start = 0
  init = re.search(r"\swhile\(%?([\w.\-]+)\)", line)
  if init:
    first = re.search(r"\stuple\(%?([\w.\-]+)", _definition(init.group(1), caller))
    name = first.group(1) if first else ""
    for _ in range(4):  # through copies / bitcasts to the constant the induction variable starts from
      definition = _definition(name, caller)
      const = re.search(r"\sconstant\((-?\d+)\)", definition)
      if const:
        start = int(const.group(1))
        break
      moved = re.search(r"\s(?:copy|bitcast|convert)\(%?([\w.\-]+)\)", definition)
      if not moved:
        break
      name = moved.group(1)
  return max(limit - start + (1 if inclusive else 0), 1)


def collectives_from_hlo(text: str) -> list[Collective]:
  """The collectives one execution of the HLO module `text` runs (see the module docstring).

  Args:
    text: optimized HLO text, e.g. `jax.jit(f).lower(...).compile().as_text()`.

  Returns:
    One `Collective` per distinct collective (deduplicated by channel id), with its run count.
  """
  comps = _split_computations(text)
  if "ENTRY" not in comps:
    raise ValueError("no ENTRY computation in the HLO text")
  # Times each computation runs per execution: the entry once, a while body trip-count times per caller run.
  # A fusion's computation belongs to the control computation (entry, loop body) that runs the fusion: the
  # copies of one asynchronous collective sit in several fusions of one control computation and share a channel
  # id, while a loop-peeled copy of a collective keeps its channel id in a different control computation.
  runs: dict[str, int] = {"ENTRY": 1}
  control: dict[str, str] = {"ENTRY": "ENTRY"}
  order, seen = ["ENTRY"], {"ENTRY"}
  edges: dict[str, list[tuple[str, int, bool]]] = {}
  for name, lines in comps.items():
    for line in lines:
      fused = bool(re.search(r"\sfusion\(", line))
      for callee in _callees(line):
        trips = _trip_count(line, comps, lines) if re.search(r"\bbody=%?" + re.escape(callee) + r"\b", line) else 1
        edges.setdefault(name, []).append((callee, trips, fused))
  i = 0
  while i < len(order):  # breadth-first from the entry; HLO call graphs are acyclic
    caller = order[i]
    i += 1
    for callee, trips, fused in edges.get(caller, []):
      runs[callee] = max(runs.get(callee, 0), runs[caller] * trips)
      control.setdefault(callee, control[caller] if fused else callee)
      if callee not in seen and callee in comps:
        seen.add(callee)
        order.append(callee)

  found: dict[Any, Collective] = {}
  for comp in order:
    scatter_fusion = comp.startswith("all-reduce-scatter")
    for line in comps[comp]:
      inst = _INSTRUCTION.match(line)
      op = _OPCODE.search(line)
      if not inst or not op or op.group(1) in ("fusion", "while", "call", "conditional", "async-start"):
        continue
      opcode = op.group(1)
      result = line[inst.start(2):op.start()]
      shapes = _shape_bytes(result)
      kind = opcode.removesuffix("-start")
      dcn = False
      if opcode == "send":
        # Multi-slice TPU programs hand cross-slice collectives to the megascale runtime as host sends.
        megascale = re.search(r'_xla_megascale_transfer_type="(\w+)"', line)
        if not megascale:
          continue
        kind, dcn, shapes = megascale.group(1).lower().replace("_", "-"), True, shapes[:1]
        if kind not in KINDS:
          continue
      if opcode == "all-gather-start":
        shapes = shapes[len(shapes) // 2:]  # (operands, outputs)
      elif opcode == "collective-permute-start":
        shapes = shapes[:1]
      groups = () if dcn else parse_replica_groups(line[op.end():])
      size = float(sum(shapes))
      if kind == "reduce-scatter":
        size *= max(len(g) for g in groups) if groups else 1  # the result is one scattered share
      if kind == "all-reduce" and scatter_fusion:
        kind = "reduce-scatter"
      channel = re.search(r"channel_id=(\d+)", line)
      key = (control.get(comp, comp), int(channel.group(1))) if channel else (comp, inst.group(1))
      count = runs.get(comp, 1)
      previous = found.get(key)
      if previous is None or count > previous.count:
        found[key] = Collective(kind=kind, bytes=size, groups=groups, count=count, name=inst.group(1), dcn=dcn)
  return list(found.values())


@dataclasses.dataclass(frozen=True)
class CommEstimate:
  """Per-device communication of one step, by collective kind.

  Attributes:
    seconds: estimated wire time per kind (ring model, see the module docstring), all runs counted.
    bytes: bytes each device sends per kind (the ring model's traffic, all runs counted).
    counts: collectives per kind (all runs counted).
    dcn_seconds: the part of `seconds` spent on DCN (multi-slice), all kinds together.
  """
  seconds: dict[str, float]
  bytes: dict[str, float]
  counts: dict[str, int]
  dcn_seconds: float = 0.0

  @property
  def total_seconds(self) -> float:
    return sum(self.seconds.values())

  @property
  def total_bytes(self) -> float:
    return sum(self.bytes.values())


def _ring_factor(kind: str, n: int) -> float:
  if n <= 1:
    return 0.0
  if kind == "all-reduce":
    return 2.0 * (n - 1) / n
  if kind == "collective-permute":
    return 1.0
  return (n - 1) / n


def _group_layout(group: Sequence[int], devices: Sequence[Any] | None, torus: Sequence[int]) -> tuple[int, int]:
  """(torus dimensions k spanned within a slice, slices s spanned) of a group of partition ids."""
  n = len(group)
  members = [devices[i] for i in group if devices is not None and i < len(devices)]
  if members and all(getattr(d, "coords", None) is not None for d in members):
    slices = len({getattr(d, "slice_index", 0) for d in members})
    coords = np.array([list(d.coords) for d in members])
    dims = int(sum(len(set(coords[:, j])) > 1 for j in range(coords.shape[1])))
    return max(dims, 1), slices
  # No coordinates (CPU devices, or ids beyond the list): assume the group fills the largest torus dims first.
  dims, covered = 0, 1
  for size in sorted(torus or (n,), reverse=True):
    if covered >= n:
      break
    covered *= size
    dims += 1
  return max(dims, 1), 1


def estimate(collectives: Sequence[Collective], chip: ChipSpec, devices: Sequence[Any] | None = None,
             torus: Sequence[int] = ()) -> CommEstimate:
  """Wire time of `collectives` on `chip`'s interconnect (ring model of the module docstring).

  Args:
    collectives: from `collectives_from_hlo`.
    chip: its `ici_link_bytes_per_s`, `ici_links` and `dcn_bytes_per_s` are used.
    devices: the program's devices in partition order (`mesh.devices.flat`): their `coords` and `slice_index`
      say which torus dimensions and slices a group spans. Without them, groups fill the largest dims of `torus`.
    torus: the slice's chip grid, for the fallback above.
  """
  seconds = dict.fromkeys(KINDS, 0.0)
  sent = dict.fromkeys(KINDS, 0.0)
  counts = dict.fromkeys(KINDS, 0)
  dcn_total = 0.0
  n_all = len(devices) if devices is not None else 0
  num_slices = len({getattr(d, "slice_index", 0) for d in devices}) if devices else 1
  for c in collectives:
    counts[c.kind] += c.count
    if c.dcn:
      # Between slices (one peer per slice), after the in-slice part was done on ICI.
      wire = _ring_factor(c.kind, num_slices) * c.bytes
      t = wire / chip.dcn_bytes_per_s + (num_slices - 1) * DCN_STEP_SECONDS if num_slices > 1 else 0.0
      seconds[c.kind] += c.count * t
      sent[c.kind] += c.count * wire
      dcn_total += c.count * t
      continue
    group = max(c.groups, key=len) if c.groups else tuple(range(n_all))
    n = len(group)
    if n <= 1:
      continue
    dims, slices = _group_layout(group, devices, torus)
    if c.kind == "collective-permute":
      # A point-to-point exchange: one link (or DCN when a pair crosses slices).
      bandwidth = chip.dcn_bytes_per_s if slices > 1 else chip.ici_link_bytes_per_s
      t = c.bytes / bandwidth + (DCN_STEP_SECONDS if slices > 1 else ICI_STEP_SECONDS)
      seconds[c.kind] += c.count * t
      sent[c.kind] += c.count * c.bytes
      dcn_total += c.count * t if slices > 1 else 0.0
      continue
    n_ici = max(n // slices, 1)
    ici_bw = 2 * min(dims, max(chip.ici_links // 2, 1)) * chip.ici_link_bytes_per_s
    ici_bytes = _ring_factor(c.kind, n_ici) * c.bytes
    t = ici_bytes / ici_bw + (n_ici - 1) / (2 * dims) * ICI_STEP_SECONDS if n_ici > 1 else 0.0
    dcn_bytes, t_dcn = 0.0, 0.0
    if slices > 1:
      dcn_bytes = _ring_factor(c.kind, slices) * c.bytes / n_ici
      t_dcn = dcn_bytes / chip.dcn_bytes_per_s + (slices - 1) * DCN_STEP_SECONDS
    seconds[c.kind] += c.count * (t + t_dcn)
    sent[c.kind] += c.count * (ici_bytes + dcn_bytes)
    dcn_total += c.count * t_dcn
  return CommEstimate(seconds=seconds, bytes=sent, counts=counts, dcn_seconds=dcn_total)


def estimate_compiled(compiled: Any, chip: ChipSpec, devices: Sequence[Any] | None = None,
                      torus: Sequence[int] = ()) -> CommEstimate:
  """`estimate` of the collectives in a compiled executable's optimized HLO."""
  return estimate(collectives_from_hlo(compiled.as_text() or ""), chip, devices, torus)
