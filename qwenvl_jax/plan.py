"""Plans a configured model without allocating it: parameter counts by component via `jax.eval_shape`, and with
`--topology` the AOT-compiled train step for a TPU slice (per-chip memory, compiler FLOPs, step time, MFU).

  python -m qwenvl_jax.plan --config=configs/stage2.py:model=qwen_vl_7b
  python -m qwenvl_jax.plan --preset=qwen_vl_7b --res=448
  python -m qwenvl_jax.plan --config=configs/stage2.py:model=qwen_vl_7b --topology=v5p-128   # needs libtpu:
      # pip install -r requirements-tpu-aot.txt; see qwenvl_jax/planning/train_plan.py

The count reads the same config the trainer reads (`config.model` preset, `config.res`), builds the model under
`nnx.eval_shape` (shapes only, nothing materialized) and prints the ViT trunk, the adapter (resampler + ln_post +
proj), the LLM and the total, plus how many parameters each stage trains.
"""

from __future__ import annotations

import functools

from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from qwenvl_jax import cli

from qwenvl_jax import sharding
from qwenvl_jax.model import QwenVL, QwenVLConfig, get_preset, lora
from qwenvl_jax.planning import train_plan
from qwenvl_jax.training import peft
from qwenvl_jax.training.optimizer import make_is_frozen, stage_frozen_patterns

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config (configs/stageN.py[:args]).",
                                          lock_config=False)
_PRESET = flags.DEFINE_string("preset", None, "Model preset when no --config is given (tiny, mid, qwen_vl_7b).")
_RES = flags.DEFINE_integer("res", None, "Input resolution when no --config is given (224 or 448).")
_TOPOLOGY = flags.DEFINE_string("topology", None, "Also AOT-compile the train step for this TPU slice "
                                "(v5p-128, v4-128, v5e-256, v6e-64, v5p:4x4x8); needs --config and libtpu.")
_NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "Identical slices over DCN (with --topology).")

def model_config_from(config=None, preset: str | None = None, res: int | None = None) -> QwenVLConfig:
  """The architecture config named by an experiment config (or by a preset and resolution)."""
  if config is not None:
    return train_plan.model_config_for(config)  # the trainer's numerics too (dtype, remat, attention)
  cfg = get_preset(preset or "qwen_vl_7b")
  return cfg.with_image_size(res) if res else cfg


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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  cfg = model_config_from(config, _PRESET.value, _RES.value)
  name = config.model if config is not None else (_PRESET.value or "qwen_vl_7b")
  print(format_counts(cfg, name), flush=True)
  if config is not None and peft.lora_config(config) is not None:
    lcfg = peft.lora_config(config)
    state = sharding.abstract_model(peft.model_fn(cfg, config))[1]
    print(f"  {f'trained by LoRA r={lcfg.rank}':<28}{lora.trained_count(state, lcfg):>17,}"
          f"   (targets {', '.join(lcfg.targets)}; modules_to_save {list(lcfg.modules_to_save) or 'none'})",
          flush=True)
  if _TOPOLOGY.value:
    if config is None:
      raise app.UsageError("--topology plans a training stage: give --config=configs/stageN.py[:args]")
    from qwenvl_jax.hardware import chips  # pylint: disable=import-outside-toplevel
    topology = chips.parse_topology(_TOPOLOGY.value, _NUM_SLICES.value)
    print(topology.describe(), "\ncompiling the train step (minutes for the full model) ...", flush=True)
    step_plan, facts = train_plan.plan_stage(config, topology)
    print(f"stage {config.stage}: mesh {facts['mesh']}, batch {facts['batch']} x {facts['seq_len']} tokens in "
          f"{facts['accum_steps']} micro-batch(es), {facts['res']} px x {facts['max_images']} image slots, "
          f"remat {facts['remat']}")
    print(step_plan.format())


if __name__ == "__main__":
  cli.run(main)
