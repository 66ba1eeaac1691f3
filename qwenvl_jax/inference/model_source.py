"""What `--checkpoint` names, resolved into what an inference job loads: the params directory, the preset, the
image size, the tokenizer spec and the chat format.

`--checkpoint` may be
  * a training run directory (`<run>`, holding `config.json` and `checkpoints/<step>/params`): its latest step;
  * one checkpoint of a run (`<run>@<step>`, `<run>/checkpoints/<step>` or `<run>/checkpoints/<step>/params`);
  * a params checkpoint from `python -m qwenvl_jax.convert` (no run config: the preset, image size, chat format
    and tokenizer from the flags or else from what `convert` recorded in it, the tokenizer as a copy kept in the
    checkpoint directory; older checkpoints record only some of them);
  * nothing (random weights, for smoke tests).
A run's `config.json` gives the preset (`model`), the image size (`res`), the tokenizer (`''` = the run's own
`<run>/tokenizer.model`, `qwen:PATH`, `sentencepiece:PATH`) and the chat format (stage 3 trains on ChatML
conversations; stages 1-2 on raw text). Values the user passes explicitly win over the run's.

`check_preset` compares the stored parameter shapes with the chosen preset before anything is restored, and on a
mismatch names the differing parameters and the preset whose shapes do match (the restore itself would only say
that shapes differ).
"""

from __future__ import annotations

import dataclasses
import json
import os

from flax import nnx

from qwenvl_jax import errors, sharding
from qwenvl_jax import text as qtext
from qwenvl_jax.checkpoint import model_card, orbax_store, run_layout
from qwenvl_jax.model import QwenVL
from qwenvl_jax.model.config import PRESETS, QwenVLConfig, get_preset

DEFAULT_PRESET = "qwen_vl_7b"


@dataclasses.dataclass(frozen=True)
class ModelSource:
  """params: params checkpoint directory or None (random weights); preset: model preset name; image_size: input
  resolution or None (the preset's); tokenizer: tokenizer spec (`text.load_tokenizer`) or None; chat_format:
  'chatml' or 'raw'; run_dir and step: the training run and step the params come from (None for converted
  checkpoints)."""
  params: str | None
  preset: str
  image_size: int | None
  tokenizer: str | None
  chat_format: str
  run_dir: str | None = None
  step: int | None = None


def _latest_step(run_dir: str) -> int:
  steps = [s for s in run_layout.finished_steps(run_dir)
           if orbax_store.is_params_dir(os.path.join(run_dir, "checkpoints", str(s), "params"))]
  if not steps:
    raise FileNotFoundError(f"training run {run_dir} holds no finished checkpoint (no checkpoints/<step>/params)")
  return steps[-1]


def _run_tokenizer(run_dir: str, spec: str) -> str:
  """The tokenizer spec of a run: its `config.tokenizer` (checked by the one spec parser), or '' = the run's own
  synthetic SentencePiece model."""
  if spec:
    try:
      qtext.parse_tokenizer_spec(spec)
    except ValueError as e:
      raise errors.ConfigError(f"{run_dir}/config.json: {e}") from e
    return spec
  return os.path.join(run_dir, "tokenizer.model")


def resolve(checkpoint: str | None, *, model: str | None = None, tokenizer: str | None = None,
            image_size: int | None = None, chat_format: str | None = None) -> ModelSource:
  """The `ModelSource` of `checkpoint` (see the module docstring); explicit arguments override the run's config.

  Raises:
    FileNotFoundError: the path does not exist, or is neither a run, a run's checkpoint nor a params directory.
  """
  if not checkpoint:
    return ModelSource(None, model or DEFAULT_PRESET, image_size, tokenizer, chat_format or "chatml")
  path = os.path.abspath(checkpoint)
  run, step_text = run_layout.split_step(checkpoint)
  if step_text and os.path.isdir(os.path.join(run, "checkpoints")):
    # RUN@STEP, as config.init=trainer:RUN@STEP and convert --src=RUN@STEP spell a run's step.
    if not step_text.isdigit():
      raise errors.ConfigError(f"checkpoint {checkpoint!r}: the step after '@' must be a number (RUN@STEP)")
    path = os.path.abspath(os.path.join(run, "checkpoints", str(int(step_text))))
    if not os.path.isdir(path):
      steps = run_layout.finished_steps(run)
      raise FileNotFoundError(f"checkpoint {checkpoint!r}: {run} has no step {int(step_text)} (its steps: "
                              f"{', '.join(map(str, steps)) or 'none'})")
  if not os.path.isdir(path):
    what = "is a file, not a checkpoint folder" if os.path.exists(path) else "does not exist"
    raise FileNotFoundError(f"checkpoint {checkpoint!r} {what}")
  run_dir = step = None
  if os.path.isfile(os.path.join(path, "config.json")) and os.path.isdir(os.path.join(path, "checkpoints")):
    run_dir, step = path, _latest_step(path)
  elif found := run_layout.step_folder(path):
    run_dir, step = found
  step_dir = os.path.dirname(path)
  if run_dir is None and os.path.basename(path) in ("opt_state", "data", "meta") and run_layout.step_folder(step_dir):
    # A sibling of a step's params (opt_state, data, meta): opt_state has a _METADATA too, so it would be taken
    # for a params checkpoint and fail deep inside the restore.
    raise errors.UserFileNotFoundError(
        f"checkpoint {checkpoint!r} is the {os.path.basename(path)!r} folder of a training run's step, not its "
        "model parameters",
        hint=f"pass the step ({step_dir}) or its params folder ({os.path.join(step_dir, 'params')})")
  if run_dir is None:
    if not orbax_store.is_params_dir(path):
      raise FileNotFoundError(f"{checkpoint} is neither a training run (config.json + checkpoints/), a run's "
                              "checkpoints/<step>, nor a params checkpoint (no _METADATA)" + _pytorch_kind(path))
    recorded = model_card.recorded_model(path)  # what `convert` wrote it for (`checkpoint.model_metadata`)
    return ModelSource(path, model or recorded.get("preset") or DEFAULT_PRESET,
                       image_size or recorded.get("image_size"),
                       tokenizer or model_card.recorded_tokenizer(path, recorded),
                       chat_format or model_card.recorded_chat_format(path, recorded) or "chatml")
  params = os.path.join(run_dir, "checkpoints", str(step), "params")
  if not orbax_store.is_params_dir(params):
    raise FileNotFoundError(f"{params} is not a params checkpoint (the save did not finish?)")
  config_path = os.path.join(run_dir, "config.json")
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"{run_dir} has checkpoints but no config.json: pass --model and --tokenizer and "
                            f"point --checkpoint at {params}")
  with open(config_path, encoding="utf-8") as f:
    run = json.load(f)
  card = run_model(run_dir, run)
  if int((run.get("lora") or {}).get("rank", 0) or 0) > 0:
    # Its checkpoints hold the base (bf16, or QLoRA's 4-bit codes) plus adapters, not the plain model's tree.
    # The merged checkpoint records the run's preset, image size, chat format and tokenizer (a copy).
    raise errors.ConfigError(
        f"{run_dir} is a LoRA/QLoRA run: merge its adapters first, then use the merged params checkpoint in its "
        "place",
        # generate, serve, evaluate and convert --mode=quantize all land here: name no one command's flags.
        hint=f"python -m qwenvl_jax.convert --mode=merge_lora --src={run_dir}@{step} --dst=MERGED, then pass "
             f"MERGED in place of {checkpoint}")
  return ModelSource(params, model or card["preset"], image_size or card["image_size"],
                     tokenizer or card["tokenizer"], chat_format or card["chat_format"], run_dir, step)


def run_model(run_dir: str, run: dict) -> dict:
  """What a training run's config (`run`, its parsed config.json) says of its model, in the keys of
  `checkpoint.model_card.recorded_model`: preset (`model`), image size (`res`), tokenizer spec, and chat format
  (stage 3 trains on ChatML conversations; stages 1-2 on raw text)."""
  return {"preset": run.get("model", DEFAULT_PRESET), "image_size": run.get("res"),
          "tokenizer": _run_tokenizer(run_dir, run.get("tokenizer", "")),
          "chat_format": "chatml" if run.get("stage") == 3 else "raw"}


def _shapes(cfg: QwenVLConfig) -> dict[str, tuple[int, ...]]:
  """Dotted path -> shape of every stored variable of `QwenVL(cfg)` (abstract: nothing is allocated)."""
  from qwenvl_jax.checkpoint import orbax_store  # pylint: disable=import-outside-toplevel  (slow to import)
  _, abstract_state = sharding.abstract_model(lambda: QwenVL(cfg, rngs=nnx.Rngs(0)))
  return {k: v[0] for k, v in orbax_store.param_shapes(abstract_state).items()}


def check_preset(params: str, cfg: QwenVLConfig, preset: str) -> None:
  """Raises errors.ConfigError (a ValueError) when the parameters stored at `params` do not have the shapes of `cfg`
  (preset `preset`): the message lists the differing parameters (stored vs preset) and names a preset that matches,
  if any."""
  from qwenvl_jax.checkpoint import ParamReader  # pylint: disable=import-outside-toplevel
  stored = {k: tuple(v[0]) for k, v in ParamReader(params).shapes.items()}
  expected = _shapes(cfg)
  diffs = [f"{k}: stored {stored.get(k, 'absent')}, preset {expected.get(k, 'absent')}"
           for k in sorted(set(stored) | set(expected)) if stored.get(k) != expected.get(k)]
  if not diffs:
    return
  vocab = stored.get("llm.wte.embedding", (cfg.llm.vocab_size,))[0]
  matching = []
  for name in PRESETS:
    if name == preset:
      continue
    other = get_preset(name, dtype=cfg.dtype, param_dtype=cfg.param_dtype, image_pad_id=0)
    other = dataclasses.replace(other, llm=dataclasses.replace(other.llm, vocab_size=vocab))
    other = other.with_image_size(cfg.vision.image_size)
    if _shapes(other) == stored:
      matching.append(name)
  hint = (f"the stored shapes are those of preset {matching[0]!r}: pass --model={matching[0]}" if matching
          else "no preset has these shapes")
  shown = "; ".join(diffs[:6]) + (f"; and {len(diffs) - 6} more" if len(diffs) > 6 else "")
  raise errors.ConfigError(f"checkpoint {params} does not fit preset {preset!r} ({len(diffs)} parameters differ: "
                           f"{shown}); {hint}")


def _pytorch_kind(path: str) -> str:
  """What to do with a folder of PyTorch weights given where a JAX checkpoint belongs ('' for anything else): a
  PEFT adapter (`convert --mode=export_peft`'s output, or one from the official LoRA recipe) or a Hugging Face
  checkpoint (the released weights, `convert --mode=orbax_to_torch`'s output)."""
  if not os.path.isdir(path):
    return ""
  names = set(os.listdir(path))
  if "adapter_config.json" in names:
    return ("; it is a PEFT adapter for PyTorch, which loads here only merged into its base: for one of our LoRA "
            "runs, convert --mode=merge_lora --src=RUN --dst=MERGED; for one trained in PyTorch, peft's "
            "merge_and_unload() and save_pretrained(), then convert --mode=torch_to_orbax")
  if any(n.endswith((".safetensors", ".bin")) for n in names):
    return (f"; it holds PyTorch weights: python -m qwenvl_jax.convert --mode=torch_to_orbax --src={path} "
            "--dst=PARAMS converts them")
  return ""
