"""Ahead-of-time compilation of a jitted step for a mesh, and what the compiler says about it.

`compile_step(fn, args, mesh=...)` lowers and compiles `fn` for abstract, sharded arguments (no array is ever
allocated, so a 9.6B-parameter train step compiles for a v5p-128 on a laptop) and returns a `StepPlan`:

- memory per chip from `memory_analysis()`: arguments (params, optimizer state, batch), outputs, aliased bytes
  (donated buffers reused as outputs), temporaries (activations, gradients, collectives' buffers) and generated
  code; total = arguments + outputs - aliased + temporaries + code, against the chip's HBM;
- cost per chip from `cost_analysis()`: `flops`, `bytes accessed`, and XLA's own roofline `optimal_seconds`;
- an estimated step time (XLA's `optimal_seconds`, else the roofline max(flops / peak, bytes / HBM bandwidth), plus
  the FLOPs XLA misses when scanned layers make it count a loop body once: see `jaxpr_flops`), hence MFU = model FLOPs /
  (step time x chips x peak). It is a lower bound on time and so an upper bound on MFU when communication is ignored;
- communication per chip from the compiled program's collectives (`collectives`: all-gather, reduce-scatter,
  all-reduce, all-to-all, collective-permute with their bytes and replica groups) at the chip's ICI / DCN
  bandwidth (ring model), hence a step-time range: full overlap (max(compute, communication), what XLA's
  async collectives aim for) ... no overlap (compute + communication), and the matching MFU range;
- a verdict: fits, or does not and what to change (per-chip batch, remat, a wider fsdp/tensor mesh).

All compiler figures are per device; on the topologies of `planning.mesh` a device is a chip (megacore).
"""
import dataclasses
import math
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from qwenvl_jax.hardware.chips import GIB, ChipSpec
from qwenvl_jax.planning import collectives, jaxpr_flops

# Above this share of HBM a step that "fits" on paper tends to fail at run time (fragmentation, runtime buffers,
# the input pipeline's device copies), so the verdict warns.
TIGHT_FRACTION = 0.92


def abstract_like(tree: Any, shardings: Any) -> Any:
  """`jax.ShapeDtypeStruct`s with the shapes and dtypes of `tree` and the matching shardings.

  Args:
    tree: a pytree of arrays or `ShapeDtypeStruct`s (e.g. the output of `jax.eval_shape`).
    shardings: a pytree of `Sharding`s with the structure of `tree`, or one `Sharding` for every leaf.
  """
  if isinstance(shardings, jax.sharding.Sharding):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shardings), tree)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


@dataclasses.dataclass(frozen=True, kw_only=True)
class StepPlan:
  """What the compiler predicts for one step on one chip of the mesh.

  When XLA refuses to compile because the program exceeds HBM, `compile_error` holds its message, the arguments
  come from the input shardings and the temporaries are the message's total less them; cost figures are None.

  Byte and FLOP figures are per chip; `model_flops` is for the whole step on all chips (the MFU numerator, from
  the caller's analytic count: 6 x params x tokens, causal attention halved, frozen parts forward only).
  """
  chip: ChipSpec
  num_chips: int
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  code_bytes: int
  flops: float | None
  bytes_accessed: float | None
  optimal_seconds: float | None
  model_flops: float | None = None
  global_batch: int | None = None
  tokens: int | None = None  # tokens one step processes on all chips (the tokens/s numerator)
  compile_seconds: float = 0.0
  loops: int = 0
  compile_error: str = ""
  program_flops: float | None = None
  comm: collectives.CommEstimate | None = None
  # What shrinks this program's temporaries, and what shrinks its resident arguments (weights, KV cache), when it is
  # not a training step (whose levers, batch, remat, a tensor axis, sharding, `advice` names otherwise): e.g. a
  # server prefill's "fewer requests per prefill". Set by `inference_plan`.
  remedy: str = ""
  resident_remedy: str = ""

  @property
  def total_bytes(self) -> int:
    return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes

  @property
  def hbm_fraction(self) -> float:
    return self.total_bytes / self.chip.hbm_bytes

  @property
  def fits(self) -> bool:
    return not self.compile_error and self.total_bytes <= self.chip.hbm_bytes

  @property
  def roofline_seconds(self) -> float | None:
    """max(compute time, HBM time) of one chip, from the compiler's FLOP and byte counts."""
    if not self.flops:
      return None
    seconds = self.flops / self.chip.peak_bf16_flops
    if self.bytes_accessed:
      seconds = max(seconds, self.bytes_accessed / self.chip.hbm_bytes_per_s)
    return seconds

  @property
  def missing_flops(self) -> float:
    """Per-chip FLOPs the compiler's loop-once count misses: program FLOPs per chip - compiled FLOPs (>= 0).

    0 when the program has no while loop or a figure is missing.
    """
    if not self.loops or not self.program_flops or not self.flops:
      return 0.0
    return max(self.program_flops / self.num_chips - self.flops, 0.0)

  @property
  def step_seconds(self) -> float | None:
    """Estimated step time (a lower bound).

    XLA's `optimal_seconds` when it gives one, else the roofline; for programs with scanned layers, plus the
    FLOPs the compiler missed at peak rate (the layers' matmuls are compute-bound at training sizes), and never
    below all program FLOPs at peak.
    """
    seconds = self.optimal_seconds if self.optimal_seconds is not None and self.optimal_seconds > 0 else None
    if seconds is None:
      seconds = self.roofline_seconds
    if seconds is None or not self.missing_flops:
      return seconds
    peak = self.chip.peak_bf16_flops
    return max(seconds + self.missing_flops / peak, self.program_flops / self.num_chips / peak)

  @property
  def mfu(self) -> float | None:
    """MFU at the compute-only step time (an upper bound: no communication cost)."""
    if not self.model_flops or not self.step_seconds:
      return None
    return self.model_flops / (self.step_seconds * self.num_chips * self.chip.peak_bf16_flops)

  @property
  def comm_seconds(self) -> float | None:
    """Estimated per-chip wire time of the step's collectives (None when not analysed)."""
    return None if self.comm is None else self.comm.total_seconds

  @property
  def step_seconds_range(self) -> tuple[float, float] | None:
    """(full overlap: max(compute, communication), no overlap: compute + communication) step times."""
    if self.step_seconds is None or self.comm is None:
      return None
    compute, comm = self.step_seconds, self.comm.total_seconds
    return max(compute, comm), compute + comm

  @property
  def mfu_range(self) -> tuple[float, float] | None:
    """(no overlap, full overlap) MFU: the step-time range turned into model FLOP utilization."""
    times = self.step_seconds_range
    if not self.model_flops or not times:
      return None
    denom = self.num_chips * self.chip.peak_bf16_flops
    return self.model_flops / (times[1] * denom), self.model_flops / (times[0] * denom)

  @property
  def estimated_seconds(self) -> float | None:
    """The step time a plan search ranks by: halfway between full and no overlap (compute-only without comm)."""
    times = self.step_seconds_range
    return self.step_seconds if times is None else (times[0] + times[1]) / 2

  def tokens_per_second(self, seconds: float | None) -> tuple[float, float] | None:
    """(all chips, per chip) tokens per second at a step time of `seconds`; None when either is unknown."""
    if not self.tokens or not seconds:
      return None
    return self.tokens / seconds, self.tokens / seconds / self.num_chips

  @property
  def compiler_to_model_flops(self) -> float | None:
    """Compiled (+ missed loop) FLOPs over model FLOPs (> 1: remat recompute, masked attention; < 1: a miss)."""
    if not self.model_flops or not self.flops:
      return None
    return (self.flops + self.missing_flops) * self.num_chips / self.model_flops

  @property
  def verdict(self) -> str:
    """FITS, FITS but tight (over `TIGHT_FRACTION` of HBM) or DOES NOT FIT."""
    if not self.fits:
      return "DOES NOT FIT"
    return f"FITS, but tight (> {TIGHT_FRACTION:.0%} of HBM)" if self.hbm_fraction > TIGHT_FRACTION else "FITS"

  def to_dict(self) -> dict[str, Any]:
    """The figures of `format()` as JSON values (`plan --json`): bytes per chip, FLOPs, seconds per step, tokens
    per second and MFU, each at full overlap, no overlap and the `estimated_seconds` a search ranks by (None where
    unknown: no communication analysed, no token or model FLOP count given)."""
    times = self.step_seconds_range or (None, None)
    mfu = self.mfu_range or (None, None)
    estimate = self.estimated_seconds
    at = {"full_overlap": times[0], "no_overlap": times[1], "estimate": estimate}
    rates = {k: self.tokens_per_second(v) for k, v in at.items()}
    comm = self.comm
    return {
        "chip": self.chip.name, "num_chips": self.num_chips, "hbm_bytes": self.chip.hbm_bytes,
        "memory_bytes": {"arguments": self.argument_bytes, "outputs": self.output_bytes,
                         "aliased": self.alias_bytes, "temporaries": self.temp_bytes, "code": self.code_bytes,
                         "total": self.total_bytes},
        "hbm_fraction": self.hbm_fraction, "fits": self.fits, "verdict": self.verdict,
        "compile_error": self.compile_error or None, "advice": self.advice(),
        "flops": self.flops, "bytes_accessed": self.bytes_accessed, "optimal_seconds": self.optimal_seconds,
        "program_flops": self.program_flops, "model_flops": self.model_flops, "while_loops": self.loops,
        "compiled_to_model_flops": self.compiler_to_model_flops,
        "collectives": None if comm is None else {
            kind: {"count": comm.counts[kind], "bytes": comm.bytes[kind], "seconds": comm.seconds[kind]}
            for kind in collectives.KINDS if comm.counts[kind]},
        "step_seconds": {"compute": self.step_seconds, "communication": self.comm_seconds, **at},
        "tokens_per_step": self.tokens,
        "tokens_per_second": {k: r and r[0] for k, r in rates.items()},
        "tokens_per_second_per_chip": {k: r and r[1] for k, r in rates.items()},
        "mfu": {"no_overlap": mfu[0], "full_overlap": mfu[1], "compute_only": self.mfu},
        "compile_seconds": self.compile_seconds,
    }

  def advice(self) -> list[str]:
    """What to change, biggest lever first, when the step does not fit (or barely does); empty otherwise."""
    if self.hbm_fraction <= TIGHT_FRACTION:
      return []
    hbm = self.chip.hbm_bytes
    over = self.total_bytes - hbm
    tips = []
    fixed = self.argument_bytes + self.output_bytes - self.alias_bytes + self.code_bytes
    if fixed > TIGHT_FRACTION * hbm and self.resident_remedy:
      tips.append(f"weights, KV cache and inputs alone take {fixed / GIB:.1f} GiB per chip: {self.resident_remedy}")
    elif fixed > TIGHT_FRACTION * hbm:
      tips.append(f"parameters + optimizer state + batch alone take {fixed / GIB:.1f} GiB per chip: shard them over "
                  f"more chips (a larger fsdp degree or slice), freeze more of the model, or keep fewer f32 copies")
    elif self.temp_bytes:
      room = TIGHT_FRACTION * hbm - fixed
      scale = max(room, 0) / self.temp_bytes
      batch_tip = ""
      if self.global_batch:
        batch_tip = f" (global batch {self.global_batch} -> at most ~{max(int(self.global_batch * scale), 0)})"
      if self.remedy:
        tips.append(f"temporaries take {self.temp_bytes / GIB:.1f} GiB per chip: {self.remedy}")
      else:
        tips.append(f"temporaries (activations, gradients) take {self.temp_bytes / GIB:.1f} GiB per chip: cut the "
                    f"per-chip batch to ~{scale:.0%} of now{batch_tip}, or remat more (--config.remat=full saves "
                    f"only each layer's input), or split activations with a tensor axis")
    if not self.remedy and self.output_bytes > self.alias_bytes and self.output_bytes - self.alias_bytes > 0.1 * hbm:
      tips.append(f"{(self.output_bytes - self.alias_bytes) / GIB:.1f} GiB of outputs are not aliased to inputs: "
                  f"donate the train state (donate_argnums) so updated params reuse their buffers")
    if over > 0:
      tips.append(f"needs {over / GIB:.1f} GiB per chip more than the {hbm / GIB:.0f} GiB of HBM")
    return tips

  def format(self) -> str:
    """A human-readable multi-line report."""

    def gib(n: float) -> str:
      return format_bytes(n, width=9)

    hbm = self.chip.hbm_bytes
    lines = []
    if self.compile_error:
      lines += [f"the compiler ran out of memory: {self.compile_error}",
                "  (figures below: arguments from the input shardings, temporaries the error's total less them; "
                "no cost)"]
    lines += [
        f"per-chip memory ({self.chip.name}, {hbm / GIB:.0f} GiB HBM, {self.num_chips} "
        f"chip{'s' if self.num_chips != 1 else ''}):",
        f"  arguments     {gib(self.argument_bytes)}   params, optimizer state or KV cache, inputs",
        f"  outputs       {gib(self.output_bytes)}   (aliased to donated inputs: {format_bytes(self.alias_bytes)})",
        f"  temporaries   {gib(self.temp_bytes)}   activations, gradients, collective buffers",
        f"  code          {gib(self.code_bytes)}"
        + ("   (not reported by this backend)" if not self.code_bytes else ""),
        f"  total         {gib(self.total_bytes)}   "
        + (f"= {self.hbm_fraction:.1%}" if self.hbm_fraction >= 1e-3 or not self.total_bytes else "< 0.1%") + " of HBM",
    ]
    lines.append("cost per chip (compiler):")
    lines.append(f"  flops         {_fmt(self.flops, 'FLOP')}")
    lines.append(f"  bytes         {_fmt(self.bytes_accessed, 'B')} accessed")
    lines.append(f"  optimal       {format_seconds(self.optimal_seconds)} (XLA roofline)")
    if self.program_flops:
      lines.append(f"  program       {_fmt(self.program_flops / self.num_chips, 'FLOP')} (matmuls of the traced "
                   f"step, every scan trip counted, / chips)")
    if self.loops:
      lines.append(f"  note: {self.loops} while loop(s) (scanned layers), whose bodies XLA counts once: its "
                   + (f"figures miss {_fmt(self.missing_flops, 'FLOP')}, added to the step time at peak rate"
                      if self.missing_flops else "figures are undercounts"))
    if self.model_flops:
      lines.append(f"model FLOPs per step {_fmt(self.model_flops, 'FLOP')} (all chips); compiled/model "
                   f"{self.compiler_to_model_flops:.2f}" if self.compiler_to_model_flops else "")
    if self.step_seconds and self.comm is None:
      rate = format_throughput(self.tokens, self.num_chips, self.step_seconds)
      lines.append(f"estimated step time {format_seconds(self.step_seconds)} (lower bound)"
                   + (f", at most {rate}" if rate else "")
                   + (f", estimated MFU {self.mfu:.1%} (upper bound)" if self.mfu is not None else ""))
    elif self.step_seconds:
      lines += self._format_comm()
    lines.append(f"compile time {self.compile_seconds:.1f} s")
    lines.append(f"verdict: {self.verdict}")
    lines.extend(f"  - {tip}" for tip in self.advice())
    return "\n".join(line for line in lines if line)

  def _format_comm(self) -> list[str]:
    comm = self.comm
    lines = [f"compute time  {format_seconds(self.step_seconds)} per step (roofline + missed loop FLOPs, as above)",
             f"communication {format_seconds(comm.total_seconds)} per step (ring model at {self.chip.name} ICI "
             f"{self.chip.ici_link_bytes_per_s / 1e9:.0f} GB/s per link one way x {self.chip.ici_links} links"
             + (f", DCN {self.chip.dcn_bytes_per_s / 1e9:.2f} GB/s per chip: {format_seconds(comm.dcn_seconds)}"
                if comm.dcn_seconds else "") + ")"]
    for kind in collectives.KINDS:
      if comm.counts[kind]:
        lines.append(f"  {kind:<19}{comm.counts[kind]:>6} x, {_fmt(comm.bytes[kind], 'B')} sent, "
                     f"{format_seconds(comm.seconds[kind])}")
    fast, slow = self.step_seconds_range
    if not comm.total_seconds:  # one chip, or nothing to exchange: no range (it read '326 us ... 326 us')
      rate = format_throughput(self.tokens, self.num_chips, fast)
      lines.append(f"estimated step time {format_seconds(fast)} (no communication)" + (f": {rate}" if rate else ""))
      if self.mfu_range:
        lines.append(f"estimated MFU {self.mfu_range[1]:.1%}")
      return lines
    rate = format_throughput(self.tokens, self.num_chips, fast, slow)
    lines.append(f"estimated step time {format_seconds(fast)} (full overlap) ... {format_seconds(slow)} (no overlap)"
                 + (f": {rate}" if rate else ""))
    if self.mfu_range:
      low, high = self.mfu_range
      lines.append(f"estimated MFU {low:.1%} (no overlap) ... {high:.1%} (full overlap); "
                   f"{'communication' if comm.total_seconds > self.step_seconds else 'compute'}-bound")
    return lines


def _fmt(value: float | None, unit: str, *, lowest: int = -3, highest: int = 5, space: str = " ") -> str:
  """`value` with an SI prefix and 3 significant digits ('408 us', '1.87 MB'); prefixes from 1000**lowest to
  1000**highest."""
  if value is None:
    return "n/a"
  if value == 0:
    return f"0{space}{unit}"
  exponent = min(max(int(math.floor(math.log10(abs(value)) / 3)), lowest), highest)
  if exponent < highest and abs(float(f"{value / 1000**exponent:.3g}")) >= 1000:
    exponent += 1  # 999.7 us rounds to 1 ms, not '1e+03 us'
  prefix = {-3: "n", -2: "u", -1: "m", 0: "", 1: "k", 2: "M", 3: "G", 4: "T", 5: "P"}[exponent]
  number = value / 1000**exponent
  text = f"{number:.3g}" if abs(number) < 999.5 else f"{number:,.0f}"  # past the top prefix: all digits
  return f"{text}{space}{prefix}{unit}"


def format_bytes(n: float, width: int = 0) -> str:
  """'15.68 GiB'; below 0.1 GiB in MiB ('51.80 MiB') or KiB: a tiny model's plan read '0.00 GiB' everywhere."""
  if abs(n) >= 0.1 * GIB or n == 0:
    return f"{n / GIB:{width}.2f} GiB"
  if abs(n) >= 2**20:
    return f"{n / 2**20:{width}.2f} MiB"
  return f"{n / 2**10:{width}.2f} KiB"


def format_seconds(seconds: float | None) -> str:
  """'2.31 s', '408 us', '1,250 s' (never kiloseconds: a tiny step read '0.00 s' with two decimals)."""
  return _fmt(seconds, "s", highest=0)


def format_throughput(tokens: int | None, num_chips: int, *seconds: float | None) -> str:
  """'2.51M tokens/s (627k per chip)' for `tokens` per step at each step time in `seconds` ('A ... B' for two);
  '' when the tokens or a time are unknown."""
  if not tokens or not all(seconds):
    return ""
  rate = lambda x: _fmt(x, "", lowest=0, space="")  # noqa: E731
  total = " ... ".join(rate(tokens / s) for s in seconds)
  chip = " ... ".join(rate(tokens / s / num_chips) for s in seconds)
  return f"{total} tokens/s ({chip} per chip)"


def count_loops(compiled: jax.stages.Compiled) -> int:
  """Number of while loops in the optimized program (scan over layers compiles to one per pass)."""
  return len(re.findall(r"\swhile\(", compiled.as_text() or ""))


def extrapolate_cost(plan: StepPlan, base: StepPlan, bumped: dict[str, StepPlan],
                     depths: dict[str, int]) -> StepPlan:
  """`plan` with its cost (FLOPs, bytes, optimal seconds) replaced by a loop-free extrapolation to full depth.

  XLA's cost analysis counts each while-loop body once, so a scanned L-layer stack looks like one layer. Compile
  the step twice more without loops (layers unrolled): `base` with every stack at depth 1, and for each stack
  `t` a copy with that stack at depth 2 (`bumped[t]`). Layers of a stack are identical, so the full cost is
  base + sum_t (depths[t] - 1) x (bumped[t] - base). Memory stays that of `plan` (the real, scanned program).

  Args:
    plan: the plan of the real program (memory is kept).
    base: unrolled, every stack at depth 1.
    bumped: stack name -> unrolled plan with that stack at depth 2 and the others at 1.
    depths: stack name -> real depth.

  Raises:
    ValueError: `bumped` and `depths` name different stacks, or a plan lacks a cost figure.
  """
  if set(bumped) != set(depths):
    raise ValueError(f"bumped plans for {sorted(bumped)} but depths for {sorted(depths)}")

  def extrapolate(field: str) -> float | None:
    values = [getattr(p, field) for p in (base, *bumped.values())]
    if any(v is None for v in values):
      return None
    return getattr(base, field) + sum(
        (depths[name] - 1) * (getattr(bumped[name], field) - getattr(base, field)) for name in bumped)

  return dataclasses.replace(plan, flops=extrapolate("flops"), bytes_accessed=extrapolate("bytes_accessed"),
                             optimal_seconds=extrapolate("optimal_seconds"), loops=0)


def _cost(compiled: jax.stages.Compiled) -> dict[str, float]:
  cost = compiled.cost_analysis()
  # Older JAX returns one dict per partition in a list; they are identical for SPMD programs.
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return dict(cost or {})


def plan_from_compiled(compiled: jax.stages.Compiled, chip: ChipSpec, num_chips: int, *,
                       model_flops: float | None = None, global_batch: int | None = None,
                       tokens: int | None = None, compile_seconds: float = 0.0) -> StepPlan:
  """Reads `memory_analysis()` and `cost_analysis()` of a compiled step into a `StepPlan`."""
  memory = compiled.memory_analysis()
  if memory is None:
    raise RuntimeError("this backend gives no memory analysis for compiled programs; plan for a TPU topology")
  cost = _cost(compiled)

  def positive(key: str) -> float | None:
    value = cost.get(key)
    return float(value) if value is not None and value >= 0 else None

  return StepPlan(
      chip=chip, num_chips=num_chips,
      argument_bytes=int(memory.argument_size_in_bytes), output_bytes=int(memory.output_size_in_bytes),
      alias_bytes=int(memory.alias_size_in_bytes), temp_bytes=int(memory.temp_size_in_bytes),
      code_bytes=int(memory.generated_code_size_in_bytes),
      flops=positive("flops"), bytes_accessed=positive("bytes accessed"),
      optimal_seconds=positive("optimal_seconds"), model_flops=model_flops, global_batch=global_batch,
      tokens=tokens, compile_seconds=compile_seconds, loops=count_loops(compiled))


def shard_bytes(tree: Any) -> int:
  """Bytes one device holds of a pytree of sharded `ShapeDtypeStruct`s (unsharded leaves count in full)."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.shape
    if getattr(leaf, "sharding", None) is not None:
      shape = leaf.sharding.shard_shape(shape)
    total += math.prod(shape) * jax.numpy.dtype(leaf.dtype).itemsize
  return total


_SIZE = r"([\d.]+)\s*([KMGTP]?)i?B?"
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4, "P": 1024**5}


def _parse_size(number: str, unit: str) -> int:
  # XLA prints binary units without the "i" (a 16 GiB v5e shows "15.75G" available).
  return int(float(number) * _UNITS[unit])


def oom_plan(message: str, chip: ChipSpec, num_chips: int, *, argument_bytes: int,
             model_flops: float | None = None, global_batch: int | None = None, tokens: int | None = None,
             compile_seconds: float = 0.0) -> StepPlan:
  """A "does not fit" plan from XLA's RESOURCE_EXHAUSTED compile error.

  Understands "... the total memory required for HLO temporaries (20.30G) exceeds available HBM (15.75G)" and
  "Used 20.3G of 15.75G hbm"; when neither matches, temporaries are set so the total just exceeds HBM (a lower
  bound). Both figures are the program's whole requirement, its arguments included, despite the first one's
  wording, so the temporaries are that figure less `argument_bytes`. Measured with libtpu 0.0.42.1 on v5e-1: the
  full-size bf16 decode call (arguments 25.99 GiB) reported 28.99G; the int8 server's prefill of 2 requests
  (arguments 13.12 GiB) reported 16.16G, where the same program compiled for v6e-1 (32 GiB) has 3.26 GiB of
  temporaries and one request fits v5e-1 with 2.31. Taken as temporaries alone, the plans counted the arguments
  twice (54.98 GiB for the first).
  """
  first = message.strip().splitlines()[0] if message.strip() else message
  temps = re.search(r"temporaries \(" + _SIZE + r"\)", message)
  used = re.search(r"[Uu]sed " + _SIZE + r" of " + _SIZE, message)
  if temps or used:
    temp_bytes = max(_parse_size(*(temps or used).groups()[:2]) - argument_bytes, 0)
  else:
    temp_bytes = max(chip.hbm_bytes - argument_bytes + 1, 0)
  return StepPlan(chip=chip, num_chips=num_chips, argument_bytes=argument_bytes, output_bytes=0, alias_bytes=0,
                  temp_bytes=temp_bytes, code_bytes=0, flops=None, bytes_accessed=None, optimal_seconds=None,
                  model_flops=model_flops, global_batch=global_batch, tokens=tokens,
                  compile_seconds=compile_seconds, compile_error=first)


def compile_step(fn: Callable[..., Any], args: Sequence[Any], *, chip: ChipSpec, mesh: Mesh,
                 out_shardings: Any = None, donate_argnums: int | Sequence[int] = (),
                 model_flops: float | None = None, global_batch: int | None = None, tokens: int | None = None,
                 static_argnums: int | Sequence[int] = (),
                 count_program_flops: bool = True, torus: Sequence[int] = (), keep_unused: bool = False
                 ) -> tuple[jax.stages.Compiled | None, StepPlan]:
  """AOT-compiles `fn(*args)` for `mesh` and reads the compiler's memory and cost analyses.

  Args:
    fn: a pure step function (not yet jitted), e.g. `train_step(state, batch)`.
    args: pytrees of `jax.ShapeDtypeStruct` carrying `NamedSharding`s over `mesh` (see `abstract_like`); they
      are the in-shardings.
    chip: the chip the mesh's devices are (HBM and peak come from here).
    mesh: the mesh of abstract (or real) devices.
    out_shardings: output shardings (None lets the compiler choose, which may replicate large outputs).
    donate_argnums: arguments whose buffers the outputs may reuse (the train state).
    model_flops: analytic FLOPs of one step on all chips, for the MFU estimate.
    global_batch: the batch size, only to phrase "cut the batch to ..." advice.
    tokens: tokens one step processes on all chips, for the tokens/s estimate.
    static_argnums: passed to `jax.jit`.
    count_program_flops: when the program has loops, also trace it and count its matmul FLOPs with every scan
      trip (`jaxpr_flops`), to correct the compiler's loop-once cost.
    torus: the slice's chip grid, only for devices without coordinates (see `collectives.estimate`).
    keep_unused: count arguments the program does not read (jit drops them otherwise), e.g. the ViT weights of a
      decode step: they stay in HBM while it runs.

  Returns:
    The compiled executable and its `StepPlan`; the executable is None when XLA found the program does not fit
    in HBM (the plan then says so, see `oom_plan`).
  """
  jitted = jax.jit(fn, out_shardings=out_shardings, donate_argnums=donate_argnums, static_argnums=static_argnums,
                   keep_unused=keep_unused)
  start = time.perf_counter()
  try:
    with jax.set_mesh(mesh):
      compiled = jitted.lower(*args).compile()
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    plan = oom_plan(str(e), chip, mesh.devices.size, argument_bytes=shard_bytes(args), model_flops=model_flops,
                    global_batch=global_batch, tokens=tokens, compile_seconds=time.perf_counter() - start)
    return None, plan
  seconds = time.perf_counter() - start
  plan = plan_from_compiled(compiled, chip, mesh.devices.size, model_flops=model_flops,
                            global_batch=global_batch, tokens=tokens, compile_seconds=seconds)
  comm = collectives.estimate_compiled(compiled, chip, list(mesh.devices.flat), torus)
  plan = dataclasses.replace(plan, comm=comm)
  if plan.loops and count_program_flops:
    with jax.set_mesh(mesh):
      plan = dataclasses.replace(plan, program_flops=jaxpr_flops.program_flops(fn, *args).flops)
  return compiled, plan
