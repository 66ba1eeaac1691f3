"""Plans a configured model without allocating it: parameter counts by component via `jax.eval_shape`, and with
`--topology` the AOT-compiled train step for a TPU slice (per-chip memory, compiler FLOPs, step time, MFU).

  python -m qwenvl_jax.plan --config=configs/stage2.py:model=qwen_vl_7b
  python -m qwenvl_jax.plan --preset=qwen_vl_7b --res=448
  python -m qwenvl_jax.plan --config=configs/stage2.py:model=qwen_vl_7b --topology=v5p-128   # needs libtpu:
      # pip install -r requirements-tpu-aot.txt; see qwenvl_jax/planning/train_plan.py
  python -m qwenvl_jax.plan --config=configs/stage3.py:model=qwen_vl_7b,lora=64 --topology=v6e-1 \\
      --config.batch_size=1 --config.accum_steps=1       # a LoRA run: bf16 base, f32 adapters and their AdamW
  python -m qwenvl_jax.plan --preset=qwen_vl_7b --topology=v5e-1 \\
      --inference=quantize=int8,batch=8,context=2048,kv_cache_dtype=int8   # serving: planning/inference_plan.py
  python -m qwenvl_jax.plan ... --json     # the same figures as one JSON object on stdout, the report on stderr

The count reads the same config the trainer reads (`config.model` preset, `config.res`), builds the model under
`nnx.eval_shape` (shapes only, nothing materialized) and prints the ViT trunk, the adapter (resampler + ln_post +
proj), the LLM and the total, plus how many parameters each stage trains.
"""

from __future__ import annotations

import functools
import os
import sys
import time

from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from qwenvl_jax import cli

from qwenvl_jax import errors
from qwenvl_jax import sharding
from qwenvl_jax.model import QwenVL, QwenVLConfig, get_preset, lora
from qwenvl_jax.planning import inference_plan, output, search, train_plan
from qwenvl_jax.training import peft
from qwenvl_jax.training.optimizer import make_is_frozen, stage_frozen_patterns

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config (configs/stageN.py[:args]).",
                                          lock_config=False)
_PRESET = flags.DEFINE_string("preset", None, "Model preset when no --config is given (tiny, mid, qwen_vl_7b).")
_RES = flags.DEFINE_integer("res", None, "Input resolution when no --config is given (224 or 448).")
_TOPOLOGY = flags.DEFINE_string("topology", None, "Also AOT-compile the train step for this TPU slice "
                                "(v5p-128, v4-128, v5e-256, v6e-64, v5p:4x4x8); needs --config and libtpu.")
_NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "Identical slices over DCN (with --topology).")
_INFERENCE = flags.DEFINE_string(
    "inference", None, "With --topology: plan inference instead of training, i.e. AOT-compile the decode step and "
    "the prefill of the --config's (or --preset's) model with bf16 or quantized weights, e.g. "
    "--inference=quantize=int8,batch=8,context=2048,kv_cache_dtype=int8 (keys: " + inference_plan.inference_arg_keys()
    + "); '' = the defaults; server=true plans serve's own programs, with serve's default sizes.")
_SEARCH = flags.DEFINE_bool("search", False, "With --topology: search remat x micro-batches x (fsdp, tensor) x "
                            "attention kernel for the configured batch and rank the plans that fit.")
_MAX_COMPILES = flags.DEFINE_integer("max_compiles", 4, "With --search: AOT compiles at most (minutes each at "
                                     "full size); the rest are ranked by the analytic estimate.")
_SEARCH_CACHE = flags.DEFINE_string("search_cache", os.path.join(os.path.expanduser("~"), ".cache", "qwenvl_jax",
                                                                 "plan_search"),
                                    "With --search: compiled results kept here between runs ('' = none).")
_SEARCH_REMATS = flags.DEFINE_list("search_remat", list(search.REMATS), "With --search: remat policies tried.")
_SEARCH_TENSOR = flags.DEFINE_list("search_tensor", [str(t) for t in search.TENSOR_DEGREES],
                                   "With --search: tensor-parallel degrees tried.")
_SEARCH_ATTENTION = flags.DEFINE_list("search_attention", list(search.ATTENTIONS),
                                      "With --search: attention kernels tried.")
_JSON = flags.DEFINE_bool("json", False, "Print the figures as one JSON object on stdout (the report goes to stderr): "
                          "parameter counts, and with --topology memory per chip, step times, tokens/s, MFU, "
                          "micro-batches, the search's rows and best flags, or the --inference programs.")

# How an error of the planned server names --inference's keys (it read "a larger --inference: tensor_parallel").
INFERENCE_KEY_NAMES = {"batch_flag": "--inference: batch", "tensor_flag": "tensor_parallel in --inference"}

# Flags that only mean something beside another one; alone they were ignored without a word.
_BELONGS_TO = (("num_slices", "topology"), ("search", "topology"), ("max_compiles", "search"),
               ("search_cache", "search"), ("search_remat", "search"), ("search_tensor", "search"),
               ("search_attention", "search"))


def check_flag_combination(given: dict[str, str], *, topology: str | None, search: bool, num_slices: int,
                           inference: bool = False) -> None:
  """Refuses a flag the run would ignore: --num_slices or --search without --topology, a --search_* flag or
  --max_compiles without --search, any of the search's flags with --inference; and a --num_slices below 1.
  `given` maps each flag the user gave to its spelling ('num_slices' -> '--num_slices=2'; a false --nosearch is
  no search).

  Raises:
    errors.ConfigError: naming the flag and the one it belongs to.
  """
  given = {k: v for k, v in given.items() if k != "search" or search}
  for flag, parent in _BELONGS_TO:
    if flag not in given:
      continue
    if inference and "search" in (flag, parent):
      what = "--search ranks" if flag == "search" else f"{given[flag]} belongs to --search, which ranks"
      raise errors.ConfigError(f"{what} training layouts: drop it with --inference")
    if flag == "search" and not topology:
      raise errors.ConfigError("--search ranks layouts for a TPU slice: give --topology (e.g. v5p-128)")
    if not {"topology": topology, "search": search}[parent]:
      example = "--topology=v5p-128" if parent == "topology" else "--search"
      raise errors.ConfigError(f"{given[flag]} applies to --{parent}, which is not given: it would be ignored",
                               hint=f"add {example}, or drop {given[flag]}")
  if num_slices < 1:
    raise errors.ConfigError(f"--num_slices={num_slices} must be >= 1 (identical slices of --topology)")


def model_config_from(config=None, preset: str | None = None, res: int | None = None) -> QwenVLConfig:
  """The architecture config named by an experiment config (or by a preset and resolution)."""
  if config is not None:
    return train_plan.model_config_for(config)  # the trainer's numerics too (dtype, remat, attention)
  check_model_flags(None, preset, res)
  cfg = get_preset(preset or "qwen_vl_7b")
  return cfg.with_image_size(res) if res is not None else cfg


def check_model_flags(config, preset: str | None, res: int | None, config_file: str = "--config") -> None:
  """Refuses a `config` (loaded from `config_file`, `PATH[:ARG]`) that is not a training config, --preset / --res
  next to --config (the config names the model: they were silently ignored) and a --res that is 0 or negative
  (0 silently meant the preset's resolution).

  Raises:
    errors.ConfigError: saying which override to use instead.
  """
  if config is not None:
    from qwenvl_jax.training import validation  # pylint: disable=import-outside-toplevel
    validation.check_is_training_config(config, source=config_file.partition(":")[0], command="plan")
    given = [f"--{k}={v}" for k, v in (("preset", preset), ("res", res)) if v is not None]
    if given:
      args = ",".join(f"{k}={v}" for k, v in (("model", preset), ("res", res)) if v is not None)
      overrides = " ".join(f"--config.{k}={v}" for k, v in (("model", preset), ("res", res)) if v is not None)
      spec = f"{config_file},{args}" if ":" in config_file else f"{config_file}:{args}"
      raise errors.ConfigError(f"{' '.join(given)} with --config: the config names the model and its resolution",
                               hint=f"use --config={spec} or {overrides}")
  elif res is not None and res <= 0:
    raise errors.ConfigError(f"--res={res} must be a positive multiple of the patch size (e.g. 224 or 448)")


@functools.lru_cache(maxsize=4)
def _abstract_state(cfg: QwenVLConfig) -> nnx.State:
  """The model's abstract state (shapes only), built once per config for both counts."""
  return sharding.abstract_model(lambda: QwenVL(cfg, rngs=nnx.Rngs(0)))[1]


def parameter_counts(cfg: QwenVLConfig) -> dict[str, int]:
  """{'visual', 'adapter', 'llm', 'total'} parameter counts, computed from abstract shapes only."""
  state = _abstract_state(cfg)
  counts = {k: sharding.count_params(state[k]) for k in ("visual", "adapter", "llm")}
  counts["total"] = sum(counts.values())
  return counts


def trainable_counts(cfg: QwenVLConfig) -> dict[int, int]:
  """Parameters each stage trains (with the official fix_vit semantics in stage 3)."""
  state = _abstract_state(cfg)
  flat = [("/".join(map(str, path)), var) for path, var in nnx.to_flat_state(state)]
  out = {}
  for stage in (1, 2, 3):
    is_frozen = make_is_frozen(stage_frozen_patterns(stage))
    out[stage] = sum(var.size for path, var in flat if not is_frozen(path))
  return out


def format_counts(cfg: QwenVLConfig, name: str) -> str:
  counts = parameter_counts(cfg)
  lines = [f"model {name}: {cfg.vision.image_size} px, {cfg.vision.num_patches} patches per image, "
           f"{cfg.image_tokens} image tokens, compute {cfg.dtype}, params {cfg.param_dtype}",
           f"  {'ViT trunk':<28}{counts['visual']:>17,}",
           f"  {'adapter (resampler+proj)':<28}{counts['adapter']:>17,}",
           f"  {'LLM':<28}{counts['llm']:>17,}",
           f"  {'total':<28}{counts['total']:>17,}"]
  for stage, n in trainable_counts(cfg).items():
    lines.append(f"  {f'trained in stage {stage}':<28}{n:>17,}")
  return "\n".join(lines)


def counts_to_dict(cfg: QwenVLConfig, name: str) -> dict:
  """`format_counts`'s figures as JSON values (`plan --json`)."""
  return {"name": name, "image_size": cfg.vision.image_size, "patches_per_image": cfg.vision.num_patches,
          "image_tokens": cfg.image_tokens, "dtype": cfg.dtype, "param_dtype": cfg.param_dtype,
          "params": parameter_counts(cfg), "trained_by_stage": {str(k): v for k, v in trainable_counts(cfg).items()}}


def lora_weight_bytes(state) -> tuple[dict[str, int], int]:
  """(the frozen base's bytes by dtype, int4 at half a byte; the float32 adapters' bytes) of a LoRA/QLoRA model."""
  from qwenvl_jax.model import quantize as qlib  # pylint: disable=import-outside-toplevel
  return (qlib.weight_bytes(state.filter(nnx.Not(nnx.LoRAParam))),
          sum(qlib.weight_bytes(state.filter(nnx.LoRAParam)).values()))


def format_weight_bytes(state, quant) -> str:
  """Where a LoRA/QLoRA run's weights go, by dtype (int4 at half a byte): the frozen base and the adapters."""
  base, adapters = lora_weight_bytes(state)
  how = "per channel" if quant and quant[0].mode == "int8" else f"groups of {quant[0].group_size}" if quant else ""
  kind = "LoRA base" if quant is None else f"QLoRA base ({quant[0].mode}, {how})"
  parts = ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in sorted(base.items(), key=lambda kv: -kv[1]))
  return (f"  {kind}: {sum(base.values()) / 2**30:.2f} GiB ({parts}); adapters float32 {adapters / 2**30:.2f} GiB "
          f"+ AdamW 2x that")


def _say(*lines) -> None:
  """A line of the human report (on stderr with --json)."""
  output.say(*lines, as_json=_JSON.value)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  config_file = config_flags.get_config_filename(flags.FLAGS["config"]) if config is not None else "--config"
  check_model_flags(config, _PRESET.value, _RES.value, config_file)
  given = {name: flags.FLAGS[name].serialize() for name, _ in _BELONGS_TO if flags.FLAGS[name].present}
  check_flag_combination(given, topology=_TOPOLOGY.value, search=_SEARCH.value, num_slices=_NUM_SLICES.value,
                         inference=_INFERENCE.value is not None)
  # The --json object: every key present, None where this run plans no such thing.
  report = {"model": None, "topology": None, "train": None, "search": None, "inference": None}
  if _INFERENCE.value is not None:
    _plan_inference(config, report)
    return _emit(report)
  if _TOPOLOGY.value and config is None:  # before the counts: the run stops here
    raise app.UsageError("--topology plans a training stage: give --config=configs/stageN.py[:args]")
  cfg = model_config_from(config, _PRESET.value, _RES.value)
  name = config.model if config is not None else (_PRESET.value or "qwen_vl_7b")
  _say(format_counts(cfg, name))
  report["model"] = counts_to_dict(cfg, name)
  if config is not None and peft.lora_config(config) is not None:
    lcfg = peft.lora_config(config)
    state = sharding.abstract_model(peft.model_fn(cfg, config))[1]
    trained = lora.trained_count(state, lcfg)
    _say(f"  {f'trained by LoRA r={lcfg.rank}':<28}{trained:>17,}"
         f"   (targets {', '.join(lcfg.targets)}; modules_to_save {list(lcfg.modules_to_save) or 'none'})")
    _say(format_weight_bytes(state, peft.base_quantization(config)))
    base, adapters = lora_weight_bytes(state)
    report["model"]["lora"] = {"rank": lcfg.rank, "trained": trained, "targets": list(lcfg.targets),
                               "modules_to_save": list(lcfg.modules_to_save), "base_bytes": base,
                               "adapter_bytes": adapters}
  if _TOPOLOGY.value:
    topology = _topology()
    report["topology"] = output.topology_to_dict(topology)
    from qwenvl_jax.training import validation  # pylint: disable=import-outside-toplevel
    validation.check_step_fields(config, topology.chip.platform)  # what `train` would refuse, before compiling
    if _SEARCH.value:
      found = _run_search(config, topology, report)
      _emit(report)
      return 0 if found else 1
    if not _batch_splits(config, topology):
      sys.exit(2)
    _say(f"{topology.describe()}\ncompiling the train step (minutes for the full model) ...")
    step_plan, facts = train_plan.plan_stage(config, topology)
    _say(f"stage {config.stage}: mesh {facts['mesh']}, batch {facts['batch']} x {facts['seq_len']} tokens in "
         f"{facts['accum_steps']} micro-batch(es), {facts['res']} px x {facts['max_images']} image slots, "
         f"remat {facts['remat']}")
    _say(step_plan.format())
    tips = train_plan.what_would_fit(config, step_plan, facts, topology)
    if tips:
      _say("what would fit:" if not step_plan.fits else "what would leave more room:")
      _say("\n".join(f"  - {tip}" for tip in tips))
    report["train"] = {"stage": config.stage, "mesh": facts["mesh"], "batch": facts["batch"],
                       "seq_len": facts["seq_len"], "micro_batches": facts["accum_steps"], "res": facts["res"],
                       "max_images": facts["max_images"], "remat": facts["remat"], "plan": step_plan.to_dict(),
                       "what_would_fit": tips}
  return _emit(report)


def _emit(report: dict) -> None:
  """With --json, `report` as one line of JSON on stdout."""
  output.emit(report, as_json=_JSON.value)


def _topology():
  """--topology / --num_slices as a `chips.Topology`; a name that is not one is a flag mistake (one line)."""
  from qwenvl_jax.hardware import chips  # pylint: disable=import-outside-toplevel
  try:
    return chips.parse_topology(_TOPOLOGY.value, _NUM_SLICES.value)
  except ValueError as e:
    raise errors.ConfigError(f"--topology={_TOPOLOGY.value}: {e}") from e


def _plan_inference(config, report: dict) -> None:
  """`--inference`: the decode step and prefill of the model, AOT-compiled for --topology."""
  kwargs = inference_plan.parse_inference_arg(_INFERENCE.value)  # bad keys fail before any compile
  if not _TOPOLOGY.value:
    raise app.UsageError("--inference plans serving on a TPU slice: give --topology (e.g. v5e-1)")
  preset = config.model if config is not None else (_PRESET.value or "qwen_vl_7b")
  cfg = inference_plan.inference_model_config(preset, config.res if config is not None else _RES.value)
  res = cfg.vision.image_size  # --preset=tiny without --res: the preset's 224 px, as the counts say (it was 448)
  topology = _topology()
  report["model"] = inference_plan.model_to_dict(preset, cfg)
  report["topology"] = output.topology_to_dict(topology)
  _say(f"model {preset}: {res} px; {topology.describe()}\ncompiling the decode step"
       + (" and the prefill" if kwargs["with_prefill"] else "") + " (minutes for the full model) ...")
  result = inference_plan.plan_inference(cfg, topology, **INFERENCE_KEY_NAMES, **kwargs)
  _say(result.format())
  report["inference"] = result.to_dict()


def _batch_splits(config, topology) -> bool:
  """True when the configured batch splits over the configured mesh; else prints why and the nearest valid plans."""
  ici = {k: int(v) for k, v in config.mesh.ici.items()}
  fixed = 1
  for v in ici.values():
    fixed *= v if v > 0 else 1
  if topology.chips_per_slice % fixed:
    return True  # a mesh that does not fit the topology: make_mesh names it
  fill = topology.chips_per_slice // fixed
  shards = (ici["data"] if ici["data"] > 0 else fill) * (ici["fsdp"] if ici["fsdp"] > 0 else fill)
  shards *= topology.num_slices
  micro, rest = divmod(config.batch_size, config.accum_steps)
  if not rest and micro % shards == 0:
    return True
  print(f"error: config.batch_size={config.batch_size} in config.accum_steps={config.accum_steps} micro-batches "
        f"does not split over the {shards} data x fsdp chips of {topology.accelerator_type}; nearest valid plans:",
        file=sys.stderr)
  for batch, accum, fsdp, tensor in search.nearest_valid(config.batch_size, config.accum_steps,
                                                         topology.chips_per_slice, topology.num_slices):
    rules = "fsdp_tp" if tensor > 1 else config.mesh.rules
    # data=1: the layouts put every chip of a slice on fsdp x tensor, whatever the config's data degree was
    print(f"  --config.batch_size={batch} --config.accum_steps={accum} --config.mesh.ici.data=1 "
          f"--config.mesh.ici.fsdp={fsdp} --config.mesh.ici.tensor={tensor} --config.mesh.rules={rules}"
          f"   ({_rows(batch // accum // (fsdp * topology.num_slices))} per chip per micro-batch)", file=sys.stderr)
  print("  or search layouts of this batch: add --search", file=sys.stderr)
  return False


def _rows(n: int) -> str:
  return f"{n} row{'s' if n != 1 else ''}"


def _run_search(config, topology, report: dict) -> bool:
  """`--search`: the table and the best plan's flags; whether a compiled plan fits."""
  tensors = search.check_values(_SEARCH_REMATS.value, _SEARCH_ATTENTION.value, _SEARCH_TENSOR.value,
                                topology.chips_per_slice)
  if not search.candidates(config.batch_size, topology.chips_per_slice, topology.num_slices, tensors=tensors):
    shards = " or ".join(str(topology.chips_per_slice // t * topology.num_slices) for t in tensors
                         if topology.chips_per_slice % t == 0)
    raise errors.ConfigError(f"no layout to search: config.batch_size={config.batch_size} in any number of "
                             f"micro-batches does not split over {shards} data x fsdp chips "
                             f"(--search_tensor={','.join(_SEARCH_TENSOR.value)} on {topology.accelerator_type})",
                             hint="a batch size that is a multiple of the data x fsdp chips, or larger tensor "
                                  "degrees (--search_tensor)")
  _say(f"{topology.describe()}\nsearching layouts of stage {config.stage} (batch {config.batch_size} x "
       f"{config.seq_len} tokens, {config.max_images} image slots at {config.res} px) ...")
  start = time.perf_counter()
  rows = search.search(config, topology, max_compiles=_MAX_COMPILES.value, cache_dir=_SEARCH_CACHE.value,
                       remats=_SEARCH_REMATS.value, attentions=_SEARCH_ATTENTION.value,
                       tensors=tensors, log=_say)
  _say(search.format_table(rows, topology.chip.hbm_bytes))
  seconds = time.perf_counter() - start
  _say(f"search took {seconds:.0f} s")
  top = search.best(rows)
  report["search"] = {"stage": config.stage, "batch": config.batch_size, "seq_len": config.seq_len,
                      "rows": [row.to_dict() for row in rows], "seconds": seconds,
                      "best": top and search.best_to_dict(top, config, topology.num_chips)}
  if top is None:
    print(search.no_fit_message(rows), file=sys.stderr)
    return False
  _say(search.format_best(top, config, topology.num_chips))
  return True


if __name__ == "__main__":
  cli.run(main)
