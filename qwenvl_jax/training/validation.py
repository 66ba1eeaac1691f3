"""Every check of a training config that can run before the trainer writes anything into the workdir.

A typo must not leave a trace: a `config.json` recorded for a config that then crashes refuses the corrected
command, and an empty `checkpoints/` looks like a run. So `check_config` runs first in `train` and checks, without
allocating a parameter or writing a file: the numeric fields (sizes, cadences, the optimizer's rates and ranges),
the enumerations (resume, distributed.initialize, optimizer schedule), the model preset with the run's resolution
and numerics, the attention kernel against the backend, the LoRA / QLoRA fields against the model (abstract), the
mesh against the devices and the batch against the mesh, the tokenizer spec (its file is opened), the init
checkpoint (its parameter names and shapes against the model's), and the data sources (their files are opened and
indexed, TFDS datasets looked up). Failures raise `errors.ConfigError` naming the config key.
"""

from __future__ import annotations

import math
import os
import re

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from qwenvl_jax import errors
from qwenvl_jax.model import config as model_config
from qwenvl_jax.model import kernels

# The SentencePiece model of the synthetic data needs <unk>, 13 symbols and 256 byte pieces before any learned piece.
_MIN_SYNTHETIC_VOCAB = 1 + 13 + 256 + 1


def _positive(config: ml_collections.ConfigDict, keys: dict[str, int]) -> None:
  for key, minimum in keys.items():
    node = config
    for part in key.split("."):
      node = node[part]
    if not isinstance(node, int) or isinstance(node, bool) or node < minimum:
      raise errors.ConfigError(f"config.{key}={node!r} must be an integer >= {minimum}")


def _choice(value, key: str, allowed: tuple) -> None:
  if value not in allowed:
    raise errors.ConfigError(f"config.{key}={value!r}: expected one of {', '.join(map(repr, allowed))}")


# Groups whose keys are task names rather than fields (stage 2's mixture): any task of `records.TASKS`.
_TASK_KEYED = ("data.mixture", "data.mixture_sources")


def check_is_training_config(config: ml_collections.ConfigDict, source: str = "the config",
                             command: str = "train") -> None:
  """Refuses a config that is not a training stage's: an evaluation config (configs/eval/*.py, with its `task`),
  one without a `stage`, and one holding a field that `configs/stage<N>.py`'s defaults do not have. `--config.`
  overrides are checked against those fields by the flag parser; a config file of one's own
  (`c.totl_steps = 5`) is checked here, so its typo is not recorded in config.json and ignored.

  Args:
    config: the loaded config.
    source: what to call it in the message (the config file's path).
    command: the command that was given it (`train`, `plan`).

  Raises:
    errors.ConfigError: naming the file and the field, with the closest existing fields.
  """
  if "stage" not in config:
    what = "an evaluation config" if "task" in config else "not a training config (it has no stage field)"
    raise errors.ConfigError(f"{source} is {what}; {command} takes a training config such as configs/stage2.py")
  _choice(config.stage, "stage", (1, 2, 3))
  from qwenvl_jax.data import records  # pylint: disable=g-import-not-at-top
  from qwenvl_jax.training.stage_config import stage_config  # pylint: disable=g-import-not-at-top  (cycle)
  defaults = stage_config(config.stage, None)  # the fields do not depend on the arg string

  def walk(node, known, prefix):
    for key in node.keys():
      path = prefix + key
      allowed = set(known.keys()) | (set(records.TASKS) if prefix.rstrip(".") in _TASK_KEYED else set())
      if key not in allowed:
        scope = "config" + ("." + prefix.rstrip(".") if prefix else "")
        close = errors.closest(key, sorted(allowed))
        hint = f"; did you mean {', '.join(f'{scope}.{c}' for c in close)}?" if close else ""
        raise errors.ConfigError(f"{source} sets config.{path}, which is not a field of a stage-{config.stage} "
                                 f"training config{hint}",
                                 hint="the fields and their defaults: qwenvl_jax/training/stage_config.py")
      if isinstance(node[key], ml_collections.ConfigDict) and isinstance(known.get(key),
                                                                          ml_collections.ConfigDict):
        walk(node[key], known[key], path + ".")

  walk(config, defaults, "")


def _number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_optimizer(opt: ml_collections.ConfigDict) -> None:
  """The AdamW fields of `config.optimizer` (training/optimizer.py): each refused with its key and range, since
  optax takes a negative rate, a beta of 1 or a negative clip without complaint (lr=-1 trained, uphill)."""
  def refuse(key: str, requirement: str):
    raise errors.ConfigError(f"config.optimizer.{key}={opt[key]!r} {requirement}")

  if not _number(opt.lr) or opt.lr <= 0:
    refuse("lr", "must be a number > 0 (the peak learning rate)")
  if not _number(opt.min_lr) or opt.min_lr < 0:
    refuse("min_lr", "must be a number >= 0 (the rate the cosine schedule ends at)")
  if opt.schedule == "cosine" and opt.min_lr > opt.lr:
    refuse("min_lr", f"must be <= config.optimizer.lr={opt.lr!r} (the cosine decays from lr to min_lr)")
  for key in ("b1", "b2"):
    if not _number(opt[key]) or not 0 <= opt[key] < 1:
      refuse(key, "must be in [0, 1) (an Adam moment's decay rate)")
  if not _number(opt.eps) or opt.eps <= 0:
    refuse("eps", "must be a number > 0 (Adam's denominator term: with 0 an entry whose gradient stays 0 "
                  "updates by 0/0 = NaN)")
  if not _number(opt.weight_decay) or opt.weight_decay < 0:
    refuse("weight_decay", "must be a number >= 0 (0 = no decay)")
  if opt.grad_clip is not None and (not _number(opt.grad_clip) or opt.grad_clip < 0):
    refuse("grad_clip", "must be a number > 0 (the global gradient-norm limit), or 0 for no clipping")
  if opt.vit_layer_decay is not None and (not _number(opt.vit_layer_decay) or not 0 <= opt.vit_layer_decay <= 1):
    refuse("vit_layer_decay", "must be in [0, 1] (the ViT's layer-wise LR decay; 1 or 0 = none)")
  for key in ("mu_dtype", "nu_dtype"):
    value = opt.get(key, "")
    try:
      floating = not value or jnp.issubdtype(jnp.dtype(value), jnp.floating)
    except TypeError:
      floating = False
    if not floating:
      refuse(key, "must be '' (the parameter dtype) or a float dtype such as 'bfloat16'")
  try:
    re.compile(opt.wd_exclude)
  except (re.error, TypeError) as e:
    raise errors.ConfigError(f"config.optimizer.wd_exclude={opt.wd_exclude!r} is not a regex: {e}") from e


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises `errors.ConfigError` (or a FileNotFoundError naming the path) for anything wrong in `config`.

  Runs after `jax.distributed.initialize` (it builds the mesh) and before the workdir is created.
  """
  from qwenvl_jax.training import experiment, setup  # pylint: disable=g-import-not-at-top  (cycle-free, lazy)
  cfg = check_step_fields(config, jax.default_backend())
  try:
    mesh, rules = experiment.make_mesh(config)
    setup.check_batch(config, mesh, rules)
  except ValueError as e:
    raise errors.ConfigError(str(e)) from e
  _check_tokenizer(config, cfg)
  if config.init:
    _check_init(config, cfg)
  _check_data(config)


def _check_init(config: ml_collections.ConfigDict, cfg: model_config.QwenVLConfig) -> None:
  """`config.init` names a params checkpoint of `config.model`'s weights (read from its metadata: nothing is
  restored). A LoRA run's checkpoint (its base and adapters) failed in the restore, whose hint named flags of other
  commands ('name its preset (--model / --preset)') and never the merge that turns it into weights."""
  from qwenvl_jax.checkpoint import orbax_store  # pylint: disable=g-import-not-at-top
  from qwenvl_jax.training import peft  # pylint: disable=g-import-not-at-top
  from qwenvl_jax.training.checkpointing import resolve_params_checkpoint  # pylint: disable=g-import-not-at-top
  try:
    source = resolve_params_checkpoint(config.init)
  except ValueError as e:
    raise errors.ConfigError(str(e)) from e
  stored = orbax_store.ParamReader(source).shapes
  adapters = sorted(k for k in stored if k.endswith((".lora_a", ".lora_b")))
  if adapters:
    step = os.path.dirname(source) if os.path.basename(source) == "params" else source
    raise errors.ConfigError(
        f"config.init={config.init!r} is a LoRA run's checkpoint: {source} holds its frozen base and "
        f"{len(adapters)} adapter arrays ({adapters[0]}, ...), not a model's weights",
        hint=f"merge the adapters into the base first: python -m qwenvl_jax.convert --mode=merge_lora --src={step} "
             "--dst=MERGED, then --config.init=params:MERGED")
  if any(k.endswith(".qvalue") for k in stored):
    raise errors.ConfigError(f"config.init={config.init!r}: {source} is a quantized checkpoint (convert "
                             "--mode=quantize); training starts from float weights",
                             hint="name the float params checkpoint it was quantized from")
  problems = orbax_store.tree_problems(stored, peft.init_tree(peft.model_fn(cfg, config)))
  if problems:
    from qwenvl_jax.checkpoint import model_card  # pylint: disable=g-import-not-at-top
    from qwenvl_jax.training import experiment  # pylint: disable=g-import-not-at-top
    preset, run = model_card.recorded_model(source).get("preset"), experiment.init_run_model(config.init)
    if preset:
      hint = f"the checkpoint records preset {preset!r}: set config.model={preset}"
    elif run is not None and run[1] != config.model:  # a run's step records no preset: its config.json does
      hint = f"the run {run[0]} trained config.model={run[1]!r}: set config.model={run[1]}"
    else:
      hint = "set config.model to the preset those weights are of (a run's config.json names it)"
    raise errors.ConfigError(f"config.init={config.init!r}: {source} does not hold weights of "
                             f"config.model={config.model!r}: " + "; ".join(problems), hint=hint)


def check_step_fields(config: ml_collections.ConfigDict, platform: str) -> model_config.QwenVLConfig:
  """The checks of `check_config` that need no devices, files or data: the numeric fields, the enumerations, the
  optimizer, the model preset at the run's resolution, the attention kernel against `platform` ('tpu' for a plan
  of a TPU slice) and LoRA / QLoRA targets. `plan` runs them too, so it refuses what `train` would.

  Returns:
    The model config.
  Raises:
    errors.ConfigError: naming the config key.
  """
  from qwenvl_jax.training import peft  # pylint: disable=g-import-not-at-top  (cycle-free, lazy)
  _choice(config.stage, "stage", (1, 2, 3))
  _positive(config, {"res": 1, "batch_size": 1, "accum_steps": 1, "seq_len": 2, "max_images": 1,
                     "total_steps": 1, "stop_at_step": 0, "log_every": 1, "checkpoint.every": 1,
                     "checkpoint.keep": 1, "data.num_workers": 0, "data.read_threads": 1, "data.packing_bins": 1,
                     "data.num_epochs": 0, "data.max_consecutive_skips": 0, "optimizer.warmup_steps": 0})
  if config.stop_at_step > config.total_steps:
    raise errors.ConfigError(f"config.stop_at_step={config.stop_at_step} is past config.total_steps="
                             f"{config.total_steps}, where the run ends anyway",
                             hint="a planned stop must come at or before total_steps; 0 = none")
  _choice(config.resume, "resume", ("auto", "force", "never"))
  _choice(config.distributed.initialize, "distributed.initialize", ("auto", "yes", "no"))
  _choice(config.optimizer.schedule, "optimizer.schedule", ("cosine", "constant"))
  _check_optimizer(config.optimizer)
  _choice(config.cpu_options, "cpu_options", ("auto", "on", "off"))
  try:
    cfg = model_config.get_preset(config.model, dtype=config.model_dtype, param_dtype=config.param_dtype,
                                  remat_policy=config.remat, attention_impl=config.attention_impl)
    cfg = cfg.with_image_size(config.res)
  except ValueError as e:
    raise errors.ConfigError(f"config.model={config.model!r} at config.res={config.res}: {e}") from e
  try:  # a kernel this backend cannot run (cudnn on a CPU, splash off TPU) fails at its first trace otherwise
    kernels.check_attention_impl(config.attention_impl, platform, dtype=cfg.dtype,
                                 head_dims=cfg.attention_head_dims)
  except ValueError as e:
    raise errors.ConfigError(f"config.attention_impl={config.attention_impl!r}: {e}") from e
  from qwenvl_jax.training import experiment  # pylint: disable=g-import-not-at-top  (cycle-free, lazy)
  try:
    peft.check_fields(config)
    experiment.frozen_patterns(config)  # what a LoRA run freezes against config.frozen / fix_vit
    # LoRA or QLoRA targets that match no projection or are narrower than the rank, a group size that does not
    # divide a quantized kernel (abstract: nothing allocated); they were a traceback from the model's first build.
    if peft.lora_config(config) is not None:
      nnx.eval_shape(peft.model_fn(cfg, config))
  except ValueError as e:
    if isinstance(e, errors.UserError):
      raise
    raise errors.ConfigError(str(e)) from e
  return cfg


def _check_tokenizer(config: ml_collections.ConfigDict, cfg: model_config.QwenVLConfig) -> None:
  spec = config.tokenizer
  if not spec:
    if not _MIN_SYNTHETIC_VOCAB <= config.synthetic_vocab_size <= cfg.llm.vocab_size:
      raise errors.ConfigError(
          f"config.synthetic_vocab_size={config.synthetic_vocab_size} must be in [{_MIN_SYNTHETIC_VOCAB}, "
          f"{cfg.llm.vocab_size}] (the model {config.model!r} has {cfg.llm.vocab_size} embedding rows)")
    return
  from qwenvl_jax import text  # pylint: disable=g-import-not-at-top
  try:  # the one spec parser of every entry point: qwen:PATH, sentencepiece:PATH, or a .tiktoken / .model file
    kind, path = text.parse_tokenizer_spec(spec)
  except ValueError as e:
    raise errors.ConfigError(f"config.tokenizer={spec!r}: {e} (or '' for the synthetic vocabulary)") from e
  if not os.path.isfile(path):
    raise errors.UserFileNotFoundError(f"config.tokenizer={spec!r}: {path} is not a file")
  try:
    tok = text.QwenTokenizer(path) if kind == "qwen" else text.SentencePieceTokenizer(path)
  except ValueError as e:
    raise errors.ConfigError(f"config.tokenizer={spec!r}: {e}") from e
  if tok.vocab_size > cfg.llm.vocab_size:
    raise errors.ConfigError(f"config.tokenizer={spec!r} defines {tok.vocab_size} ids but model {config.model!r} "
                             f"has only {cfg.llm.vocab_size} embedding rows; use a matching tokenizer or model")


def _check_data(config: ml_collections.ConfigDict) -> None:
  """Opens every source of the stage (files indexed, TFDS datasets looked up; nothing is decoded)."""
  from qwenvl_jax.data.pipeline import make_source_datasets  # pylint: disable=g-import-not-at-top
  try:
    make_source_datasets(config.data, stage=config.stage, image_size=config.res)
  except (ValueError, KeyError) as e:
    if isinstance(e, errors.UserError):
      raise
    raise errors.ConfigError(f"config.data: {e}") from e
