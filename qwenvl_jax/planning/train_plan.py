"""Plans a training stage for a TPU topology: the real train step, AOT-compiled for abstract devices. The entry
point is `python -m qwenvl_jax.plan --config=... --topology=...`:

  python -m qwenvl_jax.plan --config=configs/stage2.py:model=qwen_vl_7b --topology=v5p-128
  python -m qwenvl_jax.plan --config=configs/stage1.py:model=tiny --topology=v5e-4 \\
      --config.batch_size=8 --config.mesh.rules=fsdp_tp --config.mesh.ici.tensor=2

It builds what `qwenvl_jax.training.trainer` builds before its loop (model, rule-table shardings, stage optimizer,
`make_train_step`, donated state, batch sharded over the rules' `act_batch`), but from abstract shapes and the
topology's abstract devices: nothing is allocated, no TPU is needed (libtpu is: requirements-tpu-aot.txt). The
report is `aot.StepPlan.format()`, with the trainer's own model-FLOP count (`training.flops`) as the MFU numerator.

The tokenizer is not loaded: shapes only depend on the preset's vocabulary, and the planner must not need data.
"""
import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from qwenvl_jax import errors, sharding
from qwenvl_jax.hardware import chips
from qwenvl_jax.hardware.chips import GIB
from qwenvl_jax.model import config as model_config
from qwenvl_jax.planning import aot, mesh as mesh_lib
from qwenvl_jax.training import flops
from qwenvl_jax.training.optimizer import make_is_frozen, path_str
from qwenvl_jax.training.setup import build_step
from qwenvl_jax.training.step import TrainState


def model_config_for(config: ml_collections.ConfigDict) -> model_config.QwenVLConfig:
  """The model config the trainer would build for `config` (minus the tokenizer's id checks)."""
  cfg = model_config.get_preset(config.model, dtype=config.model_dtype, param_dtype=config.param_dtype,
                                remat_policy=config.remat, attention_impl=config.attention_impl)
  return cfg.with_image_size(config.res)


def abstract_batch(config: ml_collections.ConfigDict, cfg: model_config.QwenVLConfig, sharding_: Any) -> dict:
  """`ShapeDtypeStruct`s of a DESIGN §4 batch of `config.batch_size` rows."""
  b, t, m, s = config.batch_size, config.seq_len, config.max_images, cfg.vision.image_size
  shapes = {"input_ids": ((b, t), jnp.int32), "targets": ((b, t), jnp.int32), "loss_mask": ((b, t), jnp.float32),
            "segment_ids": ((b, t), jnp.int32), "positions": ((b, t), jnp.int32),
            "images": ((b, m, s, s, 3), jnp.uint8), "image_mask": ((b, m), jnp.bool_)}
  return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding_) for k, (shape, dtype) in shapes.items()}


def plan_stage(config: ml_collections.ConfigDict, topology: chips.Topology) -> tuple[aot.StepPlan, dict]:
  """Compiles the train step of `config` for `topology`.

  Args:
    config: an experiment config (`configs/stageN.py`).
    topology: the TPU slice(s).

  Returns:
    The plan and a dict of facts for the report (mesh shape, parameter counts, frozen patterns).

  Raises:
    errors.ConfigError: mesh degrees that do not match the topology, or an unknown rule table.
    ValueError: the batch does not split over the mesh.
  """
  return plan_on_devices(config, mesh_lib.topology_devices(topology), topology.chip, torus=topology.shape,
                         num_slices=topology.num_slices)


def plan_on_devices(config: ml_collections.ConfigDict, devices: list, chip: chips.ChipSpec, *,
                    torus: tuple[int, ...] = (), num_slices: int = 1) -> tuple[aot.StepPlan, dict]:
  """`plan_stage` for given devices: a TPU topology's abstract ones, or this host's real accelerators (e.g.
  `jax.devices()` with `chips.chip_spec(device_kind)`, to put the estimate next to a measured step,
  bench/bench_train_step_gpu.py). Compiles only; allocates nothing."""
  cfg = model_config_for(config)
  ici = {k: int(v) for k, v in config.mesh.ici.items()}
  dcn = {k: int(v) for k, v in config.mesh.dcn.items()}
  if num_slices > 1 and all(v == 1 for v in dcn.values()):
    dcn["data"] = num_slices  # as the launcher does: slices join over DCN on the data axis
  try:
    rules = sharding.load_rules(config.mesh.rules)
  except ValueError as e:
    raise errors.ConfigError(f"config.mesh.rules: {e}") from e
  try:  # degrees that do not multiply to the chips of the topology
    mesh = sharding.make_mesh(ici, dcn, devices=devices)
  except ValueError as e:
    raise errors.ConfigError(f"config.mesh: {e}", hint="the ICI degrees multiply to the chips of one slice, the "
                             "DCN degrees to the slices; one ICI degree may be -1 (the rest)") from e
  setup = build_step(config, cfg, mesh, rules)
  replicated, frozen = setup.replicated, setup.frozen
  state = TrainState(jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated), setup.abstract_params,
                     setup.abstract_opt)
  state_shardings = setup.shardings
  batch = abstract_batch(config, cfg, sharding.batch_sharding(mesh, rules))

  is_frozen = make_is_frozen(frozen)
  model_flops = flops.train_step_flops(cfg, batch=config.batch_size, seq_len=config.seq_len,
                                       max_images=config.max_images, is_trainable=lambda p: not is_frozen(p)).total
  with sharding.use_rules(mesh, rules):
    compiled, plan = aot.compile_step(setup.step_fn, (state, batch), chip=chip, mesh=mesh,
                               out_shardings=(state_shardings, replicated), donate_argnums=0,
                               model_flops=model_flops, global_batch=config.batch_size,
                               tokens=config.batch_size * config.seq_len, torus=torus)
  flat_params = _flat(setup.abstract_params)
  trainable = sum(x.size for k, x in flat_params.items() if not is_frozen(k))
  f32 = lambda x: x.dtype == jnp.float32
  logits_buffers = (full_logits_buffers(compiled.as_text(), config.seq_len, cfg.llm.vocab_size)
                    if compiled is not None else [])
  facts = {"mesh": dict(mesh.shape), "params": sharding.count_params(setup.abstract_state), "trainable": trainable,
           "frozen": list(frozen), "batch": config.batch_size, "accum_steps": config.accum_steps,
           "seq_len": config.seq_len, "res": config.res, "max_images": config.max_images, "remat": config.remat,
           "loss_chunk": int(config.get("loss_chunk", 0)), "full_logits_buffers": logits_buffers,
           # per-chip bytes that the memory options of `what_would_fit` would halve
           "frozen_f32_bytes": aot.shard_bytes([x for k, x in flat_params.items() if is_frozen(k) and f32(x)]),
           "trained_f32_bytes": aot.shard_bytes([x for k, x in flat_params.items() if not is_frozen(k) and f32(x)]),
           "moment_f32_bytes": aot.shard_bytes([x for x in jax.tree.leaves(setup.abstract_opt)
                                                if f32(x) and x.ndim]),
           "rows_per_chip": config.batch_size // config.accum_steps // sharding.batch_shards(mesh, rules),
           "lora": bool(config.get("lora") and int(config.lora.rank))}
  return plan, facts


def what_would_fit(config: ml_collections.ConfigDict, plan: aot.StepPlan, facts: dict,
                   topology: chips.Topology) -> list[str]:
  """The config changes that would make a stage plan fit (or leave headroom), each with its estimated saving per
  chip, biggest first, and the smallest wider slice of the same chip that would hold it; [] when it fits with room.

  Estimates are from the plan's own figures: halving a float32 state shard saves half its bytes; a wider slice
  shards the state (arguments, outputs) further and keeps the temporaries as they are (an upper bound).
  """
  hbm = topology.chip.hbm_bytes
  if plan.fits and plan.hbm_fraction <= aot.TIGHT_FRACTION:
    return []
  gib = lambda n: f"{n / GIB:.2f} GiB"
  tips: list[tuple[float, str]] = []
  if facts["moment_f32_bytes"] and not facts["lora"]:
    save = facts["moment_f32_bytes"] / 2
    tips.append((save, f"--config.optimizer.mu_dtype=bfloat16 --config.optimizer.nu_dtype=bfloat16: AdamW moments "
                       f"in bf16, -{gib(save)} per chip"))
  if facts["frozen_f32_bytes"] and not facts["lora"]:
    save = facts["frozen_f32_bytes"] / 2
    tips.append((save, f"--config.frozen_dtype=bfloat16: the frozen parameters in bf16, -{gib(save)} per chip"))
  if config.accum_steps > 1 and not facts["lora"]:
    save = facts["trained_f32_bytes"]
    tips.append((save, f"--config.accum_steps=1 --config.batch_size={config.batch_size // config.accum_steps}: "
                       f"no float32 gradient accumulator, -{gib(save)} per chip (fewer rows per step)"))
  mesh, n = facts["mesh"], topology.num_chips
  if facts["rows_per_chip"] <= 1 and mesh.get("tensor", 1) == 1 and mesh.get("fsdp", 1) % 2 == 0:
    tips.append((0.0, f"--config.mesh.rules=fsdp_tp --config.mesh.ici.fsdp={mesh['fsdp'] // 2} "
                      f"--config.mesh.ici.tensor=2 --config.batch_size={config.batch_size // 2}: split each row's "
                      "attention scores, MLP activations and gathered layer weights over 2 chips"))
  elif facts["rows_per_chip"] > 1:
    tips.append((0.0, f"fewer rows per chip per micro-batch (now {facts['rows_per_chip']}): raise "
                      "--config.accum_steps or lower --config.batch_size"))
  tips.sort(key=lambda t: -t[0])
  lines = [text for _, text in tips]
  saved = sum(save for save, _ in tips)
  if saved:
    after = plan.total_bytes - saved
    lines.append(f"all of the savings above: est. {gib(after)} per chip of {hbm / GIB:.0f} GiB -> "
                 + ("would fit" if after <= hbm else "still over"))
  state = plan.argument_bytes + plan.output_bytes - plan.alias_bytes + plan.code_bytes
  for k in (2, 4, 8, 16, 32):
    estimate = state / k + plan.temp_bytes
    if estimate <= aot.TIGHT_FRACTION * hbm:
      prefix, count = topology.accelerator_type.rsplit("-", 1)
      lines.append(f"or a {k}x wider slice ({prefix}-{int(count) * k}, {n * k} chips): est. <= {gib(estimate)} "
                   "per chip as configured")
      break
  else:
    lines.append(f"the temporaries alone ({gib(plan.temp_bytes)} per chip) leave no room on a wider slice: change "
                 "the micro-batch or remat first")
  return lines



def full_logits_buffers(hlo_text: str, seq_len: int, vocab: int) -> list[str]:
  """The distinct float32 shapes in a compiled (per-device) HLO text that span the whole sequence and the whole
  vocabulary, i.e. full `[rows, T, V]` logits or their gradient; [] when the loss is chunked (`model.losses`)."""
  out = []
  for shape in set(re.findall(r"f32\[([0-9,]+)\]", hlo_text)):
    dims = [int(d) for d in shape.split(",")]
    if seq_len in dims and vocab in dims:
      out.append(f"f32[{shape}]")
  return sorted(out)


def _flat(tree: Any) -> dict[str, Any]:
  return {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
