"""`plan --search`: which remat x micro-batches x (fsdp, tensor) x attention kernel to run a stage with.

The global batch, sequence and model stay those of the config; the search varies how the step is laid out:

  remat        config.remat            full | dots | none
  micro-batches config.accum_steps      every divisor A of the batch whose micro-batch B/A splits over data x fsdp
  mesh         config.mesh.ici          (fsdp, tensor) with fsdp x tensor = chips per slice; tensor > 1 uses the
                                        fsdp_tp rule table; slices join on data over DCN
  attention    config.attention_impl    xla | splash (TPU)

Full-size compiles take minutes each, so the search is bounded in three steps:
  1. every candidate gets an analytic per-chip memory estimate (parameter/optimizer shards from the abstract
     model's counts, activations from the remat policy's saved tensors, the float32 logits of the whole sequence
     or of one `loss_chunk`) and an analytic step time (model FLOPs x remat recompute at peak; FSDP all-gathers
     and reduce-scatters of every micro-batch and tensor-parallel all-reduces on ICI, ring model): candidates over
     `PRUNE_FACTOR` x HBM are dropped unseen;
  2. the `max_compiles` best of the rest (estimated to fit first, then by analytic time) are AOT-compiled
     (`train_plan.plan_stage`), and their real memory (memory_analysis) and compute + communication estimate
     (`collectives`) replace the guesses;
  3. compiled results are cached as JSON under `cache_dir`, keyed by config, topology and candidate, so a re-run
     (or a wider search) compiles only what is new.
The table ranks the compiled plans that fit by estimated step time (the mean of full- and no-overlap), then the
rest; the best plan's `--config.` flags are printed. A compiled plan's compute time is at least the analytic
matmul time, since XLA counts no FLOPs inside Pallas kernels (splash attention).

Letters: B global batch, A micro-batches, T tokens per row, V vocabulary, f fsdp degree, t tensor degree.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
import typing
from collections.abc import Callable, Sequence

import ml_collections

from qwenvl_jax import errors, new_files
from qwenvl_jax.hardware import chips
from qwenvl_jax.planning import aot, mesh as mesh_lib

REMATS = ("full", "dots", "none")
ATTENTIONS = ("xla", "splash")
TENSOR_DEGREES = (1, 2, 4, 8)
# The analytic memory estimate is rough (no fragmentation, no XLA temporaries beyond the model's); only what is
# far over HBM is dropped before compiling.
PRUNE_FACTOR = 1.5
# Forward recomputed in the backward pass: matmul FLOPs x this (full remat reruns the whole forward).
_REMAT_FLOPS = {"none": 1.0, "dots": 1.05, "dots_no_batch": 1.1, "full": 4 / 3}


def check_values(remats: Sequence[str], attentions: Sequence[str], tensors: Sequence[str],
                 chips_per_slice: int) -> list[int]:
  """Refuses `--search_remat`, `--search_attention` and `--search_tensor` values no layout can take (each was a
  "compile failed" row, or a traceback); returns the tensor degrees as integers.

  Raises:
    errors.ConfigError: naming the flag, the value and what is allowed.
  """
  from qwenvl_jax.model import config as model_config  # pylint: disable=import-outside-toplevel
  allowed = typing.get_args(model_config.RematPolicy)
  for flag, values, known in (("search_remat", remats, allowed), ("search_attention", attentions, ATTENTIONS)):
    bad = [v for v in values if v not in known]
    if bad or not values:
      what = f"{', '.join(map(repr, bad))} is not one of" if values else "give one or more of"
      raise errors.ConfigError(f"--{flag}={','.join(values)}: {what} {', '.join(known)}")
  degrees = []
  for t in tensors:
    if not t.isdigit() or int(t) < 1:
      raise errors.ConfigError(f"--search_tensor={','.join(tensors)}: {t!r} is not a positive integer")
    degrees.append(int(t))
  if not any(chips_per_slice % t == 0 for t in degrees):
    raise errors.ConfigError(f"--search_tensor={','.join(tensors)}: no degree divides the {chips_per_slice} chips "
                             f"of a slice", hint="tensor degrees are divisors of the chips, e.g. 1, 2, 4")
  return degrees


@dataclasses.dataclass(frozen=True)
class Candidate:
  """One layout of the step."""
  remat: str
  accum: int
  fsdp: int
  tensor: int
  attention: str

  def flags(self, rules: str) -> str:
    """The `--config.` flags that select this layout."""
    return (f"--config.remat={self.remat} --config.accum_steps={self.accum} --config.mesh.ici.data=1 "
            f"--config.mesh.ici.fsdp={self.fsdp} --config.mesh.ici.tensor={self.tensor} "
            f"--config.mesh.rules={rules} --config.attention_impl={self.attention}")

  def rules(self, configured: str) -> str:
    return "fsdp_tp" if self.tensor > 1 else configured

  def __str__(self) -> str:  # the progress lines and the best plan (the dataclass repr read as Python)
    return (f"remat {self.remat}, {self.accum} micro-batch{'es' if self.accum > 1 else ''}, fsdp {self.fsdp} x "
            f"tensor {self.tensor}, {self.attention} attention")


@dataclasses.dataclass
class Row:
  """A candidate and what is known of it (estimates, and a compiled plan's figures when compiled)."""
  candidate: Candidate
  est_bytes: float
  est_seconds: float
  status: str = "not compiled"   # compiled | pruned | not compiled | compile failed
  total_bytes: float | None = None
  fits: bool | None = None
  compute_seconds: float | None = None
  comm_seconds: float | None = None
  step_seconds: float | None = None
  mfu_low: float | None = None
  mfu_high: float | None = None
  compile_seconds: float = 0.0
  note: str = ""

  def to_dict(self) -> dict:
    """The table's figures of this row as JSON values (`plan --search --json`); bytes per chip, seconds per step."""
    c = self.candidate
    return {"remat": c.remat, "micro_batches": c.accum, "fsdp": c.fsdp, "tensor": c.tensor,
            "attention": c.attention, "status": self.status, "fits": self.fits, "bytes_per_chip": self.total_bytes,
            "estimated_bytes_per_chip": self.est_bytes, "compute_seconds": self.compute_seconds,
            "comm_seconds": self.comm_seconds, "step_seconds": self.step_seconds,
            "estimated_step_seconds": self.est_seconds,
            "mfu": {"no_overlap": self.mfu_low, "full_overlap": self.mfu_high},
            "compile_seconds": self.compile_seconds, "note": self.note}


def candidates(batch: int, chips_per_slice: int, num_slices: int, *, platform: str = "tpu",
               remats: Sequence[str] = REMATS, attentions: Sequence[str] = ATTENTIONS,
               tensors: Sequence[int] = TENSOR_DEGREES) -> list[Candidate]:
  """Every layout whose micro-batches split over the mesh's data x fsdp devices."""
  out = []
  for tensor in tensors:
    if chips_per_slice % tensor:
      continue
    fsdp = chips_per_slice // tensor
    shards = fsdp * num_slices
    for accum in range(1, batch + 1):
      if batch % accum or (batch // accum) % shards:
        continue
      for remat in remats:
        for attention in attentions:
          if attention == "splash" and platform != "tpu":
            continue
          out.append(Candidate(remat, accum, fsdp, tensor, attention))
  return out


def nearest_valid(batch: int, accum: int, chips_per_slice: int, num_slices: int, *, limit: int = 3
                  ) -> list[tuple[int, int, int, int]]:
  """(batch, accum, fsdp, tensor) layouts near a configured (batch, accum) that do split over the chips.

  Returns up to `limit` layouts of the same batch (for each tensor degree, the micro-batch count nearest the
  configured one), then the nearest batch sizes with the configured micro-batch count on the pure-fsdp mesh.
  """
  found = []
  for tensor in TENSOR_DEGREES:
    if chips_per_slice % tensor:
      continue
    shards = chips_per_slice // tensor * num_slices
    options = [a for a in range(1, batch + 1) if batch % a == 0 and (batch // a) % shards == 0]
    if options:
      best = min(options, key=lambda a: (abs(math.log(a / accum)), -a))
      found.append((batch, best, chips_per_slice // tensor, tensor))
  found = list(dict.fromkeys(found))[:limit]
  step = accum * chips_per_slice * num_slices
  lower = batch // step * step
  for b in sorted({lower, lower + step} - {0, batch}, key=lambda b: abs(b - batch)):
    found.append((b, accum, chips_per_slice, 1))
  return found


def estimate_memory(cfg, config: ml_collections.ConfigDict, cand: Candidate, num_chips_slice: int,
                    num_slices: int, params: int, trainable: int) -> float:
  """Rough per-chip bytes of the step (the pruning test; the compiler's figure replaces it when compiled)."""
  shards = cand.fsdp * cand.tensor
  state = params * 4 / shards + trainable * (8 + 4) / shards  # f32 params, two Adam moments, f32 grad sum
  rows = config.batch_size // cand.accum / (cand.fsdp * num_slices)
  l, v = cfg.llm, cfg.vision
  t, d = config.seq_len, l.width
  per_token = {"full": 2 * d,
               "dots": 2 * (2 * d + (3 * d + 2 * l.mlp_dim) / cand.tensor),
               "none": 2 * (10 * d + (3 * d + 3 * l.mlp_dim) / cand.tensor)}.get(cand.remat, 2 * d)
  saved = rows * t * per_token * l.layers
  scores = rows * l.heads / cand.tensor * t * t * 4 if cand.attention == "xla" else 0.0
  working = rows * t * 2 * (12 * d + 3 * l.mlp_dim / cand.tensor) + scores * (1 if cand.remat != "none" else
                                                                               l.layers)
  images = rows * config.max_images
  p = v.num_patches
  vit_trains = config.stage != 3
  vit_token = {"full": 2 * v.width, "dots": 2 * (5 * v.width + 2 * v.mlp_dim / cand.tensor),
               "none": 2 * (10 * v.width + 2 * v.mlp_dim / cand.tensor)}.get(cand.remat, 2 * v.width)
  vit = images * p * (vit_token * v.layers if vit_trains else 2 * (6 * v.width + v.mlp_dim / cand.tensor))
  # bf16 logits, their float32 upcast and its gradient: whole, or one `loss_chunk` of tokens at a time.
  chunk = int(config.get("loss_chunk", 0))
  logits = rows * (min(chunk, t) if chunk > 0 else t) * l.vocab_size * (2 + 4 + 4) / cand.tensor
  return state + saved + working + vit + logits


def estimate_seconds(model_flops: float, cand: Candidate, chip: chips.ChipSpec, num_chips: int,
                     params: int, trainable: int, tokens_per_micro: float, width: int, layers: int) -> float:
  """Analytic step time: compute at peak (+ remat recompute) and ring-model FSDP / tensor traffic, half overlapped."""
  compute = model_flops * _REMAT_FLOPS.get(cand.remat, 1.0) / (num_chips * chip.peak_bf16_flops)
  ici = 2 * min(3, chip.ici_links // 2) * chip.ici_link_bytes_per_s
  f = cand.fsdp
  # Per micro-batch: bf16 weights gathered for the forward and again for the backward, bf16 gradients scattered.
  fsdp_bytes = (2 * params * 2 + trainable * 2) / cand.tensor * (f - 1) / f
  # Per micro-batch and layer: two all-reduces forward, two backward, of the rows' bf16 activations.
  rows_tokens = tokens_per_micro / (f * max(num_chips // (f * cand.tensor), 1))
  tp_bytes = 0.0 if cand.tensor == 1 else 4 * layers * 2 * rows_tokens * width * 2 * (cand.tensor - 1) / cand.tensor
  comm = cand.accum * (fsdp_bytes + tp_bytes) / ici
  return (max(compute, comm) + compute + comm) / 2


def _read_cached(path: str) -> dict | None:
  """A compiled candidate's cached row, or None: none there, or one a killed search cut short (a cache miss, which
  compiles it again, instead of a JSON traceback on every later search)."""
  try:
    with open(path, encoding="utf-8") as f:
      row = json.load(f)
  except (OSError, ValueError):
    return None
  return row if isinstance(row, dict) else None


def _write_cached(path: str, row: dict) -> None:
  """Writes a cached row whole or not at all, so two searches never read half of one."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  new_files.replace_whole(path, json.dumps(row))


def _cache_key(config: ml_collections.ConfigDict, topology: chips.Topology, cand: Candidate) -> str:
  text = json.dumps([config.to_dict(), topology.topology_name, topology.num_slices, dataclasses.asdict(cand)],
                    sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:24]


def _apply(config: ml_collections.ConfigDict, cand: Candidate) -> ml_collections.ConfigDict:
  out = ml_collections.ConfigDict(config.to_dict())
  out.remat = cand.remat
  out.accum_steps = cand.accum
  out.attention_impl = cand.attention
  out.mesh.ici.data = 1
  out.mesh.ici.fsdp = cand.fsdp
  out.mesh.ici.tensor = cand.tensor
  out.mesh.rules = cand.rules(config.mesh.rules)
  return out


def _fill(row: Row, plan: aot.StepPlan, floor_seconds: float) -> None:
  """Copies a compiled plan's figures into `row`.

  The compute time is floored at the analytic matmul time (model FLOPs x remat recompute at peak): XLA counts
  no FLOPs inside a Pallas kernel (splash attention), which would otherwise make splash plans look free.
  """
  row.status = "compiled"
  row.total_bytes = plan.total_bytes
  row.fits = plan.fits
  row.compile_seconds = plan.compile_seconds
  if plan.compile_error:
    row.note = "compiler: out of HBM"
    return
  compute = max(plan.step_seconds or 0.0, floor_seconds)
  comm = plan.comm_seconds or 0.0
  row.compute_seconds, row.comm_seconds = compute, plan.comm_seconds
  row.step_seconds = (max(compute, comm) + compute + comm) / 2
  if plan.model_flops:
    peak = plan.num_chips * plan.chip.peak_bf16_flops
    row.mfu_low, row.mfu_high = plan.model_flops / ((compute + comm) * peak), plan.model_flops / (
        max(compute, comm) * peak)


def search(config: ml_collections.ConfigDict, topology: chips.Topology, *, max_compiles: int = 4,
           cache_dir: str = "", remats: Sequence[str] = REMATS, attentions: Sequence[str] = ATTENTIONS,
           tensors: Sequence[int] = TENSOR_DEGREES,
           compile_fn: Callable[[ml_collections.ConfigDict, chips.Topology], aot.StepPlan] | None = None,
           log: Callable[[str], None] = print) -> list[Row]:
  """Searches layouts of `config`'s step on `topology` (see the module docstring); rows best first.

  Args:
    config: the experiment config (its batch, sequence, model and stage are kept).
    topology: the TPU slice(s).
    max_compiles: AOT compiles at most (cached results do not count).
    cache_dir: where compiled results are kept between runs ('' = no cache).
    remats, attentions, tensors: the values tried.
    compile_fn: (config, topology) -> StepPlan; default `train_plan.plan_stage` (tests pass a cheaper one).
    log: progress lines.
  """
  # Imported on use: they pull in the model and the trainer.
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from qwenvl_jax import sharding  # pylint: disable=import-outside-toplevel
  from qwenvl_jax.model import QwenVL  # pylint: disable=import-outside-toplevel
  from qwenvl_jax.planning import train_plan  # pylint: disable=import-outside-toplevel
  from qwenvl_jax.training import experiment, flops, optimizer  # pylint: disable=import-outside-toplevel

  if compile_fn is None:
    compile_fn = lambda c, t: train_plan.plan_stage(c, t)[0]  # noqa: E731
  cfg = train_plan.model_config_for(config)
  is_frozen = optimizer.make_is_frozen(experiment.frozen_patterns(config))
  state = sharding.abstract_model(lambda: QwenVL(cfg, rngs=nnx.Rngs(0)))[1]
  flat = [("/".join(map(str, path)), var) for path, var in nnx.to_flat_state(state)]
  params = sum(var.size for _, var in flat)
  trainable = sum(var.size for path, var in flat if not is_frozen(path))
  model_flops = flops.train_step_flops(cfg, batch=config.batch_size, seq_len=config.seq_len,
                                       max_images=config.max_images,
                                       is_trainable=lambda p: not is_frozen(p)).total
  rows = []
  for cand in candidates(config.batch_size, topology.chips_per_slice, topology.num_slices,
                         platform=topology.chip.platform, remats=remats, attentions=attentions, tensors=tensors):
    mem = estimate_memory(cfg, config, cand, topology.chips_per_slice, topology.num_slices, params, trainable)
    secs = estimate_seconds(model_flops, cand, topology.chip, topology.num_chips, params, trainable,
                            config.batch_size // cand.accum * config.seq_len, cfg.llm.width, cfg.llm.layers)
    row = Row(cand, mem, secs)
    if mem > PRUNE_FACTOR * topology.chip.hbm_bytes:
      row.status, row.note = "pruned", f"estimate {mem / chips.GIB:.0f} GiB > {PRUNE_FACTOR} x HBM"
    rows.append(row)
  log(f"{len(rows)} candidates, {sum(r.status == 'pruned' for r in rows)} pruned by the memory estimate")

  compiled = 0
  # Likely fits first (estimate within HBM), fastest first: a compile spent on a layout that runs out of memory
  # teaches least.
  hbm = topology.chip.hbm_bytes
  for row in sorted((r for r in rows if r.status != "pruned"), key=lambda r: (r.est_bytes > hbm, r.est_seconds)):
    path = os.path.join(cache_dir, _cache_key(config, topology, row.candidate) + ".json") if cache_dir else ""
    cached = _read_cached(path) if path else None
    if cached is not None:
      row.__dict__.update({k: v for k, v in cached.items() if k != "candidate"})
      row.note = (row.note + " (cached)").strip()
      continue
    if compiled >= max_compiles:
      continue
    compiled += 1
    start = time.perf_counter()
    log(f"compiling {compiled}/{max_compiles}: {row.candidate} ...")
    try:
      floor = model_flops * _REMAT_FLOPS.get(row.candidate.remat, 1.0) / (
          topology.num_chips * topology.chip.peak_bf16_flops)
      _fill(row, compile_fn(_apply(config, row.candidate), topology), floor)
    except mesh_lib.MissingLibtpuError:
      raise  # no layout can compile: one error line, not a table of failed rows that says "raise --max_compiles"
    except Exception as e:  # pylint: disable=broad-except  (one failed layout must not end the search)
      row.status, row.note = "compile failed", f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
    log(f"  {row.status} in {time.perf_counter() - start:.0f} s")
    if path and row.status == "compiled":
      _write_cached(path, {k: v for k, v in dataclasses.asdict(row).items() if k != "candidate"})

  def rank(r: Row):
    # What was compiled first (fitting plans by step time, then what ran out of memory or failed), then the
    # analytic guesses, then what the estimate pruned.
    if r.status == "compiled" and r.fits:
      return (0, r.step_seconds)
    order = {"compiled": 1, "compile failed": 2, "not compiled": 3, "pruned": 4}
    return (order.get(r.status, 5), r.est_seconds)

  return sorted(rows, key=rank)


def format_table(rows: Sequence[Row], hbm_bytes: float, *, limit: int = 40) -> str:
  """The search table: one line per candidate, best first."""
  gib = chips.GIB
  head = (f"{'#':>3} {'remat':<5} {'A':>3} {'fsdp':>4} {'tp':>3} {'attn':<6} {'status':<12} {'GiB/chip':>9} "
          f"{'compute':>9} {'comm':>9} {'step':>9} {'MFU no..full overlap':>20}  note")
  lines = [head]
  for i, r in enumerate(rows[:limit], 1):
    c = r.candidate
    mem = f"{r.total_bytes / gib:8.1f}" + ("!" if r.fits is False else " ") if r.total_bytes is not None \
        else f"~{r.est_bytes / gib:7.0f} "
    mfu = f"{r.mfu_low:6.1%} .. {r.mfu_high:6.1%}" if r.mfu_low is not None else ""
    step = _seconds(r.step_seconds) if r.step_seconds is not None else "~" + _seconds(r.est_seconds).strip()
    lines.append(f"{i:>3} {c.remat:<5} {c.accum:>3} {c.fsdp:>4} {c.tensor:>3} {c.attention:<6} {r.status:<12} "
                 f"{mem:>9} {_seconds(r.compute_seconds)} {_seconds(r.comm_seconds)} {step:>9} {mfu:>20}  {r.note}")
  if len(rows) > limit:
    lines.append(f"... {len(rows) - limit} more")
  lines.append(f"GiB/chip: compiler's total ('!' = over the {hbm_bytes / gib:.0f} GiB HBM) or ~analytic estimate; "
               f"step: mean of full- and no-overlap estimates (compiled) or ~analytic")
  return "\n".join(lines)


def _seconds(x: float | None) -> str:
  if x is None:
    return f"{'':>9}"
  if x >= 1:
    return f"{x:8.2f}s"
  if x >= 1e-3:
    return f"{x * 1e3:7.1f}ms"
  return f"{x * 1e6:7.1f}us"


def no_fit_message(rows: Sequence[Row]) -> str:
  """Why a search found no plan that fits, and the lever that can change it: more compiles only when layouts are
  left uncompiled (it was always "raise --max_compiles", also when the estimate had pruned every layout)."""
  count = {s: sum(r.status == s for r in rows) for s in ("compiled", "compile failed", "not compiled", "pruned")}
  done = (f"{count['compiled']} compiled over HBM, {count['compile failed']} failed to compile, "
          f"{count['pruned']} pruned by the memory estimate")
  if count["not compiled"]:
    return (f"no compiled plan fits ({done}); {count['not compiled']} layout(s) not compiled yet: raise "
            "--max_compiles (compiled results are cached)")
  return (f"no layout fits ({done}): a larger topology, fewer rows per step (--config.batch_size), or the savings "
          "a plan without --search lists under 'what would fit'")


def best_to_dict(row: Row, config: ml_collections.ConfigDict, num_chips: int) -> dict:
  """`format_best`'s figures as JSON values: the row's, its `--config.` flags and tokens/s at its step time."""
  tokens = config.batch_size * config.seq_len
  return {**row.to_dict(), "flags": row.candidate.flags(row.candidate.rules(config.mesh.rules)),
          "tokens_per_second": tokens / row.step_seconds if row.step_seconds else None,
          "tokens_per_second_per_chip": tokens / row.step_seconds / num_chips if row.step_seconds else None}


def format_best(row: Row, config: ml_collections.ConfigDict, num_chips: int) -> str:
  """The best plan's line and its `--config.` flags: step time and MFU as estimated, tokens/s at that time."""
  rate = aot.format_throughput(config.batch_size * config.seq_len, num_chips, row.step_seconds)
  return (f"best plan: {row.candidate}, estimated {aot.format_seconds(row.step_seconds)}/step"
          + (f", {rate}" if rate else "")
          + (f", MFU {row.mfu_low:.1%} .. {row.mfu_high:.1%}" if row.mfu_low is not None else "")
          + f"\n  {row.candidate.flags(row.candidate.rules(config.mesh.rules))}")


def best(rows: Sequence[Row]) -> Row | None:
  """The fastest compiled plan that fits, if any."""
  fitting = [r for r in rows if r.status == "compiled" and r.fits]
  return min(fitting, key=lambda r: r.step_seconds) if fitting else None
