"""From an experiment ConfigDict to the objects a run needs: tokenizer, model config, mesh, filters.

Every function here reads a small part of the stage config (`configs/stage{1,2,3}.py`) and fails with a message
that names the offending config key.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile

from etils import epath
import jax
import ml_collections
import numpy as np

from qwenvl_jax import errors, sharding
from qwenvl_jax.checkpoint import run_layout
from qwenvl_jax.model import config as model_config
from qwenvl_jax.model import lora
from qwenvl_jax.training import peft, workdir as workdir_lib
from qwenvl_jax.training.optimizer import make_is_frozen, stage_frozen_patterns

def frozen_patterns(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The frozen-path regexes: `config.frozen` if set ('none' = train everything), else the stage's filters; a
  LoRA run (`config.lora.rank > 0`) freezes all but its adapters and modules_to_save (`training.peft`).

  Raises:
    ValueError: a LoRA run with `config.frozen` or `fix_vit=False`, or on default targets the stage freezes.
  """
  lora_frozen = peft.frozen_patterns(config)
  if lora_frozen is not None:
    if config.frozen:
      raise ValueError(f"config.frozen={config.frozen!r} with config.lora.rank={config.lora.rank}: a LoRA run "
                       "freezes everything but its adapters; use config.lora.modules_to_save to train more")
    if not config.get("fix_vit", True):  # it unfreezes the ViT of full fine-tuning; a LoRA run would ignore it
      raise ValueError(f"config.fix_vit=False with config.lora.rank={config.lora.rank}: a LoRA run freezes the whole "
                       "base, the ViT included; to adapt the ViT add 'visual/blocks/.*' to config.lora.targets")
    _check_default_targets(config)
    return lora_frozen
  if config.frozen == "none":
    return ()
  if config.frozen:
    return (config.frozen,)
  return stage_frozen_patterns(config.stage, fix_vit=config.fix_vit)


def _check_default_targets(config: ml_collections.ConfigDict) -> None:
  """Refuses a LoRA run on the default targets (the official LLM c_attn, attn.c_proj, w1, w2) of a stage that freezes
  them: stage 1 trains the ViT and adapter, and `lora=64` on it trained LLM adapters and left the ViT and adapter
  frozen, the opposite of the stage, without a word. Other targets are the user's choice (a ViT adapter in stage 3,
  an LLM one in stage 1)."""
  if set(peft.lora_config(config).targets) != set(lora.OFFICIAL_TARGETS):
    return
  is_frozen = make_is_frozen(stage_frozen_patterns(config.stage, fix_vit=config.get("fix_vit", True)))
  if all(is_frozen(f"{target}/kernel") for target in lora.OFFICIAL_TARGETS):
    raise errors.ConfigError(
        f"config.lora.rank={config.lora.rank} on stage {config.stage} adapts the default config.lora.targets (the "
        f"LLM's c_attn, attn.c_proj, w1, w2), which stage {config.stage} freezes: the run would train LLM adapters, "
        "not what the stage trains",
        hint=f"target what stage {config.stage} trains, e.g. --config.lora.targets='visual/blocks/.*,adapter/.*'; "
             "LoRA on the LLM is stage 3's (configs/stage3.py:lora=64)")


def _broadcast_bytes(data: bytes | None) -> bytes:
  """Process 0's bytes on every process (small payloads only; a no-op with one process)."""
  if jax.process_count() == 1:
    return data
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  size = multihost_utils.broadcast_one_to_all(np.int64(len(data) if data is not None else 0))
  buf = np.frombuffer(data, np.uint8) if data is not None else np.zeros(int(size), np.uint8)
  return np.asarray(multihost_utils.broadcast_one_to_all(buf)).tobytes()


def _init_run(init: str) -> epath.Path | None:
  """The training run whose weights `config.init` names: `trainer:WORKDIR[@STEP]`, or `params:` of a run's
  `<run>/checkpoints/<step>/params`; None for anything else (a converted checkpoint)."""
  kind, _, arg = init.partition(":")
  if kind == "trainer" and arg:
    return epath.Path(workdir_lib.absolute(run_layout.split_step(arg)[0]))
  found = run_layout.step_folder(arg) if kind == "params" and arg else None
  if found and epath.Path(arg).name == "params" and (epath.Path(found[0]) / "config.json").exists():
    return epath.Path(found[0])
  return None


def init_run_model(init: str) -> tuple[epath.Path, str] | None:
  """(run, its `config.model`) of the training run whose weights `config.init` names (`_init_run`), read from the
  run's config.json; None when `init` names no run or that file is missing or unreadable. A run's step records no
  preset of its own (a converted checkpoint's model card does)."""
  run = _init_run(init)
  if run is None or not (run / "config.json").is_file():
    return None
  try:
    model = json.loads((run / "config.json").read_text()).get("model")
  except (OSError, ValueError, AttributeError):
    return None
  return (run, model) if isinstance(model, str) and model else None


def _run_vocabulary(run: epath.Path, init: str) -> str | None:
  """The tokenizer spec of the run `run` (its config.tokenizer), or None when it trained on its own synthetic
  vocabulary, whose tokenizer.model `make_tokenizer` then copies."""
  spec = None
  if (run / "config.json").exists():
    try:
      spec = json.loads((run / "config.json").read_text()).get("tokenizer") or None
    except (ValueError, AttributeError) as e:
      raise errors.ConfigError(f"config.init={init!r}: {run / 'config.json'} is not a run's config ({e})") from e
  if spec is None and not (run / "tokenizer.model").exists():
    raise errors.ConfigError(
        f"config.init={init!r}: cannot tell which vocabulary {run}'s weights were trained with (no config.tokenizer "
        "in its config.json and no tokenizer.model)", hint="set --config.tokenizer to it")
  return spec


def inherit_tokenizer(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
  """`config`, or a copy whose empty `config.tokenizer` names the vocabulary the `config.init` weights were trained
  with: the tokenizer a converted `params:` checkpoint keeps (`checkpoint.model_card`; the spec points at that
  copy, so the checkpoint must stay where it is), or the other run's `config.tokenizer`. A run on the synthetic
  vocabulary keeps '', and `make_tokenizer` copies that run's tokenizer.model. A resumed run (`workdir` holds its
  config.json) keeps the tokenizer it recorded. '' used to mean a fresh synthetic vocabulary whatever the init,
  so a fine-tune of a converted Qwen-VL without --config.tokenizer trained on the wrong token ids without a word.

  Raises:
    errors.ConfigError: a `params:` directory that is no params checkpoint, or one that keeps no tokenizer (or
    keeps it on a remote path); a run whose vocabulary cannot be told.
  """
  init = config.get("init", "")
  if config.tokenizer or not init:
    return config
  recorded = epath.Path(workdir) / "config.json"  # a run config (`workdir.check_usable` refused anything else)
  if recorded.exists():
    spec = json.loads(recorded.read_text()).get("tokenizer") or None
  else:
    kind, _, arg = init.partition(":")
    run = _init_run(init)
    if run is not None:
      spec = _run_vocabulary(run, init) if run.is_dir() else None  # a missing run: validation names it
    elif kind == "params" and arg and epath.Path(workdir_lib.absolute(arg)).is_dir():
      spec = _converted_vocabulary(workdir_lib.absolute(arg), init)
    else:
      spec = None  # a missing or malformed init: validation names it
  if spec is None:
    return config
  config = copy.deepcopy(config)
  config.tokenizer = spec
  return config


def _converted_vocabulary(path: str, init: str) -> str:
  """The spec of the tokenizer the converted params checkpoint `path` keeps."""
  from qwenvl_jax.checkpoint import model_card, orbax_store  # pylint: disable=g-import-not-at-top
  if not orbax_store.is_params_dir(path):
    raise errors.ConfigError(f"config.init={init!r}: {path} is not a params checkpoint (no _METADATA)",
                             hint="a training run or its step: config.init=trainer:RUN[@STEP]")
  spec = model_card.recorded_tokenizer(path, model_card.recorded_model(path))
  if spec is None:
    raise errors.ConfigError(
        f"config.init={init!r} keeps no tokenizer, and config.tokenizer is '' (a new synthetic vocabulary, "
        "not the one those weights were trained with)",
        hint="set --config.tokenizer to its vocabulary, e.g. --config.tokenizer=qwen:/ckpt/Qwen-VL-Chat/qwen.tiktoken")
  if workdir_lib.is_remote(spec.partition(":")[2]):
    raise errors.ConfigError(f"config.init={init!r} keeps its tokenizer at {spec.partition(':')[2]}, and the "
                             "trainer reads tokenizers from local files",
                             hint="copy it to this machine and set --config.tokenizer=KIND:LOCAL_PATH")
  return spec


def make_tokenizer(config: ml_collections.ConfigDict, workdir: str):
  """The tokenizer `config.tokenizer` names.

  '' trains (or reloads) the synthetic dataset's SentencePiece model at `<workdir>/tokenizer.model`; process 0
  trains it and sends the bytes to the others, so hosts need no shared disk. A run that starts from another run
  (`config.init=trainer:...`) on the synthetic vocabulary copies that run's tokenizer.model instead (the same
  vocabulary its weights learned, whatever data.seed or synthetic_vocab_size now say). Anything else is a
  tokenizer spec (`text.load_tokenizer`: `qwen:PATH`, `sentencepiece:PATH`, or a `.tiktoken` / `.model` file).
  """
  from qwenvl_jax import text  # pylint: disable=g-import-not-at-top
  spec = config.tokenizer
  if spec:
    try:
      return text.load_tokenizer(spec)
    except ValueError as e:
      raise ValueError(f"config.tokenizer: {e} (or '' for the synthetic dataset's vocabulary)") from e
  # The workdir may be a gs:// URL (epath); SentencePiece loads from a local file.
  path = epath.Path(workdir) / "tokenizer.model"
  data = None
  if jax.process_index() == 0:
    init_run = _init_run(config.get("init", ""))
    if not path.exists() and init_run is not None and (init_run / "tokenizer.model").exists():
      data = (init_run / "tokenizer.model").read_bytes()
      path.write_bytes(data)
    elif not path.exists():
      from qwenvl_jax.data import train_synthetic_tokenizer  # pylint: disable=g-import-not-at-top
      with tempfile.TemporaryDirectory() as tmp:
        tok = train_synthetic_tokenizer(os.path.join(tmp, "synthetic"), vocab_size=config.synthetic_vocab_size,
                                        seed=config.data.seed)
        with open(tok.path, "rb") as f:
          data = f.read()
      path.write_bytes(data)
    else:
      data = path.read_bytes()
  data = _broadcast_bytes(data)
  local = os.fspath(path)
  if jax.process_index() != 0 or workdir_lib.is_remote(path):
    local = os.path.join(tempfile.mkdtemp(prefix="qwenvl_tokenizer_"), "tokenizer.model")
    with open(local, "wb") as f:
      f.write(data)
  return text.SentencePieceTokenizer(local)  # a foreign tokenizer.model was refused by `workdir.check_usable`


def make_model_config(config: ml_collections.ConfigDict, tokenizer) -> model_config.QwenVLConfig:
  """The preset `config.model` at `config.res` px with the run's numerics and the tokenizer's `<imgpad>` id."""
  cfg = model_config.get_preset(config.model, dtype=config.model_dtype, param_dtype=config.param_dtype,
                                remat_policy=config.remat, attention_impl=config.attention_impl,
                                image_pad_id=tokenizer.img_pad_id)
  cfg = cfg.with_image_size(config.res)
  if cpu_formulations(config):
    cfg = cfg.with_cpu_formulations()
  if tokenizer.vocab_size > cfg.llm.vocab_size:
    raise ValueError(f"the tokenizer defines {tokenizer.vocab_size} ids but model {config.model!r} has only "
                     f"{cfg.llm.vocab_size} embedding rows; use a matching config.tokenizer or model")
  return cfg


def cpu_formulations(config: ml_collections.ConfigDict) -> bool:
  """Whether the run builds its model in the CPU formulations: `config.cpu_options` 'on', or 'auto' on a CPU
  backend."""
  return config.cpu_options == "on" or (config.cpu_options == "auto" and jax.default_backend() == "cpu")


def make_mesh(config: ml_collections.ConfigDict) -> tuple[jax.sharding.Mesh, sharding.Rules]:
  """The (data, fsdp, tensor) mesh of `config.mesh.ici` / `config.mesh.dcn` and the rule table `config.mesh.rules`."""
  ici = {k: int(v) for k, v in config.mesh.ici.items()}
  dcn = {k: int(v) for k, v in config.mesh.dcn.items()}
  return sharding.make_mesh(ici, dcn), sharding.load_rules(config.mesh.rules)
