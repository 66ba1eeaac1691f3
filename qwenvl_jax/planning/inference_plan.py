"""Plans quantized (or float) inference for a TPU topology: the real prefill and decode step, AOT-compiled.

  python -m qwenvl_jax.plan --preset=qwen_vl_7b --topology=v5e-1 \\
      --inference=quantize=int8,batch=8,kv_cache_dtype=int8
  python -m qwenvl_jax.planning.inference_plan --preset=qwen_vl_7b --topology=v5e-1 --quantize=int8 \\
      --batch=4 --context=2048 --kv_cache_dtype=bfloat16
  python -m qwenvl_jax.planning.inference_plan --preset=qwen_vl_7b --topology=v5e-1 --quantize=int8 \\
      --batch=8 --context=2048 --kv_cache_dtype=int8

Letters: B rows, C context (cache slots: prompt + new tokens), P prompt length, M images per row.

It builds what `inference.Generator` runs — the quantized model's graph and abstract state
(`model.quantize.quantize_model` under `nnx.eval_shape`), rule-table shardings over the topology's abstract
devices, an abstract KV cache of C slots (bf16 or int8) — and compiles two programs with `planning.aot`:
  * `decode`: `inference.decode_step` (one token per row against the full cache; the cache donated, as the
    generation loop carries it), whose arguments are the weights + the cache that live through a generation
    (all the weights: the ViT's, which the step does not read, are resident too and counted, `keep_unused`);
  * `prefill`: `inference.prefill` of P prompt tokens with M images per row into the cache (the peak of
    activations: the ViT, the adapter and a P x P attention per layer).
`--attention=splash` (`attention=splash` of `plan --inference`) plans serve's, generate's and evaluate's
`--attention=splash`: the Pallas kernel in the image encoder and the prefill, no [heads, P, P] scores.
Nothing is allocated and no TPU is needed (libtpu is: requirements-tpu-aot.txt). When a plan does not fit, the
report says by how much and what would (a smaller batch, an int8 cache, int4 weights, more chips).

The layout is the runtime's (`inference.layout.make_inference_mesh` over the topology's devices): `--rules=
inference_tp` (default: tensor parallel over one host's chips, replicas over the rest) or `--rules=fsdp` (as
training). `--server` plans what `python -m qwenvl_jax.serve` runs instead, the engine's own programs
(`inference.slot_programs`): B slots of C cache slots that live through every call, the decode call of all B
slots (`--decode_steps` steps over the whole context), the prefill of k requests' P-token prompts into k slot rows of
the donated slots' cache, the encoding of their k x M images (with the cache resident), and the copy of one slot
row's prompt onto another (`slot_programs.copy_prompt`, the n choices of one request; its whole context). B, k and
M default to serve's --num_slots, --prefill_batch and --max_images (`qwenvl_jax.serving_defaults`); P is --prompt,
by default C (serve compiles prefills of prompts up to C tokens, so the plan takes the longest; a generator plan's
default is 1024, at most C). `--max_slots` searches the most slots that fit (every program within HBM):

  python -m qwenvl_jax.planning.inference_plan --preset=qwen_vl_7b --topology=v5e-8 --quantize=none \
      --context=2048 --max_slots
  python -m qwenvl_jax.planning.inference_plan ... --json    # the figures as one JSON object on stdout, as `plan`'s
"""
from __future__ import annotations

import dataclasses
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding

from qwenvl_jax import config_args, errors, serving_defaults, sharding
from qwenvl_jax.hardware import chips
from qwenvl_jax.hardware.chips import GIB
from qwenvl_jax.inference import decode, layout, loading, slot_programs
from qwenvl_jax.model import QwenVL, get_preset
from qwenvl_jax.model import quantize as qlib
from qwenvl_jax.model.config import QwenVLConfig
from qwenvl_jax.planning import aot, mesh as mesh_lib, output

# What a plan holds when not told: `Generator`'s rows, one image each, all prefilled at once (prefill_batch 0 = the
# batch); a server plan holds `serve`'s defaults (its slots, its images per request and requests per prefill), so a
# server plan that says "fits" planned what `serve` compiles when given no size flags.
GENERATOR_SIZES = {"batch": 4, "images": 1, "prefill_batch": 0}
SERVER_SIZES = {"batch": serving_defaults.NUM_SLOTS, "images": serving_defaults.MAX_IMAGES,
                "prefill_batch": serving_defaults.PREFILL_BATCH}
GENERATOR_PROMPT = 1024  # prompt tokens of a generator plan's prefill (at most the context)


def default_prompt(context: int, server: bool) -> int:
  """The prompt length a plan's prefill takes when none is given: a server's is the whole context (serve compiles
  prefills of prompts up to --context tokens, so a "fits" must hold for the longest), a generator's
  `GENERATOR_PROMPT` tokens, at most the context."""
  return context if server else min(GENERATOR_PROMPT, context)


# What shrinks each program's temporaries (`aot.StepPlan.remedy`: printed under a program that does not fit, in
# place of a training step's batch / remat / tensor-axis advice).
REMEDIES = {
    "decode": "fewer rows (batch) or a shorter context",
    "prefill": "fewer rows per prefill (prefill_batch) or shorter prompts (prompt)",
    "server_decode": "fewer slots (serve's --num_slots) or a shorter context (--context)",
    "server_prefill": "fewer requests per prefill (serve's --prefill_batch) or a shorter context (serve's --context: "
                      "the longest prompt it prefills)",
    "encode": "fewer images per prefill (serve's --max_images x --prefill_batch)",
    "copy": "fewer slots (serve's --num_slots) or a shorter context (--context)",
}


def resident_remedy(facts: dict) -> str:
  """What shrinks the weights and KV cache that every program of a plan holds (`aot.StepPlan.resident_remedy`), in
  the words of the command it plans (`serve`; else `generate` / `evaluate`), leaving out what the plan already uses."""
  levers = []
  if facts["quantize"] != "int4":
    levers.append("int4 weights (--quantize=int4)" if facts["quantize"] == "int8" else "int8 or int4 weights "
                  "(--quantize)")
  if facts["kv_cache_dtype"] != "int8":
    levers.append("an int8 KV cache (--kv_cache_dtype=int8)")
  levers.append("fewer slots (serve's --num_slots) or a shorter context (--context)" if facts["server"] else
                "fewer rows (the plan's batch; evaluate's --config.per_device_batch_size) or a shorter context (the "
                "prompt and --max_new_tokens)")
  return ", ".join(levers) + ", or more chips (tensor parallelism)"


def _remedy(plan: aot.StepPlan | None, program: str, facts: dict) -> aot.StepPlan | None:
  return plan and dataclasses.replace(plan, remedy=REMEDIES[program], resident_remedy=resident_remedy(facts))


@dataclasses.dataclass(frozen=True)
class InferencePlan:
  """The two compiled programs' plans and what they were built from."""
  decode: aot.StepPlan
  prefill: aot.StepPlan | None
  weight_bytes: dict[str, int]      # whole model, by dtype (int4 counted as half a byte)
  cache_bytes: int                  # whole cache, all chips
  facts: dict
  encode: aot.StepPlan | None = None  # server: the engine's image encoding (the slots' cache stays resident)
  copy: aot.StepPlan | None = None  # server: one slot row's prompt onto another (the cache donated)

  def _programs(self) -> list[tuple[aot.StepPlan, int]]:
    """Each compiled program with the HBM per chip it needs while it runs: the server's encode program also has
    the slots' cache resident."""
    out = [(self.decode, self.decode.total_bytes)]
    if self.prefill is not None:
      out.append((self.prefill, self.prefill.total_bytes))
    if self.encode is not None:
      out.append((self.encode, self.encode.total_bytes + self.cache_bytes // self.encode.num_chips))
    if self.copy is not None:
      out.append((self.copy, self.copy.total_bytes))
    return out

  def _over(self, plan: aot.StepPlan | None) -> bool:
    """Whether `plan` (one of the programs, or None) does not fit."""
    return any(p is plan and (not p.fits or need > p.chip.hbm_bytes) for p, need in self._programs())

  def peak_bytes(self) -> int:
    """The most HBM per chip any program needs."""
    return max(need for _, need in self._programs())

  def fits(self) -> bool:
    return not any(self._over(p) for p, _ in self._programs())

  def format(self) -> str:
    f = self.facts
    weights = sum(self.weight_bytes.values())
    lines = [f"{'server' if f['server'] else 'inference'}: {f['model']} weights {f['quantize']}, KV cache "
             f"{f['kv_cache_dtype']}, {'slots' if f['server'] else 'batch'} {f['batch']}, "
             f"context {f['context']} slots, prompt {f['prompt']} tokens with {f['images']} image(s) per row, "
             f"layout {f['layout']} ({f['rules']}), {f.get('attention', 'xla')} attention",
             f"  weights {aot.format_bytes(weights)} ("
             + ", ".join(f"{k} {aot.format_bytes(v)}" for k, v in sorted(self.weight_bytes.items())) + ")",
             f"  KV cache {aot.format_bytes(self.cache_bytes)} "
             f"({self.cache_bytes / f['batch'] / f['context'] / 1024:.0f} KiB per token)",
             "decode step:", self.decode.format()]
    if self.prefill is not None:
      what = (f"server prefill ({f['prefill_batch']} request(s) into the {f['batch']} slots' cache)" if f["server"]
              else f"prefill ({f['prefill_batch']} row(s) at once)")
      lines += [f"{what}:", self.prefill.format()]
    if self.encode is not None:
      lines += [f"server image encoding ({f['prefill_batch'] * f['images']} image(s); the slots' cache, "
                f"{aot.format_bytes(self.cache_bytes / self.encode.num_chips)} per chip, stays resident):",
                self.encode.format()]
    if self.copy is not None:
      lines += [f"server prompt copy (one slot row's {f['context']} slots onto another, the n choices of one "
                f"request):", self.copy.format()]
    peak = self.peak_bytes()
    hbm = self.decode.chip.hbm_bytes
    programs = {1: "one", 2: "two", 3: "three", 4: "four"}[len(self._programs())]
    lines.append(f"peak of the {programs} programs: {aot.format_bytes(peak)} of {hbm / GIB:.0f} GiB per chip -> "
                 + ("FITS" if self.fits() else "DOES NOT FIT: " + self.what_would_fit()))
    return "\n".join(lines)

  def to_dict(self) -> dict:
    """`format()`'s figures as JSON values (`plan --inference=... --json`): each program's `StepPlan.to_dict()`,
    the whole model's weight and cache bytes, and the peak per chip."""
    fits = self.fits()
    return {"facts": self.facts, "weight_bytes": self.weight_bytes, "cache_bytes": self.cache_bytes,
            "decode": self.decode.to_dict(), "prefill": self.prefill and self.prefill.to_dict(),
            "encode": self.encode and self.encode.to_dict(), "copy": self.copy and self.copy.to_dict(),
            "peak_bytes_per_chip": self.peak_bytes(),
            "hbm_bytes": self.decode.chip.hbm_bytes, "fits": fits,
            "what_would_fit": None if fits else self.what_would_fit()}

  def what_would_fit(self) -> str:
    """What to change, naming the program that does not fit: a prefill or an image encoding over HBM is fixed by
    its own sizes (fewer requests or images at once, shorter prompts), not by fewer decode rows."""
    f = self.facts
    hbm = self.decode.chip.hbm_bytes
    tips = []
    if self._over(self.prefill):
      if f.get("prefill_batch", 1) > 1 and f.get("server"):
        tips.append(f"the prefill of {f['prefill_batch']} requests at once does not fit: plan it with "
                    f"prefill_batch=1 (serve's --prefill_batch; its temporaries need not shrink in proportion)")
      elif f.get("prefill_batch", 1) > 1:  # generate and evaluate prefill all their rows at once
        tips.append(f"the prefill of {f['prefill_batch']} rows at once does not fit: a smaller batch or a shorter "
                    f"prompt")
      else:
        tips.append(f"the prefill of one {f.get('prompt')}-token prompt does not fit: a shorter "
                    + ("context (serve's --context: the longest prompt it prefills)" if f.get("server") else "prompt"))
    if self._over(self.prefill) and f.get("attention") == "xla":
      tips.append("splash attention (--attention=splash; the plan's attention=splash) writes no [heads, P, P] "
                  "float32 scores per layer")
    if self._over(self.encode):
      tips.append(f"encoding {f.get('prefill_batch', 1) * f.get('images', 0)} images at once does not fit: fewer "
                  f"images per request or fewer requests per prefill (serve's --max_images, --prefill_batch)")
    if tips and not self._over(self.decode):
      return "; ".join(tips)
    per_row_cache = self.cache_bytes / f["batch"] / self.decode.num_chips
    fixed = self.decode.argument_bytes - self.cache_bytes / self.decode.num_chips
    rows = int((aot.TIGHT_FRACTION * hbm - fixed - self.decode.temp_bytes) // max(per_row_cache, 1))
    tips.append(f"at most ~{max(rows, 0)} {'slots' if f.get('server') else 'rows'} with this cache")
    if f["kv_cache_dtype"] != "int8":
      tips.append("an int8 KV cache (--kv_cache_dtype=int8) halves the cache")
    if f["quantize"] != "int4":
      tips.append("int4 weights (--quantize=int4) halve the weights")
    tips.append("or more chips (fsdp over a larger topology)")
    return "; ".join(tips)


def _abstract(shape, dtype, axes, mesh, rules) -> jax.ShapeDtypeStruct:
  """An abstract argument laid out over `mesh` by the logical `axes` under `rules`."""
  return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(
      mesh, sharding.resolve_spec(shape, axes, rules, dict(mesh.shape))))


def abstract_cache(cfg: QwenVLConfig, batch: int, context: int, kv_cache_dtype: str | None, mesh, rules):
  """`ShapeDtypeStruct`s of an empty KV cache, rows sharded like the batch, heads like the tensor axis."""
  llm = nnx.eval_shape(lambda: QwenVL(cfg, rngs=nnx.Rngs(0))).llm
  cache = jax.eval_shape(lambda: llm.init_cache(batch, context, dtype=kv_cache_dtype))
  kv_axes = ("layers", "cache_batch", "cache_heads", "cache_len", "cache_head_dim")  # `KVCache` layout
  shard = lambda x, axes: _abstract(x.shape, x.dtype, axes, mesh, rules)
  fields = {name: getattr(cache, name) for name in cache._fields}
  out = {k: (shard(v, kv_axes) if v is not None and v.ndim == 5 else v) for k, v in fields.items()}
  out["segment_ids"] = shard(cache.segment_ids, ("cache_batch", "cache_len"))
  return type(cache)(**out)


def plan_inference(cfg: QwenVLConfig, topology: chips.Topology, *, quantize: str | None, batch: int,
                   context: int, prompt: int, images: int | None = None, kv_cache_dtype: str | None = None,
                   rules_name: str = layout.DEFAULT_RULES, group_size: int = qlib.DEFAULT_GROUP_SIZE,
                   with_prefill: bool = True, prefill_batch: int | None = None, tensor_parallel: int = 0,
                   server: bool = False, decode_steps: int = serving_defaults.DECODE_STEPS,
                   batch_flag: str = "--batch", tensor_flag: str = "--tensor_parallel",
                   attention: str | None = None) -> InferencePlan:
  """AOT-compiles the decode step (and prefill) of `cfg` on `topology`; see the module docstring.

  images: images per row (None: 1; with `server`, serve's --max_images: the most a request may hold).
  prefill_batch: rows prefilled together (None or 0: `batch`, as `Generator` does; with `server`, serve's
    --prefill_batch, at most `batch` slots, as `serving.Engine` caps it).
  rules_name, tensor_parallel: the layout (`inference.layout.make_inference_mesh` over the topology's devices).
  server: plan the serving engine's own programs (`inference.slot_programs`, what `serving.slots` jits): the
    decode call of all `batch` slots (`decode_steps` steps attending to the whole context), the prefill of
    `prefill_batch` requests into the slots' cache, and the encoding of their images (with the cache resident).
  batch_flag, tensor_flag: how the caller names the slots and the tensor degree in an error ('--batch';
    `plan --inference`: '--inference: batch', 'tensor_parallel in --inference').
  attention: the model's `attention_impl` as serve's --attention sets it (`inference.loading.ATTENTION`; None:
    `cfg`'s).

  Raises:
    errors.ConfigError: with `server`, slots that do not split over the model replicas (`serve` refuses them).
  """
  images, prefill_batch = _sizes(server, batch, images, prefill_batch)
  if attention is not None:
    cfg = dataclasses.replace(cfg, attention_impl=attention)
  if prompt > context:
    raise ValueError(f"prompt {prompt} is longer than the context {context}")
  devices = mesh_lib.topology_devices(topology)
  mesh, rules = layout.make_inference_mesh(cfg, rules_name, tensor_parallel=tensor_parallel, devices=devices)
  if server:  # serve's own check: a plan that says "fits" for slots serve refuses misleads
    layout.check_slots(batch, mesh, rules, flag=batch_flag, tensor_flag=tensor_flag)

  def make():
    model = QwenVL(cfg, rngs=nnx.Rngs(0))
    return qlib.quantize_model(model, qlib.QuantConfig(mode=quantize, group_size=group_size)) if quantize else model

  graphdef, abstract_state = sharding.abstract_model(make)
  state = aot.abstract_like(nnx.to_pure_dict(abstract_state),
                            nnx.to_pure_dict(sharding.state_shardings(abstract_state, rules, mesh)))

  def as_state(pure: dict) -> nnx.State:
    out = jax.tree.map(lambda x: x, abstract_state)
    nnx.replace_by_pure_dict(out, pure)
    return out
  cache = abstract_cache(cfg, batch, context, kv_cache_dtype, mesh, rules)
  facts = _facts(cfg, quantize, kv_cache_dtype, batch, prefill_batch, context, prompt, images, mesh, rules_name,
                 server)
  if server:
    return _plan_server(cfg, topology, graphdef, state, as_state, cache, mesh, rules, batch=batch, context=context,
                        prompt=prompt, images=images, prefill_batch=prefill_batch, with_prefill=with_prefill,
                        decode_steps=decode_steps, facts=facts, weight_bytes=qlib.weight_bytes(abstract_state))
  vec = lambda n, dtype: _abstract((n,), dtype, ("act_batch",), mesh, rules)
  scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=aot.replicated(mesh))

  def decode_fn(state, tokens, positions, cache, index, rope_base):
    return decode.decode_step(graphdef, as_state(state), tokens, positions, cache, index, rope_base=rope_base)

  with sharding.use_rules(mesh, rules):
    _, decode_plan = aot.compile_step(decode_fn, (state, vec(batch, jnp.int32), vec(batch, jnp.int32), cache,
                                                  scalar, vec(batch, jnp.float32)),
                                      chip=topology.chip, mesh=mesh, donate_argnums=3, count_program_flops=False,
                                      keep_unused=True, tokens=batch)  # the ViT's weights are resident too
  decode_plan = _remedy(decode_plan, "decode", facts)
  prefill_plan = None
  if with_prefill:
    s, k = cfg.vision.image_size, prefill_batch
    pcache = abstract_cache(cfg, k, context, kv_cache_dtype, mesh, rules)
    seq = lambda: _abstract((k, prompt), jnp.int32, ("act_batch", None), mesh, rules)
    arrays = {"input_ids": seq(), "segment_ids": seq(), "positions": seq()}
    if images:
      arrays["images"] = _abstract((k, images, s, s, 3), jnp.uint8, ("act_batch",) + (None,) * 4, mesh, rules)
      arrays["image_mask"] = _abstract((k, images), jnp.bool_, ("act_batch", None), mesh, rules)

    def prefill_fn(state, arrays, cache, rope_base):
      return decode.prefill(graphdef, as_state(state), arrays, cache, rope_base=rope_base)

    with sharding.use_rules(mesh, rules):
      _, prefill_plan = aot.compile_step(prefill_fn, (state, arrays, pcache, vec(k, jnp.float32)),
                                         chip=topology.chip, mesh=mesh, donate_argnums=2,
                                         count_program_flops=False, keep_unused=True, tokens=k * prompt)
  return InferencePlan(decode_plan, _remedy(prefill_plan, "prefill", facts), qlib.weight_bytes(abstract_state),
                       _tree_bytes(cache), facts)


def _sizes(server: bool, batch: int, images: int | None, prefill_batch: int | None) -> tuple[int, int]:
  """(images per row, rows per prefill) of a plan: those given, else `GENERATOR_SIZES` / `SERVER_SIZES`'s."""
  defaults = SERVER_SIZES if server else GENERATOR_SIZES
  images = defaults["images"] if images is None else images
  prefill_batch = prefill_batch or defaults["prefill_batch"] or batch
  # The engine prefills at most its slots at once (`serving.Engine.prefill_sizes`), and encodes their images.
  return images, min(prefill_batch, batch) if server else prefill_batch


def _tree_bytes(tree) -> int:
  return sum(int(x.size) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _facts(cfg, quantize, kv_cache_dtype, batch, prefill_batch, context, prompt, images, mesh, rules_name,
           server) -> dict:
  return {"model": f"{cfg.llm.layers}-layer LLM, {cfg.vision.image_size} px", "quantize": quantize or "none",
          "kv_cache_dtype": kv_cache_dtype or cfg.dtype, "batch": batch, "prefill_batch": prefill_batch,
          "context": context, "prompt": prompt, "images": images, "mesh": dict(mesh.shape),
          "layout": layout.describe(mesh), "rules": rules_name, "server": server, "attention": cfg.attention_impl}


def _plan_server(cfg, topology, graphdef, state, as_state, cache, mesh, rules, *, batch, context, prompt, images,
                 prefill_batch, with_prefill, decode_steps, facts, weight_bytes) -> InferencePlan:
  """The serving engine's four programs (`inference.slot_programs`) on abstract arguments: the decode call of
  all `batch` slots over the whole context (the largest window), the prefill of `prefill_batch` prompts of `prompt`
  tokens into the slots' cache (donated to both, as `serving.slots.SlotModel` does), the image encoding of
  their images (`images` each), and the copy of one row's whole context onto another (the cache donated)."""
  def sharded(shape, dtype, axes):
    return _abstract(shape, dtype, axes, mesh, rules)

  def rows(n, dtype):
    return sharded((n,), dtype, ("act_batch",))

  def by_rows(tree):  # abstract arrays of `tree`'s shapes and dtypes, rows over the batch axes
    return jax.tree.map(lambda x: sharded(x.shape, x.dtype, ("act_batch",) + (None,) * (x.ndim - 1)), tree)

  def sampling(n):  # the per-row settings' shapes and dtypes, as `Sampling.greedy` makes them
    return by_rows(slot_programs.Sampling.greedy(n))

  # The slots' token history (`slot_programs.TokenHistory`: the penalties' and the logit bias'), donated with the
  # cache: the shapes `init_history` makes, rows over the batch axes as it constrains them.
  history = by_rows(jax.eval_shape(lambda: slot_programs.init_history(batch, cfg.llm.vocab_size)))

  def decode_fn(state, cache, history, tokens, positions, active, rope_base, samp):
    return slot_programs.decode(graphdef, None, decode_steps, context, as_state(state), cache, history, tokens,
                                positions, active, rope_base, samp)

  with sharding.use_rules(mesh, rules):
    _, decode_plan = aot.compile_step(
        decode_fn, (state, cache, history, rows(batch, jnp.int32), rows(batch, jnp.int32), rows(batch, jnp.bool_),
                    rows(batch, jnp.float32), sampling(batch)),
        chip=topology.chip, mesh=mesh, donate_argnums=(1, 2), count_program_flops=False, keep_unused=True,
        tokens=batch * decode_steps)
  decode_plan = _remedy(decode_plan, "server_decode", facts)
  if not with_prefill:
    return InferencePlan(decode_plan, None, weight_bytes, _tree_bytes(cache), facts)
  k, q, d, s = prefill_batch, cfg.image_tokens, cfg.llm.width, cfg.vision.image_size
  feature_slots = max(1, k * images)

  def prefill_fn(state, cache, history, ids, lengths, first_image, feats, slot_rows, rope_base, samp, bias_ids,
                 bias_values, stop_ids):
    return slot_programs.prefill(graphdef, None, as_state(state), cache, history, ids, lengths, first_image, feats,
                                 slot_rows, rope_base, samp, bias_ids, bias_values, stop_ids)

  def encode_fn(state, pixels):
    return slot_programs.encode(graphdef, feature_slots, as_state(state), pixels)

  def copy_fn(cache, history, src, dst):
    return slot_programs.copy_prompt(context, cache, history, src, dst)

  feats = sharded((feature_slots, q, d), cfg.dtype, (None, None, None))
  with sharding.use_rules(mesh, rules):
    _, prefill_plan = aot.compile_step(
        prefill_fn, (state, cache, history, sharded((k, prompt), jnp.int32, ("act_batch", None)),
                     rows(k, jnp.int32), rows(k, jnp.int32), feats, rows(k, jnp.int32), rows(k, jnp.float32),
                     sampling(k), *by_rows(slot_programs.no_bias(k, cfg.llm.vocab_size)),
                     by_rows(slot_programs.no_stops(k, cfg.llm.vocab_size))),
        chip=topology.chip, mesh=mesh, donate_argnums=(1, 2), count_program_flops=False, keep_unused=True,
        tokens=k * prompt)
    encode_plan = None
    if images:
      _, encode_plan = aot.compile_step(
          encode_fn, (state, sharded((feature_slots, s, s, 3), jnp.uint8, (None,) * 4)),
          chip=topology.chip, mesh=mesh, count_program_flops=False, keep_unused=True)
    scalar = sharded((), jnp.int32, ())
    _, copy_plan = aot.compile_step(copy_fn, (cache, history, scalar, scalar), chip=topology.chip, mesh=mesh,
                                    donate_argnums=(0, 1), count_program_flops=False)
  return InferencePlan(decode_plan, _remedy(prefill_plan, "server_prefill", facts), weight_bytes, _tree_bytes(cache),
                       facts, _remedy(encode_plan, "encode", facts), _remedy(copy_plan, "copy", facts))


# The keys of `python -m qwenvl_jax.plan --inference=key=value,...` and their defaults (which give their types);
# with server=true, batch, images and prefill_batch default to `SERVER_SIZES` (serve's).
INFERENCE_ARG_DEFAULTS = {"quantize": "int8", "batch": GENERATOR_SIZES["batch"], "context": serving_defaults.CONTEXT,
                          "prompt": 0, "images": GENERATOR_SIZES["images"], "kv_cache_dtype": "bfloat16",
                          "prefill_batch": GENERATOR_SIZES["prefill_batch"], "decode_only": False,
                          "group_size": qlib.DEFAULT_GROUP_SIZE, "rules": layout.DEFAULT_RULES, "tensor_parallel": 0,
                          "server": False, "attention": "xla"}


def inference_arg_keys() -> str:
  """The keys of --inference and their defaults, for its help: 'quantize [int8], batch [4; server: 8], ...'."""
  shown = {**INFERENCE_ARG_DEFAULTS, "prompt": f"{GENERATOR_PROMPT}, at most context"}
  servers = {**SERVER_SIZES, "prompt": "context"}
  return ", ".join(f"{k} [{v}" + (f"; server: {servers[k]}]" if k in servers else "]") for k, v in shown.items())


def parse_inference_arg(arg: str) -> dict:
  """The plan_inference keyword arguments of an `--inference=quantize=int8,batch=8,kv_cache_dtype=int8` string
  (keys and defaults: `INFERENCE_ARG_DEFAULTS`, with server=true `SERVER_SIZES`; '' or 'default' = all defaults).

  Raises:
    errors.ConfigError: an unknown key, a value of the wrong type, or an unknown quantization / cache dtype.
  """
  arg = "" if arg in ("", "default", "true", "1") else arg
  try:
    given = config_args.parse_arg(arg, INFERENCE_ARG_DEFAULTS)
  except ValueError as e:
    raise errors.ConfigError(f"--inference: {e}") from None
  values = {**INFERENCE_ARG_DEFAULTS, **(SERVER_SIZES if given.get("server") else {}), **given}
  if "prompt" not in given:
    values["prompt"] = default_prompt(values["context"], values["server"])
  if values["quantize"] not in ("none", "int8", "int4"):
    raise errors.ConfigError(f"--inference: quantize={values['quantize']!r}; expected none, int8 or int4")
  if values["kv_cache_dtype"] not in ("bfloat16", "int8"):
    raise errors.ConfigError(f"--inference: kv_cache_dtype={values['kv_cache_dtype']!r}; expected bfloat16 or int8")
  if values["attention"] not in loading.ATTENTION:
    raise errors.ConfigError(f"--inference: attention={values['attention']!r}; expected "
                             + " or ".join(loading.ATTENTION))
  check_sizes(values, lambda key: f"--inference: {key}={values[key]}")
  return {"quantize": None if values["quantize"] == "none" else values["quantize"], "batch": values["batch"],
          "context": values["context"], "prompt": values["prompt"], "images": values["images"],
          "kv_cache_dtype": "int8" if values["kv_cache_dtype"] == "int8" else None, "rules_name": values["rules"],
          "group_size": values["group_size"], "with_prefill": not values["decode_only"],
          "prefill_batch": values["prefill_batch"] or None, "tensor_parallel": values["tensor_parallel"],
          "server": values["server"], "attention": values["attention"]}


def check_sizes(values: dict, name) -> None:
  """Refuses sizes no plan has: rows, context or prompt below 1, a prompt longer than the context, negative
  images, prefill rows or tensor degree (0 = the default), decode steps below 1. `name(key)` spells the flag.

  Raises:
    errors.ConfigError: naming the flag.
  """
  for key, minimum in (("batch", 1), ("context", 1), ("prompt", 1), ("images", 0), ("prefill_batch", 0),
                       ("tensor_parallel", 0), ("decode_steps", 1)):
    if key in values and values[key] < minimum:
      raise errors.ConfigError(f"{name(key)} must be {'positive' if minimum else '>= 0'}")
  if values["prompt"] > values["context"]:
    raise errors.ConfigError(f"{name('prompt')} is longer than context={values['context']}")


def inference_model_config(preset: str, res: int | None = None) -> QwenVLConfig:
  """The serving numerics of `preset` at `res` px (None: the preset's, as `serve --model` without --image_size):
  bf16 weights and compute, no remat (xla attention: `plan_inference`'s `attention` sets another)."""
  cfg = get_preset(preset, dtype="bfloat16", param_dtype="bfloat16", remat_policy="none")
  return cfg if res is None else cfg.with_image_size(res)


@dataclasses.dataclass(frozen=True)
class SlotSearch:
  """The outcome of `max_slots`: the most slots that fit, the plan there, and the probes (slots -> peak bytes per
  chip of both programs, or None where a program did not fit)."""
  slots: int
  plan: InferencePlan | None
  probes: dict[int, int | None]
  granularity: int
  does_not_fit: int | None = None   # the fewest slots found not to fit

  def format(self) -> str:
    f = self.plan.facts if self.plan else {}
    probes = ", ".join(f"{b}: {'over HBM' if v is None else f'{v / GIB:.2f} GiB'}"
                       for b, v in sorted(self.probes.items()))
    head = (f"most slots that fit: {self.slots} ({self.does_not_fit} do not; slots in multiples of "
            f"{self.granularity}; context {f.get('context')}, weights {f.get('quantize')}, KV cache "
            f"{f.get('kv_cache_dtype')}, layout {f.get('layout')})")
    return "\n".join([head, f"  peak per chip by slots: {probes}"] + ([self.plan.format()] if self.plan else []))

  def to_dict(self) -> dict:
    """`format()`'s search figures as JSON values (`--max_slots --json`; the plan at `slots` is reported beside
    it): the slots found, the fewest found not to fit, the granularity and each probe's peak bytes per chip (None:
    over HBM)."""
    return {"slots": self.slots, "does_not_fit": self.does_not_fit, "granularity": self.granularity,
            "probes": [{"slots": b, "peak_bytes_per_chip": v} for b, v in sorted(self.probes.items())]}


def max_slots(plan_at, *, granularity: int, start: int, hbm_bytes: int, log=print) -> SlotSearch:
  """The most slots B (a multiple of `granularity`) for which `plan_at(B, with_prefill)` fits in `hbm_bytes`.

  Memory grows about linearly in B (the cache and the per-slot temporaries), so each next probe is where the line
  through the two probes nearest to the limit reaches it (a secant step, kept strictly inside the bracket of the
  largest B known to fit and the smallest known not to, else the bracket's middle). The search runs on the decode
  step alone (the larger program of a server with many slots), then checks the answer with the prefill too and
  searches on both programs only if the prefill is the one that does not fit. Every compile is logged with its
  wall time; a full-size search takes about 5 to 8 compiles.
  """
  g = granularity
  seen: dict[tuple[int, bool], tuple[int, bool]] = {}
  plans: dict[tuple[int, bool], InferencePlan] = {}

  def probe(b: int, full: bool) -> bool:
    if (b, full) not in seen:
      t = time.perf_counter()
      plans[(b, full)] = plan_at(b, full)
      # Over HBM, the peak is the bytes XLA's refusal names.
      seen[(b, full)] = plans[(b, full)].peak_bytes(), plans[(b, full)].fits()
      used, fits = seen[(b, full)]
      log(f"  {b} slots{'' if full else ' (decode step only)'}: {used / GIB:.2f} GiB per chip"
          f"{'' if fits else ' -> over HBM'} ({time.perf_counter() - t:.0f} s)")
    return seen[(b, full)][1]

  def next_probe(full: bool, lo: int, hi: int | None) -> int:
    # Only programs that compiled give exact bytes (a refusal's figure is XLA's estimate of a different total).
    points = sorted(((b, seen[(b, f)][0]) for (b, f), (_, fits) in seen.items() if f == full and fits),
                    key=lambda p: abs(p[1] - hbm_bytes))[:2]
    guess = None
    if len(points) == 2:
      (b1, y1), (b2, y2) = points
      slope = (y2 - y1) / (b2 - b1)
      if slope > 0:  # aim a little below the limit: an overshoot costs a compile that cannot fit
        guess = int((b1 + (0.995 * hbm_bytes - y1) / slope) // g * g)
    middle = None if hi is None else (lo + hi) // 2 // g * g
    if hi is None and guess is not None and guess < lo + g:  # the line says lo is the answer: bracket it
      guess = lo + resolution(lo)
    elif guess is None or guess < lo + g or (hi is not None and guess > hi - g):
      guess = 2 * lo if hi is None else middle
    elif hi is not None:  # at most halfway up after an overshoot, else 3/4: a convex curve cannot stall it
      guess = min(guess, middle if last_failed[0] else (lo + 3 * (hi - lo) // 4) // g * g)
    return max(guess, lo + g)

  last_failed = [False]

  def resolution(lo: int) -> int:
    # The answer is known to a slot granule, or to 2 % of it (a handful of slots at full size).
    return max(g, int(0.02 * lo) // g * g)

  def search(full: bool, lo: int, hi: int | None) -> int:
    while hi is None or hi - lo > resolution(lo):
      b = next_probe(full, lo, hi)
      fits = probe(b, full)
      last_failed[0] = not fits
      lo, hi = (b, hi) if fits else (lo, b)
    bracket[full] = hi
    return lo

  bracket: dict[bool, int | None] = {}
  b = max(g, start // g * g)
  while not probe(b, False):
    if b == g:
      return SlotSearch(0, None, {k: None for (k, _) in seen}, g, g)
    b = max(g, b // 2 // g * g)
  lo = search(False, b, None)
  if not probe(lo, True):
    lo = search(True, 0, lo)
  probes = {b: used if fits else None for (b, full), (used, fits) in seen.items() if full or not fits}
  return SlotSearch(lo, plans.get((lo, True)), probes, g, bracket.get(True, bracket.get(False)))


def model_to_dict(preset: str, cfg: QwenVLConfig) -> dict:
  """The planned model as JSON values (`--json`): its preset, image size and decoder layers."""
  return {"name": preset, "image_size": cfg.vision.image_size, "llm_layers": cfg.llm.layers}


def run(*, preset: str, res: int | None, topology: str, quantize: str | None, kv_cache_dtype: str | None,
        batch: int | None, context: int, prompt: int | None, images: int | None, prefill_batch: int | None,
        tensor_parallel: int, decode_steps: int, rules_name: str, group_size: int, with_prefill: bool, server: bool,
        slot_search: bool, llm_layers: int = 0, as_json: bool = False, attention: str = "xla") -> dict:
  """The command's work once its flags are read (batch, images, prefill_batch: None where not given, then
  `GENERATOR_SIZES`'s, or `SERVER_SIZES`'s for a server): the plan, or with `slot_search` the most server slots
  that fit, printed by `output`. Returns the report object (with `as_json` printed alone on stdout, the report
  then on stderr): model, topology, inference (the plan's `to_dict()`; a search's at the slots found, None when
  none fit) and max_slots (the search's `to_dict()`, None without one).

  Raises:
    errors.UserError: a size no plan has, an unknown topology, no libtpu.
  """
  server = server or slot_search
  prompt = default_prompt(context, server) if prompt is None else prompt
  given = {"batch": batch, "images": images, "prefill_batch": prefill_batch}
  values = {**(SERVER_SIZES if server else GENERATOR_SIZES), **{k: v for k, v in given.items() if v is not None},
            "context": context, "prompt": prompt, "tensor_parallel": tensor_parallel, "decode_steps": decode_steps}
  check_sizes(values, lambda key: f"--{key}={values[key]}")
  say = lambda *lines: output.say(*lines, as_json=as_json)
  cfg = inference_model_config(preset, res)
  if llm_layers:
    cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, layers=llm_layers))
  slice_ = chips.parse_topology(topology, 1)
  report = {"model": model_to_dict(preset, cfg), "topology": output.topology_to_dict(slice_), "inference": None,
            "max_slots": None}
  say(f"{slice_.describe()}\ncompiling (minutes for the full model) ...")

  def plan_at(b: int, full: bool) -> InferencePlan:
    return plan_inference(cfg, slice_, quantize=quantize, batch=b, context=context, prompt=prompt,
                          images=values["images"], kv_cache_dtype=kv_cache_dtype, rules_name=rules_name,
                          group_size=group_size, with_prefill=full, prefill_batch=values["prefill_batch"] or None,
                          tensor_parallel=tensor_parallel, server=server, decode_steps=decode_steps,
                          attention=attention)

  if slot_search:
    mesh, rule_table = layout.make_inference_mesh(cfg, rules_name, tensor_parallel=tensor_parallel,
                                                  devices=mesh_lib.topology_devices(slice_))
    granularity = sharding.batch_shards(mesh, rule_table)
    say(f"layout {layout.describe(mesh)} ({rules_name}); slots in multiples of {granularity}")
    result = max_slots(plan_at, granularity=granularity, start=values["batch"], hbm_bytes=slice_.chip.hbm_bytes,
                       log=say)
    say(result.format())
    report["max_slots"] = result.to_dict()
    report["inference"] = result.plan and result.plan.to_dict()
  else:
    result = plan_at(values["batch"], with_prefill)
    say(result.format())
    report["inference"] = result.to_dict()
  output.emit(report, as_json=as_json)
  return report


def _cli() -> None:
  """Command-line flags (defined only when run as a program) and the report."""
  from absl import app, flags  # pylint: disable=import-outside-toplevel
  gen, srv = GENERATOR_SIZES, SERVER_SIZES
  flags.DEFINE_string("preset", "qwen_vl_7b", "Model preset (tiny, mid, qwen_vl_7b).")
  flags.DEFINE_integer("res", None, "Input resolution (default: the preset's, 448 for qwen_vl_7b).")
  flags.DEFINE_string("topology", "v5e-1", "TPU slice, e.g. v5e-1, v5e-8, v4-8.")
  flags.DEFINE_enum("quantize", "int8", ["none", "int8", "int4"], "Weight quantization.")
  flags.DEFINE_integer("group_size", qlib.DEFAULT_GROUP_SIZE, "int4 group size.")
  flags.DEFINE_integer("batch", None, f"Rows decoded together (default {gen['batch']}); with --server the slots "
                       f"(default serve's --num_slots, {srv['batch']}); with --max_slots the first probe.")
  flags.DEFINE_integer("context", serving_defaults.CONTEXT, "KV cache slots (prompt + new tokens; default serve's "
                       "--context).")
  flags.DEFINE_integer("prompt", None, f"Prompt tokens of the prefill plan (default {GENERATOR_PROMPT}, at most "
                       "--context; with --server the whole --context, the longest prefill serve compiles).")
  flags.DEFINE_integer("images", None, f"Images per row in the prefill plan (default {gen['images']}; with --server "
                       f"serve's --max_images, {srv['images']}).")
  flags.DEFINE_enum("kv_cache_dtype", "bfloat16", ["bfloat16", "int8"], "KV cache storage.")
  flags.DEFINE_enum("attention", "xla", list(loading.ATTENTION), "Attention of the image encoder and the prefill "
                    "(serve's, generate's --attention): xla, or splash (the TPU kernel).")
  flags.DEFINE_string("rules", layout.DEFAULT_RULES, "Sharding rule table: inference_tp (tensor parallel "
                      "within a host, replicas across hosts: what generate/evaluate/serve use) or fsdp.")
  flags.DEFINE_integer("tensor_parallel", 0, "Chips per model replica (0 = one host's).")
  flags.DEFINE_bool("decode_only", False, "Compile only the decode step.")
  flags.DEFINE_integer("prefill_batch", None, "Rows prefilled together (default: all --batch rows; with --server "
                       f"serve's --prefill_batch, {srv['prefill_batch']}, at most --batch; 0 = the default).")
  flags.DEFINE_bool("server", False, "Plan the serving engine: --batch slots of --context cache slots.")
  flags.DEFINE_integer("decode_steps", serving_defaults.DECODE_STEPS, "With --server: decode steps per engine call "
                       "(serve's --decode_steps).")
  flags.DEFINE_integer("llm_layers", 0, "Decoder layers (0 = the preset's); fewer for a quick, "
                       "smaller compile (bench/plan_server_slots.py extrapolates from them).")
  flags.DEFINE_bool("max_slots", False, "Search the most server slots that fit (implies --server; "
                    "--batch is the first probe).")
  flags.DEFINE_bool("json", False, "Print the figures as one JSON object on stdout (the report goes to stderr): the "
                    "model, the topology, the plan's programs (memory per chip, step times, the peak, fits) and "
                    "with --max_slots the search's probes.")

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    run(preset=f.preset, res=f.res, topology=f.topology, quantize=None if f.quantize == "none" else f.quantize,
        kv_cache_dtype="int8" if f.kv_cache_dtype == "int8" else None, batch=f.batch, context=f.context,
        prompt=f.prompt, images=f.images, prefill_batch=f.prefill_batch, tensor_parallel=f.tensor_parallel,
        decode_steps=f.decode_steps, rules_name=f.rules, group_size=f.group_size, with_prefill=not f.decode_only,
        server=f.server, slot_search=f.max_slots, llm_layers=f.llm_layers, as_json=f.json, attention=f.attention)

  def guarded(argv):  # a user mistake (no libtpu, an unknown topology) is one line and status 2, as in `plan`
    try:
      return main(argv)
    except errors.UserError as e:
      print(errors.format_user_error(e), file=sys.stderr, flush=True)
      sys.exit(errors.USER_ERROR_EXIT_CODE)

  app.run(guarded)


if __name__ == "__main__":
  _cli()
