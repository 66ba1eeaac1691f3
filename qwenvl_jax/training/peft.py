"""Parameter-efficient fine-tuning in the trainer: the model a LoRA run builds, what it freezes, where it starts.

Letters: none (trees of parameters).

`config.lora.rank > 0` turns a stage into a LoRA run, as the official `finetune.py --use_lora` does:
* the model is the stage's model with its base weights held in `config.lora.base_dtype` (bf16: no float32 master
  copy of what never changes) and float32 adapters attached by `model.lora.apply_lora` on `config.lora.targets`
  (module-path regexes; default the official c_attn, attn.c_proj, w1, w2 of the LLM);
* everything but the adapters and `config.lora.modules_to_save` (`wte`, `lm_head`, trained in full in float32)
  is frozen, so only they get gradients and AdamW state;
* a fresh run starting from a params checkpoint (`config.init`) restores the base from it and initializes the
  adapters (B = 0, so step 0 is exactly the base model).
Trainer checkpoints hold the whole parameter tree (the bf16 base with the adapters): resuming needs nothing but the
workdir, and `convert --mode=merge_lora` / `--mode=export_peft` read the adapters from it.

Full fine-tuning has the same lever for what it freezes: `config.frozen_dtype='bfloat16'` holds the frozen
parameters (stage 3: the ViT, ln_post and proj; 1.84B at full size) in bf16 and the trained ones in
`config.param_dtype` (float32). With a bf16 compute dtype the forward pass is unchanged: every kernel is cast to
bf16 before its matmul anyway; only the float32 norms and biases of the frozen part are rounded.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import ml_collections
from flax import nnx

from qwenvl_jax import sharding
from qwenvl_jax.model import QwenVL, lora
from qwenvl_jax.model.config import QwenVLConfig
from qwenvl_jax.training.optimizer import make_is_frozen


def _items(value: str) -> tuple[str, ...]:
  return tuple(v.strip() for v in str(value or "").split(",") if v.strip())


def lora_config(config: ml_collections.ConfigDict) -> lora.LoraConfig | None:
  """The run's `LoraConfig`, or None when `config.lora.rank` is 0 (full fine-tuning)."""
  section = config.get("lora")
  if section is None or int(section.rank) == 0:
    return None
  return lora.LoraConfig(rank=int(section.rank), alpha=float(section.alpha), dropout=float(section.dropout),
                         targets=_items(section.targets), modules_to_save=_items(section.modules_to_save))


def frozen_dtype(config: ml_collections.ConfigDict) -> str | None:
  """The dtype a full fine-tuning run holds its frozen parameters in (`config.frozen_dtype`), or None (as trained).

  Raises:
    ValueError: an unknown dtype name, or the field set on a LoRA run (whose base dtype is `config.lora.base_dtype`).
  """
  name = str(config.get("frozen_dtype", "") or "")
  if not name:
    return None
  if name not in ("bfloat16", "float16", "float32"):
    raise ValueError(f"config.frozen_dtype={name!r}: expected '', 'bfloat16', 'float16' or 'float32'")
  if lora_config(config) is not None:
    raise ValueError(f"config.frozen_dtype={name!r} with config.lora.rank={config.lora.rank}: a LoRA run holds its "
                     "frozen base in config.lora.base_dtype")
  return name


def cast_frozen(model: QwenVL, is_frozen: Callable[[str], bool], dtype: str) -> QwenVL:
  """Casts every `nnx.Param` of `model` whose path ('visual/blocks/mlp/fc1/kernel') `is_frozen` to `dtype`, in
  place; returns `model`."""
  for path, var in nnx.iter_graph(model):
    if isinstance(var, nnx.Param) and is_frozen("/".join(map(str, path))):
      var.set_value(var.get_value().astype(dtype))
  return model


def model_fn(cfg: QwenVLConfig, config: ml_collections.ConfigDict, *, seed: int = 0) -> Callable[[], QwenVL]:
  """A function building the run's model: `QwenVL(cfg)` (its frozen parameters in `config.frozen_dtype` when
  set), or for a LoRA run the bf16 base with adapters."""
  lcfg, dtype = lora_config(config), frozen_dtype(config)
  if lcfg is None:
    if dtype is None:
      return lambda: QwenVL(cfg, rngs=nnx.Rngs(seed))
    # experiment imports this module; its frozen patterns (stage filters or config.frozen) are needed only here.
    from qwenvl_jax.training import experiment  # pylint: disable=import-outside-toplevel
    is_frozen = make_is_frozen(experiment.frozen_patterns(config))
    return lambda: cast_frozen(QwenVL(cfg, rngs=nnx.Rngs(seed)), is_frozen, dtype)
  base_cfg = dataclasses.replace(cfg, param_dtype=config.lora.base_dtype)

  def make():
    model = QwenVL(base_cfg, rngs=nnx.Rngs(seed))
    return lora.apply_lora(model, lcfg, rngs=nnx.Rngs(seed + 1))

  return make


def dropout_seed(config: ml_collections.ConfigDict, seed: int) -> int | None:
  """The train step's LoRA-dropout seed: `seed` for a LoRA run with dropout > 0, else None (no dropout)."""
  lcfg = lora_config(config)
  return seed if lcfg is not None and lcfg.dropout > 0 else None


def frozen_patterns(config: ml_collections.ConfigDict) -> tuple[str, ...] | None:
  """The frozen-path regexes of a LoRA run (everything but adapters and modules_to_save); None otherwise."""
  lcfg = lora_config(config)
  return None if lcfg is None else (lora.frozen_pattern(lcfg),)


def init_from_base(source: str, make_model: Callable[[], QwenVL], mesh, rules) -> dict:
  """The params pure dict of a fresh LoRA run: base weights restored from the params checkpoint `source`,
  adapters (and nothing else) initialized on device in their shardings."""
  from qwenvl_jax.checkpoint import restore_params  # pylint: disable=import-outside-toplevel
  _, abstract = sharding.abstract_model(make_model)
  shardings = sharding.state_shardings(abstract, rules, mesh)
  not_lora = nnx.Not(nnx.LoRAParam)
  base = restore_params(source, abstract.filter(not_lora), shardings.filter(not_lora))

  def adapters():
    return nnx.state(make_model(), nnx.LoRAParam)  # the base's init is dead code to XLA

  with sharding.use_rules(mesh, rules):
    fresh = jax.jit(adapters, out_shardings=shardings.filter(nnx.LoRAParam))()
  return nnx.to_pure_dict(nnx.merge_state(base, fresh))


def load_run(spec: str) -> tuple[QwenVL, lora.LoraConfig, ml_collections.ConfigDict]:
  """(model with its trained adapters, LoraConfig, the run's config) of a LoRA trainer run `WORKDIR[@STEP]`
  (default the latest step), restored on the local devices from the run's own config.json and checkpoint.

  Raises:
    ValueError: the run is not a LoRA run. FileNotFoundError: no config.json or checkpoint there.
  """
  import json  # pylint: disable=import-outside-toplevel
  import os  # pylint: disable=import-outside-toplevel
  from qwenvl_jax.checkpoint import restore_params  # pylint: disable=import-outside-toplevel
  from qwenvl_jax.model import config as model_config  # pylint: disable=import-outside-toplevel
  from qwenvl_jax.training.checkpointing import resolve_params_checkpoint  # pylint: disable=import-outside-toplevel
  workdir = spec.split("@")[0]
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: --src must be a trainer workdir (WORKDIR[@STEP]) of a LoRA run")
  with open(path, encoding="utf-8") as f:
    config = ml_collections.ConfigDict(json.load(f))
  lcfg = lora_config(config)
  if lcfg is None:
    raise ValueError(f"{workdir} is not a LoRA run (config.lora.rank is 0)")
  cfg = model_config.get_preset(config.model, dtype=config.model_dtype, param_dtype=config.param_dtype,
                                remat_policy="none", attention_impl="xla").with_image_size(config.res)
  make = model_fn(cfg, config, seed=config.seed)
  graphdef, abstract = sharding.abstract_model(make)
  mesh = sharding.make_mesh({"fsdp": -1})
  shardings = sharding.state_shardings(abstract, sharding.load_rules("fsdp"), mesh)
  state = restore_params(resolve_params_checkpoint("trainer:" + spec), abstract, shardings)
  return nnx.merge(graphdef, state), lcfg, config
