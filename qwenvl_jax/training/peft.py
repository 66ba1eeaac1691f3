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

QLoRA (`config.lora.base_quantize` = nf4 | int4 | int8, shorthand `configs/stage3.py:qlora=64`): the projections
matched by `config.lora.quantize_targets` (default every LLM block projection: c_attn, attn.c_proj, w1, w2,
mlp.c_proj) are replaced by `model.quantize.QuantizedEinsum`s before the adapters attach, so the frozen base of
those layers is held as 4-bit codes + float32 per-group scales (`config.lora.quantize_group` inputs per group, 64
as in the QLoRA paper; int8: one scale per output channel) and computed in the compute dtype (bf16); everything
else of the base (ViT, adapter, embeddings, lm_head, norms) stays in `base_dtype`. Adapters and their AdamW state
are float32 as for LoRA. The codes are parameters of the frozen set: no gradient (the step differentiates the
trainable leaves only) and no optimizer state; trainer checkpoints store them as they are (4-bit), so a QLoRA run
resumes from its workdir alone. A fresh run from a float params checkpoint quantizes it kernel by kernel while
restoring.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable

import jax
import ml_collections
from flax import nnx

from qwenvl_jax import errors, sharding, tree_paths
from qwenvl_jax.model import QwenVL, layers, lora
from qwenvl_jax.model import quantize as qlib
from qwenvl_jax.model.config import QwenVLConfig
from qwenvl_jax.training.optimizer import make_is_frozen

# What QLoRA quantizes by default: every projection of the LLM's decoder blocks (the LoRA targets and mlp.c_proj).
QLORA_TARGETS = ("llm/blocks/.*",)
QLORA_GROUP = 64  # inputs per scale of the 4-bit codes: the QLoRA paper's blocks
QLORA_MODES = ("nf4", "int4", "int8")


def _items(value: str) -> tuple[str, ...]:
  return tuple(v.strip() for v in str(value or "").split(",") if v.strip())


def _named(e: ValueError) -> errors.ConfigError:
  """A `model.lora` error about a field (`lora.rank=...`) as the trainer config's: `config.lora.rank=...`."""
  message = str(e)
  return errors.ConfigError("config." + message if message.startswith("lora.") else message)


def lora_config(config: ml_collections.ConfigDict) -> lora.LoraConfig | None:
  """The run's `LoraConfig`, or None when `config.lora.rank` is 0 (full fine-tuning).

  Raises:
    errors.ConfigError: a negative rank, or a field `LoraConfig` refuses (named as `config.lora.<field>`).
  """
  section = config.get("lora")
  if section is None:
    return None
  rank = section.rank
  if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
    raise errors.ConfigError(f"config.lora.rank={rank!r} must be an integer >= 0 (the LoRA rank; 0 = no LoRA, "
                             "full fine-tuning)")
  if rank == 0:
    return None
  try:
    return lora.LoraConfig(rank=rank, alpha=float(section.alpha), dropout=float(section.dropout),
                           targets=_items(section.targets), modules_to_save=_items(section.modules_to_save))
  except ValueError as e:
    raise _named(e) from e


def check_fields(config: ml_collections.ConfigDict) -> None:
  """The fields of a training config this module reads, checked without a model: `lora_config`'s,
  `base_quantization`'s and `frozen_dtype`'s checks, plus what a full fine-tuning run or the chunked loss would
  silently ignore.

  Raises:
    ValueError (errors.ConfigError for most): naming the config key.
  """
  lcfg = lora_config(config)
  base_quantization(config)
  frozen_dtype(config)  # an unknown name was a ValueError traceback from the trainer's model build
  if lcfg is None:
    section = config.get("lora")  # a config written before LoRA existed has none
    saved = _items(section.get("modules_to_save", "")) if section is not None else ()
    if saved:  # full fine-tuning trains what the stage trains; this field would change nothing, without a word
      raise errors.ConfigError(f"config.lora.modules_to_save={','.join(saved)!r} needs config.lora.rank > 0: it "
                               "names what a LoRA run trains in full besides its adapters")
    return
  if config.get("loss_chunk", 0) > 0 and any(re.fullmatch(t, "llm/lm_head") for t in lcfg.targets):
    # The chunked loss multiplies by lm_head's kernel itself (training/step.py): an adapter there never runs.
    raise errors.ConfigError(
        f"config.lora.targets={','.join(lcfg.targets)!r} matches llm/lm_head, whose adapter the chunked loss "
        f"(config.loss_chunk={config.loss_chunk}) never calls: it would stay zero",
        hint="train lm_head in full with config.lora.modules_to_save=lm_head, or target e.g. 'llm/blocks/.*'")


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


def base_quantization(config: ml_collections.ConfigDict) -> tuple[qlib.QuantConfig, tuple[str, ...]] | None:
  """(QuantConfig, module-path regexes to quantize) of a QLoRA run, or None (LoRA on a float base, or no LoRA).

  Raises:
    ValueError: an unknown `config.lora.base_quantize`, a group size that is not a power of two (nf4 / int4) or not
      the default (int8, which has no groups), or QLoRA without LoRA (rank 0).
  """
  section = config.get("lora")
  mode = str(section.get("base_quantize", "") or "") if section is not None else ""
  if not mode:
    return None
  if mode not in QLORA_MODES:
    raise ValueError(f"config.lora.base_quantize={mode!r}: expected '' (a bf16 base: LoRA) or one of "
                     f"{', '.join(QLORA_MODES)} (QLoRA)")
  if int(section.rank) == 0:
    raise ValueError(f"config.lora.base_quantize={mode!r} needs LoRA adapters: set config.lora.rank > 0 (or use "
                     "configs/stage3.py:qlora=64)")
  group = section.get("quantize_group", QLORA_GROUP)
  if mode == "int8":  # one scale per output channel (model.quantize): a group size other than the default is ignored
    if group != QLORA_GROUP:
      raise errors.ConfigError(f"config.lora.quantize_group={group!r} is the group size of nf4 / int4 codes: "
                               "config.lora.base_quantize='int8' holds one scale per output channel and ignores it",
                               hint=f"leave config.lora.quantize_group at {QLORA_GROUP}, or use "
                                    "config.lora.base_quantize=nf4 (or int4) for groups")
  elif isinstance(group, bool) or not isinstance(group, int) or group < 1 or group & (group - 1):
    # QuantConfig's rule, said with the config key
    raise ValueError(f"config.lora.quantize_group={group!r} must be a power of two (e.g. 64, the QLoRA paper's)")
  targets = _items(section.get("quantize_targets", ",".join(QLORA_TARGETS)))
  tree_paths.compile_patterns(targets, "config.lora.quantize_targets:")
  if any(re.fullmatch(t, "llm/lm_head") for t in targets):
    raise ValueError(f"config.lora.quantize_targets={','.join(targets)!r} matches llm/lm_head, which stays in "
                     "base_dtype (the chunked loss reads its kernel); quantize e.g. 'llm/blocks/.*,visual/blocks/.*'")
  return qlib.QuantConfig(mode=mode, group_size=group, embeddings=False), targets


def model_fn(cfg: QwenVLConfig, config: ml_collections.ConfigDict, *, seed: int = 0) -> Callable[[], QwenVL]:
  """A function building the run's model: `QwenVL(cfg)` (its frozen parameters in `config.frozen_dtype` when
  set), or for a LoRA run the bf16 base with adapters (QLoRA: with its target projections quantized first)."""
  lcfg, dtype = lora_config(config), frozen_dtype(config)
  if lcfg is None:
    if dtype is None:
      return lambda: QwenVL(cfg, rngs=nnx.Rngs(seed))
    # experiment imports this module; its frozen patterns (stage filters or config.frozen) are needed only here.
    from qwenvl_jax.training import experiment  # pylint: disable=import-outside-toplevel
    is_frozen = make_is_frozen(experiment.frozen_patterns(config))
    return lambda: cast_frozen(QwenVL(cfg, rngs=nnx.Rngs(seed)), is_frozen, dtype)
  try:
    base_cfg = dataclasses.replace(cfg, param_dtype=config.lora.base_dtype)
  except ValueError as e:  # "unknown param_dtype", a field the user never set
    raise errors.ConfigError(f"config.lora.base_dtype={config.lora.base_dtype!r}: {e}") from e
  quant = base_quantization(config)

  def make():
    model = QwenVL(base_cfg, rngs=nnx.Rngs(seed))
    if quant is not None:
      _check_groups(model, *quant)
      qlib.quantize_model(model, quant[0], only=quant[1], what="config.lora.quantize_targets:")
    try:
      return lora.apply_lora(model, lcfg, rngs=nnx.Rngs(seed + 1))
    except ValueError as e:
      raise _named(e) from e

  return make


def _check_groups(model: QwenVL, qcfg: qlib.QuantConfig, targets: tuple[str, ...]) -> None:
  """Refuses a 4-bit group size that does not divide the inputs of a kernel it quantizes: `model.quantize` would
  give that kernel one scale per output channel instead of groups, without a word."""
  if qcfg.mode == "int8":  # per channel: no groups
    return
  lengths = {}
  for p, m in nnx.iter_modules(model):
    path = "/".join(map(str, p))
    if isinstance(m, layers.Einsum) and any(re.fullmatch(t, path) for t in targets):
      lengths[path] = m.kernel.shape[qlib.contracted_axes(m.spec, m.kernel.ndim)[-1]]  # the grouped axis
  bad = sorted(p for p, n in lengths.items() if n > qcfg.group_size and n % qcfg.group_size)
  if bad:
    fits = qcfg.group_size
    while any(n > fits and n % fits for n in lengths.values()):
      fits //= 2
    raise errors.ConfigError(
        f"config.lora.quantize_group={qcfg.group_size} does not divide the {lengths[bad[0]]} inputs of {bad[0]}"
        + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else "") + f": its {qcfg.mode} codes would get one scale "
        f"per output channel instead of groups; use a group size that divides every target's inputs, e.g. {fits}")


def trained_summary(config: ml_collections.ConfigDict, abstract_state: nnx.State) -> str | None:
  """What a LoRA run trains, for the trainer's start line ('LoRA r=8 on llm/blocks/attn/qkv, ...: 12,345 trained
  parameters, the rest frozen'), or None for full fine-tuning. The frozen-path regex said nothing to a reader."""
  lcfg = lora_config(config)
  if lcfg is None:
    return None
  saved = f" + {', '.join(lcfg.modules_to_save)} in full" if lcfg.modules_to_save else ""
  quant = base_quantization(config)
  codes = f" ({', '.join(quant[1])} as {quant[0].mode} codes)" if quant else ""
  return (f"LoRA r={lcfg.rank} on {', '.join(lcfg.targets)}{saved}: {lora.trained_count(abstract_state, lcfg):,} "
          f"trained parameters, the rest frozen{codes}")


def dropout_seed(config: ml_collections.ConfigDict, seed: int) -> int | None:
  """The train step's LoRA-dropout seed: `seed` for a LoRA run with dropout > 0, else None (no dropout)."""
  lcfg = lora_config(config)
  return seed if lcfg is not None and lcfg.dropout > 0 else None


def frozen_patterns(config: ml_collections.ConfigDict) -> tuple[str, ...] | None:
  """The frozen-path regexes of a LoRA run (everything but adapters and modules_to_save); None otherwise."""
  lcfg = lora_config(config)
  return None if lcfg is None else (lora.frozen_pattern(lcfg),)


def _quantized_modules(model: QwenVL) -> dict[str, qlib.QuantizedEinsum]:
  """{dotted module path: module} of the quantized projections (QLoRA) of a (possibly abstract) model."""
  return {".".join(map(str, p)): m for p, m in nnx.iter_modules(model) if isinstance(m, qlib.QuantizedEinsum)}


def init_tree(make_model: Callable[[], QwenVL]) -> dict[str, tuple[tuple[int, ...], None]]:
  """{dotted name: (shape, None)} of the float params checkpoint that a fresh run of `make_model` starts from
  (`config.init`): the model's parameters without LoRA adapters, each quantized projection (QLoRA) as its float
  `kernel` (the codes have the kernel's shape; the scales are computed while restoring). Nothing is allocated."""
  from qwenvl_jax.tree_paths import flatten  # pylint: disable=import-outside-toplevel
  model = nnx.eval_shape(make_model)
  modules = _quantized_modules(model)
  expected = {}
  for name, value in flatten(nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.LoRAParam)))).items():
    module, leaf = name.rsplit(".", 1)
    if module in modules and leaf == "scale":
      continue
    expected[f"{module}.kernel" if module in modules and leaf == "qvalue" else name] = (tuple(value.shape), None)
  return expected


def init_from_base(source: str, make_model: Callable[[], QwenVL], mesh, rules,
                   quant: qlib.QuantConfig | None = None) -> dict:
  """The params pure dict of a fresh LoRA run: base weights restored from the params checkpoint `source`,
  adapters (and nothing else) initialized on device in their shardings.

  quant: a QLoRA run's QuantConfig (`base_quantization`): `source` is a float checkpoint whose kernels of the
  quantized projections are quantized one at a time while restoring (peak: the quantized model + one float32
  kernel).
  """
  from qwenvl_jax.checkpoint import restore_params  # pylint: disable=import-outside-toplevel
  _, abstract = sharding.abstract_model(make_model)
  # Shardings are computed per filtered state: a state of NamedShardings has no variable types left to filter by.
  base_abstract, lora_abstract = abstract.filter(nnx.Not(nnx.LoRAParam)), abstract.filter(nnx.LoRAParam)
  base_shardings = sharding.state_shardings(base_abstract, rules, mesh)
  if quant is None:
    base = restore_params(source, base_abstract, base_shardings)
  else:
    base = _restore_quantizing(source, base_abstract, base_shardings, make_model, quant)

  def adapters():
    return nnx.state(make_model(), nnx.LoRAParam)  # the base's init is dead code to XLA

  with sharding.use_rules(mesh, rules):
    fresh = jax.jit(adapters, out_shardings=sharding.state_shardings(lora_abstract, rules, mesh))()
  return nnx.to_pure_dict(nnx.merge_state(base, fresh))


def _restore_quantizing(source: str, abstract: nnx.State, shardings: nnx.State, make_model: Callable[[], QwenVL],
                        qcfg: qlib.QuantConfig) -> nnx.State:
  """The QLoRA base state (`abstract`: quantized targets, no adapters) from the float params checkpoint `source`.

  Every leaf is read shard by shard (`jax.make_array_from_callback` over `checkpoint.ParamReader`, so each process
  reads only its own shards); a quantized module's float `kernel` is read in float32 in its codes' sharding,
  quantized by a jitted `quantize_array` and freed before the next one is read.
  """
  import numpy as np  # pylint: disable=import-outside-toplevel
  from qwenvl_jax.checkpoint.orbax_store import ParamReader, check_tree  # pylint: disable=import-outside-toplevel
  from qwenvl_jax.tree_paths import flatten, unflatten  # pylint: disable=import-outside-toplevel
  reader = ParamReader(source)
  modules = _quantized_modules(nnx.eval_shape(make_model))
  values, specs = flatten(nnx.to_pure_dict(abstract)), flatten(nnx.to_pure_dict(shardings))
  check_tree(reader.shapes, init_tree(make_model), f"checkpoint {source}")

  def read(name, shape, dtype, spec):
    return jax.make_array_from_callback(shape, spec, lambda idx: np.asarray(reader.read(name, idx), dtype))

  out = {}
  for module, m in sorted(modules.items()):
    qv, sc = f"{module}.qvalue", f"{module}.scale"
    contracted = qlib.contracted_axes(m.spec, m.qvalue.ndim)
    fn = jax.jit(lambda x, c=contracted: qlib.quantize_array(x, c, qcfg), out_shardings=(specs[qv], specs[sc]))
    w = read(f"{module}.kernel", values[qv].shape, np.float32, specs[qv])
    out[qv], out[sc] = fn(w)
    w.delete()
  for name, value in values.items():
    if name not in out:
      out[name] = read(name, value.shape, np.dtype(value.dtype), specs[name])
  state = jax.tree.map(lambda x: x, abstract)
  nnx.replace_by_pure_dict(state, unflatten(out))
  return state


def run_spec(spec: str) -> tuple[str, int | None]:
  """(workdir, step or None for the latest) of a LoRA run as `convert --mode=merge_lora / export_peft` take it:
  `WORKDIR`, `WORKDIR@STEP`, or the step's folder `WORKDIR/checkpoints/STEP[/params]`, which generate and serve
  take for a run's step (it used to be read as a workdir: "checkpoints/STEP/config.json not found").

  Raises:
    FileNotFoundError: the path does not exist, or is a params checkpoint (already merged or converted: there are
      no adapters to read). ValueError: a step after '@' that is not a number.
  """
  import os  # pylint: disable=import-outside-toplevel
  from qwenvl_jax.checkpoint import orbax_store, run_layout  # pylint: disable=import-outside-toplevel
  workdir, step = run_layout.split_step(spec)  # the last '@', unless the whole is a path (a folder named with an '@')
  if step and not step.isdigit():
    raise ValueError(f"the step after '@' in {spec!r} must be a number (WORKDIR@STEP), got {step!r}")
  found = None if step else run_layout.step_folder(workdir)
  if found:
    workdir, step = found[0], str(found[1])
  if not os.path.exists(workdir):
    raise FileNotFoundError(f"{workdir} does not exist (--src names a LoRA run's workdir: WORKDIR[@STEP])")
  if orbax_store.is_params_dir(workdir) and not os.path.exists(os.path.join(workdir, "config.json")):
    raise FileNotFoundError(f"{workdir} is a params checkpoint, not a LoRA training run: it holds no adapters "
                            "(a merged one is used as it is); --src must be the run's workdir (WORKDIR[@STEP])")
  return workdir, int(step) if step else None


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
  from qwenvl_jax.checkpoint.run_layout import finished_steps  # pylint: disable=import-outside-toplevel
  workdir, step = run_spec(spec)
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: --src must be a trainer workdir (WORKDIR[@STEP]) of a LoRA run")
  with open(path, encoding="utf-8") as f:
    config = ml_collections.ConfigDict(json.load(f))
  lcfg = lora_config(config)
  if lcfg is None:
    if "lora" not in config and not os.path.isdir(os.path.join(workdir, "checkpoints")):  # e.g. a Hugging Face folder
      raise errors.ConfigError(f"{workdir} is not a training run (no checkpoints/ beside its config.json)",
                               hint="pass the workdir of a LoRA run (WORKDIR[@STEP])")
    raise errors.ConfigError(f"{workdir} is not a LoRA run (config.lora.rank is 0)",
                             hint="its checkpoints hold the whole model, no adapters: use the run as it is "
                                  "(--checkpoint), or export it with --mode=orbax_to_torch")
  steps = finished_steps(workdir)
  if not steps:
    raise FileNotFoundError(f"{workdir} holds no finished checkpoint yet (train the run first)")
  if step is not None and step not in steps:
    raise FileNotFoundError(f"{workdir} has no finished step {step} (its steps: {', '.join(map(str, steps))})")
  # The step's own folder: a workdir whose name holds an '@' is not split again ("trainer:" + spec was).
  params = os.path.join(workdir, "checkpoints", str(steps[-1] if step is None else step), "params")
  cfg = model_config.get_preset(config.model, dtype=config.model_dtype, param_dtype=config.param_dtype,
                                remat_policy="none", attention_impl="xla").with_image_size(config.res)
  make = model_fn(cfg, config, seed=config.seed)
  graphdef, abstract = sharding.abstract_model(make)
  mesh = sharding.make_mesh({"fsdp": -1})
  shardings = sharding.state_shardings(abstract, sharding.load_rules("fsdp"), mesh)
  state = restore_params(params, abstract, shardings)
  return nnx.merge(graphdef, state), lcfg, config
